"""Training learns: with the stand-in backbone (``backbone="standin"``: per-cell colour and texture
statistics, not DINOv3), heads trained on real labelled data beat the baselines on data held out
of training, and their metrics are what scikit-learn computes.

- Segmentation: the linear and DPT heads, trained on four of the five real Chesapeake pairs,
  map the fifth better than the majority class does (mIoU, the class COG against its label).
- Classification: a probe on real chips of the NAIP 2020 scene, cut into ``water`` and ``land``
  folders by the scene's own near-infrared band (a chip is water when 90 % of its pixels have NIR
  below 60, land when 90 % are above 100: open water absorbs NIR; the scene's cell means are
  bimodal, lakes at 20-30 and land above 100), classifies chips of the 2019 scene cut by the same
  rule better than chance, from RGB alone; its predictions are scikit-learn's
  ``LogisticRegression`` on the same features and C.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix

from dinov3_geo.models.heads.io import load_head
from dinov3_geo.models.standin import standin_backbone
from dinov3_geo.train.datasets import chips_from_folder
from dinov3_geo.train.features import extract_features
from dinov3_geo.train.fit import predict_segmentation
from dinov3_geo.train.metrics import IGNORE
from helpers import CHESAPEAKE, LANDCOVER, SAMPLES, label_of, run_cli

HELD_OUT = SAMPLES / "chesapeake" / "id_000051_image.tif"


def miou_by_sklearn(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Mean IoU over the classes present in truth or prediction, from scikit-learn's confusion matrix."""
    keep = truth != IGNORE
    cm = confusion_matrix(truth[keep].ravel(), pred[keep].ravel(), labels=np.arange(num_classes))
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean())


@pytest.mark.parametrize("kind", ["linear", "dpt"])
def test_segmentation_head_beats_the_majority_class_on_a_held_out_pair(tmp_path, capsys, kind):
    """Trained on four Chesapeake pairs, the head maps the fifth (held out) better than predicting
    the training set's majority class everywhere; its recorded validation mIoU is the one
    scikit-learn's confusion matrix gives for the reloaded head on the validation chips."""
    train = [p for p in CHESAPEAKE if p != HELD_OUT]
    head_path = tmp_path / f"{kind}.safetensors"
    args = ["train", "segment", "--classes", LANDCOVER, "--decoder", kind, "--backbone", "standin", "-o", head_path,
            "--chip", "64", "--epochs", "10" if kind == "linear" else "6", "--lrs", "3e-3",
            "--batch-size", "4" if kind == "linear" else "8",
            "--device", "cpu", "--cache", tmp_path / "cache"]
    for image in train:
        args += ["--image", image, "--labels", label_of(image)]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    out = tmp_path / "classes.tif"
    code, err = run_cli(["segment", HELD_OUT, "--head", head_path, "--backbone", "standin", "-o", out, "--tile", "128",
                         "--overlap", "32", "--device", "cpu"], capsys)
    assert code == 0, err
    with rasterio.open(out) as ds:
        pred = ds.read(1)
    with rasterio.open(label_of(HELD_OUT)) as ds:
        truth = ds.read(1)
    head = load_head(head_path)
    counts = np.array(head.meta["training"]["class_counts"])
    majority = np.full_like(truth, counts.argmax())
    ours, baseline = miou_by_sklearn(truth, pred, 7), miou_by_sklearn(truth, majority, 7)
    assert ours > baseline + 0.1, (ours, baseline)

    # the recorded validation mIoU, recomputed from the reloaded head with scikit-learn
    from dinov3_geo.train.run import segmentation_data
    data = segmentation_data(images=train, labels=[label_of(p) for p in train], chip=64,
                             class_names=LANDCOVER.split(","))
    val = data.splits["val"]
    norm = head.meta["normalisation"]
    feats = extract_features(standin_backbone(), data.images[val], norm["mean"], norm["std"],
                             kind="last" if kind == "linear" else "layers")
    val_pred = predict_segmentation(head.module(), feats, 64)
    assert head.meta["metrics"]["val"]["miou"] == pytest.approx(miou_by_sklearn(data.labels[val], val_pred, 7),
                                                                abs=1e-9)


def water_land_chips(scene: Path, folder: Path, size: int = 32, per_class: int = 40) -> dict[str, int]:
    """Chips of ``scene`` (RGB only) into ``folder/water`` and ``folder/land`` by the NIR rule of
    the module docstring, ``per_class`` of each spread evenly over the qualifying chips (in
    raster order); returns how many of each were cut."""
    with rasterio.open(scene) as src:
        rgb, nir, valid = src.read((1, 2, 3)), src.read(4), src.dataset_mask() > 0
    found: dict[str, list] = {"water": [], "land": []}
    for r in range(0, nir.shape[0] - size + 1, size):
        for c in range(0, nir.shape[1] - size + 1, size):
            cell = nir[r:r + size, c:c + size]
            if valid[r:r + size, c:c + size].all():
                if (cell < 60).mean() >= 0.9:
                    found["water"].append((r, c))
                elif (cell > 100).mean() >= 0.9:
                    found["land"].append((r, c))
    for cls, places in found.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        picked = sorted({int(i) for i in np.linspace(0, len(places) - 1, min(per_class, len(places)))})
        for r, c in (places[i] for i in picked):
            with rasterio.open(folder / cls / f"{r}_{c}.tif", "w", driver="GTiff", width=size, height=size,
                               count=3, dtype="uint8") as dst:
                dst.write(rgb[:, r:r + size, c:c + size])
    return {cls: len(list((folder / cls).iterdir())) for cls in found}


def test_probe_beats_chance_and_is_scikit_learns_logistic_regression(tmp_path, capsys):
    """A probe trained on water/land chips of NAIP 2020 classifies the 2019 scene's chips better
    than chance (0.5, balanced); its predictions equal scikit-learn's LogisticRegression fitted on
    the same features (train + val) at the C the sweep chose."""
    made = water_land_chips(SAMPLES / "opengeos_naip_m_4709963_se_14_1_20200831.tif", tmp_path / "train")
    held = water_land_chips(SAMPLES / "naip_m_4709963_se_14_1_20190904.tif", tmp_path / "held")
    assert min(made.values()) >= 30 and min(held.values()) >= 30, (made, held)
    head_path = tmp_path / "probe.safetensors"
    code, err = run_cli(["train", "classify", "--chips", tmp_path / "train", "--chip", "32", "--backbone", "standin",
                         "-o", head_path, "--c-grid", "0.01,0.1,1,10", "--device", "cpu", "--cache", tmp_path / "c"],
                        capsys)
    assert code == 0, err
    head = load_head(head_path)
    assert head.class_names == ["land", "water"]
    backbone = standin_backbone()
    norm = head.meta["normalisation"]
    train = chips_from_folder(tmp_path / "train", 32)
    test = chips_from_folder(tmp_path / "held", 32)
    x_train = extract_features(backbone, train.images, norm["mean"], norm["std"]).vectors("cls")
    x_test = extract_features(backbone, test.images, norm["mean"], norm["std"]).vectors("cls")
    with torch.no_grad():
        ours = head.module()(torch.from_numpy(x_test)).argmax(1).numpy()
    accuracy = float((ours == test.labels).mean())
    chance = float(np.bincount(test.labels).max() / len(test.labels))
    assert accuracy >= chance + 0.15, (accuracy, chance)
    reference = LogisticRegression(C=head.meta["fit"]["C"], max_iter=1000, random_state=0).fit(x_train, train.labels)
    assert (reference.predict(x_test) == ours).all()
    assert accuracy == pytest.approx(reference.score(x_test, test.labels))


def test_standin_similarity_groups_water_with_water(tmp_path, capsys):
    """``similar`` with the stand-in from a point on a lake of the NAIP scene: cells of open water
    (NIR below 60, the rule above) are on average more similar to it than land cells; with
    ``cluster`` (6 units), most water cells share one unit, in which water is at least twice as
    frequent as in the scene."""
    scene = SAMPLES / "opengeos_naip_m_4709963_se_14_1_20200831.tif"
    with rasterio.open(scene) as src:
        nir = src.read(4, window=Window(0, 0, 16 * (src.width // 16), 16 * (src.height // 16)))
        valid = src.read_masks(4, window=Window(0, 0, 16 * (src.width // 16), 16 * (src.height // 16))) > 0
        t = src.transform
    h, w = nir.shape[0] // 16, nir.shape[1] // 16
    cell_nir = nir.reshape(h, 16, w, 16).mean((1, 3))
    cell_ok = valid.reshape(h, 16, w, 16).all((1, 3))
    water, land = (cell_nir < 60) & cell_ok, (cell_nir > 100) & cell_ok
    i, j = np.argwhere(water)[len(np.argwhere(water)) // 2]
    x, y = t * (16 * j + 8, 16 * i + 8)
    sim_path, units_path = tmp_path / "similar.tif", tmp_path / "units.tif"
    common = ["--backbone", "standin", "--device", "cpu", "--tile", "256", "--overlap", "32"]
    assert run_cli(["similar", scene, "--at", f"{x},{y}", "-o", sim_path, *common], capsys)[0] == 0
    assert run_cli(["cluster", scene, "-k", "6", "-o", units_path, *common], capsys)[0] == 0
    with rasterio.open(sim_path) as ds:
        sim = ds.read(1)[:16 * h, :16 * w].reshape(h, 16, w, 16)[:, 0, :, 0]
    with rasterio.open(units_path) as ds:
        units = ds.read(1)[:16 * h, :16 * w].reshape(h, 16, w, 16)[:, 0, :, 0]
    assert np.nanmean(sim[water]) > np.nanmean(sim[land]) + 0.1
    water_unit = np.bincount(units[water], minlength=6).argmax()
    in_unit = (units == water_unit) & cell_ok
    assert (units[water] == water_unit).mean() > 0.5                 # water cells together
    assert water[in_unit].mean() > 2 * water[cell_ok].mean()         # and that unit mostly water
