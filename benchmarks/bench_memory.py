"""Peak memory of the streaming pipeline on a large scene, with a trivial model.

Builds a SIZE x SIZE 3-band uint8 GeoTIFF (tiled, DEFLATE) block by block from a real sample scene
repeated over the grid, then streams it through the public pipeline (``dinov3_geo.predict``: chip
plan -> reader threads -> batches -> model -> StreamingStitcher -> COGSink) with a stand-in model
(the mean of the channels) on the CPU. Prints one JSON line last: peak RSS (sampled and
ru_maxrss), baseline (after the imports), scene size, seconds.

    python benchmarks/bench_memory.py [--size 20000] [--height H] [--tile 512] [--overlap 64] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import rasterio
import torch
from rasterio.windows import Window

from dinov3_geo import predict
from dinov3_geo.hostmem import keep_freed_memory

SAMPLE = Path(__file__).resolve().parent.parent / "data_samples" / "landsat7_saltlake_truecolor_utm12n.tif"
BLOCK = 512


def make_scene(path: Path, size: int, height: int | None = None) -> None:
    """Write ``height`` (default ``size``) x ``size`` x 3 uint8, block by block, tiling the real
    sample over the grid."""
    height = height or size
    with rasterio.open(SAMPLE) as src:
        tile = src.read([1, 2, 3])
        profile = src.profile.copy()
    th, tw = tile.shape[1:]
    profile.update(width=size, height=height, count=3, tiled=True, blockxsize=BLOCK, blockysize=BLOCK,
                   compress="DEFLATE", zlevel=1, bigtiff="IF_SAFER", photometric="RGB")
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, height, BLOCK):
            rows = np.arange(r, min(r + BLOCK, height)) % th
            band = tile[:, rows]
            for c in range(0, size, BLOCK):
                cols = np.arange(c, min(c + BLOCK, size)) % tw
                dst.write(band[:, :, cols], window=Window(c, r, len(cols), len(rows)))


class PeakSampler(threading.Thread):
    """Samples this process's RSS every ``every`` seconds and keeps the maximum."""

    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        self.every, self.peak, self.stop_flag = every, 0, threading.Event()
        self.proc = psutil.Process()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def stop(self) -> int:
        self.stop_flag.set()
        self.join()
        return max(self.peak, self.proc.memory_info().rss)


class ChannelMean(torch.nn.Module):
    """The stand-in model: the mean of the three 0..1 channels, one band."""

    channels = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1, keepdim=True)


def stream(scene_path: Path, out: Path, tile: int, overlap: int, readers: int = 2) -> int:
    """Run the stand-in model over the scene; return the number of chips computed."""
    result = predict(scene_path, ChannelMean(), out, tile=tile, overlap=overlap, device="cpu", precision="fp32",
                     batch_size=8, overwrite=True, progress=False, readers=readers)
    return result.stats.chips_computed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000, help="width (and height unless --height) in px")
    ap.add_argument("--height", type=int, default=None, help="height in px (default: --size)")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    keep_freed_memory()     # as the dinov3geo command does; library runs leave the allocator alone
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    height = a.height or a.size
    scene_path, out = work / f"scene_{height}x{a.size}.tif", work / f"out_{height}x{a.size}.tif"
    try:
        t0 = time.time()
        if not scene_path.exists():
            make_scene(scene_path, a.size, height)
        t1 = time.time()
        baseline = psutil.Process().memory_info().rss
        sampler = PeakSampler()
        sampler.start()
        chips = stream(scene_path, out, a.tile, a.overlap)
        peak = sampler.stop()
        t2 = time.time()
        with rasterio.open(out) as ds:
            layout = ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT")
            shape = (ds.height, ds.width)
        print(json.dumps({
            "scene_px": [height, a.size], "tile": a.tile, "overlap": a.overlap, "chips_computed": chips,
            "baseline_rss_mb": round(baseline / 2**20), "peak_rss_mb": round(peak / 2**20),
            "peak_above_baseline_mb": round((peak - baseline) / 2**20),
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "make_input_s": round(t1 - t0, 1), "stream_s": round(t2 - t1, 1),
            "output_shape": shape, "output_layout": layout,
        }))
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
