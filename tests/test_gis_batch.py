"""Combined outputs of a batch in several CRSs, and without any: one CRS rule, true areas, a STAC
Collection of every output, QGIS styles, GeoPackage 1.2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import pystac
import pytest
import rasterio
from pyproj import Geod
from rasterio.windows import Window

import geopandas as gpd
import shapely

from dinov3_geo import run_batch
from dinov3_geo.batch.mosaic import merge_vectors, write_vrts
from dinov3_geo.io.stac import item_path
from dinov3_geo.io.styles import class_table, layer_styles, qml_path, write_layer_style
from dinov3_geo.io.gpkg import write_gpkg_layer
from helpers import SAMPLES, assert_geopackage_12, categories, leftovers, write_crop

CHESAPEAKE = "chesapeake/id_000051_image.tif"      # no CRS, no geotransform, no GCPs
SALT_LAKE = "landsat7_saltlake_truecolor_utm12n.tif"          # EPSG:32612, 30 m
FAST = dict(tile=128, overlap=32, device="cpu", progress=False)
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Four real crops in three CRSs (two in UTM 12N, one warped to WGS 84 degrees, one to CONUS
    Albers) and one chip without any georeference."""
    folder = tmp_path_factory.mktemp("scenes")
    write_crop(SALT_LAKE, Window(200, 300, 160, 150), folder / "a_utm.tif")
    write_crop(SALT_LAKE, Window(400, 300, 150, 160), folder / "b_utm.tif")
    write_crop(SALT_LAKE, Window(300, 450, 150, 150), folder / "c_wgs84.tif", "EPSG:4326")
    write_crop(SALT_LAKE, Window(500, 450, 160, 150), folder / "d_albers.tif", "EPSG:5070")
    (folder / "e_plain.tif").write_bytes((SAMPLES / CHESAPEAKE).read_bytes())
    return folder


@pytest.fixture(scope="module")
def job(scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    (out / ".a_utm_canopy.tif.stac.json.partial-x1y2.json").write_text("{}")     # left by a killed run
    result = run_batch([str(scenes / "*.tif")], out, weights="demo", vector=out / "all.gpkg", min_height=0.001,
                       **FAST)
    assert result.ok and len(result.of("done")) == 5
    return out, result


def geodesic_area(geometry, crs) -> float:
    """The area in m² of ``geometry`` (in ``crs``) on the WGS 84 ellipsoid (pyproj's Geod)."""
    lonlat = gpd.GeoSeries([geometry], crs=crs).to_crs("EPSG:4326").iloc[0]
    return abs(Geod(ellps="WGS84").geometry_area_perimeter(lonlat)[0])


def test_combined_geopackage_has_a_layer_per_crs_with_true_areas(job):
    """The most common CRS takes the plain layer, each other CRS its own layer named after it;
    nothing is reprojected; every area is the polygon's true (geodesic) area."""
    out, result = job
    layers = {name for name, _ in pyogrio.list_layers(out / "all.gpkg")} - {"layer_styles"}
    assert layers == {"canopy", "canopy_EPSG-4326", "canopy_EPSG-5070"}
    expected = {"canopy": (32612, {"a_utm.tif", "b_utm.tif"}), "canopy_EPSG-4326": (4326, {"c_wgs84.tif"}),
                "canopy_EPSG-5070": (5070, {"d_albers.tif"})}
    for layer, (epsg, scenes) in expected.items():
        frame = pyogrio.read_dataframe(out / "all.gpkg", layer=layer)
        assert frame.crs.to_epsg() == epsg and set(frame["scene"]) == scenes
        for scene in scenes:        # features as each scene's own GeoPackage has them
            own = pyogrio.read_dataframe(out / f"{Path(scene).stem}_canopy.gpkg", layer="canopy")
            mine = frame[frame["scene"] == scene].drop(columns="scene").reset_index(drop=True)
            assert mine.geometry.geom_equals(own.geometry).all()
            np.testing.assert_array_equal(mine["area_m2"], own["area_m2"])
        for geometry, area in zip(frame.geometry, frame["area_m2"]):
            assert area == pytest.approx(geodesic_area(geometry, frame.crs), rel=2e-3)
    degrees = pyogrio.read_dataframe(out / "all.gpkg", layer="canopy_EPSG-4326")
    assert degrees.geometry.area.max() < 1 < degrees["area_m2"].min()      # planar degrees² are no areas
    assert_geopackage_12(out / "all.gpkg")
    for layer in expected:          # each layer with the parts' QGIS style
        renderer = layer_styles(out / "all.gpkg")[layer]
        assert "graduatedSymbol" in renderer and 'attr="mean_height_m"' in renderer


def test_mosaics_follow_the_same_rule_and_skip_the_ungeoreferenced_scene(job):
    out, result = job
    assert [p.name for p in result.mosaics] == ["mosaic_canopy.vrt", "mosaic_canopy_EPSG-4326.vrt",
                                                "mosaic_canopy_EPSG-5070.vrt"]
    for vrt, epsg in zip(result.mosaics, (32612, 4326, 5070)):
        with rasterio.open(vrt) as ds:
            assert ds.crs.to_epsg() == epsg and ds.width > 0 and ds.height > 0
            assert ds.transform.e < 0
        assert palette_or_ramp(qml_path(vrt))
    notes = json.loads((out / "summary_canopy.json").read_text())["notes"]
    plain = [n for n in notes if "e_plain_canopy." in n]
    assert len(plain) == 2 and "no mosaic" in plain[0] and "all.gpkg" in plain[1], notes
    with rasterio.open(out / "e_plain_canopy.tif") as ds:         # its own output: as its input, unplaced
        assert ds.crs is None and ds.gcps == ([], None)
    assert "area_px" in pyogrio.read_dataframe(out / "e_plain_canopy.gpkg", layer="canopy").columns


def palette_or_ramp(path: Path) -> bool:
    text = path.read_text()
    return "singlebandpseudocolor" in text or "paletted" in text


def test_every_output_has_a_stac_item_in_the_collection(job):
    out, result = job
    assert result.catalogue == out / "collection_canopy.json"
    collection = pystac.Collection.from_file(str(result.catalogue))
    items = {item.id: item for item in collection.get_items()}
    scenes = ("a_utm", "b_utm", "c_wgs84", "d_albers", "e_plain")
    expected = {f"{s}_canopy.{ext}" for s in scenes for ext in ("tif", "gpkg")}
    expected |= {p.name for p in result.mosaics} | {"all.gpkg"}
    assert set(items) == expected
    for name, item in items.items():
        assert item.collection_id == collection.id
        assert Path(item.assets["data"].get_absolute_href()).name == name
    a = items["a_utm_canopy.tif"]
    with rasterio.open(out / "a_utm_canopy.tif") as ds:
        fields = a.assets["data"].extra_fields
        assert fields["proj:code"] == "EPSG:32612" and fields["proj:transform"] == list(ds.transform)[:6]
    assert a.properties["dinov3:weights_sha256"] == "demo" and a.properties["dinov3:task"] == "canopy"
    assert Path([link for link in a.links if link.rel == "derived_from"][0].get_absolute_href()).name == "a_utm.tif"
    assert items["e_plain_canopy.tif"].geometry is None
    west, south, east, north = collection.extent.spatial.bboxes[0]
    assert all(west <= i.bbox[0] and i.bbox[2] <= east and south <= i.bbox[1] and i.bbox[3] <= north
               for i in items.values() if i.bbox)
    assert leftovers(out) == []         # the killed run's temporary too


def test_a_resumed_job_keeps_the_items_of_skipped_scenes(scenes, job):
    out, first = job
    ids = {item.id for item in pystac.Collection.from_file(str(first.catalogue)).get_items()}
    before = item_path(out / "a_utm_canopy.tif").stat().st_mtime_ns
    again = run_batch([str(scenes / "*.tif")], out, weights="demo", vector=out / "all.gpkg", min_height=0.001,
                      **FAST)
    assert len(again.of("skipped")) == 5
    assert item_path(out / "a_utm_canopy.tif").stat().st_mtime_ns == before
    assert {item.id for item in pystac.Collection.from_file(str(again.catalogue)).get_items()} == ids


def test_a_batch_of_ungeoreferenced_scenes_writes_no_mosaic(tmp_path):
    """The README's land-cover batch over Chesapeake chips: no VRT with negative sizes, a note."""
    result = run_batch([str(SAMPLES / "chesapeake" / "id_00005*_image.tif"), str(SAMPLES / CHESAPEAKE)],
                       tmp_path, weights="demo", **FAST)
    assert result.ok and result.mosaics == [] and not list(tmp_path.glob("*.vrt"))
    assert any("no mosaic" in n for n in result.notes)
    assert (tmp_path / "collection_canopy.json").exists()


def test_chips_of_scenes_in_two_crss_by_the_same_rule(tmp_path):
    """classify's combined layer (the per-scene chip GeoPackages of a probe; the head batches run
    one end to end): ``chips`` in the most common CRS, ``chips_EPSG-4326`` beside it, each styled
    by class."""
    parts = []
    for name, crs in (("a", "EPSG:32612"), ("b", "EPSG:32612"), ("c", "EPSG:4326")):
        part = tmp_path / f"{name}_chips.gpkg"
        box = shapely.box(0, 0, 1, 1) if crs == "EPSG:4326" else shapely.box(4e5, 4.5e6, 4.1e5, 4.51e6)
        write_gpkg_layer(gpd.GeoDataFrame({"class": ["water"]}, geometry=[box], crs=crs), part, "chips")
        write_layer_style(part, "chips", "chips", class_table(["water"], {0: (0, 0, 255)}))
        parts.append((f"{name}.tif", part))
    total, layers, notes = merge_vectors(parts, tmp_path / "mosaic_classify.gpkg", "chips")
    assert (total, layers, notes) == (3, ["chips", "chips_EPSG-4326"], [])
    for layer in layers:
        _, cats = categories(layer_styles(tmp_path / "mosaic_classify.gpkg")[layer])
        assert cats == [("water", "water", (0, 0, 255))]
    assert_geopackage_12(tmp_path / "mosaic_classify.gpkg")


def test_mosaics_leave_out_grids_that_are_not_north_up(tmp_path):
    """A south-up grid, one placed by ground control points only and one without CRS: no negative
    sizes, no mosaic of them, one note each kind."""
    from affine import Affine
    from rasterio.control import GroundControlPoint

    def raster(name, **georef):
        path = tmp_path / name
        with rasterio.open(path, "w", driver="GTiff", width=20, height=10, count=1, dtype="float32", **georef) as ds:
            ds.write(np.ones((1, 10, 20), np.float32))
        return path

    north = raster("north.tif", crs="EPSG:32612", transform=Affine(30, 0, 4e5, 0, -30, 4.5e6))
    south = raster("south.tif", crs="EPSG:32612", transform=Affine(30, 0, 4e5, 0, 30, 4.5e6))
    gcps = [GroundControlPoint(r, c, 4e5 + 30 * c, 4.5e6 - 30 * r) for r, c in ((0, 0), (0, 20), (10, 0))]
    placed = raster("gcps.tif", gcps=gcps, crs="EPSG:32612")
    plain = raster("plain.tif")
    written, notes = write_vrts([north, south, placed, plain], tmp_path / "mosaic.vrt")
    assert written == [tmp_path / "mosaic.vrt"]
    with rasterio.open(written[0]) as ds:
        assert (ds.width, ds.height) == (20, 10) and ds.transform == Affine(30, 0, 4e5, 0, -30, 4.5e6)
    assert len(notes) == 2 and "gcps.tif" in notes[0] and "plain.tif" in notes[0] and "south.tif" in notes[1]
