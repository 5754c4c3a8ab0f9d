"""The allocator setting is the program's choice: the command keeps freed memory in the process
(glibc) unless the user says not to; ``import dinov3_geo`` and library runs leave the allocator alone."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = "from dinov3_geo.hostmem import keep_freed_memory as k; print(k(), k())"
COMMAND = """
import os
from dinov3_geo.cli import main
from dinov3_geo.hostmem import MMAP_THRESHOLD, freed_memory_kept
main([])
print(freed_memory_kept(), os.environ.get("MALLOC_MMAP_THRESHOLD_") == str(MMAP_THRESHOLD))
"""
LIBRARY_RUN = """
import sys, torch, dinov3_geo
from dinov3_geo.hostmem import freed_memory_kept
dinov3_geo.predict(sys.argv[1], torch.nn.Conv2d(3, 1, 1), sys.argv[2], tile=128, overlap=16, device="cpu",
                   progress=False)
print(freed_memory_kept())
"""
SCENE = Path(__file__).resolve().parents[1] / "data_samples" / "rasterio_RGB.byte.tif"
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _run(code, env_value=None, *args):
    env = {k: v for k, v in os.environ.items() if k != "DINOV3GEO_KEEP_FREED_MEMORY" and not k.startswith("MALLOC_")}
    if env_value is not None:
        env["DINOV3GEO_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_thresholds_set_once_on_glibc():
    assert _run(CHECK) == ["True", "True"]


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_environment_leaves_the_allocator_alone(value):
    assert _run(CHECK, value) == ["False", "False"]


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_the_command_keeps_freed_memory_for_itself_and_its_workers():
    assert _run(COMMAND) == ["True", "True"]


def test_a_library_run_leaves_the_allocator_alone(tmp_path):
    out = tmp_path / "out.tif"
    assert _run(LIBRARY_RUN, None, SCENE, out) == ["False"]
    assert out.exists()
