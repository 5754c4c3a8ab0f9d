"""The run's allocator setting: glibc keeps freed memory in the process unless the user says not to."""
import os
import platform
import subprocess
import sys

import pytest

CHECK = "from dinov3_geo.hostmem import keep_freed_memory as k; print(k(), k())"


def _run(env_value):
    env = {k: v for k, v in os.environ.items() if k != "DINOV3GEO_KEEP_FREED_MEMORY"}
    if env_value is not None:
        env["DINOV3GEO_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_thresholds_set_once_on_glibc():
    assert _run(None) == ["True", "True"]


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_environment_leaves_the_allocator_alone(value):
    assert _run(value) == ["False", "False"]
