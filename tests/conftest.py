"""Fixtures shared by the test modules (plain helpers live in ``helpers.py``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dinov3_geo.testing.random_backbone import write_random_backbone
from dinov3_geo.testing.random_chmv2 import write_random_chmv2
from helpers import SAMPLES, MemorySink, stream, write_raster


@pytest.fixture
def sample():
    """Path of a real scene in ``data_samples/`` by file name."""
    def get(name: str) -> Path:
        path = SAMPLES / name
        assert path.exists(), f"missing sample {path}"
        return path
    return get


@pytest.fixture
def raster(tmp_path):
    """``raster(array, name="x.tif", **profile)`` writes a GeoTIFF under ``tmp_path``."""
    def make(array: np.ndarray, name: str = "scene.tif", **kw) -> Path:
        return write_raster(tmp_path / name, array, **kw)
    return make


@pytest.fixture
def memory_sink():
    return MemorySink


@pytest.fixture
def run_stream():
    return stream


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory) -> Path:
    """A tiny random DINOv3 backbone saved in the Hugging Face layout (read only: tests share it)."""
    return write_random_backbone(tmp_path_factory.mktemp("backbone") / "dinov3-tiny")


@pytest.fixture(scope="session")
def random_chmv2(tmp_path_factory) -> Path:
    """A tiny random CHMv2 canopy model saved in the Hugging Face layout (read only: tests share it)."""
    return write_random_chmv2(tmp_path_factory.mktemp("chmv2") / "chmv2")
