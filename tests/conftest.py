"""Generic fixtures shared by the test modules."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

SAMPLES = Path(__file__).resolve().parent.parent / "data_samples"


@pytest.fixture
def sample():
    """Path of a real scene in ``data_samples/`` by file name."""
    def get(name: str) -> Path:
        path = SAMPLES / name
        assert path.exists(), f"missing sample {path}"
        return path
    return get


def write_raster(path, array: np.ndarray, crs="EPSG:32633", transform: Affine | None = None,
                 nodata=None, **extra) -> Path:
    """Write ``array`` (``[bands, h, w]`` or ``[h, w]``) as a GeoTIFF; returns the path."""
    array = array[None] if array.ndim == 2 else array
    transform = transform if transform is not None else Affine(10.0, 0, 500000.0, 0, -10.0, 4000000.0)
    profile = dict(driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                   dtype=array.dtype.name, crs=crs, transform=transform, nodata=nodata, **extra)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(array)
    return Path(path)


@pytest.fixture
def raster(tmp_path):
    """``raster(array, name="x.tif", **profile)`` writes a GeoTIFF under ``tmp_path``."""
    def make(array: np.ndarray, name: str = "scene.tif", **kw) -> Path:
        return write_raster(tmp_path / name, array, **kw)
    return make


class MemorySink:
    """A sink that assembles the rows it receives and checks each row arrives exactly once."""

    def __init__(self, count: int, height: int, width: int, dtype="float32", fill=np.nan):
        self.array = np.full((count, height, width), fill, dtype=dtype)
        self.times = np.zeros(height, np.int64)

    def write(self, row_off: int, array: np.ndarray) -> None:
        self.array[:, row_off:row_off + array.shape[1]] = array
        self.times[row_off:row_off + array.shape[1]] += 1


class ChipFunction(torch.nn.Module):
    """A numpy function of one 0..1 chip (``[3, T, T]`` -> ``[C, T, T]``) as a model for the pipeline."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.ascontiguousarray(self.fn(c), np.float32)) for c in x.numpy()])


def stream(scene, sink, model, channels: int, tile: int, overlap: int, kind="continuous", batch_size=4):
    """Run ``model`` (chip ``[3, tile, tile]`` float in 0..1 -> ``[channels, tile, tile]``) over a
    scene through the public pipeline (``run_chips`` into a ``StreamingStitcher`` on ``sink``)."""
    from dinov3_geo.io.stitch import StreamingStitcher
    from dinov3_geo.pipeline import ChipPlan, RunSettings, run_chips

    plan = ChipPlan.build(scene.height, scene.width, tile, overlap)
    stitcher = StreamingStitcher(sink, plan, channels, kind=kind)
    run_chips(scene, ChipFunction(model), stitcher, plan, RunSettings.resolve("cpu", "fp32", batch_size),
              progress=False)
    return stitcher


@pytest.fixture
def memory_sink():
    return MemorySink


@pytest.fixture
def run_stream():
    return stream
