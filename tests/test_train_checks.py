"""Training cannot mislead: labels, classes and options are checked before any backbone loads or
feature is computed, with one ``error:`` line and nothing written; head files are finite and
intact or refused; the command shows the class counts, feature progress, each sweep step and the
final metrics. Labels are real (the Chesapeake pairs, the NAIP scene's own near-infrared band).
"""
from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch
from rasterio.features import shapes
from rasterio.windows import Window

from dinov3_geo.errors import WeightsError
from dinov3_geo.models.heads.io import load_head, save_head
from dinov3_geo.models.heads.linear import LinearProbe
from dinov3_geo.train.datasets import vector_labels
from helpers import CHESAPEAKE, ROOT, SAMPLES, label_of, run_cli

NAIP = SAMPLES / "opengeos_naip_m_4709963_se_14_1_20200831.tif"
NO_BACKBONE = "/nonexistent/backbone.pth"       # a check that loads it first fails on this, not on its subject
FAST = ["--decoder", "linear", "--epochs", "1", "--lrs", "1e-3", "--chip", "64", "--batch-size", "4", "--device", "cpu"]


def one_error(code: int, err: str, out: Path, *patterns: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code in (1, 2) and len(lines) == 1 and "Traceback" not in err, err
    assert all(p in lines[0] for p in patterns), lines[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return lines[0]


def write_label(path: Path, values: np.ndarray, nodata=None) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[1], height=values.shape[0], count=1,
                       dtype="uint8", nodata=nodata) as dst:
        dst.write(values.astype(np.uint8), 1)
    return path


def naip_cover(tmp_path: Path, column_values) -> Path:
    """Polygons of water and land over the top-left of the NAIP scene (its NIR band < 60 is water),
    with ``column_values(is_water)`` as the ``cover`` attribute; a GeoPackage."""
    with rasterio.open(NAIP) as src:
        nir, t, crs = src.read(4, window=Window(0, 0, 256, 256)), src.transform, src.crs
    geoms = [(shapely.geometry.shape(g), bool(v)) for g, v in shapes((nir < 60).astype(np.uint8), transform=t)
             if shapely.geometry.shape(g).area > 2000]
    frame = gpd.GeoDataFrame({"cover": [column_values(w) for _, w in geoms]}, geometry=[g for g, _ in geoms], crs=crs)
    path = tmp_path / "cover.gpkg"
    frame.to_file(path, driver="GPKG")
    return path


# -- options: checked first ---------------------------------------------------------------------------

PAIR = ["--image", CHESAPEAKE[0], "--labels", label_of(CHESAPEAKE[0])]


@pytest.mark.parametrize("args, flag", [
    (["train", "segment", *PAIR, "--epochs", "0"], "--epochs"),
    (["train", "segment", *PAIR, "--lrs", "0"], "--lrs"),
    (["train", "segment", *PAIR, "--lrs=-1e-3,1e-3"], "--lrs"),
    (["train", "segment", *PAIR, "--batch-size", "0"], "--batch-size"),
    (["train", "classify", "--chips", SAMPLES, "--c-grid", "0"], "--c-grid"),
    (["train", "classify", "--chips", SAMPLES, "--c-grid=-1,1"], "--c-grid"),
    (["train", "classify", "--chips", SAMPLES, "--batch-size", "0"], "--batch-size"),
    (["eval", "geobench", "--root", SAMPLES, "--epochs", "0"], "--epochs"),
], ids=["epochs-0", "lr-0", "lr-negative", "seg-batch-0", "c-0", "c-negative", "probe-batch-0", "eval-epochs-0"])
def test_bad_options_refused_before_any_work(tmp_path, capsys, args, flag):
    """Each bad option is one line naming it (exit 2), before the (missing) backbone is looked up."""
    out = tmp_path / "h.safetensors"
    extra = ["-o", out] if args[0] == "train" else []
    code, err = run_cli([*args, *extra, "--backbone", NO_BACKBONE], capsys)
    line = one_error(code, err, out, flag)
    assert code == 2 and "backbone" not in line


# -- labels ----------------------------------------------------------------------------------------------

def test_one_class_labels_refused(tmp_path, capsys):
    """Labels of a single class would train a useless head with a perfect score: refused."""
    label = write_label(tmp_path / "one.tif", np.ones((256, 256)))
    out = tmp_path / "h.safetensors"
    code, err = run_cli(["train", "segment", "--image", CHESAPEAKE[0], "--labels", label, "-o", out,
                         "--backbone", NO_BACKBONE], capsys)
    one_error(code, err, out, "only class 'class_1' has training examples", "at least two classes")


def test_label_nodata_that_removes_a_class_is_named(tmp_path, capsys):
    """A 0/1 mask whose nodata is 0 leaves one class: refused, saying how many pixels nodata removed."""
    with rasterio.open(label_of(CHESAPEAKE[0])) as src:
        water = (src.read(1) == 4).astype(np.uint8)
    label = write_label(tmp_path / "mask.tif", water, nodata=0)
    out = tmp_path / "h.safetensors"
    code, err = run_cli(["train", "segment", "--image", CHESAPEAKE[0], "--labels", label, "-o", out,
                         "--backbone", NO_BACKBONE], capsys)
    removed = int((water == 0).sum())
    one_error(code, err, out, "only class 'class_1'", f"nodata value 0 removes {removed:,} of 65,536 pixels")


def test_counts_nodata_and_empty_named_classes_shown_before_training(tmp_path, capsys):
    """The command shows the label nodata removal and the pixels per class and split before the
    features, warns about each named class without examples, and ends with val and test lines."""
    with rasterio.open(label_of(CHESAPEAKE[1])) as src:
        values = src.read(1)
    label = write_label(tmp_path / "l.tif", values, nodata=5)
    out = tmp_path / "h.safetensors"
    code, err = run_cli(["train", "segment", "--image", CHESAPEAKE[1], "--labels", label, "--classes",
                         "unused,water,tree canopy,low vegetation,barren,impervious other,impervious road",
                         "-o", out, "--backbone", "standin", "--cache", tmp_path / "c", *FAST], capsys)
    assert code == 0, err
    lines = err.splitlines()
    first_feature = next(i for i, line in enumerate(lines) if line.startswith("features:"))
    assert any(f"nodata value 5 removes {int((values == 5).sum()):,}" in line for line in lines[:first_feature])
    assert "classes: 7, labelled pixels per class (train / val):" in lines[:first_feature]
    counts = np.bincount(values[values != 5], minlength=7)
    shown = {line.split(":")[0].strip(): line for line in lines[:first_feature] if line.startswith("  ")}
    assert sum(int(v.replace(",", "")) for v in shown["2 tree canopy"].split(":")[1].split("/")) == counts[2]
    assert "warning: class 0 'unused' has no examples" in err and "warning: class 1 'water'" in err
    assert "warning: class 5 'impervious other' has no examples" in err      # all removed by nodata
    assert any(line.startswith("lr 0.001 (1/1): val mIoU") for line in lines)
    assert any(line.startswith("val: miou ") and "pixel_accuracy" in line for line in lines)
    assert any(line.startswith("test: none") for line in lines)


def test_numeric_column_codes_are_the_class_values(tmp_path):
    """A float column (2.0 land, 10.0 water) gives classes in numeric order whose values are the
    codes (not string order); CODE:NAME pairs name them."""
    gpkg = naip_cover(tmp_path, lambda water: 10.0 if water else 2.0)
    plain = vector_labels(gpkg, "cover", NAIP, chip=64)
    assert plain.class_names == [f"class_{i}" for i in range(11)]
    counts = np.bincount(plain.labels[plain.labels != 255].ravel(), minlength=11)
    assert counts[2] > 0 and counts[10] > 0 and counts.sum() == counts[2] + counts[10]
    named = vector_labels(gpkg, "cover", NAIP, chip=64, class_names=["10:water", "2:land"])
    assert named.class_names[2] == "land" and named.class_names[10] == "water"
    assert np.array_equal(named.labels, plain.labels)
    odd = naip_cover(tmp_path, lambda water: 1500.5 if water else -3.0)
    ranked = vector_labels(odd, "cover", NAIP, chip=64)
    assert ranked.class_names == ["-3", "1500.5"] and ranked.codes == [-3.0, 1500.5]
    assert np.array_equal(ranked.labels == 1, plain.labels == 10)


def test_text_column_in_the_order_classes_gives(tmp_path, capsys):
    """--classes with --label-column is honoured: the head's classes are in the order given."""
    gpkg = naip_cover(tmp_path, lambda water: "water" if water else "land")
    alphabetical = vector_labels(gpkg, "cover", NAIP, chip=64)
    assert alphabetical.class_names == ["land", "water"]
    out = tmp_path / "h.safetensors"
    code, err = run_cli(["train", "segment", "--labels", gpkg, "--label-column", "cover", "--image", NAIP,
                         "--classes", "water,land", "-o", out, "--backbone", "standin", "--cache", tmp_path / "c",
                         *FAST], capsys)
    assert code == 0, err
    head = load_head(out)
    assert head.class_names == ["water", "land"]
    ours = np.array(head.meta["training"]["class_counts"])
    theirs = np.bincount(alphabetical.labels[alphabetical.labels != 255].ravel(), minlength=2)
    assert list(ours) == list(theirs[::-1])


@pytest.mark.parametrize("column, message", [("geometry", "is the features' geometry"),
                                             ("kind", "has one value ('field') for every feature")])
def test_useless_label_columns_refused(tmp_path, capsys, column, message):
    gpkg = naip_cover(tmp_path, lambda water: "water" if water else "land")
    frame = gpd.read_file(gpkg)
    frame["kind"] = "field"
    frame.to_file(gpkg, driver="GPKG")
    out = tmp_path / "h.safetensors"
    code, err = run_cli(["train", "segment", "--labels", gpkg, "--label-column", column, "--image", NAIP, "-o", out,
                         "--backbone", NO_BACKBONE], capsys)
    one_error(code, err, out, message)


def test_chips_folder_of_one_class_refused(tmp_path, capsys):
    folder = tmp_path / "chips" / "water"
    folder.mkdir(parents=True)
    with rasterio.open(NAIP) as src:
        for i in range(4):
            with rasterio.open(folder / f"{i}.tif", "w", driver="GTiff", width=32, height=32, count=3,
                               dtype="uint8") as dst:
                dst.write(src.read((1, 2, 3), window=Window(200 + 32 * i, 200, 32, 32)))
    out = tmp_path / "h.safetensors"
    code, err = run_cli(["train", "classify", "--chips", tmp_path / "chips", "-o", out, "--backbone", NO_BACKBONE],
                        capsys)
    one_error(code, err, out, "only class 'water' has training examples")


def resisc45_folder(root: Path) -> Path:
    """Real 32 px chips in torchgeo's RESISC45 layout (NWPU-RESISC45/<class>/<image>.jpg, split lists)."""
    from PIL import Image

    names = {"train": [], "val": [], "test": []}
    with rasterio.open(NAIP) as src:
        for k, cls in enumerate(("farmland", "lake")):
            (root / "NWPU-RESISC45" / cls).mkdir(parents=True)
            for i in range(4):
                chip = src.read((1, 2, 3), window=Window(100 + 40 * i, 100 + 300 * k, 32, 32))
                name = f"{cls}_{i:03d}.jpg"
                Image.fromarray(chip.transpose(1, 2, 0)).save(root / "NWPU-RESISC45" / cls / name)
                names[("train", "train", "val", "test")[i]].append(name)
    for split, files in names.items():
        (root / f"resisc45-{split}.txt").write_text("\n".join(files) + "\n")
    return root


def test_torchgeo_dataset_without_the_task_key_refused(tmp_path, capsys):
    """``train segment --torchgeo RESISC45``: RESISC45 samples have no mask: one line naming the
    dataset and the key, before any backbone loads."""
    root = resisc45_folder(tmp_path / "resisc45")
    out = tmp_path / "h.safetensors"
    code, err = run_cli(["train", "segment", "--torchgeo", "RESISC45", "--root", root, "-o", out,
                         "--backbone", NO_BACKBONE], capsys)
    one_error(code, err, out, "torchgeo RESISC45 samples have no 'mask'", "train classify")


# -- head files ----------------------------------------------------------------------------------------

def trained_probe(tmp_path: Path, capsys) -> Path:
    folder = tmp_path / "chips"
    with rasterio.open(NAIP) as src:
        for cls, row in (("a", 100), ("b", 500)):
            (folder / cls).mkdir(parents=True)
            for i in range(4):
                with rasterio.open(folder / cls / f"{i}.tif", "w", driver="GTiff", width=32, height=32, count=3,
                                   dtype="uint8") as dst:
                    dst.write(src.read((1, 2, 3), window=Window(100 + 40 * i, row, 32, 32)))
    out = tmp_path / "probe.safetensors"
    code, err = run_cli(["train", "classify", "--chips", folder, "--chip", "32", "--c-grid", "1", "-o", out,
                         "--backbone", "standin", "--device", "cpu", "--cache", tmp_path / "c"], capsys)
    assert code == 0, err
    return out


def test_head_with_flipped_payload_bytes_does_not_load(tmp_path, capsys):
    """Bytes flipped in a head file's tensor payload (finite or not): load_head and ``classify``
    refuse it with one line naming the file."""
    head = trained_probe(tmp_path, capsys)
    data = bytearray(head.read_bytes())
    for offset in (len(data) - 3, len(data) - 40):       # inside the tensors, after the header
        damaged = tmp_path / f"damaged{offset}.safetensors"
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        damaged.write_bytes(bytes(flipped))
        with pytest.raises(WeightsError, match="damaged head file"):
            load_head(damaged)
    out = tmp_path / "chips.gpkg"
    code, err = run_cli(["classify", NAIP, "--head", damaged, "--backbone", "standin", "-o", out, "--device", "cpu"],
                        capsys)
    one_error(code, err, out, str(damaged), "damaged head file")


def test_heads_with_nan_weights_are_neither_written_nor_loaded(tmp_path, capsys):
    """save_head refuses NaN weights (nothing written); a file holding NaN weights (written
    without the checksum, as an older dinov3-geo did) does not load."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    probe = LinearProbe(4, 2)
    with torch.no_grad():
        probe.linear.weight[0, 0] = float("nan")
    head = load_head(trained_probe(tmp_path, capsys))
    out = tmp_path / "nan.safetensors"
    with pytest.raises(WeightsError, match="NaN or infinite"):
        save_head(out, probe, {k: v for k, v in head.meta.items() if k not in ("sha256", "format", "version")})
    assert not out.exists()
    state = {k: v.clone() for k, v in head.state.items()}
    state["linear.weight"][0, 0] = float("nan")
    with safe_open(str(head.source), framework="pt") as fh:
        meta = dict(fh.metadata())
    meta_json = json.loads(meta["dinov3_geo_head"])
    meta_json.pop("sha256")
    save_file(state, str(out), metadata={"dinov3_geo_head": json.dumps(meta_json)})
    with pytest.raises(WeightsError, match=r"linear.weight hold NaN or infinite values"):
        load_head(out)


# -- the README's runnable heads example ------------------------------------------------------------------

def readme_heads_commands() -> list[list[str]]:
    """The ``dinov3geo`` commands of the README's runnable Heads block (continuation lines joined)."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    block = re.search(r"Runnable as is.*?```bash\n(.*?)```", text, re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in joined.splitlines() if line.startswith("dinov3geo ")]


def test_readme_heads_example_runs_and_maps_more_than_one_class(tmp_path, capsys, monkeypatch):
    """The README's example as written: it trains, and the held-out image's class map holds
    several classes (a head that learned nothing maps a whole scene as one class)."""
    (tmp_path / "data_samples").symlink_to(SAMPLES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DINOV3GEO_CACHE", str(tmp_path / "cache"))
    commands = readme_heads_commands()
    assert [c[:2] for c in commands] == [["train", "segment"], ["segment", "data_samples/chesapeake/id_000051_image.tif"]]
    for args in commands:
        code, err = run_cli(args, capsys)
        assert code == 0, err
    with rasterio.open(tmp_path / "landcover.tif") as ds:
        classes = np.bincount(ds.read(1).ravel(), minlength=256)
    assert (classes[:7] > 0.05 * classes.sum()).sum() >= 2
