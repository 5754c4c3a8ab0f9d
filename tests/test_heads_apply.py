"""Applying heads to scenes: per-class polygons merged across strips, the class COG and the chip
GeoPackage of ``dinov3geo segment --head`` / ``dinov3geo classify``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from rasterio.features import shapes
from sklearn.metrics import jaccard_score

from dinov3_geo.io.vector import polygonize_classes
from dinov3_geo.models.heads.io import load_head
from dinov3_geo.train.metrics import confusion, mean_iou
from helpers import (CHESAPEAKE, FAST_SEG, LANDCOVER, SAMPLES, geobench_classification, geobench_segmentation,
                     label_of, run_cli)

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


# -- applying trained heads through the command line -------------------------------------------------

def test_chesapeake_pairs_train_then_map_another_pair(tmp_path, backbone_dir, capsys):
    """Train on four Chesapeake pairs, map the fifth image: a uint8 class COG with the head's colour
    table and class names (255 nodata) and class polygons; its mIoU against the fifth label is
    scikit-learn's."""
    train = CHESAPEAKE[:4]
    args = ["train", "segment", "--classes", LANDCOVER, "--decoder", "linear", "--backbone", backbone_dir,
            "-o", tmp_path / "head.safetensors", "--cache", tmp_path / "cache", *FAST_SEG]
    for image in train:
        args += ["--image", image, "--labels", label_of(image)]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    target = CHESAPEAKE[4]
    out, vec = tmp_path / "classes.tif", tmp_path / "classes.gpkg"
    code, err = run_cli(["segment", target, "--head", tmp_path / "head.safetensors", "--backbone", backbone_dir,
                         "-o", out, "--vector", vec, "--tile", "128", "--overlap", "32", "--device", "cpu"], capsys)
    assert code == 0, err
    head = load_head(tmp_path / "head.safetensors")
    with rasterio.open(out) as ds:
        pred = ds.read(1)
        assert ds.dtypes[0] == "uint8" and ds.nodata == 255 and (ds.width, ds.height) == (256, 256)
        cmap = ds.colormap(1)
        tags = ds.tags()
    assert all(tuple(cmap[i][:3]) == tuple(head.colors[i]) for i in range(7))
    assert [tags[f"CLASS_{i}"] for i in range(7)] == LANDCOVER.split(",")
    with rasterio.open(label_of(target)) as ds:
        truth = ds.read(1)
    present = np.union1d(np.unique(truth), np.unique(pred))
    assert mean_iou(confusion(truth, pred, 7)) == pytest.approx(
        jaccard_score(truth.ravel(), pred.ravel(), labels=present, average="macro"))
    polys = pyogrio.read_dataframe(vec, layer="classes")
    assert set(polys["class_name"]) <= set(LANDCOVER.split(","))
    assert polys.geometry.area.sum() == pytest.approx(256 * 256)      # pixel units: no georeference


@pytest.mark.slow
def test_geobench_dpt_head_maps_a_georeferenced_scene(tmp_path, backbone_dir, capsys):
    """A DPT head trained on a GEO-Bench-format task maps a real scene of data_samples: the class COG
    is on the scene's grid, nodata where the scene is, polygons carry class names and area_m2."""
    folder = geobench_segmentation(tmp_path / "m-chesapeake-landcover", size=64)
    code, err = run_cli(["train", "segment", "--geobench", folder, "--decoder", "dpt", "--backbone", backbone_dir,
                         "-o", tmp_path / "dpt.safetensors", "--cache", tmp_path / "cache", *FAST_SEG], capsys)
    assert code == 0, err
    scene = SAMPLES / "rasterio_RGB.byte.tif"
    out, vec = tmp_path / "c.tif", tmp_path / "c.gpkg"
    code, err = run_cli(["segment", scene, "--head", tmp_path / "dpt.safetensors", "--backbone", backbone_dir,
                         "-o", out, "--vector", vec, "--tile", "256", "--overlap", "32", "--device", "cpu"], capsys)
    assert code == 0, err
    with rasterio.open(scene) as src, rasterio.open(out) as ds:
        assert (ds.crs, ds.transform, ds.width, ds.height) == (src.crs, src.transform, src.width, src.height)
        invalid = src.dataset_mask() == 0
        pred = ds.read(1)
    assert (pred[invalid] == 255).all() and (pred[~invalid] < 7).all()
    polys = pyogrio.read_dataframe(vec, layer="classes")
    assert len(polys) > 0 and (polys["area_m2"] > 0).all()


def test_classify_scene_chips(tmp_path, backbone_dir, capsys):
    """A probe classifies every 64 px chip of a real scene: one chip polygon per computed chip, the
    class is the most probable, the probabilities sum to one."""
    folder = geobench_classification(tmp_path / "task")
    code, err = run_cli(["train", "classify", "--geobench", folder, "--backbone", backbone_dir, "-o",
                         tmp_path / "probe.safetensors", "--c-grid", "1", "--device", "cpu", "--cache", tmp_path / "c"],
                        capsys)
    assert code == 0, err
    scene = SAMPLES / "stars_L7_ETMs.tif"
    out = tmp_path / "chips.gpkg"
    code, err = run_cli(["classify", scene, "--head", tmp_path / "probe.safetensors", "--backbone", backbone_dir,
                         "--tile", "64", "-o", out, "--device", "cpu", "--bands", "3,2,1"], capsys)
    assert code == 0, err
    chips = pyogrio.read_dataframe(out, layer="chips")
    assert len(chips) == 36                          # 349 x 352 px in 64 px chips: 6 x 6
    p = chips[["p_class_0", "p_class_1"]].to_numpy()
    assert np.allclose(p.sum(1), 1, atol=1e-5)
    assert (chips["class"] == np.array(["class_0", "class_1"])[p.argmax(1)]).all()
    assert np.allclose(chips["probability"], p.max(1))
    with rasterio.open(scene) as src:
        assert chips.crs == src.crs
        assert chips.geometry.area.iloc[0] == pytest.approx(64 * 64 * abs(src.transform.a * src.transform.e))


def test_apply_refuses_a_file_that_is_not_a_head(tmp_path, backbone_dir, capsys):
    """A raster given as --head, or a head of the other task: one error line, nothing written."""
    scene = SAMPLES / "rasterio_RGB.byte.tif"
    out = tmp_path / "c.tif"
    code, err = run_cli(["segment", scene, "--head", scene, "--backbone", backbone_dir, "-o", out], capsys)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "not a dinov3-geo head file" in lines[0], err
    assert not out.exists()
    folder = geobench_classification(tmp_path / "task")
    assert run_cli(["train", "classify", "--geobench", folder, "--backbone", backbone_dir,
                    "-o", tmp_path / "p.safetensors", "--c-grid", "1", "--device", "cpu", "--cache", tmp_path / "c"],
                   capsys)[0] == 0
    code, err = run_cli(["segment", scene, "--head", tmp_path / "p.safetensors", "--backbone", backbone_dir, "-o", out],
                        capsys)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "a classify head" in lines[0], err
    assert not out.exists()
