"""The command line's single error path, run as a separate process for every bad input.

Every expected failure must print exactly one line ``error: <file or option>: <problem>`` (after
any warnings), exit 2 for wrong usage and 1 for a failed run, show no traceback (unless
``--debug``) and leave nothing at the output path, nor temporary files beside it.

Most cases run through a small fork server: a clean process that imports ``dinov3_geo.cli`` (and
torch) once, then forks a child per case that executes ``python -m dinov3_geo.cli`` exactly (via
``runpy``) with its own argv, cwd, stdout/stderr files and exit code. A few cases run the real
``python -m dinov3_geo.cli`` and the ``dinov3geo`` script to keep that path honest.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from helpers import ROOT, SAMPLES, UTM, child_env, leftovers, rgb_crop, write_raster

SAMPLE = SAMPLES / "rasterio_RGB.byte.tif"
FAST = ["--tile", "64", "--overlap", "16", "--device", "cpu", "--batch-size", "4"]

# -------------------------------------------------------------------------------------------------
# Running the command


_SERVER = textwrap.dedent(r"""
    import json, os, runpy, signal, sys, traceback
    # the heavy imports (torch, timm, rasterio) once; the cli module itself runs afresh per case
    import dinov3_geo.api, dinov3_geo.models.canopy, safetensors.torch, timm.models.eva, tqdm.auto
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                signal.alarm(int(req["timeout"]))
                os.chdir(req["cwd"])
                os.environ.clear(); os.environ.update(req["env"])
                for fd, name in ((1, req["stdout"]), (2, req["stderr"])):
                    f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(f, fd); os.close(f)
                sys.argv = ["dinov3geo", *req["args"]]
                try:
                    runpy.run_module("dinov3_geo.cli", run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush(); sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
""")


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


class ForkServer:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT, env=child_env())
        self.n = 0

    def run(self, args, cwd: Path, env: dict, timeout: int = 120) -> Result:
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        req = dict(args=[str(a) for a in args], cwd=str(cwd), env=env, stdout=str(out), stderr=str(err),
                   timeout=timeout)
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "fork server died"
        return Result(json.loads(reply)["rc"], out.read_text(), err.read_text())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield server
    server.close()


@pytest.fixture
def cli(fork_server, tmp_path):
    """``cli(*args)`` runs ``dinov3geo`` in a child process (cwd = tmp_path, private weights cache)."""
    env = child_env(DINOV3GEO_CACHE=str(tmp_path / "cache"), DINOV3GEO_WEIGHTS=str(tmp_path / "no-weights"))

    def run(*args) -> Result:
        return fork_server.run(args, tmp_path, env)
    return run


def run_python_m(args, cwd: Path, timeout: int = 120) -> Result:
    p = subprocess.run([sys.executable, "-m", "dinov3_geo.cli", *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=timeout,
                       env=child_env(DINOV3GEO_CACHE=str(cwd / "cache")))
    return Result(p.returncode, p.stdout, p.stderr)


# -------------------------------------------------------------------------------------------------
# Models and scenes


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """A tiny CHMv2 HF folder, the same split into Meta's head .pth + backbone .pth, and a backbone
    of another width in Meta's layout."""
    from dinov3_geo.models.heads.chmv2 import read_chmv2_weights
    from dinov3_geo.models.weights import hf_to_meta_backbone_state

    from transformers import CHMv2Config, CHMv2ForDepthEstimation

    from dinov3_geo.testing.random_chmv2 import write_random_chmv2

    root = tmp_path_factory.mktemp("models")
    write_random_chmv2(root / "chm")
    narrow = CHMv2Config.from_pretrained(root / "chm")
    narrow.backbone_config.hidden_size, narrow.backbone_config.intermediate_size = 32, 128
    CHMv2ForDepthEstimation(narrow).eval().save_pretrained(root / "narrow")
    out = {}
    for name in ("chm", "narrow"):
        folder = root / name
        w = read_chmv2_weights(folder)
        torch.save(w.head_state, root / f"{name}_head.pth")
        torch.save(hf_to_meta_backbone_state(w.backbone_state, w.backbone_config), root / f"{name}_backbone.pth")
        out[name] = folder
    out["head"], out["backbone"] = root / "chm_head.pth", root / "chm_backbone.pth"
    out["narrow_backbone"] = root / "narrow_backbone.pth"
    return out


def write(path: Path, array: np.ndarray, **profile) -> Path:
    """``array`` as a GeoTIFF on the UTM grid unless ``profile`` says otherwise."""
    return write_raster(path, array, **{**UTM, **profile})


# -------------------------------------------------------------------------------------------------
# Checks


def assert_failed(res: Result, rc: int, *needles: str, output: Path | None = None) -> str:
    """One ``error:`` line (the last line), the exit code, no traceback, no output, no temp files."""
    errors = [ln for ln in res.lines if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert res.lines[-1] == errors[0], res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    assert res.rc == rc, (res.rc, res.stderr)
    line = errors[0]
    for needle in needles:
        assert needle.lower() in line.lower(), (needle, line)
    if output is not None:
        assert not output.exists(), f"{output} was written"
        if output.parent.is_dir():
            assert leftovers(output.parent) == [], leftovers(output.parent)
    return line


def assert_ok(res: Result, output: Path) -> None:
    assert res.rc == 0, res.stderr
    assert "error:" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert output.exists()
    assert leftovers(output.parent) == [], leftovers(output.parent)


# -------------------------------------------------------------------------------------------------
# Inputs


def _netcdf_two_variables(path: Path) -> Path:
    """A container with two subdatasets: GDAL opens it with zero bands."""
    from scipy.io import netcdf_file

    f = netcdf_file(str(path), "w")
    f.createDimension("y", 32)
    f.createDimension("x", 32)
    for name in ("a", "b"):
        f.createVariable(name, "f4", ("y", "x"))[:] = np.ones((32, 32), "f4")
    f.close()
    return path


def _truncated(path: Path) -> Path:
    data = SAMPLE.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _vrt_without_source(folder: Path) -> Path:
    """A VRT over a real crop whose source file was deleted afterwards."""
    import rasterio.shutil

    source = write(folder / "tile.tif", rgb_crop())
    rasterio.shutil.copy(source, folder / "mosaic.vrt", driver="VRT")
    source.unlink()
    return folder / "mosaic.vrt"


BAD_INPUTS = {
    # name: (builder(tmp) -> scene path, expected words in the error line)
    "missing": (lambda d: d / "nothere.tif", ["nothere.tif", "not found"]),
    "text file": (lambda d: (d / "notes.tif").write_text("just some text\n" * 20) and d / "notes.tif",
                  ["notes.tif", "not a readable raster"]),
    "empty file": (lambda d: (d / "empty.tif").write_bytes(b"") or d / "empty.tif", ["empty.tif", "0 bytes"]),
    "truncated": (lambda d: _truncated(d / "half.tif"), ["half.tif", "truncated"]),
    "zero bands": (lambda d: _netcdf_two_variables(d / "two.nc"), ["two.nc", "no raster band"]),
    "two bands": (lambda d: write(d / "two.tif", rgb_crop()[:2]), ["two.tif", "2 bands", "--bands"]),
    "8x8 px": (lambda d: write(d / "small.tif", rgb_crop(8)), ["small.tif", "too small", "8 x 8"]),
    "complex": (lambda d: write(d / "cplx.tif", rgb_crop().astype(np.complex64)), ["cplx.tif", "complex64"]),
    "boolean (1 bit)": (lambda d: write(d / "mask.tif", (rgb_crop()[:1] > 100).astype(np.uint8), nbits=1),
                        ["mask.tif", "1-bit"]),
    "VRT without its source": (lambda d: _vrt_without_source(d), ["mosaic.vrt", "source file", "tile.tif",
                                                                   "missing"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(cli, models, tmp_path, case):
    build, needles = BAD_INPUTS[case]
    scene = build(tmp_path)
    out = tmp_path / "out" / "canopy.tif"
    out.parent.mkdir()
    res = cli("segment", scene, "--weights", models["chm"], "-o", out, *FAST)
    assert_failed(res, 1, *needles, output=out)


def test_traceback_only_with_debug(cli, models, tmp_path):
    scene = write(tmp_path / "cplx.tif", rgb_crop().astype(np.complex64))
    out = tmp_path / "canopy.tif"
    res = cli("segment", scene, "--weights", models["chm"], "-o", out, *FAST, "--debug")
    assert res.rc == 1
    assert "Traceback" in res.stderr and res.lines[-1].startswith("error:")
    assert not out.exists()


@pytest.mark.parametrize("dtype,nodata", [("uint8", 0), ("float32", float("nan")), ("uint16", 0)])
def test_all_nodata_writes_fully_nodata_output_and_says_so(cli, models, tmp_path, dtype, nodata):
    scene = write(tmp_path / "void.tif", np.zeros((3, 80, 80), dtype) + (nodata if dtype == "float32" else 0),
                  nodata=nodata)
    out = tmp_path / "void_canopy.tif"
    res = cli("segment", scene, "--weights", models["chm"], "-o", out, *FAST)
    assert_ok(res, out)
    assert "no valid pixel" in res.stderr and "entirely nodata" in res.stderr, res.stderr
    with rasterio.open(out) as ds:
        assert (ds.width, ds.height) == (80, 80)
        assert np.isnan(ds.read(1)).all()


def test_geographic_crs_works_with_pixel_size_note(cli, models, tmp_path):
    deg = 0.6 / 111_000
    scene = write(tmp_path / "geo.tif", rgb_crop(), crs="EPSG:4326", transform=Affine(deg, 0, 10.0, 0, -deg, 45.0))
    out = tmp_path / "geo_canopy.tif"
    res = cli("segment", scene, "--weights", models["chm"], "-o", out, *FAST)
    assert_ok(res, out)
    notes = [ln for ln in res.lines if "geographic" in ln and "pixel size" in ln]
    assert notes and "m" in notes[0], res.stderr
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 4326


def plain_scene(path: Path) -> Path:
    """A real crop with no georeference at all (no CRS, no transform)."""
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8") as ds:
        ds.write(rgb_crop())
    return path


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_no_georeference_works_in_pixel_space(cli, models, tmp_path):
    scene = plain_scene(tmp_path / "plain.tif")
    out = tmp_path / "plain_canopy.tif"
    res = cli("segment", scene, "--weights", models["chm"], "-o", out, *FAST)
    assert_ok(res, out)
    warns = [ln for ln in res.lines if ln.startswith("warning:")]
    assert any("no georeference" in ln for ln in warns), res.stderr
    assert len(warns) == 1, res.stderr           # ours, not also GDAL's/rasterio's
    with rasterio.open(out) as ds:
        assert ds.crs is None
        assert np.isfinite(ds.read(1)).all()


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_library_warnings_do_not_reach_the_user(cli, models, tmp_path):
    """Meta .pth weights (torch pickles), a scene without CRS and a GeoPackage: only our own lines."""
    scene = plain_scene(tmp_path / "plain.tif")
    out = tmp_path / "plain_canopy.tif"
    res = cli("segment", scene, "--weights", models["head"], "--backbone-weights", models["backbone"], "-o", out,
              "--vector", tmp_path / "plain.gpkg", *FAST)
    assert_ok(res, out)
    assert [ln for ln in res.lines if ln.startswith("warning:")] == [
        f"warning: {scene}: no georeference (no CRS, no geotransform): outputs carry none either (GIS tools "
        "place them on the input); polygons are in pixel units, areas in pixels (area_px)"], res.stderr
    assert all(ln.startswith(("warning:", "done in", "wrote ")) for ln in res.lines), res.stderr


# -------------------------------------------------------------------------------------------------
# Options


BAD_OPTIONS = {
    "tile not multiple of 16": (["--tile", "60"], ["--tile", "multiple of 16", "60"]),
    "tile not a number": (["--tile", "abc"], ["--tile", "abc"]),
    "overlap half the tile": (["--tile", "64", "--overlap", "32"], ["--overlap", "tile/2"]),
    "negative overlap": (["--overlap", "-1"], ["--overlap"]),
    "batch size 0": (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    "unknown task": (["--task", "landcover"], ["--task", "landcover", "canopy"]),
    "unknown device": (["--device", "tpu"], ["--device", "tpu"]),
    "unknown precision": (["--precision", "fp16"], ["--precision", "fp16"]),
    "band out of range": (["--bands", "3,2,9"], ["--bands", "band 9", "3 band"]),
    "band zero": (["--bands", "0,1,2"], ["--bands", "band 0"]),
    "two bands chosen": (["--bands", "1,2"], ["--bands", "1 or 3"]),
    "bands not numbers": (["--bands", "r,g,b"], ["--bands", "r,g,b"]),
    "bad scale": (["--scale", "5,1"], ["--scale", "5,1"]),
    "bad gsd": (["--gsd", "-1"], ["--gsd", "-1"]),
    "gsd upsampling 1000x": (["--gsd", "0.0006"], ["--gsd", "1000.0x per axis", "--allow-large"]),
    "min height nan": (["--min-height", "nan", "--vector", "v.gpkg"], ["--min-height", "nan"]),
    "min height negative": (["--min-height", "-5", "--vector", "v.gpkg"], ["--min-height", "-5"]),
    "min height inf": (["--min-height", "inf", "--vector", "v.gpkg"], ["--min-height", "inf"]),
}


@pytest.fixture
def good_scene(tmp_path):
    return write(tmp_path / "scene.tif", rgb_crop())


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option(cli, models, tmp_path, good_scene, case):
    opts, needles = BAD_OPTIONS[case]
    out = tmp_path / "canopy.tif"
    res = cli("segment", good_scene, "--weights", models["chm"], "-o", out, *FAST, *opts)
    assert_failed(res, 2, *needles, output=out)


def test_no_command_is_usage_error(cli):
    res = cli()
    assert_failed(res, 2, "command")


def test_unknown_argument(cli, good_scene):
    assert_failed(cli("segment", good_scene, "-o", "out.tif", "--colour", "red"), 2, "--colour")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_requested_but_absent(cli, models, tmp_path, good_scene):
    out = tmp_path / "canopy.tif"
    res = cli("segment", good_scene, "--weights", models["chm"], "-o", out, "--device", "cuda")
    assert_failed(res, 2, "--device", "no CUDA GPU", "--device cpu", output=out)


# -------------------------------------------------------------------------------------------------
# Weights


class _Payload:
    """Unpickling this runs a command: torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _weights_case(case: str, d: Path, models: dict) -> tuple[list, list[str]]:
    """(extra arguments, expected words) for a bad-weights case."""
    if case == "missing":
        return ["--weights", d / "nope.pth"], ["nope.pth", "not found"]
    if case == "missing folder":
        return ["--weights", d / "nope"], ["nope", "not found"]
    if case == "truncated pth":
        data = models["head"].read_bytes()
        (d / "head.pth").write_bytes(data[: len(data) // 2])
        return (["--weights", d / "head.pth", "--backbone-weights", models["backbone"]],
                ["head.pth", "truncated"])
    if case == "truncated safetensors":
        folder = d / "chm"
        shutil.copytree(models["chm"], folder)
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        return ["--weights", folder], ["model.safetensors", "truncated"]
    if case == "text file":
        (d / "weights.pth").write_text("these are not weights\n")
        return ["--weights", d / "weights.pth"], ["weights.pth", "not a PyTorch checkpoint"]
    if case == "text safetensors":
        (d / "weights.safetensors").write_text("these are not weights\n")
        return ["--weights", d / "weights.safetensors"], ["weights.safetensors", "safetensors"]
    if case == "folder without model":
        (d / "empty_model").mkdir()
        return ["--weights", d / "empty_model"], ["empty_model", "config.json"]
    if case == "backbone given as head":
        return ["--weights", models["backbone"]], ["backbone.pth", "backbone checkpoint, not a CHMv2 head"]
    if case == "backbone folder given as head":
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        DINOv3ViTModel(DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4)).save_pretrained(d / "bb")
        return ["--weights", d / "bb"], ["bb", "not CHMv2"]
    if case == "head without backbone":
        return ["--weights", models["head"]], ["chm_head.pth", "--backbone-weights"]
    if case == "head given as backbone":
        return (["--weights", models["head"], "--backbone-weights", models["head"]],
                ["chm_head.pth", "head checkpoint"])
    if case == "head of another width":
        return (["--weights", models["head"], "--backbone-weights", models["narrow_backbone"]],
                ["narrow_backbone.pth", "width 32", "64"])
    if case == "pickle with code":
        torch.save({"weight": _Payload(d / "PWNED")}, d / "evil.pth")
        return ["--weights", d / "evil.pth"], ["evil.pth", "refused", "weights_only"]
    if case == "hash mismatch":
        shutil.copy(models["head"], d / "dinov3_vitl16_chmv2_dpt_head-3703d643.pth")
        return (["--weights", d / "dinov3_vitl16_chmv2_dpt_head-3703d643.pth", "--backbone-weights",
                 models["backbone"]], ["3703d643", "SHA-256", "--no-verify"])
    if case == "backbone hash mismatch":
        shutil.copy(models["backbone"], d / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth")
        return (["--weights", models["head"], "--backbone-weights",
                 d / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"], ["eadcf0ff", "SHA-256", "--no-verify"])
    raise AssertionError(case)


WEIGHTS_CASES = ["missing", "missing folder", "truncated pth", "truncated safetensors", "text file",
                 "text safetensors", "folder without model", "backbone given as head",
                 "backbone folder given as head", "head without backbone", "head given as backbone",
                 "head of another width", "pickle with code", "hash mismatch", "backbone hash mismatch"]


@pytest.mark.parametrize("case", WEIGHTS_CASES)
def test_bad_weights(cli, models, tmp_path, good_scene, case):
    extra, needles = _weights_case(case, tmp_path, models)
    out = tmp_path / "out" / "canopy.tif"
    out.parent.mkdir()
    res = cli("segment", good_scene, "-o", out, *FAST, *extra)
    assert_failed(res, 1, *needles, output=out)
    assert not (tmp_path / "PWNED").exists()


def test_hash_mismatch_accepted_with_no_verify(cli, models, tmp_path, good_scene):
    extra, _ = _weights_case("backbone hash mismatch", tmp_path, models)
    out = tmp_path / "canopy.tif"
    assert_ok(cli("segment", good_scene, "-o", out, *FAST, *extra, "--no-verify"), out)


def test_matching_hash_prefix_is_accepted(cli, models, tmp_path, good_scene):
    prefix = hashlib.sha256(models["head"].read_bytes()).hexdigest()[:8]
    head = tmp_path / f"my_head-{prefix}.pth"
    shutil.copy(models["head"], head)
    out = tmp_path / "canopy.tif"
    res = cli("segment", good_scene, "-o", out, *FAST, "--weights", head, "--backbone-weights", models["backbone"])
    assert_ok(res, out)


def test_no_weights_anywhere(cli, tmp_path, good_scene):
    out = tmp_path / "canopy.tif"
    res = cli("segment", good_scene, "-o", out, *FAST)
    assert_failed(res, 1, "canopy weights", "--weights", output=out)


# -------------------------------------------------------------------------------------------------
# Outputs


def _read_only_folder(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    for folder in (Path("/sys/fs"), Path("/sys"), Path("/proc/sys")):   # root writes anywhere else
        try:
            fd, name = tempfile.mkstemp(dir=folder)
        except OSError:
            return folder
        os.close(fd)
        os.unlink(name)
    pytest.skip("running as root and no read-only folder found")


def test_output_folder_missing(cli, models, tmp_path, good_scene):
    out = tmp_path / "nodir" / "canopy.tif"
    assert_failed(cli("segment", good_scene, "--weights", models["chm"], "-o", out, *FAST), 1,
                  "canopy.tif", "does not exist", output=out)
    assert not out.parent.exists()


def test_output_folder_read_only(cli, models, tmp_path, good_scene):
    folder = _read_only_folder(tmp_path)
    out = folder / "canopy.tif"
    try:
        res = cli("segment", good_scene, "--weights", models["chm"], "-o", out, *FAST)
        assert_failed(res, 1, "canopy.tif", "not writable")
        assert not out.exists()
    finally:
        if folder.is_relative_to(tmp_path):
            folder.chmod(0o755)


def test_vector_folder_missing(cli, models, tmp_path, good_scene):
    out = tmp_path / "canopy.tif"
    vec = tmp_path / "nodir" / "canopy.gpkg"
    res = cli("segment", good_scene, "--weights", models["chm"], "-o", out, "--vector", vec, *FAST)
    assert_failed(res, 1, "canopy.gpkg", "does not exist", output=out)


@pytest.mark.parametrize("which", ["raster", "vector"])
def test_target_exists_without_overwrite(cli, models, tmp_path, good_scene, which):
    out, vec = tmp_path / "canopy.tif", tmp_path / "canopy.gpkg"
    existing = out if which == "raster" else vec
    existing.write_bytes(b"earlier result")
    res = cli("segment", good_scene, "--weights", models["chm"], "-o", out, "--vector", vec, *FAST)
    assert_failed(res, 1, existing.name, "exists", "overwrite")
    assert existing.read_bytes() == b"earlier result"
    assert not (vec if which == "raster" else out).exists()
    assert leftovers(tmp_path) == []


def test_target_is_the_input(cli, models, tmp_path, good_scene):
    before = good_scene.read_bytes()
    res = cli("segment", good_scene, "--weights", models["chm"], "-o", good_scene, "--overwrite", *FAST)
    assert_failed(res, 1, "scene.tif", "input")
    assert good_scene.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_vector_same_as_raster(cli, models, tmp_path, good_scene):
    out = tmp_path / "canopy.tif"
    res = cli("segment", good_scene, "--weights", models["chm"], "-o", out, "--vector", out, *FAST)
    assert_failed(res, 2, "--vector", output=out)


def test_overwrite_replaces(cli, models, tmp_path, good_scene):
    out = tmp_path / "canopy.tif"
    out.write_bytes(b"earlier result")
    assert_ok(cli("segment", good_scene, "--weights", models["chm"], "-o", out, *FAST, "--overwrite"), out)
    with rasterio.open(out) as ds:
        assert ds.width == 64


# -------------------------------------------------------------------------------------------------
# The real entry points


def test_python_m_entry_point(models, tmp_path):
    scene = write(tmp_path / "cplx.tif", rgb_crop().astype(np.complex64))
    res = run_python_m(["segment", scene, "--weights", models["chm"], "-o", tmp_path / "o.tif", *FAST], tmp_path)
    assert_failed(res, 1, "cplx.tif", "complex64", output=tmp_path / "o.tif")


@pytest.mark.skipif(shutil.which("dinov3geo") is None, reason="console script not installed")
def test_console_script(tmp_path):
    p = subprocess.run(["dinov3geo", "segment", "none.tif", "-o", "out.tif", "--tile", "60"], capture_output=True, text=True,
                       cwd=tmp_path, env=child_env(), timeout=120)
    assert_failed(Result(p.returncode, p.stdout, p.stderr), 2, "--tile", "60")
