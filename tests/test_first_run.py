"""The first run as the README tells it: its first block (install, main job with ``--weights demo``,
tests), the real-weights command without weights, and its Python blocks, run as written."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyogrio
import pytest
import rasterio

from helpers import ROOT, SAMPLES, child_env

README = (ROOT / "README.md").read_text()
NAIP = SAMPLES / "opengeos_naip_m_4709963_se_14_1_20200831.tif"
# Run as a fresh machine would: transformers (a dev-only test oracle) cannot be imported, nothing
# can be downloaded, no weights in the cache.
NO_TRANSFORMERS = "import sys; sys.modules['transformers'] = None; from dinov3_geo.cli import main; sys.exit(main())"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def in_a_fresh_folder(tmp_path: Path) -> Path:
    """An empty working folder with the repository's samples reachable as ``data_samples/``."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "data_samples").symlink_to(ROOT / "data_samples")
    return work


def run_command(line: str, cwd: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """A README ``dinov3geo ...`` line, run through the same ``main`` without transformers."""
    args = shlex.split(line)
    assert args[0] == "dinov3geo", line
    env = child_env(DINOV3GEO_CACHE=str(tmp_path / "empty-cache"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", NO_TRANSFORMERS, *args[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_first_block_is_install_main_job_and_tests():
    lines = [ln for ln in blocks("bash")[0].splitlines() if ln.strip()]
    assert len(lines) == 3, lines
    install, main_job, tests = lines
    assert install.startswith("pip install -e") and tests.startswith("python -m pytest")
    assert main_job.startswith("dinov3geo segment data_samples/opengeos_naip") and "--weights demo" in main_job
    ci = (ROOT / ".ci" / "run").read_text()
    assert install in ci and tests in ci           # CI runs exactly these


def test_main_job_runs_on_a_fresh_machine_with_the_demo_model(tmp_path):
    work = in_a_fresh_folder(tmp_path)
    main_job = blocks("bash")[0].splitlines()[1]
    run = run_command(main_job, work, tmp_path)
    assert run.returncode == 0, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("warning: ") and "meaningless" in lines[0] and "demo" in lines[0], run.stderr
    assert "error" not in run.stderr
    with rasterio.open(work / "canopy.tif") as out, rasterio.open(NAIP) as src:
        assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, src.shape)
        assert out.descriptions == ("canopy_height_m",)
    polygons = pyogrio.read_dataframe(work / "canopy.gpkg", layer="canopy")
    assert {"area_m2", "mean_height_m", "max_height_m"} <= set(polygons.columns)


def test_real_weights_command_without_the_weights_says_what_to_do(tmp_path):
    work = in_a_fresh_folder(tmp_path)
    real = blocks("bash")[1].strip()
    assert "--weights weights/dinov3-vitl16-chmv2-dpt-head" in real
    run = run_command(real, work, tmp_path)
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert run.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    line = lines[0]
    assert "huggingface.co/facebook/dinov3-vitl16-chmv2-dpt-head" in line          # where to get them
    assert "put the downloaded folder at weights/dinov3-vitl16-chmv2-dpt-head" in line   # where to put them
    assert "--weights demo" in line                                                # and how to try without
    assert not (work / "canopy.tif").exists()


@pytest.mark.slow
def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    work = in_a_fresh_folder(tmp_path)
    monkeypatch.chdir(work)
    monkeypatch.setenv("DINOV3GEO_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setitem(sys.modules, "transformers", None)
    found = blocks("python")
    assert found and "weights=\"demo\"" in found[0]
    for i, code in enumerate(found):
        namespace: dict = {}
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
    assert (work / "canopy.tif").exists() and (work / "canopy.gpkg").exists()
