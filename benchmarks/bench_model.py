"""Variants of the canopy model on one device: model-only speed, and heights against fp32.

Each variant is a way to run the same weights faster; the reference is the model in fp32 on the
same device. Input: real chips cut from the Salt Lake sample (``data_samples/``), through the
engine's device-side steps. Variants (``--variants``, default all):

- ``bf16``: what ``--precision auto`` runs on a GPU;
- ``bf16_cudnn_benchmark``: bf16 with cuDNN's autotuner on (``torch.backends.cudnn.benchmark``;
  every chip has the same size, so the head's convolutions are tuned once); no effect on a CPU;
- ``bf16_channels_last``: bf16 with the head's convolutions in channels-last (NHWC) memory format;
- ``fp8``: ``--precision fp8``, float8 products in the backbone's linear layers (GPUs of compute
  capability 8.9+; emulated, slowly, on a CPU).

For each: ``median_rel_error``, ``p99_rel_error``, ``max_rel_error`` and ``corr`` of the heights
against fp32, and ``model_only_chips_per_s`` (as ``bench_pipeline.py`` measures it); plus
``speedup_over_bf16``. Weights are random (``bench_pipeline.py``'s transformers CHMv2), so the
errors say how the arithmetic behaves on these shapes, not how a trained model's heights move:
rerun with the real weights (``--weights DIR``) before changing a default.

    python benchmarks/bench_model.py --model small --device cpu --tile 256 --batch 4
    python benchmarks/bench_model.py --model vitl --device cuda --batch 16 [--weights CHMV2_DIR] [--compile]

Prints one JSON object as the last line of stdout (also to ``--json FILE``).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import bench_pipeline as bp  # noqa: E402

VARIANTS = ("bf16", "bf16_cudnn_benchmark", "bf16_channels_last", "fp8")


def real_chips(batch: int, tile: int):
    """``batch`` uint8 chips [B,3,T,T] from the Salt Lake sample, left to right, top to bottom."""
    import numpy as np
    import rasterio
    import torch

    with rasterio.open(bp.DEFAULT_SOURCE) as src:
        data = src.read([1, 2, 3])
    _, h, w = data.shape
    chips = []
    for top in range(0, h - tile + 1, tile // 2):
        for left in range(0, w - tile + 1, tile // 2):
            chips.append(data[:, top:top + tile, left:left + tile])
    reps = -(-batch // len(chips))
    return torch.from_numpy(np.ascontiguousarray(np.stack((chips * reps)[:batch])))


def heights(model, x_uint8, dtype, dev):
    """The engine's device-side steps on ``x_uint8``: float32 heights on the CPU."""
    return bp.device_steps(model, x_uint8.to(dev), dtype).cpu()


def errors(got, ref) -> dict:
    """Relative error of ``got`` against ``ref`` (both [B,1,H,W] float32 heights)."""
    import torch

    rel = ((got - ref).abs() / ref.abs().clamp_min(1e-6)).flatten()
    g, r = got.flatten().double(), ref.flatten().double()
    corr = float(torch.corrcoef(torch.stack([g, r]))[0, 1])
    sample = rel[torch.randperm(rel.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    q = torch.quantile(sample, torch.tensor([0.5, 0.99]))
    return {"median_rel_error": round(float(q[0]), 6), "p99_rel_error": round(float(q[1]), 6),
            "max_rel_error": round(float(rel.max()), 6), "corr": round(corr, 6)}


def variant_setup(name: str, model):
    """(precision, context manager for the variant's runs), after preparing ``model`` in place."""
    import torch

    if name == "bf16_channels_last":
        model.head.to(memory_format=torch.channels_last)
    if name == "bf16_cudnn_benchmark":
        return "bf16", torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False)
    return ("fp8" if name == "fp8" else "bf16"), contextlib.nullcontext()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", choices=bp.CANOPY_MODELS)
    ap.add_argument("--weights", type=Path, default=None, help="a CHMv2 folder or head .pth (default: random)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10, help="model-only batches per variant")
    ap.add_argument("--compile", action="store_true", help="torch.compile every variant (warm-up not timed)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the random weights (kept, reused)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown} (choose from {', '.join(VARIANTS)})")

    import torch

    from dinov3_geo.engine import Engine, RunSettings
    from dinov3_geo.models.canopy import load_canopy_model

    t0 = time.perf_counter()
    dev = RunSettings.resolve(a.device).device
    result: dict = {"device": bp.device_name(dev), "model": a.model if a.weights is None else str(a.weights),
                    "chip": a.tile, "batch": a.batch, "compile": a.compile, "torch": torch.__version__}
    with bp.recorded(result, a.work, "bench-model-", t0) as work:
        weights = a.weights or bp.ensure_canopy_weights(a.model, work)
        x = real_chips(a.batch, a.tile)
        ref = heights(load_canopy_model(weights, device=dev, dtype=torch.float32, verify=False), x,
                      torch.float32, dev)
        for name in variants:
            model = load_canopy_model(weights, device=dev, dtype=torch.bfloat16, verify=False)
            precision, flags = variant_setup(name, model)
            try:
                with flags:
                    settings = RunSettings.resolve(dev, precision, a.batch, a.compile)
                    Engine(model, settings)   # fp8: converts; compile: compiles the regions in place
                    dtype = settings.dtype
                    got = heights(model, x, dtype, dev)
                    speed = bp.model_only(dev, dtype, model, a.batch, a.tile, a.batch * a.iters, a.iters)
                result[name] = {**errors(got, ref), "model_only_chips_per_s": round(speed["chips_per_s"], 3)}
            except Exception as exc:      # one variant (fp8 on an older GPU) must not cost the others
                result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            bp.log(f"{name}: {result[name]}")
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        base = result.get("bf16", {}).get("model_only_chips_per_s")
        for name in variants:
            speed = result[name].get("model_only_chips_per_s")
            if base and speed:
                result[name]["speedup_over_bf16"] = round(speed / base, 3)
    return bp.emit(result, a.json)


if __name__ == "__main__":
    sys.exit(1 if "error" in main() else 0)
