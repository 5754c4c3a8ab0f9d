"""Applying heads to scenes: per-class polygons merged across strips, the class COG and the chip
GeoPackage of ``dinov3geo segment --head`` / ``dinov3geo classify``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from rasterio.features import shapes

from dinov3_geo.io.vector import polygonize_classes

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data_samples"
NAIP = SAMPLES / "opengeos_naip_m_4709963_se_14_1_20200831.tif"


@pytest.fixture(scope="module")
def class_raster(tmp_path_factory) -> Path:
    """Three classes of the real NAIP scene (terciles of its NIR band), nodata 255 where it is invalid."""
    path = tmp_path_factory.mktemp("classes") / "classes.tif"
    with rasterio.open(NAIP) as src:
        nir, valid = src.read(4)[:200, :300], src.read_masks(4)[:200, :300] > 0
        profile = dict(driver="GTiff", width=300, height=200, count=1, dtype="uint8", crs=src.crs,
                       transform=src.transform, nodata=255)
    classes = np.digitize(nir, np.percentile(nir[valid], [33, 66])).astype(np.uint8)
    classes[~valid] = 255
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(classes, 1)
    return path


@pytest.mark.parametrize("strip_rows", [7, 1024])
def test_class_polygons_match_whole_raster_shapes(class_raster, tmp_path, strip_rows):
    """Strip by strip (7 rows: many borders) gives exactly the regions rasterio.features.shapes finds
    on the whole raster: same count per class, same area per class, class names attached."""
    out = tmp_path / "c.gpkg"
    n = polygonize_classes(class_raster, out, ["low", "mid", "high"], strip_rows=strip_rows)
    frame = pyogrio.read_dataframe(out, layer="classes")
    with rasterio.open(class_raster) as src:
        data, t = src.read(1), src.transform
    ref = [(int(v), g) for g, v in shapes(data, mask=data != 255, connectivity=4, transform=t)]
    assert n == len(frame) == len(ref)
    pixel = abs(t.a * t.e)
    for value, name in enumerate(["low", "mid", "high"]):
        part = frame[frame["class"] == value]
        assert set(part["class_name"]) == {name}
        assert len(part) == sum(1 for v, _ in ref if v == value)
        assert part.geometry.area.sum() == pytest.approx((data == value).sum() * pixel)
    assert frame["area_m2"].sum() == pytest.approx((data != 255).sum() * pixel, rel=2e-3)
