"""The land-analysis commands: a run through each, and bad input answered in one line with nothing written."""
from __future__ import annotations

import geopandas as gpd
import pytest
import rasterio
import shapely

from dinov3_geo.cli import main
from dinov3_geo.testing.random_backbone import write_random_backbone

NAIP_2020 = "opengeos_naip_m_4709963_se_14_1_20200831.tif"
FAST = ["--tile", "128", "--overlap", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bb")
    return write_random_backbone(folder / "a", seed=0), write_random_backbone(folder / "b", seed=1)


def one_error_line(capsys, code: int, rc: int) -> str:
    """The exit code and the one ``error:`` line, which ends the output (no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert rc == code and len(errors) == 1 and err[-1] == errors[0], err
    assert not any("Traceback" in line for line in err), err
    return errors[0]


def test_embed_similar_cluster_through_the_command(sample, tmp_path, backbones, capsys):
    scene, (bb, _) = sample("stars_L7_ETMs.tif"), backbones
    feats, sim, units = tmp_path / "feats.zarr", tmp_path / "sim.tif", tmp_path / "units.tif"
    assert main(["embed", str(scene), "-o", str(feats), "--patch", "--backbone", str(bb), *FAST]) == 0
    with rasterio.open(scene) as ds:
        x, y = ds.xy(100, 100)
    assert main(["similar", str(scene), "-o", str(sim), "--at", f"{x},{y}", "--features", str(feats),
                 "--backbone", str(bb), *FAST]) == 0
    assert main(["cluster", str(scene), "-o", str(units), "-k", "3", "--features", str(feats),
                 "--backbone", str(bb), *FAST]) == 0
    assert "wrote" in capsys.readouterr().err
    with rasterio.open(sim) as a, rasterio.open(units) as b, rasterio.open(scene) as ds:
        assert a.shape == b.shape == ds.shape and a.crs == b.crs == ds.crs


def test_point_outside_the_scene(sample, tmp_path, backbones, capsys):
    out = tmp_path / "sim.tif"
    rc = main(["similar", str(sample(NAIP_2020)), "-o", str(out), "--at", "0,0", "--backbone", str(backbones[0]), *FAST])
    line = one_error_line(capsys, 2, rc)
    assert f"--at: point 0,0 is outside {sample(NAIP_2020)} (x 485899 to 490569" in line
    assert list(tmp_path.iterdir()) == []


def test_polygons_outside_the_scene(sample, tmp_path, backbones, capsys):
    far = tmp_path / "far.gpkg"
    gpd.GeoDataFrame(geometry=[shapely.box(10, 10, 11, 11)], crs="EPSG:4326").to_file(far)   # off Africa
    out = tmp_path / "sim.tif"
    rc = main(["similar", str(sample(NAIP_2020)), "-o", str(out), "--like", str(far), "--backbone",
               str(backbones[0]), *FAST])
    assert "--like: the polygons of" in one_error_line(capsys, 2, rc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["far.gpkg"]


def test_dates_that_do_not_overlap(sample, tmp_path, backbones, capsys):
    out = tmp_path / "change.tif"
    rc = main(["change", str(sample(NAIP_2020)), str(sample("stars_L7_ETMs.tif")), "-o", str(out),
               "--backbone", str(backbones[0]), *FAST])
    assert "does not overlap" in one_error_line(capsys, 1, rc)
    assert list(tmp_path.iterdir()) == []


def test_fewer_than_two_clusters(sample, tmp_path, backbones, capsys):
    rc = main(["cluster", str(sample(NAIP_2020)), "-o", str(tmp_path / "c.tif"), "-k", "1",
               "--backbone", str(backbones[0]), *FAST])
    assert "-k: k must be a whole number from 2" in one_error_line(capsys, 2, rc)
    assert list(tmp_path.iterdir()) == []


def test_features_from_another_backbone(sample, tmp_path, backbones, capsys):
    scene, (a, b) = sample("stars_L7_ETMs.tif"), backbones
    feats = tmp_path / "feats.zarr"
    assert main(["embed", str(scene), "-o", str(feats), "--patch", "--backbone", str(a), *FAST]) == 0
    capsys.readouterr()
    rc = main(["cluster", str(scene), "-o", str(tmp_path / "c.tif"), "--features", str(feats),
               "--backbone", str(b), *FAST])
    assert f"{feats}: features made with backbone" in one_error_line(capsys, 1, rc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.zarr", "feats.zarr.stac.json"]


def test_point_on_a_scene_without_georeference_is_where_gis_tools_draw_it(sample, tmp_path, backbones, capsys):
    """A scene without CRS or geotransform (a Chesapeake chip) lies at x = column, y = -row in QGIS
    and in the explorer: ``--at`` takes that placement, and a point below the x axis's mirror is
    outside."""
    import rasterio

    scene = sample("chesapeake/id_000367_image.tif")
    out = tmp_path / "sim.tif"
    row, col = 100, 200                                    # the cell (6, 12)
    rc = main(["similar", str(scene), "-o", str(out), f"--at={col + 0.5},{-(row + 0.5)}", "--backbone",
               str(backbones[0]), *FAST])
    assert rc == 0, capsys.readouterr().err
    with rasterio.open(out) as ds:
        sim = ds.read(1)
    assert sim[row, col] == pytest.approx(1.0, abs=1e-5) and sim[row // 16 * 16, col // 16 * 16] == sim[row, col]
    rc = main(["similar", str(scene), "-o", str(tmp_path / "no.tif"), f"--at={col},{row}", "--backbone",
               str(backbones[0]), *FAST])
    assert "y -256 to 0 in pixels: x = column, y = -row" in one_error_line(capsys, 2, rc)
