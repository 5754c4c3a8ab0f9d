"""Options are checked at the door: every option error arrives before any weights are read and in
under two seconds.

The weights here are a named pipe: opening it for reading blocks until a writer comes, which none
does, so a run that reads weights before its error hangs and the child process is killed at its
time limit (the test then fails naming the case it was in). All cases run in one child process,
each timed from the call (the library imported before: importing torch is not the check).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import rasterio
from rasterio.windows import Window

from helpers import SAMPLES

SCENE = SAMPLES / "rasterio_RGB.byte.tif"

CHILD = textwrap.dedent('''
    import json, sys, time
    import dinov3_geo.analysis, dinov3_geo.api, dinov3_geo.batch    # imported first: the cases time the checks
    from dinov3_geo.cli import main
    for name, argv in json.loads(sys.argv[1]):
        print("case", name, flush=True)
        t0 = time.perf_counter()
        code = main(argv)
        print(json.dumps({"name": name, "code": code, "seconds": time.perf_counter() - t0}), flush=True)
''')


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("door")
    pipe = folder / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    os.mkfifo(pipe)
    small = folder / "small.tif"           # 64 x 64 px: 16 cells of 16 px
    with rasterio.open(SCENE) as src:
        window = Window(300, 300, 64, 64)
        profile = dict(driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs=src.crs,
                       transform=src.window_transform(window), nodata=0)
        with rasterio.open(small, "w", **profile) as dst:
            dst.write(src.read(window=window))
    with rasterio.open(SCENE) as src:      # a point on the scene's nodata collar (its top-left corner)
        x, y = (float(v) for v in src.xy(2, 2))
        assert src.read_masks(1, window=Window(0, 0, 16, 16)).max() == 0
    feats = folder / "feats.zarr"          # a real store (demo backbone) of the small scene
    from dinov3_geo.analysis import embed

    embed(small, feats, patch=True, backbone="demo", tile=64, overlap=16, device="cpu")
    return {"pipe": str(pipe), "small": str(small), "at": f"{x!r},{y!r}", "feats": str(feats),
            "out": str(folder / "out.tif"), "missing": str(folder / "missing.tif"), "head": str(folder / "h.safetensors")}


def cases(f: dict[str, str]) -> list[tuple[str, list[str]]]:
    pipe, small, out = f["pipe"], f["small"], f["out"]
    return [
        ("k above the cells", ["cluster", small, "-k", "20", "-o", out, "--backbone", pipe]),
        ("pca above the cells", ["embed", small, "--patch", "--pca", "100", "-o", f["out"] + ".zarr", "--backbone", pipe]),
        ("at on nodata", ["similar", str(SCENE), f"--at={f['at']}", "-o", out, "--backbone", pipe]),
        ("at outside", ["similar", str(SCENE), "--at=0,0", "-o", out, "--backbone", pipe]),
        ("tile not a multiple of 16", ["segment", str(SCENE), "--head", f["head"], "--tile", "100", "-o", out,
                                       "--backbone", pipe]),
        ("unknown task", ["segment", str(SCENE), "--task", "trees", "-o", out, "--weights", pipe]),
        ("missing scene", ["similar", f["missing"], "--at=0,0", "-o", out, "--backbone", pipe]),
        ("missing scene, cluster", ["cluster", f["missing"], "-o", out, "--backbone", pipe]),
        ("overlap of patch features", ["embed", small, "--patch", "--overlap", "20", "-o", f["out"] + ".zarr",
                                       "--backbone", pipe]),
        ("bad precision", ["segment", str(SCENE), "--weights", pipe, "--precision", "fp16", "-o", out]),
        ("bad dtype", ["segment", str(SCENE), "--weights", pipe, "--dtype", "int8", "-o", out]),
        ("bad batch size", ["embed", small, "-o", f["out"] + ".parquet", "--backbone", pipe, "--batch-size", "0"]),
    ]


def test_every_option_error_comes_before_the_weights(files):
    run = cases(files)
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(run)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:        # a case that opens the pipe hangs until this limit
        stdout, stderr = child.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        child.kill()
        stdout, stderr = child.communicate()
    lines = stdout.splitlines()
    results = [json.loads(line) for line in lines if line.startswith("{")]
    started = [line[5:] for line in lines if line.startswith("case ")]
    assert len(results) == len(run), f"stopped in case '{started[-1] if started else '?'}' (it read the " \
                                     f"weights or hung): {stderr[-2000:]}"
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(run), stderr
    for result, line in zip(results, errors):
        assert result["code"] in (1, 2), (result, line)
        assert result["seconds"] < 2.0, (result, line)
        assert "internal error" not in line and files["pipe"] not in line, line
