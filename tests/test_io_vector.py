"""Polygonising a float raster into a GeoPackage: counts, attributes, strip seams, areas, atomicity."""
import os

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Geod
from scipy import ndimage

from dinov3_geo.errors import InputError, OutputError
from dinov3_geo.io.vector import polygonize_threshold
from helpers import write_raster

RGB = "rasterio_RGB.byte.tif"


@pytest.fixture
def heights(sample, tmp_path):
    """A float 'height' raster from a real scene: band 2 scaled to 0..30 m, NaN where nodata."""
    with rasterio.open(sample(RGB)) as src:
        data = src.read(2).astype(np.float32) / 255 * 30
        data[src.read_masks(2) == 0] = np.nan
        path = write_raster(tmp_path / "heights.tif", data, crs=src.crs, transform=src.transform,
                            nodata=float("nan"))
    return path, data


def selection(data, threshold):
    return (data >= threshold) & np.isfinite(data)


@pytest.mark.parametrize("strip_rows", [1024, 61, 7])
def test_counts_match_4_connected_components(heights, tmp_path, strip_rows):
    path, data = heights
    out = tmp_path / "canopy.gpkg"
    n = polygonize_threshold(path, out, 3.0, strip_rows=strip_rows)
    labels, expected = ndimage.label(selection(data, 3.0))
    assert n == expected > 100
    frame = gpd.read_file(out, layer="canopy")
    assert len(frame) == n and set(frame.geom_type) == {"Polygon"}
    with rasterio.open(path) as ds:
        assert frame.crs == ds.crs
        pixel_area = abs(ds.transform.a * ds.transform.e)
    assert list(frame.columns[:3]) == ["area_m2", "mean_height_m", "max_height_m"]
    assert frame.geometry.area.sum() / pixel_area == pytest.approx(selection(data, 3.0).sum())
    big = frame.loc[frame.area_m2.idxmax()]
    sizes = np.bincount(labels.ravel())[1:]
    k = int(np.argmax(sizes)) + 1
    assert big.mean_height_m == pytest.approx(data[labels == k].mean(), rel=1e-5)
    assert big.max_height_m == pytest.approx(data[labels == k].max(), rel=1e-6)
    assert big.area_m2 == pytest.approx(sizes.max() * pixel_area, rel=0.01)


def test_polygon_across_many_strips_is_one_feature(tmp_path):
    """A U shape and a ring cut by every strip border: one feature each, with their hole."""
    data = np.zeros((60, 50), np.float32)
    data[5:55, 5:10] = data[5:55, 20:25] = data[50:55, 5:25] = 10  # U: joined only at the bottom
    data[10:40, 30:45] = 20
    data[15:35, 35:40] = 0  # ring with a hole
    path = write_raster(tmp_path / "h.tif", data)
    out = tmp_path / "p.gpkg"
    assert polygonize_threshold(path, out, 5.0, strip_rows=4) == 2
    frame = gpd.read_file(out).sort_values("max_height_m")
    u, ring = frame.geometry.iloc[0], frame.geometry.iloc[1]
    assert u.area == pytest.approx(data[data == 10].size * 100)
    assert len(ring.interiors) == 1 and ring.area == pytest.approx((30 * 15 - 20 * 5) * 100)


def test_geographic_raster_area_in_square_metres(tmp_path):
    transform = Affine(0.001, 0, 20.0, 0, -0.001, 50.0)  # ~71 x 111 m pixels at 50 N
    data = np.zeros((40, 40), np.float32)
    data[10:30, 10:30] = 5
    path = write_raster(tmp_path / "geo.tif", data, crs="EPSG:4326", transform=transform)
    out = tmp_path / "geo.gpkg"
    assert polygonize_threshold(path, out, 1.0) == 1
    frame = gpd.read_file(out)
    lon = [20.01, 20.03, 20.03, 20.01]
    lat = [49.99, 49.99, 49.97, 49.97]
    true_area = abs(Geod(ellps="WGS84").polygon_area_perimeter(lon, lat)[0])
    assert frame.area_m2.iloc[0] == pytest.approx(true_area, rel=1e-3)


def test_empty_result_and_overwrite_rules(heights, tmp_path):
    path, _ = heights
    out = tmp_path / "none.gpkg"
    assert polygonize_threshold(path, out, 1000.0) == 0
    assert len(gpd.read_file(out)) == 0
    with pytest.raises(OutputError, match="exists"):
        polygonize_threshold(path, out, 3.0)
    assert polygonize_threshold(path, out, 3.0, overwrite=True) > 0
    with pytest.raises(OutputError, match="input"):
        polygonize_threshold(path, path, 3.0, overwrite=True)


def test_failure_leaves_no_partial_file(heights, tmp_path):
    """A raster damaged past its first strips fails after polygons were already appended to the
    temporary GeoPackage: one clear error and no file left behind."""
    path, data = heights
    damaged = write_raster(tmp_path / "damaged.tif", data, nodata=float("nan"), blockysize=8)
    size = damaged.stat().st_size
    with open(damaged, "r+b") as fh:      # uncompressed strips in row order: keep the first ~40 %
        fh.truncate(int(size * 0.4))
    path.unlink()
    with pytest.raises(InputError, match="cannot read rows"):
        polygonize_threshold(damaged, tmp_path / "out.gpkg", 3.0, strip_rows=50, batch=10)
    assert sorted(os.listdir(tmp_path)) == ["damaged.tif"]
