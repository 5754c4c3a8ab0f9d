"""``dinov3geo segment`` over many scenes: in-process and on a local Dask cluster, split scenes,
failures, interruption and resume. Real scene crops, a tiny random CHMv2, outputs compared as files."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.windows import Window, from_bounds

from dinov3_geo.batch import expand_inputs, run_batch
from dinov3_geo.errors import UsageError
from dinov3_geo.testing.random_chmv2 import write_random_chmv2
from helpers import CROPS, SAMPLES, cli_subprocess, leftovers, read_raster, write_crop

FAST = dict(tile=128, overlap=32, device="cpu")
FAST_ARGS = ["--tile", "128", "--overlap", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    for name, (sample, window) in CROPS.items():
        write_crop(sample, window, folder / f"{name}.tif")
    return folder


@pytest.fixture(scope="module")
def reference(scenes, random_chmv2, tmp_path_factory) -> Path:
    """Every scene run in this process, one after the other, without Dask."""
    out = tmp_path_factory.mktemp("reference")
    result = run_batch([str(scenes / "*.tif")], out, weights=random_chmv2, progress=False, **FAST)
    assert [o.status for o in result.outcomes] == ["done"] * len(CROPS)
    return out


@pytest.fixture(scope="module")
def dask_cluster():
    """One local Dask cluster for the module: two worker processes, one thread each, declaring a
    ``GPU`` resource as GPU workers do (so every scene and band takes one; the model runs on the CPU)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, resources={"GPU": 1},
                      dashboard_address=None) as cluster:
        yield cluster


def test_inputs_from_globs_paths_and_list_files(scenes, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# scenes\n{scenes / 'a_saltlake.tif'}\n\n{scenes / 'c_*.tif'}\n")
    got = expand_inputs([f"@{listing}", str(scenes / "b_saltlake.tif"), str(scenes / "a_saltlake.tif")])
    assert [p.name for p in got] == ["a_saltlake.tif", "c_naip.tif", "b_saltlake.tif"]
    with pytest.raises(UsageError, match="no file matches"):
        expand_inputs([str(scenes / "nothing_*.tif")])
    with pytest.raises(UsageError, match="a batch reads files"):
        expand_inputs(["https://example.com/scene.tif"])


@pytest.mark.slow
def test_cluster_run_equals_in_process_run(scenes, random_chmv2, reference, dask_cluster, tmp_path):
    """The command on a two-worker cluster ($DASK_SCHEDULER_ADDRESS): every output identical to the
    run without Dask, a VRT mosaic, one GeoPackage layer with a scene column, a JSON summary."""
    out = tmp_path / "out"
    run = cli_subprocess("segment", scenes / "*.tif", "--weights", random_chmv2, "-o", f"{out}/", *FAST_ARGS,
                         "--vector", tmp_path / "all.gpkg",
                         env={"DASK_SCHEDULER_ADDRESS": dask_cluster.scheduler_address})
    assert run.returncode == 0, run.stderr
    assert "3 done, 0 skipped (complete), 0 failed" in run.stderr
    assert "chips/s" in run.stderr and "left]" in run.stderr       # job-wide progress
    for name in CROPS:
        np.testing.assert_array_equal(read_raster(out / f"{name}_canopy.tif", 1),
                                      read_raster(reference / f"{name}_canopy.tif", 1))
    summary = json.loads((out / "summary_canopy.json").read_text())
    assert sorted(Path(d["scene"]).name for d in summary["done"]) == sorted(f"{n}.tif" for n in CROPS)
    assert summary["failed"] == [] and summary["skipped"] == []
    # one mosaic per CRS: both Salt Lake crops in place in the first, the NAIP crop in its own
    for vrt, name in (("mosaic_canopy.vrt", "b_saltlake"), ("mosaic_canopy_EPSG-26914.vrt", "c_naip")):
        with rasterio.open(out / vrt) as mosaic, rasterio.open(out / f"{name}_canopy.tif") as part:
            window = from_bounds(*part.bounds, transform=mosaic.transform).round_offsets().round_lengths()
            np.testing.assert_array_equal(mosaic.read(1, window=window), part.read(1))
    assert summary["mosaics"] == [str(out / "mosaic_canopy.vrt"), str(out / "mosaic_canopy_EPSG-26914.vrt")]
    # the same CRS rule for the polygons: a layer per CRS, the most common one plain
    layers = {layer: gpd.read_file(tmp_path / "all.gpkg", layer=layer) for layer in ("canopy", "canopy_EPSG-26914")}
    assert layers["canopy"].crs.to_epsg() == 32612 and layers["canopy_EPSG-26914"].crs.to_epsg() == 26914
    per_scene = {n: len(gpd.read_file(out / f"{n}_canopy.gpkg", layer="canopy")) for n in CROPS}
    counts = {**layers["canopy"].groupby("scene").size(), **layers["canopy_EPSG-26914"].groupby("scene").size()}
    assert counts == {f"{n}.tif": k for n, k in per_scene.items() if k}
    assert leftovers(out) == []


@pytest.mark.slow
def test_split_scene_equals_unsplit_run(scenes, random_chmv2, dask_cluster, tmp_path):
    """A scene cut into row bands on two workers, assembled into one COG equal to the unsplit run.

    At batch size 1 both runs give each chip to the model alone, so the values are bitwise equal;
    at larger batches the chips meet the model in other batch compositions (float rounding only).
    21 chip rows of 64 px: 3 bands recompute 2 of them (a scene of fewer than 10 is not split)."""
    scene = [str(write_crop(CROPS["a_saltlake"][0], Window(200, 100, 300, 1000), tmp_path / "tall.tif"))]
    tiles = dict(FAST, tile=64, overlap=16)
    whole = run_batch(scene, tmp_path / "whole", weights=random_chmv2, batch_size=1, progress=False, **tiles)
    split = run_batch(scene, tmp_path / "split", weights=random_chmv2, batch_size=1, progress=False,
                      dask=dask_cluster.scheduler_address, split_above=300 * 300, **tiles)
    assert whole.ok and split.ok and split.outcomes[0].bands == 3
    a, b = read_raster(whole.outcomes[0].output, 1), read_raster(split.outcomes[0].output, 1)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert leftovers(tmp_path / "split") == []
    batched = run_batch(scene, tmp_path / "batched", weights=random_chmv2, batch_size=4, progress=False,
                        dask=dask_cluster.scheduler_address, split_above=300 * 300, **tiles)
    np.testing.assert_allclose(read_raster(batched.outcomes[0].output, 1), a, rtol=1e-5)


@pytest.mark.slow
def test_damaged_scene_fails_alone_and_rerun_skips_complete(scenes, random_chmv2, reference, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(scenes, folder)
    good = (scenes / "a_saltlake.tif").read_bytes()
    (folder / "b_saltlake.tif").write_bytes(good[:len(good) // 3])        # a truncated download
    out = tmp_path / "out"
    first = cli_subprocess("segment", folder / "*.tif", "--weights", random_chmv2, "-o", f"{out}/", *FAST_ARGS)
    assert first.returncode == 1
    assert f"failed: {folder / 'b_saltlake.tif'}:" in first.stderr
    assert "Traceback" not in first.stderr
    for name in ("a_saltlake", "c_naip"):
        np.testing.assert_array_equal(read_raster(out / f"{name}_canopy.tif", 1),
                                      read_raster(reference / f"{name}_canopy.tif", 1))
    assert not (out / "b_saltlake_canopy.tif").exists() and leftovers(out) == []
    summary = json.loads((out / "summary_canopy.json").read_text())
    assert [Path(f["scene"]).name for f in summary["failed"]] == ["b_saltlake.tif"]
    assert "\n" not in summary["failed"][0]["reason"]

    shutil.copy(scenes / "b_saltlake.tif", folder / "b_saltlake.tif")    # the file is fixed: rerun
    second = run_batch([str(folder / "*.tif")], out, weights=random_chmv2, progress=False, **FAST)
    assert {Path(o.scene).name: o.status for o in second.outcomes} == {
        "a_saltlake.tif": "skipped", "b_saltlake.tif": "done", "c_naip.tif": "skipped"}
    np.testing.assert_array_equal(read_raster(out / "b_saltlake_canopy.tif", 1),
                                  read_raster(reference / "b_saltlake_canopy.tif", 1))


@pytest.mark.slow
def test_stale_outputs_are_redone_and_foreign_files_kept(scenes, random_chmv2, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(scenes, folder)
    out = tmp_path / "out"
    assert run_batch([str(folder / "*.tif")], out, weights=random_chmv2, progress=False, **FAST).ok
    os.utime(folder / "a_saltlake.tif")                                 # the input changed
    killed_run_files = [".a_saltlake_canopy.tif.partial-x1y2.tif", ".c_naip_canopy.tif.band-0001-of-0003.tif",
                        ".mosaic_canopy.vrt.partial-k3.vrt", ".a_saltlake_canopy.tif.partial1-ab12.bin",
                        ".a_saltlake_canopy.tif.empty2-cd34.vrt"]      # as a killed run leaves them
    for name in killed_run_files:
        (out / name).write_bytes(b"")
    with rasterio.open(out / "b_saltlake_canopy.tif", "r+", IGNORE_COG_LAYOUT_BREAK="YES") as ds:  # edited
        ds.write(np.zeros((1, ds.height, ds.width), np.float32))
    again = run_batch([str(folder / "*.tif")], out, weights=random_chmv2, progress=False, **FAST)
    assert [o.status for o in again.outcomes] == ["done", "done", "skipped"]
    assert np.nanmax(read_raster(out / "b_saltlake_canopy.tif", 1)) > 0
    assert leftovers(out) == []
    # a file of the user's at an output path, without a sidecar, is never replaced
    (out / "c_naip_canopy.tif").unlink()
    (out / "c_naip_canopy.tif.json").unlink()
    (out / "c_naip_canopy.tif").write_bytes(b"mine")
    third = run_batch([str(folder / "*.tif")], out, weights=random_chmv2, progress=False, **FAST)
    assert [o.status for o in third.outcomes] == ["skipped", "skipped", "failed"]
    assert "not written by a dinov3geo job" in third.outcomes[2].reason
    assert (out / "c_naip_canopy.tif").read_bytes() == b"mine"
    # other weights: every output of the job is redone
    other = write_random_chmv2(tmp_path / "other", seed=1)
    fourth = run_batch([str(folder / "*_saltlake.tif")], out, weights=other, progress=False, **FAST)
    assert [o.status for o in fourth.outcomes] == ["done", "done"]
    # outputs found by a glob over the output folder are not taken as scenes
    fifth = run_batch([str(folder / "a_*.tif"), str(out / "*.tif")], out, weights=other, progress=False, **FAST)
    assert [Path(o.scene).name for o in fifth.outcomes] == ["a_saltlake.tif", "c_naip_canopy.tif"]
    assert fifth.outcomes[0].status == "skipped" and any("2 input(s) left out" in n for n in fifth.notes)


@pytest.mark.slow
def test_interrupted_run_leaves_no_partial_file_and_rerun_completes(random_chmv2, tmp_path):
    """SIGTERM once the first scene is complete; the rerun skips it, does the rest, leaves nothing partial."""
    folder = tmp_path / "in"
    folder.mkdir()
    for sample in sorted(SAMPLES.glob("*.tif")):
        shutil.copy(sample, folder / sample.name)
    out = tmp_path / "out"
    args = ["segment", folder / "*.tif", "--weights", random_chmv2, "-o", f"{out}/", *FAST_ARGS]
    proc = subprocess.Popen([sys.executable, "-m", "dinov3_geo.cli", *map(str, args)], stderr=subprocess.PIPE, text=True)
    first = out / "landsat7_saltlake_truecolor_utm12n_canopy.tif.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if first.exists() and json.loads(first.read_text())["state"] == "complete":
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.splitlines()[-1].endswith("rerun the same command to resume")
    assert leftovers(out) == []
    # every scene started says how it ended: complete, or interrupted (none left "running")
    states = {p.name[:-len("_canopy.tif.json")] + ".tif": json.loads(p.read_text())["state"]
              for p in out.glob("*_canopy.tif.json")}
    complete = sorted(n for n, state in states.items() if state == "complete")
    assert first.name[:-len("_canopy.tif.json")] + ".tif" in complete
    assert set(states.values()) <= {"complete", "interrupted"} and "interrupted" in states.values()
    assert all((out / n.replace(".tif", "_canopy.tif")).exists() == (n in complete) for n in states)
    rerun = cli_subprocess(*args)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((out / "summary_canopy.json").read_text())
    assert sorted(Path(s["scene"]).name for s in summary["skipped"]) == complete
    assert len(summary["done"]) == len(list(folder.glob("*.tif"))) - len(complete)
    assert leftovers(out) == []


def test_batch_usage_errors_name_the_flag(scenes, random_chmv2, tmp_path, capsys):
    from dinov3_geo.cli import main

    assert main(["segment", str(scenes / "a_saltlake.tif"), str(scenes / "c_naip.tif"), "-o", "x.tif"]) == 2
    assert main(["segment", str(scenes / "*.tif"), "-o", f"{tmp_path}/", "--dask", "cluster"]) == 2
    assert main(["segment", str(scenes / "*.tif"), "-o", f"{tmp_path}/", "--split-above", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --output: many scenes (or --dask, --split-above) need an output folder (a path ending "
                   "in /)",
                   "error: --dask: expected local, local:N or a scheduler address such as tcp://host:8786, "
                   "got 'cluster'",
                   "error: --split-above: must be a positive number of pixels, got 0"]
