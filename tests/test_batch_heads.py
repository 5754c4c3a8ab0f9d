"""Heads and embeddings in batch mode: ``dinov3geo segment 'scenes/*.tif' --head``, ``dinov3geo
classify 'scenes/*.tif'`` and ``dinov3geo embed 'scenes/*.tif'`` into an output folder, in-process and on a two-worker Dask cluster, give exactly
the single-scene commands' outputs, and a rerun skips what is complete. Real scene crops, a tiny
random backbone, heads trained on the Chesapeake pairs of data_samples."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyogrio
import pytest
from rasterio.windows import Window

from dinov3_geo.cli import main
from helpers import CHESAPEAKE, CROPS, FAST_SEG, LANDCOVER, cli_subprocess, label_of, leftovers, read_raster, write_crop

RUN = ["--tile", "64", "--device", "cpu"]
SEG_RUN = [*RUN, "--overlap", "16"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Two georeferenced crops of the samples (two CRSs: Salt Lake UTM 12N and NAIP UTM 14N)."""
    folder = tmp_path_factory.mktemp("scenes")
    for name in ("a_saltlake", "c_naip"):
        sample, window = CROPS[name]
        write_crop(sample, window, folder / f"{name}.tif")
    return folder


@pytest.fixture(scope="module")
def heads(backbone_dir, tmp_path_factory) -> dict[str, Path]:
    """A linear segmentation head trained on four Chesapeake pairs, and a probe trained on chips of
    the Chesapeake images (one class per image pair: enough to give two classes)."""
    folder = tmp_path_factory.mktemp("heads")
    args = ["train", "segment", "--classes", LANDCOVER, "--decoder", "linear", "--backbone", backbone_dir,
            "-o", folder / "head.safetensors", "--cache", folder / "cache", *FAST_SEG]
    for image in CHESAPEAKE[:4]:
        args += ["--image", image, "--labels", label_of(image)]
    assert main([str(a) for a in args]) == 0
    chips = folder / "chips"
    for label, image in (("north", CHESAPEAKE[0]), ("south", CHESAPEAKE[1])):
        (chips / label).mkdir(parents=True)
        for i in range(3):
            write_crop(image, _window(i), chips / label / f"{i}.tif")
    assert main([str(a) for a in ["train", "classify", "--chips", chips, "--backbone", backbone_dir, "--chip", "64",
                                  "-o", folder / "probe.safetensors", "--c-grid", "1", "--device", "cpu",
                                  "--cache", folder / "cache"]]) == 0
    return {"segment": folder / "head.safetensors", "classify": folder / "probe.safetensors"}


def _window(i: int):
    from rasterio.windows import Window

    return Window(64 * i, 64 * i, 64, 64)


@pytest.fixture(scope="module")
def single(scenes, heads, backbone_dir, tmp_path_factory) -> Path:
    """Each scene through the single-scene commands: class COG + polygons, chip GeoPackage."""
    out = tmp_path_factory.mktemp("single")
    for name in ("a_saltlake", "c_naip"):
        scene = scenes / f"{name}.tif"
        assert main([str(a) for a in ["segment", scene, "--head", heads["segment"], "--backbone", backbone_dir,
                                      "-o", out / f"{name}_classes.tif", "--vector", out / f"{name}_classes.gpkg",
                                      *SEG_RUN]]) == 0
        assert main([str(a) for a in ["classify", scene, "--head", heads["classify"], "--backbone", backbone_dir,
                                      "-o", out / f"{name}_chips.gpkg", *RUN]]) == 0
        assert main([str(a) for a in ["embed", scene, "--backbone", backbone_dir,
                                      "-o", out / f"{name}_embed.parquet", *SEG_RUN]]) == 0
    return out


def chips(path: Path):
    return pyogrio.read_dataframe(path, layer="chips")


def every_crs(path: Path, layer: str) -> pd.DataFrame:
    """The features of a combined layer in all its CRSs (``layer``, ``layer_EPSG-...``)."""
    names = [n for n, _ in pyogrio.list_layers(path) if n == layer or n.startswith(f"{layer}_EPSG-")]
    return pd.concat([pyogrio.read_dataframe(path, layer=n, read_geometry=False) for n in names])


def check_like_single(out: Path, single: Path, combined: Path) -> None:
    """Batch outputs equal to the single-scene ones; combined layers carry every scene's features."""
    for name in ("a_saltlake", "c_naip"):
        classes = read_raster(single / f"{name}_classes.tif", 1)
        assert (classes < 7).all()                    # every pixel valid, one of the 7 classes
        np.testing.assert_array_equal(read_raster(out / f"{name}_classes.tif", 1), classes)
        a, b = chips(out / f"{name}_chips.gpkg"), chips(single / f"{name}_chips.gpkg")
        assert len(b) > 4
        assert a.drop(columns="geometry").equals(b.drop(columns="geometry"))
        assert a.geometry.equals(b.geometry)
        embedded = pq.read_table(single / f"{name}_embed.parquet")
        assert embedded.num_rows > 4 and pq.read_table(out / f"{name}_embed.parquet").equals(embedded)
        assert pq.read_schema(out / f"{name}_embed.parquet").metadata == embedded.schema.metadata
    polygons = every_crs(combined, "classes")
    assert polygons.groupby("scene").size().to_dict() == {
        f"{n}.tif": len(pyogrio.read_dataframe(single / f"{n}_classes.gpkg", layer="classes"))
        for n in ("a_saltlake", "c_naip")}
    every = every_crs(out / "mosaic_classify.gpkg", "chips")
    assert every.groupby("scene").size().to_dict() == {
        f"{n}.tif": len(chips(single / f"{n}_chips.gpkg")) for n in ("a_saltlake", "c_naip")}
    assert (out / "mosaic_segment.vrt").exists() and leftovers(out) == []


def test_head_batches_equal_single_scene_runs_and_resume(scenes, heads, backbone_dir, single, tmp_path, capsys):
    out = tmp_path / "out"
    seg = ["segment", scenes / "*.tif", "--head", heads["segment"], "--backbone", backbone_dir, "-o", f"{out}/",
           "--vector", out / "all_classes.gpkg", *SEG_RUN]
    clf = ["classify", scenes / "*.tif", "--head", heads["classify"], "--backbone", backbone_dir, "-o", f"{out}/",
           *RUN]
    emb = ["embed", scenes / "*.tif", "--backbone", backbone_dir, "-o", f"{out}/", *SEG_RUN]
    for command in (seg, clf, emb):
        assert main([str(a) for a in command]) == 0, capsys.readouterr().err
    check_like_single(out, single, out / "all_classes.gpkg")
    capsys.readouterr()
    assert all(main([str(a) for a in command]) == 0 for command in (seg, clf, emb))
    assert capsys.readouterr().err.count("0 done, 2 skipped (complete), 0 failed") == 3
    for task in ("segment", "classify", "embed"):
        summary = json.loads((out / f"summary_{task}.json").read_text())
        assert len(summary["skipped"]) == 2 and summary["done"] == []
    other = tmp_path / "other.safetensors"          # another probe: every chip GeoPackage is redone
    assert main([str(a) for a in ["train", "classify", "--chips", heads["classify"].parent / "chips", "--backbone",
                                  backbone_dir, "--chip", "64", "-o", other, "--c-grid", "100", "--device", "cpu",
                                  "--cache", tmp_path / "cache"]]) == 0
    capsys.readouterr()
    assert main([str(a) for a in clf[:2] + ["--head", other] + clf[4:]]) == 0
    assert "2 done, 0 skipped (complete), 0 failed" in capsys.readouterr().err


@pytest.mark.slow
def test_head_batches_on_a_two_worker_cluster(scenes, heads, backbone_dir, single, tmp_path):
    """``--dask local:2``: two worker processes, each loading backbone and head once; same files."""
    out = tmp_path / "out"
    seg = cli_subprocess("segment", scenes / "*.tif", "--head", heads["segment"], "--backbone", backbone_dir,
                         "-o", f"{out}/", "--vector", out / "all_classes.gpkg", *SEG_RUN, "--dask", "local:2")
    assert seg.returncode == 0, seg.stderr
    clf = cli_subprocess("classify", scenes / "*.tif", "--head", heads["classify"], "--backbone", backbone_dir,
                         "-o", f"{out}/", *RUN, "--dask", "local:2")
    assert clf.returncode == 0, clf.stderr
    assert "2 done, 0 skipped (complete), 0 failed" in clf.stderr
    emb = cli_subprocess("embed", scenes / "*.tif", "--backbone", backbone_dir, "-o", f"{out}/", *SEG_RUN,
                         "--dask", "local:2")
    assert emb.returncode == 0, emb.stderr
    check_like_single(out, single, out / "all_classes.gpkg")


def test_split_head_scene_equals_the_single_scene_run(scenes, heads, backbone_dir, tmp_path, capsys):
    """A scene cut into row bands (in-process), assembled into one class COG equal to the single-scene
    command's (batch size 1: every chip meets the model alone in both runs). 21 chip rows: 3 bands."""
    scene = write_crop(CROPS["a_saltlake"][0], Window(200, 100, 300, 1000), tmp_path / "tall.tif")
    common = ["--head", heads["segment"], "--backbone", backbone_dir, *SEG_RUN, "--batch-size", "1"]
    assert main([str(a) for a in ["segment", scene, "-o", tmp_path / "one.tif", *common]]) == 0
    assert main([str(a) for a in ["segment", scene, "-o", f"{tmp_path}/split/", "--split-above", 300 * 300,
                                  *common]]) == 0
    summary = json.loads((tmp_path / "split" / "summary_segment.json").read_text())
    assert summary["done"][0]["bands"] == 3
    np.testing.assert_array_equal(read_raster(tmp_path / "split" / "tall_classes.tif", 1),
                                  read_raster(tmp_path / "one.tif", 1))
    capsys.readouterr()


def test_batch_usage_errors_of_head_and_embed_tasks(scenes, heads, tmp_path, capsys):
    """Options a task cannot honour in a batch: one error line naming the flag, exit 2, nothing written."""
    out = tmp_path / "out"
    assert main(["embed", str(scenes / "*.tif"), "-o", f"{out}/", "--patch", "--pca", "3"]) == 2
    assert main(["segment", str(scenes / "*.tif"), "--head", str(heads["classify"]), "-o", f"{out}/"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("error: --pca: a batch writes full patch features (one Zarr store per scene); reduce them "
                      "one scene at a time")
    assert err[1].startswith(f"error: {heads['classify']}: a classify head: use it with classify")
    assert not out.exists()
