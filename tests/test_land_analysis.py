"""Similarity, clustering and change on real scenes, and the xarray accessor against the same calls."""
from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rioxarray
import shapely
from rasterio.io import MemoryFile
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_geom
from rasterio.windows import Window

import dinov3_geo.xarray  # noqa: F401  (registers da.dinov3)
from dinov3_geo import segment
from dinov3_geo.analysis import change, cluster, embed, similar   # importing dinov3_geo registers da.dinov3
from dinov3_geo.io.patchmap import open_features
from helpers import label_of

OPTS = dict(tile=128, overlap=32, device="cpu")
NAIP_2020 = "opengeos_naip_m_4709963_se_14_1_20200831.tif"
NAIP_2019 = "naip_m_4709963_se_14_1_20190904.tif"


def same_grid(path_a, path_b) -> None:
    with rasterio.open(path_a) as a, rasterio.open(path_b) as b:
        assert (a.crs, a.transform, a.width, a.height) == (b.crs, b.transform, b.width, b.height)


def cell_centre(path, i: int, j: int) -> tuple[float, float]:
    with rasterio.open(path) as ds:
        return ds.transform @ (16 * j + 8, 16 * i + 8)


def test_similarity_peaks_at_the_point(sample, tmp_path, backbone_dir):
    scene = sample("stars_L7_ETMs.tif")
    x, y = cell_centre(scene, 9, 13)
    out = tmp_path / "sim.tif"
    similar(scene, out, at=(x, y), backbone=backbone_dir, **OPTS)
    same_grid(scene, out)
    with rasterio.open(out) as ds:
        sim = ds.read(1)
        row, col = ds.index(x, y)
    assert sim[row, col] == pytest.approx(1.0, abs=1e-5)
    assert np.nanmax(sim) == pytest.approx(1.0, abs=1e-5)
    assert (sim[16 * 9:16 * 10, 16 * 13:16 * 14] == sim[row, col]).all()   # one value per 16-px cell
    assert np.nanmin(sim) < 0.9


def test_similarity_from_polygons_in_another_crs(sample, tmp_path, backbone_dir):
    scene = sample("stars_L7_ETMs.tif")
    with rasterio.open(scene) as ds:
        crs, t = ds.crs, ds.transform
    box = shapely.box(*(t @ (16 * 5 + 4, 16 * 9 + 4)), *(t @ (16 * 7 + 12, 16 * 7 + 12)))   # cells 7..9 x 5..7
    native, lonlat = tmp_path / "native.gpkg", tmp_path / "lonlat.gpkg"
    gpd.GeoDataFrame(geometry=[box], crs=crs).to_file(native)
    gpd.GeoDataFrame(geometry=[shapely.geometry.shape(transform_geom(crs, "EPSG:4326", box))],
                     crs="EPSG:4326").to_file(lonlat)
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    feats = tmp_path / "feats.zarr"
    embed(scene, feats, backbone=backbone_dir, patch=True, **OPTS)
    similar(scene, a, like=native, backbone=backbone_dir, features=feats, **OPTS)
    similar(scene, b, like=lonlat, backbone=backbone_dir, **OPTS)
    with rasterio.open(a) as da_, rasterio.open(b) as db_:
        np.testing.assert_allclose(da_.read(1), db_.read(1), atol=1e-5)


def test_clusters_on_the_scene_grid(sample, tmp_path, backbone_dir):
    scene = sample("rasterio_RGB.byte.tif")
    out, vec = tmp_path / "clusters.tif", tmp_path / "clusters.gpkg"
    cluster(scene, out, k=4, vector=vec, backbone=backbone_dir, **OPTS)
    same_grid(scene, out)
    with rasterio.open(out) as ds, rasterio.open(scene) as src:
        labels, valid = ds.read(1), src.dataset_mask() > 0
        assert ds.nodata == 255 and ds.colormap(1)[0][3] == 255
    assert set(np.unique(labels)) == {0, 1, 2, 3, 255}
    assert (labels[valid] != 255).all() and (labels[~valid] == 255).all()   # units exactly where data is
    polygons = gpd.read_file(vec, layer="clusters")
    assert polygons.crs == rasterio.open(scene).crs
    assert set(polygons["class"]) == {0, 1, 2, 3}
    assert polygons.area_m2.sum() == pytest.approx((labels != 255).sum() * 300.0 * 300.0, rel=0.02)


@pytest.mark.slow
def test_change_between_two_dates(sample, tmp_path, backbone_dir):
    before, after = sample(NAIP_2020), sample(NAIP_2019)
    out, same = tmp_path / "change.tif", tmp_path / "same.tif"
    change(before, after, out, backbone=backbone_dir, **OPTS)
    change(before, before, same, backbone=backbone_dir, **OPTS)
    same_grid(before, out)
    with rasterio.open(out) as ds, rasterio.open(same) as ds_same:
        dist, zero = ds.read(1), ds_same.read(1)
    assert np.nanmax(np.abs(zero)) < 1e-5             # a date against itself: no change
    assert np.isfinite(dist).mean() > 0.9 and 0 <= np.nanmin(dist) and np.nanmax(dist) <= 2
    assert np.nanmax(dist) > 0.01


@pytest.mark.slow
def test_change_warps_the_second_date_and_leaves_the_rest_nodata(sample, tmp_path, backbone_dir):
    before = sample(NAIP_2020)
    part = tmp_path / "after_part.tif"      # the 2019 image cut to its top-left part, in longitude/latitude
    with rasterio.open(sample(NAIP_2019)) as src:
        window = Window(0, 0, 400, 300)
        profile = dict(src.profile, width=400, height=300, transform=src.window_transform(window),
                       photometric="MINISBLACK")
        with MemoryFile() as mem:
            with mem.open(**profile) as cut:
                cut.write(src.read(window=window))
            with mem.open() as cut, WarpedVRT(cut, crs="EPSG:4326") as lonlat:
                profile = dict(profile, crs=lonlat.crs, transform=lonlat.transform, width=lonlat.width,
                               height=lonlat.height)
                with rasterio.open(part, "w", **profile) as dst:
                    dst.write(lonlat.read())
    out = tmp_path / "change.tif"
    change(before, part, out, backbone=backbone_dir, **OPTS)
    same_grid(before, out)
    with rasterio.open(out) as ds:
        dist = ds.read(1)
    assert np.isfinite(dist[:288, :384]).mean() > 0.9
    assert np.isnan(dist[320:, :]).all() and np.isnan(dist[:, 416:]).all()


def test_accessor_gives_the_commands_numbers(sample, tmp_path, backbone_dir):
    scene = sample("stars_L7_ETMs.tif")
    da = rioxarray.open_rasterio(scene, chunks={"band": -1, "y": 100, "x": 100})   # dask-backed
    x, y = cell_centre(scene, 12, 8)
    sim_file, feats_file = tmp_path / "sim.tif", tmp_path / "feats.zarr"
    similar(scene, sim_file, at=(x, y), backbone=backbone_dir, **OPTS)
    embed(scene, feats_file, patch=True, backbone=backbone_dir, **OPTS)
    sim = da.dinov3.similar(at=(x, y), backbone=backbone_dir, **OPTS)
    feats = da.dinov3.embed(patch=True, backbone=backbone_dir, **OPTS)
    with rasterio.open(sim_file) as ds:
        np.testing.assert_array_equal(sim.values, ds.read(1))
        assert sim.rio.crs == ds.crs and sim.rio.transform() == ds.transform
        assert np.isnan(sim.rio.nodata)
    np.testing.assert_array_equal(feats.values, open_features(feats_file).values)
    assert feats.rio.crs == da.rio.crs


@pytest.mark.slow
def test_accessor_canopy_is_the_segment_commands(sample, tmp_path):
    from dinov3_geo.testing.random_chmv2 import write_random_chmv2

    weights, scene, out = write_random_chmv2(tmp_path / "chmv2"), sample("stars_L7_ETMs.tif"), tmp_path / "canopy.tif"
    segment(scene, output=out, weights=weights, **OPTS)
    da = rioxarray.open_rasterio(scene, chunks={"band": -1, "y": 64, "x": 64})
    heights = da.dinov3.canopy(weights=weights, **OPTS)
    with rasterio.open(out) as ds:
        np.testing.assert_array_equal(heights.values, ds.read(1))
        assert heights.rio.crs == ds.crs and heights.rio.transform() == ds.transform


@pytest.mark.slow
def test_accessor_segment_with_a_trained_head_is_the_commands(sample, tmp_path, backbone_dir):
    from dinov3_geo.api import segment_with_head
    from dinov3_geo.train.run import train_segmenter

    chips = sorted(sample("chesapeake").glob("*_image.tif"))[:2]
    head = tmp_path / "head.safetensors"
    train_segmenter(head, images=chips, labels=[label_of(p) for p in chips],
                    backbone=backbone_dir, decoder="linear", lrs=[1e-3], epochs=2, device="cpu")
    scene, out = sample("stars_L7_ETMs.tif"), tmp_path / "classes.tif"
    segment_with_head(scene, head, out, backbone=backbone_dir, device="cpu")
    da = rioxarray.open_rasterio(scene, chunks={"band": -1, "y": 128, "x": 128})
    classes = da.dinov3.segment(head=head, backbone=backbone_dir, device="cpu")
    with rasterio.open(out) as ds:
        np.testing.assert_array_equal(classes.values, ds.read(1))
        assert classes.rio.crs == ds.crs and classes.rio.nodata == 255
