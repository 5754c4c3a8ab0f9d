"""What ``--precision fp8`` costs in accuracy and gains in speed, against bf16, for the canopy model.

The reference is the same model in fp32 on the same device. Input: real chips cut from the Salt Lake
sample (``data_samples/``), normalised as the engine does. For bf16 and fp8 it reports the relative
error of the heights against fp32 (median, 99th percentile, max), their correlation, and the
model-only chips/s of each (the engine's device-side steps, as ``bench_pipeline.py`` measures them).
Weights are random (``bench_pipeline.py``'s transformers CHMv2), so the errors say how the arithmetic
behaves on these shapes, not how a trained model's heights move: rerun with the real weights
(``--weights DIR``) to decide.

    python benchmarks/bench_fp8.py --model small --device cpu --tile 256 --batch 2
    python benchmarks/bench_fp8.py --model vitl --device cuda --batch 16 [--weights CHMV2_DIR]

Prints one JSON object as the last line of stdout (also to ``--json FILE``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import bench_pipeline as bp  # noqa: E402


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
    import torch
    from contextlib import nullcontext

    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    with torch.inference_mode(), autocast:
        x = x_uint8.to(dev).float().div_(255.0)
        return model(model.normalise(x).to(dtype)).float().cpu()


def errors(got, ref) -> dict:
    """Relative error of ``got`` against ``ref`` (both [B,1,H,W] float32 heights)."""
    import torch

    rel = ((got - ref).abs() / ref.abs().clamp_min(1e-6)).flatten()
    g, r = got.flatten().double(), ref.flatten().double()
    corr = float(torch.corrcoef(torch.stack([g, r]))[0, 1])
    q = torch.quantile(rel[torch.randperm(rel.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]],
                       torch.tensor([0.5, 0.99]))
    return {"median_rel_error": round(float(q[0]), 6), "p99_rel_error": round(float(q[1]), 6),
            "max_rel_error": round(float(rel.max()), 6), "corr": round(corr, 6)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", choices=bp.CANOPY_MODELS)
    ap.add_argument("--weights", type=Path, default=None, help="a CHMv2 folder or head .pth (default: random)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10, help="model-only batches per precision")
    ap.add_argument("--compile", action="store_true", help="torch.compile both (warm-up not timed)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the random weights (kept, reused)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    import torch

    from dinov3_geo.engine import Engine, dtype_for, resolve_device
    from dinov3_geo.models.canopy import load_canopy_model

    t0 = time.perf_counter()
    dev = resolve_device(a.device)
    result: dict = {"device": bp.device_name(dev), "model": a.model if a.weights is None else str(a.weights),
                    "chip": a.tile, "batch": a.batch, "compile": a.compile, "torch": torch.__version__}
    with bp.recorded(result, a.work, "bench-fp8-", t0) as work:
        weights = a.weights or bp.ensure_canopy_weights(a.model, work)
        x = real_chips(a.batch, a.tile)
        ref = heights(load_canopy_model(weights, device=dev, dtype=torch.float32, verify=False), x,
                      torch.float32, dev)
        for precision in ("bf16", "fp8"):
            dtype = dtype_for(precision)
            model = load_canopy_model(weights, device=dev, dtype=dtype, verify=False)
            engine = Engine(model, dev, precision, a.batch, a.tile, 0, compile=a.compile)   # fp8: converts
            got = heights(model, x, dtype, dev)
            speed = bp.model_only(dev, dtype, model, engine._forward, a.batch, a.tile, a.batch * a.iters, a.iters)
            result[precision] = {**errors(got, ref), "model_only_chips_per_s": round(speed["chips_per_s"], 3)}
            bp.log(f"{precision}: {result[precision]}")
            del model, engine
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        result["fp8_speedup_over_bf16"] = round(result["fp8"]["model_only_chips_per_s"]
                                                / result["bf16"]["model_only_chips_per_s"], 3)
    text = json.dumps(result)
    if a.json is not None:
        a.json.write_text(text + "\n")
    print(text, flush=True)
    return result


if __name__ == "__main__":
    sys.exit(1 if "error" in main() else 0)
