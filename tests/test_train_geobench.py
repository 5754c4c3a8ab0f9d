"""GEO-Bench read as GEO-Bench's own loader reads it, and the multi-label task.

The reference arrays in ``tests/reference/`` were made once by ``make_geobench_reference.py`` with
ServiceNow's ``geobench`` package (``load_sample_hdf5``, ``Sample.pack_to_3d``, the band
statistics): our chips normalised with the dataset's statistics must equal them. No BigEarthNet
sample is public in geo-bench's test data: the multi-label checks use real chips RELABELLED by
stated rules, and one real brick-kiln sample relabelled and written by geo-bench's own writer.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from dinov3_geo.cli import main
from dinov3_geo.models.standin import standin_backbone
from dinov3_geo.train.features import extract_features
from dinov3_geo.train.geobench_data import geobench_task
from dinov3_geo.train.labels import CHESAPEAKE_LEGEND
from helpers import ROOT, SAMPLES

REFERENCE = ROOT / "tests" / "reference"


@pytest.fixture(scope="module")
def reference() -> dict:
    with np.load(REFERENCE / "geobench_reference.npz") as ref:
        return {k: ref[k] for k in ref.files}


def task_folder(folder: Path, samples: list[Path], stats_from: Path, extra=()) -> Path:
    """A GEO-Bench task folder holding ``samples`` in every split (as geo-bench's test data does)."""
    folder.mkdir(parents=True)
    for path in [*samples, stats_from / "band_stats.json", *extra]:
        shutil.copy(path, folder / path.name)
    names = [p.stem for p in samples]
    (folder / "default_partition.json").write_text(json.dumps({"train": names, "valid": names, "test": names}))
    return folder


def normalised(data) -> np.ndarray:
    mean = np.array(data.mean, np.float32)[:, None, None]
    std = np.array(data.std, np.float32)[:, None, None]
    return (data.images[0] - mean) / std


def test_brick_kiln_equals_geobench_loader(tmp_path, reference):
    kiln = SAMPLES / "geobench_brick_kiln"
    data = geobench_task(task_folder(tmp_path / "m-brick-kiln", [kiln / "examples_0_9.hdf5"], kiln,
                                     [kiln / "task_specs.pkl"]))
    np.testing.assert_allclose(normalised(data), reference["brick_kiln_image"], rtol=0, atol=2e-5)
    assert data.labels[0] == reference["brick_kiln_label"]
    assert data.class_names == ["not brick kiln", "brick kiln"]


def test_chesapeake_equals_geobench_loader_without_clipping(tmp_path, reference):
    """Every 4th pixel, and each band's sum, minimum and maximum over the whole chip (clipping to
    the 0.1-99.9 percentiles would change the extremes), labels, and the legend's class names."""
    ches = SAMPLES / "geobench_chesapeake"
    data = geobench_task(task_folder(tmp_path / "m-chesapeake-landcover", [ches / "id_000051.hdf5"], ches,
                                     [ches / "label_stats.json"]))
    ours = normalised(data)
    np.testing.assert_allclose(ours[:, ::4, ::4], reference["chesapeake_image_every4"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(ours.min((1, 2)), reference["chesapeake_band_min"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(ours.max((1, 2)), reference["chesapeake_band_max"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(ours.astype(np.float64).sum((1, 2)), reference["chesapeake_band_sum"], rtol=1e-5,
                               atol=0.05)
    assert np.array_equal(data.labels[0], reference["chesapeake_label"])
    assert data.class_names == list(CHESAPEAKE_LEGEND)


def test_multilabel_vector_as_geobench_writes_it(tmp_path, reference):
    """A sample written by geo-bench's ``write_sample_hdf5`` with a 43-entry multi-label vector
    (a relabelled real brick-kiln sample): read as a multi-label set with that vector."""
    folder = task_folder(tmp_path / "m-bigearthnet", [REFERENCE / "geobench_multilabel_sample.hdf5"],
                         SAMPLES / "geobench_brick_kiln")
    data = geobench_task(folder)
    assert data.multilabel and data.labels.shape == (1, 43)
    assert np.array_equal(data.labels[0], reference["multilabel"])


def relabelled_bigearthnet(folder: Path) -> Path:
    """A GEO-Bench m-bigearthnet-format folder of 36 real 32 px chips (NAIP 2020 and Bahamas
    Landsat), RELABELLED by rules on the chips themselves: label 0 'naip' (which scene), 1 'dark'
    (mean RGB below the set's median), 2 'textured' (RGB standard deviation above the median)."""
    folder.mkdir(parents=True)
    chips = []
    for scene, step in (("opengeos_naip_m_4709963_se_14_1_20200831.tif", 50), ("rasterio_RGB.byte.tif", 20)):
        with rasterio.open(SAMPLES / scene) as src:
            for i in range(18):
                w = Window(200 + step * (i % 6), 200 + step * (i // 6), 32, 32)
                chips.append((scene.startswith("opengeos"), src.read((1, 2, 3), window=w).astype(np.float64)))
    mean = np.array([c.mean() for _, c in chips])
    spread = np.array([c.std() for _, c in chips])
    names = {"train": [], "valid": [], "test": []}
    for i, (naip, chip) in enumerate(chips):
        label = np.array([naip, mean[i] < np.median(mean), spread[i] > np.median(spread)], np.int64)
        with h5py.File(folder / f"id_{i:04d}.hdf5", "w") as h5:
            for b, name in enumerate(("04 - Red", "03 - Green", "02 - Blue")):
                h5.create_dataset(name, data=chip[b])
            h5.attrs["pickle"] = repr(pickle.dumps({"label": label}))
        names[("train", "train", "train", "train", "valid", "test")[i % 6]].append(f"id_{i:04d}")
    stats = {}
    for b, name in enumerate(("04 - Red", "03 - Green", "02 - Blue")):
        v = np.concatenate([c[b].ravel() for _, c in chips])
        stats[name] = {"min": v.min(), "max": v.max(), "mean": v.mean(), "std": v.std(),
                       "percentile_0_1": np.percentile(v, 0.1), "percentile_99_9": np.percentile(v, 99.9)}
    (folder / "band_stats.json").write_text(json.dumps(stats))
    (folder / "default_partition.json").write_text(json.dumps(names))
    return folder


def test_eval_geobench_multilabel_micro_f1(tmp_path, capsys):
    """``eval geobench`` on an m-bigearthnet folder: one-vs-rest probes, the test micro-F1 beside
    the model card's 73.0, equal to scikit-learn's OneVsRest logistic regression at the chosen C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.multiclass import OneVsRestClassifier

    root = tmp_path / "geobench"
    folder = relabelled_bigearthnet(root / "classification_v1.0" / "m-bigearthnet")
    code = main(["eval", "geobench", "--root", str(root), "--tasks", "m-bigearthnet", "--backbone", "standin",
                 "--device", "cpu", "--cache", str(tmp_path / "cache"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    row = json.loads(captured.out)["results"][0]
    assert row["metric"] == "micro-F1" and row["model_card"] == 73.0
    assert "labels: 3 (multi-label)" in captured.err
    data = geobench_task(folder)
    C = float(row["choice"].split("=")[1].split()[0])
    backbone = standin_backbone()
    x = extract_features(backbone, data.images, data.mean, data.std).vectors("cls")
    fit = np.concatenate([data.splits["train"], data.splits["val"]])
    model = OneVsRestClassifier(LogisticRegression(C=C, max_iter=1000, random_state=0)).fit(x[fit], data.labels[fit])
    test = data.splits["test"]
    assert row["ours"] == pytest.approx(100 * f1_score(data.labels[test], model.predict(x[test]), average="micro"),
                                        abs=1e-6)
    assert row["ours"] > 50


def test_multilabel_not_written_as_a_probe(tmp_path, capsys):
    folder = relabelled_bigearthnet(tmp_path / "m-bigearthnet")
    out = tmp_path / "h.safetensors"
    code = main(["train", "classify", "--geobench", str(folder), "-o", str(out), "--backbone", "/nonexistent.pth"])
    err = capsys.readouterr().err
    assert code == 2 and "multi-label" in err and "eval geobench" in err and not out.exists()
