"""CPU time per chip of each host stage of the pipeline, on a real scene, with no model.

Each stage runs alone, one after the other, on the same chips (the pass-through path of
``bench_pipeline.py --ceiling``), so its cost is not hidden by overlap with the others:

- ``read``: GDAL's windowed read and decode of the three bands (rasterio ``read``);
- ``mask``: GDAL's dataset mask of the window (``read_masks``) and the any-band rule;
- ``scene_read``: ``Scene.read`` as the readers call it (read, mask, scaling, zeroing invalid);
- ``pad``: reflection padding of border chips to the tile (``pad_to_tile``);
- ``stack``: stacking a batch of chips into one (pinned on CUDA) host buffer;
- ``to_float``: the uint8 -> float32 /255 step (on the device in real runs; CPU here);
- ``stitch``: ``StreamingStitcher.add`` (weights, accumulation, normalising finished rows) into a
  sink that drops rows;
- ``sink_<how>``: the same into ``COGSink`` minus ``stitch``, up to the last row, both ways:
  ``streamed`` (blocks encoded while streaming, the default) and ``gdal_copy`` (strips into a
  temporary GeoTIFF and streamed overviews, ``stream_blocks=False``);
- ``cog_<how>``: what the sink does after the last row (``finalize``): appending the encoded
  blocks, or GDAL's COG conversion.

The allocator is set as the ``dinov3geo`` command sets it (:mod:`dinov3_geo.hostmem`). Prints one JSON object (ms of
CPU per chip per stage, wall seconds, the machine, load average;
``total_cpu_ms_per_chip_<how>``: read to COG, without ``read`` and ``mask``, which ``scene_read``
contains).

    python benchmarks/bench_stages.py [--grid 12x12] [--tile 512] [--overlap 64] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
import torch

import bench_pipeline as bp
from dinov3_geo.hostmem import keep_freed_memory
from dinov3_geo.io.cog import COGSink
from dinov3_geo.io.scene import open_scene
from dinov3_geo.io.stitch import StreamingStitcher
from dinov3_geo.io.tiling import ChipPlan, pad_to_tile


class DropRows:
    """A sink that takes rows and keeps nothing."""

    def write(self, row_off: int, rows: np.ndarray) -> None:
        pass


@contextmanager
def timed(result: dict, name: str, chips: int):
    t, c = time.perf_counter(), time.process_time()
    yield
    result[name] = {"cpu_ms_per_chip": round(1000 * (time.process_time() - c) / chips, 3),
                    "wall_s": round(time.perf_counter() - t, 3)}


def run(scene_path: Path, work: Path, tile: int, overlap: int, batch: int) -> dict:
    res: dict = {}
    with open_scene(scene_path) as sc, rasterio.open(scene_path) as ds:
        plan = ChipPlan.build(sc.height, sc.width, tile, overlap)
        wins, n = plan.windows, len(plan.windows)
        with timed(res, "read", n):
            for w in wins:
                ds.read(sc.bands, window=w)
        with timed(res, "mask", n):
            for w in wins:
                np.any(ds.read_masks(sorted(set(sc.bands)), window=w) > 0, axis=0)
        chips = []
        with timed(res, "scene_read", n):
            for w in wins:
                chips.append(sc.read(w))
        with timed(res, "pad", n):
            padded = [np.ascontiguousarray(pad_to_tile(c, tile)[0]) for c, _ in chips]
        host = torch.empty((batch, 3, tile, tile), dtype=torch.uint8)
        with timed(res, "stack", n):
            for i in range(0, n, batch):
                part = padded[i:i + batch]
                np.stack(part, out=host.numpy()[:len(part)])
        with timed(res, "to_float", n):
            for i in range(0, n, batch):
                host.float().div_(255.0)
        outs = [p[:1].astype(np.float32) / 255 for p in padded]      # the pass-through model's output
        valid = [v for _, v in chips]
        with timed(res, "stitch", n):
            st = StreamingStitcher(DropRows(), plan, 1)
            for w, o, v in zip(wins, outs, valid):
                st.add(w, o, v)
            st.close()
        for how, streamed in (("gdal_copy", False), ("streamed", True)):
            sink_stages(res, how, streamed, sc, plan, work / f"stages_{how}.tif", wins, outs, valid)
    for how in ("gdal_copy", "streamed"):
        res[f"total_cpu_ms_per_chip_{how}"] = round(sum(
            v["cpu_ms_per_chip"] for k, v in res.items()
            if k not in ("read", "mask") and not k.endswith("gdal_copy" if how == "streamed" else "streamed")), 3)
    res["chips"] = n
    return res


def sink_stages(res: dict, how: str, streamed: bool, scene, plan, out: Path, wins, outs, valid) -> None:
    """``sink_<how>``: stitching into ``COGSink`` up to the last row, less the stitching alone;
    ``cog_<how>``: what the sink does after the last row."""
    n = len(wins)
    t, c = time.perf_counter(), time.process_time()
    with COGSink(out, scene, overwrite=True, stream_blocks=streamed) as sink:
        st = StreamingStitcher(sink, plan, 1)
        for w, o, v in zip(wins, outs, valid):
            st.add(w, o, v)
        st.close()
        sink.flush()
        c_rows, t_rows = time.process_time(), time.perf_counter()
    c_end, t_end = time.process_time(), time.perf_counter()
    res[f"sink_{how}"] = {"cpu_ms_per_chip": round(1000 * (c_rows - c) / n - res["stitch"]["cpu_ms_per_chip"], 3),
                          "wall_s": round(t_rows - t, 3)}
    res[f"cog_{how}"] = {"cpu_ms_per_chip": round(1000 * (c_end - c_rows) / n, 3), "wall_s": round(t_end - t_rows, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="12x12")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    rows, cols = (int(v) for v in a.grid.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        with rasterio.open(bp.DEFAULT_SOURCE) as s:
            src_hw = (s.height, s.width)
        h, w = bp.scene_size(src_hw, a.tile, a.overlap, None, (rows, cols))
        scene = work / f"scene_{h}x{w}.tif"
        if not scene.exists():
            bp.make_scene(bp.DEFAULT_SOURCE, scene, h, w)
        result = {"machine": f"{os.cpu_count()} cores, {platform.machine()}", "scene_px": [h, w], "tile": a.tile,
                  "overlap": a.overlap, "batch": a.batch,
                  "freed_memory_kept": keep_freed_memory(),     # the allocator as the command sets it
                  "load_average_before": [round(v, 2) for v in os.getloadavg()]}
        result.update(run(scene, work, a.tile, a.overlap, a.batch))
        result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
