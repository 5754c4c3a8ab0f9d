"""Batches: the overhead each scene adds, and this process against a local Dask cluster.

``--mode overhead``: N scenes of different sizes cut from the real samples in ``data_samples/``,
each run through the pipeline (``write_dense`` into a COG) with the simulated device
(``--model sleep:R``, default ``sleep:inf``: the host alone), once with one engine kept for every
scene (what a batch worker does) and once with a new engine per scene (``predict``); the wall time
per scene is fitted as ``a + b * chips``: ``a`` is the per-scene overhead (opening the scene and
the output, the first reads, the last rows and the file's completion), ``1 / b`` the chips/s.

``--mode batch``: ``run_batch`` with the demo model (``weights="demo"``, a small random CHMv2 on
the CPU) over "few large" scenes (``--large K`` scenes of ``--large-px`` px, the Salt Lake sample
tiled) and "many small" ones (the N cut scenes), in this process and on ``--dask local:W``
(``--workers``): wall seconds (with the cluster's start), chips, chips/s. ``--compile`` compiles
the model (once per engine).

Prints progress on stderr and one JSON object as the last line of stdout (also ``--json FILE``).

    python benchmarks/bench_batch.py --mode overhead --scenes 20
    python benchmarks/bench_batch.py --mode batch --scenes 20 --large 2 --workers 2
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # as the dinov3geo command does
REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import bench_pipeline as bp  # noqa: E402

SOURCES = ("landsat7_saltlake_truecolor_utm12n.tif", "opengeos_naip_m_4709963_se_14_1_20200831.tif")


def cut_scenes(folder: Path, count: int, smallest: int, largest: int) -> list[Path]:
    """``count`` windows of the samples, sizes from ``smallest`` to ``largest`` px (square-ish),
    each with its source's georeferencing, as GeoTIFFs in ``folder`` (made once)."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for k in range(count):
        source = bp.REPO / "data_samples" / SOURCES[k % len(SOURCES)]
        path = folder / f"scene_{k:02d}.tif"
        paths.append(path)
        if path.exists():
            continue
        with rasterio.open(source) as src:
            size = smallest + (largest - smallest) * k // max(1, count - 1)
            h, w = min(size, src.height), min(int(size * rng.uniform(0.8, 1.0)), src.width)
            window = Window(int(rng.integers(0, src.width - w + 1)), int(rng.integers(0, src.height - h + 1)), w, h)
            profile = src.profile | dict(width=w, height=h, transform=src.window_transform(window))
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(src.read(window=window))
    return paths


def fit(chips: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least squares ``seconds = a + b * chips``: (a, b)."""
    import numpy as np

    b, a = np.polyfit(np.asarray(chips, float), np.asarray(seconds, float), 1)
    return float(a), float(b)


def overhead(a, scenes: list[Path], work: Path) -> dict:
    """Per-scene wall seconds with one kept engine and with a new engine per scene, and the fits."""
    from dinov3_geo import predict
    from dinov3_geo.engine import Engine
    from dinov3_geo.io.scene import open_scene
    from dinov3_geo.pipeline import ChipPlan, DenseOutput, RunSettings, write_dense
    from dinov3_geo.testing.sleep_device import SleepModel

    model = SleepModel.parse(a.model)
    settings = RunSettings.resolve("cpu", batch_size=a.batch)
    engine = Engine(model, settings)
    out: dict = {}
    for how in ("kept_engine", "engine_per_scene") * a.repeats:
        chips, walls, device = [], [], []
        for k, path in enumerate(scenes):
            model.timeline.reset()
            target = work / f"overhead_{k:02d}.tif"
            t = time.perf_counter()
            if how == "kept_engine":
                with open_scene(path) as sc:
                    plan = ChipPlan.build(sc.height, sc.width, a.tile, a.overlap)
                    stats, _ = write_dense(sc, model, target, plan, settings, DenseOutput(), overwrite=True,
                                           progress=False, engine=engine)
            else:
                stats = predict(path, model, target, tile=a.tile, overlap=a.overlap, batch_size=a.batch,
                                device="cpu", overwrite=True, progress=False).stats
            walls.append(time.perf_counter() - t)
            chips.append(stats.chips_computed)
            device.append(model.timeline.busy_s)
        intercept, slope = fit(chips, walls)
        runs = out.setdefault(how, [])
        runs.append(dict(total_s=round(sum(walls), 3), chips=sum(chips), per_scene_overhead_s=round(intercept, 4),
                         chips_per_s=round(1 / slope, 1) if slope > 0 else None,
                         mean_wall_s=round(sum(walls) / len(walls), 4),
                         mean_wall_minus_device_s=round((sum(walls) - sum(device)) / len(walls), 4),
                         walls_s=[round(w, 4) for w in walls], scene_chips=chips))
        bp.log(f"{how}: {len(scenes)} scenes, {sum(chips)} chips in {sum(walls):.2f} s; overhead "
               f"{intercept * 1000:.0f} ms a scene, {1 / slope if slope > 0 else float('inf'):.0f} chips/s")
    for how, runs in out.items():
        best = runs[bp.median_index([r["per_scene_overhead_s"] for r in runs])]
        out[how] = {**best, "per_scene_overhead_s_runs": [r["per_scene_overhead_s"] for r in runs]}
    return out


def batch(a, small: list[Path], large: list[Path], work: Path) -> dict:
    """``run_batch`` (demo model) over the large and the small scenes, in process and on Dask."""
    from dinov3_geo.batch import run_batch

    out: dict = {}
    for group, scenes in (("few_large", large), ("many_small", small)):
        for where in ("in_process", f"dask_local_{a.workers}") * a.repeats:
            t = time.perf_counter()
            res = run_batch([str(p) for p in scenes], work / f"out_{group}_{where}", weights="demo", tile=a.tile,
                            overlap=a.overlap, batch_size=a.batch, device="cpu", overwrite=True, progress=False,
                            compile=a.compile, dask=None if where == "in_process" else f"local:{a.workers}")
            wall = time.perf_counter() - t
            chips = sum(o.chips for o in res.outcomes)
            busy = sum(o.seconds for o in res.outcomes)
            runs = out.setdefault(f"{group}_{where}", [])
            runs.append(dict(wall_s=round(wall, 2), chips=chips, chips_per_s=round(chips / wall, 2),
                             scene_seconds_sum=round(busy, 2), ok=res.ok, scenes=len(scenes)))
            bp.log(f"{group} {where}: {len(scenes)} scenes, {chips} chips in {wall:.1f} s ({chips / wall:.1f} chips/s)")
    for key, runs in out.items():
        best = runs[bp.median_index([r["wall_s"] for r in runs])]
        out[key] = {**best, "wall_s_runs": [r["wall_s"] for r in runs]}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("overhead", "batch"), default="overhead")
    ap.add_argument("--scenes", type=int, default=20, help="small scenes cut from the samples")
    ap.add_argument("--min-px", type=int, default=300)
    ap.add_argument("--max-px", type=int, default=700)
    ap.add_argument("--large", type=int, default=2, help="batch mode: large scenes")
    ap.add_argument("--large-px", type=int, default=2304, help="batch mode: side of the large scenes")
    ap.add_argument("--model", default="sleep:inf", help="overhead mode: sleep:R")
    ap.add_argument("--workers", type=int, default=2, help="batch mode: --dask local:W")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds; the median's figures")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    from dinov3_geo.hostmem import keep_freed_memory, usable_cores

    keep_freed_memory()     # as the dinov3geo command does (and so for its Dask workers); library runs do not

    t0 = time.perf_counter()
    result: dict = {"mode": a.mode, "machine": f"{os.cpu_count()} cores, {platform.machine()}",
                    "cores": usable_cores(), "tile": a.tile, "overlap": a.overlap, "batch": a.batch,
                    "scenes": a.scenes, "load_average_before": [round(v, 2) for v in os.getloadavg()]}
    with bp.recorded(result, a.work, "bench-batch-", t0) as work:
        small = cut_scenes(work / "small", a.scenes, a.min_px, a.max_px)
        if a.mode == "overhead":
            result.update(model=a.model, **overhead(a, small, work))
        else:
            large = []
            for k in range(a.large):
                path = work / f"large_{a.large_px}_{k}.tif"
                if not path.exists():
                    bp.make_scene(bp.DEFAULT_SOURCE, path, a.large_px, a.large_px)
                large.append(path)
            result.update(model="demo", workers=a.workers, large=a.large, large_px=a.large_px, compile=a.compile,
                          **batch(a, small, large, work))
        result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return bp.emit(result, a.json)


if __name__ == "__main__":
    sys.exit(1 if "error" in main() else 0)
