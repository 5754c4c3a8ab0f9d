"""Generic fixtures shared by the test modules."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
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


def stream(scene, sink, model, channels: int, tile: int, overlap: int, kind="continuous", order=None):
    """Run ``model`` (chip ``[3, tile, tile]`` float in 0..1 -> ``[channels, tile, tile]``) over a
    scene chip by chip like the engine: read, skip empty chips, pad to the tile, stitch."""
    from dinov3_geo.io.stitch import StreamingStitcher
    from dinov3_geo.io.tiling import pad_to_tile, plan_chips

    windows = plan_chips(scene.height, scene.width, tile, overlap)
    stitcher = StreamingStitcher(sink, scene.height, scene.width, channels, tile, overlap, kind=kind)
    for i in (order if order is not None else range(len(windows))):
        chip, valid = scene.read(windows[i])
        if not valid.any():
            stitcher.skip(windows[i])
            continue
        x = chip.astype(np.float32) / 255 if chip.dtype == np.uint8 else chip
        padded, (h, w) = pad_to_tile(x, tile)
        stitcher.add(windows[i], model(padded), valid)
    stitcher.close()
    return stitcher


@pytest.fixture
def memory_sink():
    return MemorySink


@pytest.fixture
def run_stream():
    return stream
