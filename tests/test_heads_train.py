"""Training heads on frozen features: every training source, the head file, the metrics against
scikit-learn, and the command line's bad-input path (one ``error:`` line, nothing written).

A tiny random DINOv3 backbone is saved in the Hugging Face layout; GEO-Bench task folders are built
in GEO-Bench's own on-disk format (one HDF5 per sample, band_stats.json, default_partition.json)
from real chips of the scenes in ``data_samples/``.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import geopandas as gpd
import h5py
import numpy as np
import pytest
import rasterio
import shapely
import torch
from rasterio.features import shapes
from rasterio.windows import Window
from sklearn.metrics import accuracy_score, jaccard_score

from dinov3_geo.cli import main
from dinov3_geo.errors import InputError, WeightsError
from dinov3_geo.models.load import load_backbone
from dinov3_geo.models.heads.io import check_backbone, load_head
from dinov3_geo.testing.random_backbone import write_random_backbone
from dinov3_geo.train.features import backbone_identity, extract_features
from dinov3_geo.train.geobench_data import RestrictedUnpickler, geobench_task, safe_unpickle, task_specs
from dinov3_geo.train.metrics import confusion, mean_iou, scores
from helpers import (CHESAPEAKE, FAST_SEG, SAMPLES, geobench_classification, geobench_segmentation, label_of, real_chips,
                     run_cli)


# -- metrics ------------------------------------------------------------------------------------------

def test_metrics_match_scikit_learn():
    """Accuracy and mIoU (ignore label 255, optionally ignoring class 0) equal scikit-learn's."""
    with rasterio.open(label_of(CHESAPEAKE[0])) as src:
        truth = src.read(1)
    with rasterio.open(label_of(CHESAPEAKE[1])) as src:
        pred = src.read(1)
    truth = truth.copy()
    truth[:10] = 255
    keep = truth != 255
    cm = confusion(truth, pred, 7)
    assert scores(truth, pred, 7, "classify")["accuracy"] == pytest.approx(accuracy_score(truth[keep], pred[keep]))
    present = np.union1d(np.unique(truth[keep]), np.unique(pred[keep]))
    ref = jaccard_score(truth[keep], pred[keep], labels=present, average="macro")
    assert mean_iou(cm) == pytest.approx(ref)
    ref0 = jaccard_score(truth[keep], pred[keep], labels=present[present != 0], average="macro")
    assert mean_iou(cm, ignore_classes=(0,)) == pytest.approx(ref0)


# -- GEO-Bench's own format ------------------------------------------------------------------------------

def test_real_geobench_pickles_read_without_running_them():
    """The real brick-kiln task_specs.pkl (classes of ccb.io.*) and a sample's pickle attribute are
    rebuilt as plain records: class names and the label come out, nothing is imported."""
    specs = task_specs(SAMPLES / "geobench_brick_kiln")
    assert specs["class_names"] == ["not brick kiln", "brick kiln"]
    assert specs["label_kind"] == "Classification" and tuple(specs["patch_size"]) == (64, 64)
    with h5py.File(SAMPLES / "geobench_brick_kiln" / "examples_0_9.hdf5") as h5:
        from dinov3_geo.train.geobench_data import pickle_attribute
        assert pickle_attribute(h5, "sample")["label"] == 0


def test_restricted_unpickler_refuses_code():
    """A pickle that would call os.system is refused before anything runs."""
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("touch /tmp/dinov3geo-pwned",))
    with pytest.raises(InputError, match="refused reference to (posix|os).system"):
        safe_unpickle(pickle.dumps(Evil()), "evil.pkl")
    assert not Path("/tmp/dinov3geo-pwned").exists()
    assert issubclass(RestrictedUnpickler, pickle.Unpickler)


def test_geobench_classification_probe(tmp_path, backbone_dir, capsys):
    """Train a probe on a GEO-Bench-format folder through the command; the head's test accuracy
    equals scikit-learn's accuracy of the reloaded probe's predictions on the same features."""
    folder = geobench_classification(tmp_path / "m-two-places")
    out = tmp_path / "probe.safetensors"
    code, err = run_cli(["train", "classify", "--geobench", folder, "--backbone", backbone_dir, "-o", out,
                         "--c-grid", "0.01,1,100", "--device", "cpu", "--cache", tmp_path / "cache"], capsys)
    assert code == 0, err
    assert "C 1 (2/3): val accuracy" in err and "wrote" in err.splitlines()[-1]
    head = load_head(out)
    assert head.task == "classify" and head.class_names == ["class_0", "class_1"]
    assert head.meta["normalisation"]["source"] == "dataset" and head.meta["chip_size"] == 32
    data = geobench_task(folder)
    backbone = load_backbone(backbone_dir)
    check_backbone(head, backbone_identity(backbone), "classify")
    test = data.splits["test"]
    feats = extract_features(backbone, data.images[test], head.meta["normalisation"]["mean"],
                             head.meta["normalisation"]["std"])
    with torch.no_grad():
        pred = head.module()(torch.from_numpy(feats.vectors("cls"))).argmax(1).numpy()
    assert head.meta["metrics"]["test"]["accuracy"] == pytest.approx(accuracy_score(data.labels[test], pred))
    assert head.meta["training"]["splits"] == {"train": 8, "val": 4, "test": 4}


@pytest.mark.parametrize("kind", ["linear", pytest.param("dpt", marks=pytest.mark.slow)])
def test_geobench_segmentation_heads(tmp_path, backbone_dir, capsys, kind):
    """Linear and DPT heads on the Chesapeake task in GEO-Bench's format: the recorded test mIoU
    equals scikit-learn's on the reloaded head's predictions; training is deterministic."""
    folder = geobench_segmentation(tmp_path / "m-chesapeake-landcover")
    outs = [tmp_path / f"{kind}{i}.safetensors" for i in range(2)]
    for out in outs:
        code, err = run_cli(["train", "segment", "--geobench", folder, "--decoder", kind, "--backbone", backbone_dir,
                             "-o", out, "--cache", tmp_path / "cache", *FAST_SEG], capsys)
        assert code == 0, err
        assert "epoch 1/1" in err and "val mIoU" in err
    a, b = load_head(outs[0]), load_head(outs[1])
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    from dinov3_geo.train.fit import predict_segmentation
    data = geobench_task(folder, chip=64)
    test = data.splits["test"]
    backbone = load_backbone(backbone_dir)
    feats = extract_features(backbone, data.images[test], a.meta["normalisation"]["mean"],
                             a.meta["normalisation"]["std"], kind="last" if kind == "linear" else "layers")
    pred = predict_segmentation(a.module(), feats, 64)
    truth = data.labels[test]
    keep = truth != 255
    present = np.union1d(np.unique(truth[keep]), np.unique(pred[keep]))
    ref = jaccard_score(truth[keep].ravel(), pred[keep].ravel(), labels=present, average="macro")
    assert a.meta["metrics"]["test"]["miou"] == pytest.approx(ref)
    assert a.meta["layers"] == ([0, 1, 2, 3] if kind == "dpt" else [3])


# -- other training sources ----------------------------------------------------------------------------

def test_chips_folder_probe(tmp_path, backbone_dir, capsys):
    """An ImageFolder of real PNG and GeoTIFF chips trains a probe; the class names are the folders."""
    for cls, scene in (("bahamas", "rasterio_RGB.byte.tif"), ("farmland", "opengeos_naip_m_4709963_se_14_1_20200831.tif")):
        (tmp_path / "chips" / cls).mkdir(parents=True)
        for i, chip in enumerate(real_chips(SAMPLES / scene, 48, 5)):
            driver, suffix = ("PNG", ".png") if i % 2 else ("GTiff", ".tif")
            with rasterio.open(tmp_path / "chips" / cls / f"{i}{suffix}", "w", driver=driver, width=48, height=48,
                               count=3, dtype="uint8") as dst:
                dst.write(chip)
    out = tmp_path / "probe.safetensors"
    code, err = run_cli(["train", "classify", "--chips", tmp_path / "chips", "--chip", "32", "--backbone", backbone_dir,
                         "-o", out, "--c-grid", "1", "--device", "cpu", "--cache", tmp_path / "cache"], capsys)
    assert code == 0, err
    head = load_head(out)
    assert head.class_names == ["bahamas", "farmland"]
    assert head.meta["normalisation"]["source"] == "backbone"
    assert head.meta["training"]["chips"] == 10


def test_geopackage_polygons(tmp_path, backbone_dir, capsys):
    """Polygons of water and land over the NAIP scene (from its own NIR band), reprojected to
    WGS84, train a head on the scene's grid."""
    scene = SAMPLES / "opengeos_naip_m_4709963_se_14_1_20200831.tif"
    with rasterio.open(scene) as src:
        nir = src.read(4, window=Window(0, 0, 256, 256))
        t = src.transform
        crs = src.crs
    water = (nir < 60).astype(np.uint8)
    geoms = [(shapely.geometry.shape(g), "water" if v else "land")
             for g, v in shapes(water, transform=t) if shapely.geometry.shape(g).area > 2000]
    frame = gpd.GeoDataFrame({"cover": [c for _, c in geoms]}, geometry=[g for g, _ in geoms], crs=crs).to_crs(4326)
    frame.to_file(tmp_path / "labels.gpkg", driver="GPKG")
    out = tmp_path / "head.safetensors"
    code, err = run_cli(["train", "segment", "--labels", tmp_path / "labels.gpkg", "--label-column", "cover",
                         "--image", scene, "--decoder", "linear", "--backbone", backbone_dir, "-o", out,
                         "--cache", tmp_path / "cache", *FAST_SEG], capsys)
    assert code == 0, err
    head = load_head(out)
    assert head.class_names == ["land", "water"]
    counts = head.meta["training"]["class_counts"]
    assert counts[0] > 0 and counts[1] > 0


def test_head_refuses_another_backbone(tmp_path, backbone_dir, capsys):
    """A head trained on one backbone fails to load onto another, with one clear error."""
    folder = geobench_classification(tmp_path / "task")
    out = tmp_path / "probe.safetensors"
    assert run_cli(["train", "classify", "--geobench", folder, "--backbone", backbone_dir, "-o", out,
                    "--c-grid", "1", "--device", "cpu", "--cache", tmp_path / "cache"], capsys)[0] == 0
    other = load_backbone(write_random_backbone(tmp_path / "other", seed=1))
    with pytest.raises(WeightsError, match="use the backbone it was trained with"):
        check_backbone(load_head(out), backbone_identity(other))


# -- bad input through the command line ---------------------------------------------------------------

def _one_error(code: int, err: str, out: Path, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code in (1, 2), err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_bad_label_values(tmp_path, backbone_dir, capsys):
    out = tmp_path / "h.safetensors"
    label = str(label_of(CHESAPEAKE[0]))
    code, err = run_cli(["train", "segment", "--image", CHESAPEAKE[0], "--labels", label, "--classes", "a,b",
                         "--backbone", backbone_dir, "-o", out, *FAST_SEG], capsys)
    _one_error(code, err, out, "label values 2, 3, 4, 6 are not in the class list (0 a, 1 b)")


def test_empty_chips_folder(tmp_path, backbone_dir, capsys):
    (tmp_path / "chips" / "water").mkdir(parents=True)
    out = tmp_path / "h.safetensors"
    code, err = run_cli(["train", "classify", "--chips", tmp_path / "chips", "--backbone", backbone_dir, "-o", out], capsys)
    _one_error(code, err, out, "no image chips in the class folders")


def test_class_with_one_example(tmp_path, backbone_dir, capsys):
    for cls, n in (("a", 3), ("b", 1)):
        (tmp_path / "chips" / cls).mkdir(parents=True)
        for i, chip in enumerate(real_chips(SAMPLES / "rasterio_RGB.byte.tif", 32, n)):
            with rasterio.open(tmp_path / "chips" / cls / f"{i}.tif", "w", driver="GTiff", width=32, height=32,
                               count=3, dtype="uint8") as dst:
                dst.write(chip)
    out = tmp_path / "h.safetensors"
    code, err = run_cli(["train", "classify", "--chips", tmp_path / "chips", "--backbone", backbone_dir, "-o", out], capsys)
    _one_error(code, err, out, "class 'b' (1) has fewer than 2 examples")


def test_geopackage_without_label_column(tmp_path, backbone_dir, capsys):
    scene = SAMPLES / "opengeos_naip_m_4709963_se_14_1_20200831.tif"
    with rasterio.open(scene) as src:
        box = shapely.box(*src.bounds).buffer(-1000)
        crs = src.crs
    gpd.GeoDataFrame({"kind": ["field"]}, geometry=[box], crs=crs).to_file(tmp_path / "l.gpkg", driver="GPKG")
    out = tmp_path / "h.safetensors"
    code, err = run_cli(["train", "segment", "--labels", tmp_path / "l.gpkg", "--label-column", "class",
                         "--image", scene, "--backbone", backbone_dir, "-o", out], capsys)
    _one_error(code, err, out, "no column 'class' (columns: kind)")


def test_labels_not_overlapping(tmp_path, backbone_dir, capsys):
    scene = SAMPLES / "opengeos_naip_m_4709963_se_14_1_20200831.tif"
    with rasterio.open(scene) as src:
        profile = dict(src.profile, count=1, transform=src.transform @ rasterio.Affine.translation(50000, 0))
        profile.pop("photometric", None)
    with rasterio.open(tmp_path / "far.tif", "w", **profile) as dst:
        dst.write(np.ones((1, profile["height"], profile["width"]), np.uint8))
    out = tmp_path / "h.safetensors"
    code, err = run_cli(["train", "segment", "--image", scene, "--labels", tmp_path / "far.tif",
                         "--backbone", backbone_dir, "-o", out], capsys)
    _one_error(code, err, out, "labels do not overlap the image")


def test_geobench_without_partition(tmp_path, backbone_dir, capsys):
    folder = geobench_classification(tmp_path / "task")
    (folder / "default_partition.json").unlink()
    out = tmp_path / "h.safetensors"
    code, err = run_cli(["train", "classify", "--geobench", folder, "--backbone", backbone_dir, "-o", out], capsys)
    _one_error(code, err, out, "no *_partition.json")


# -- torchgeo ------------------------------------------------------------------------------------------

def eurosat_folder(root: Path) -> Path:
    """Real chips in torchgeo's EuroSAT on-disk layout: split lists and 13-band GeoTIFFs per class
    folder (the RGB bands B04, B03, B02 hold the real chip; the others are zero)."""
    base = root / "ds/images/remote_sensing/otherDatasets/sentinel_2/tif"
    names = {"train": [], "val": [], "test": []}
    for cls, scene in (("Forest", "rasterio_RGB.byte.tif"), ("Pasture", "opengeos_naip_m_4709963_se_14_1_20200831.tif")):
        (base / cls).mkdir(parents=True)
        for i, chip in enumerate(real_chips(SAMPLES / scene, 32, 8)):
            data = np.zeros((13, 32, 32), np.uint16)
            data[3], data[2], data[1] = chip[0] * 10, chip[1] * 10, chip[2] * 10     # B04, B03, B02
            name = f"{cls}_{i}.tif"
            with rasterio.open(base / cls / name, "w", driver="GTiff", width=32, height=32, count=13,
                               dtype="uint16") as dst:
                dst.write(data)
            names[(("train",) * 4 + ("val",) * 2 + ("test",) * 2)[i]].append(name.replace(".tif", ".jpg"))
    for split, files in names.items():
        (root / f"eurosat-{split}.txt").write_text("\n".join(files) + "\n")
    return root


def test_torchgeo_eurosat_probe(tmp_path, backbone_dir, capsys):
    """torchgeo's EuroSAT class reads a dataset in its own layout (download off); the probe trains on
    its train split, C chosen on its val split, accuracy on its test split as scikit-learn computes it."""
    root = eurosat_folder(tmp_path / "eurosat")
    out = tmp_path / "probe.safetensors"
    code, err = run_cli(["train", "classify", "--torchgeo", "EuroSAT", "--root", root, "--backbone", backbone_dir,
                         "-o", out, "--c-grid", "0.1,10", "--device", "cpu", "--cache", tmp_path / "cache"], capsys)
    assert code == 0, err
    head = load_head(out)
    assert head.class_names == ["Forest", "Pasture"]
    assert head.meta["training"]["splits"] == {"train": 8, "val": 4, "test": 4}
    assert head.meta["bands"] == ["B04", "B03", "B02"]
    from dinov3_geo.train.torchgeo_source import torchgeo_dataset
    data = torchgeo_dataset("EuroSAT", root, "classify")
    test = data.splits["test"]
    feats = extract_features(load_backbone(backbone_dir), data.images[test], head.meta["normalisation"]["mean"],
                             head.meta["normalisation"]["std"])
    with torch.no_grad():
        pred = head.module()(torch.from_numpy(feats.vectors("cls"))).argmax(1).numpy()
    assert head.meta["metrics"]["test"]["accuracy"] == pytest.approx(accuracy_score(data.labels[test], pred))


def test_torchgeo_missing_dataset(tmp_path, backbone_dir, capsys):
    out = tmp_path / "h.safetensors"
    code, err = run_cli(["train", "classify", "--torchgeo", "EuroSAT", "--root", tmp_path, "--backbone", backbone_dir,
                         "-o", out], capsys)
    _one_error(code, err, out, "torchgeo EuroSAT")


@pytest.mark.slow
def test_eval_geobench_table_and_json(tmp_path, backbone_dir, capsys):
    """The protocol over a GEO-Bench root with one classification and one segmentation task: test
    metrics beside the model card's ViT-L figures, the means, and the same as JSON."""
    root = tmp_path / "geobench"
    geobench_classification(root / "classification_v1.0" / "m-brick-kiln")
    geobench_segmentation(root / "segmentation_v1.0" / "m-chesapeake-landcover", size=64)
    args = ["eval", "geobench", "--root", root, "--backbone", backbone_dir, "--epochs", "1", "--device", "cpu",
            "--cache", tmp_path / "cache"]
    code = main([str(a) for a in args + ["--json"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    rows = {r["task"]: r for r in report["results"]}
    assert rows["m-brick-kiln"]["model_card"] == 96.5 and rows["m-chesapeake-landcover"]["model_card"] == 75.6
    assert 0 <= rows["m-brick-kiln"]["ours"] <= 100 and 0 <= rows["m-chesapeake-landcover"]["ours"] <= 100
    assert report["means"]["classify"]["ours"] == pytest.approx(rows["m-brick-kiln"]["ours"])
    assert "lr = " in rows["m-chesapeake-landcover"]["choice"]
    assert main([str(a) for a in args]) == 0          # features now come from the cache
    table = capsys.readouterr().out
    assert "m-brick-kiln" in table and "96.5" in table and "mean segment" in table


def test_torchgeo_raster_pairs(tmp_path, backbone_dir, capsys):
    """torchgeo RasterDatasets (the real NAIP scene and a class raster on its grid), intersected and
    chipped by a GridGeoSampler, train a linear head."""
    scene = SAMPLES / "opengeos_naip_m_4709963_se_14_1_20200831.tif"
    (tmp_path / "tg" / "images").mkdir(parents=True)
    (tmp_path / "tg" / "labels").mkdir()
    with rasterio.open(scene) as src:
        profile = dict(src.profile)
        data = src.read(window=Window(0, 0, 256, 192))
        transform = src.transform
    profile.update(width=256, height=192, transform=transform)
    with rasterio.open(tmp_path / "tg" / "images" / "naip.tif", "w", **profile) as dst:
        dst.write(data)
    classes = np.digitize(data[3], np.percentile(data[3], [50])).astype(np.uint8)
    profile.update(count=1, nodata=None)
    profile.pop("photometric", None)
    with rasterio.open(tmp_path / "tg" / "labels" / "classes.tif", "w", **profile) as dst:
        dst.write(classes, 1)
    out = tmp_path / "head.safetensors"
    code, err = run_cli(["train", "segment", "--torchgeo", "RasterDataset", "--root", tmp_path / "tg", "--decoder", "linear",
                         "--backbone", backbone_dir, "-o", out, "--cache", tmp_path / "cache", *FAST_SEG], capsys)
    assert code == 0, err
    head = load_head(out)
    assert head.class_names == ["class_0", "class_1"] and head.meta["training"]["chips"] == 12
    assert head.meta["normalisation"]["source"] == "dataset"


def test_feature_cache_keyed_by_normalisation(tmp_path, backbone_dir):
    """Features are cached per backbone, chips and normalisation: the same request reads the file
    back (identical tensors), another normalisation computes and stores a second file."""
    backbone = load_backbone(backbone_dir)
    chips = np.stack(real_chips(SAMPLES / "rasterio_RGB.byte.tif", 32, 3)).astype(np.float32) / 255
    a = extract_features(backbone, chips, (0.4, 0.4, 0.3), (0.2, 0.2, 0.1), kind="layers", cache=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    b = extract_features(backbone, chips, (0.4, 0.4, 0.3), (0.2, 0.2, 0.1), kind="layers", cache=tmp_path)
    assert torch.equal(a.cls, b.cls) and all(torch.equal(x[0], y[0]) for x, y in zip(a.layers, b.layers))
    c = extract_features(backbone, chips, (0.5, 0.5, 0.5), (0.2, 0.2, 0.1), kind="layers", cache=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and not torch.equal(a.cls, c.cls)
    assert a.layers[0][0].shape == (3, 32, 2, 2) and len(a.layers) == 4


def test_label_grid_reprojected_onto_the_image(tmp_path, backbone_dir, capsys):
    """Labels on another grid (Web Mercator, other pixel size) are reprojected nearest onto the image:
    the labelled pixels per class match the labels made on the image's own grid within 3 %."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject
    scene = SAMPLES / "opengeos_naip_m_4709963_se_14_1_20200831.tif"
    with rasterio.open(scene) as src:
        nir = src.read(4)
        valid = src.dataset_mask() > 0
        grid = dict(crs=src.crs, transform=src.transform, width=src.width, height=src.height)
        bounds = src.bounds
    classes = np.digitize(nir, np.percentile(nir[valid], [50])).astype(np.uint8)
    classes[~valid] = 255
    t, w, h = calculate_default_transform(grid["crs"], "EPSG:3857", grid["width"], grid["height"], *bounds)
    moved = np.full((h, w), 255, np.uint8)
    reproject(classes, moved, src_transform=grid["transform"], src_crs=grid["crs"], dst_transform=t,
              dst_crs="EPSG:3857", resampling=Resampling.nearest, src_nodata=255, dst_nodata=255)
    with rasterio.open(tmp_path / "labels_3857.tif", "w", driver="GTiff", width=w, height=h, count=1,
                       dtype="uint8", crs="EPSG:3857", transform=t, nodata=255) as dst:
        dst.write(moved, 1)
    from dinov3_geo.train.datasets import labels_on_grid
    back = labels_on_grid(tmp_path / "labels_3857.tif", grid, str(scene))
    for value in (0, 1):
        assert (back == value).sum() == pytest.approx((classes == value).sum(), rel=0.03)
    out = tmp_path / "h.safetensors"
    code, err = run_cli(["train", "segment", "--image", scene, "--labels", tmp_path / "labels_3857.tif", "--decoder",
                         "linear", "--backbone", backbone_dir, "-o", out, "--cache", tmp_path / "c", *FAST_SEG], capsys)
    assert code == 0, err


def test_label_grid_without_georeference_refused(tmp_path, backbone_dir, capsys):
    """A label raster of another size than its un-georeferenced image cannot be placed: refused."""
    label = str(label_of(CHESAPEAKE[0]))
    with rasterio.open(label) as src:
        small = src.read(1)[:128, :128]
    with rasterio.open(tmp_path / "small.tif", "w", driver="GTiff", width=128, height=128, count=1,
                       dtype="uint8") as dst:
        dst.write(small, 1)
    out = tmp_path / "h.safetensors"
    code, err = run_cli(["train", "segment", "--image", CHESAPEAKE[0], "--labels", tmp_path / "small.tif",
                         "--backbone", backbone_dir, "-o", out], capsys)
    _one_error(code, err, out, "lacks a georeference to reproject it")
