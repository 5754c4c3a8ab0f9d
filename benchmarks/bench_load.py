"""Host memory while loading a ViT-7B-shaped checkpoint (Meta .pth layout, bf16 tensors).

Writes a random checkpoint with the 7B's width (4096, 32 heads, SwiGLU 8192, no qkv bias) and
``--depth`` blocks (40 = the real 7B, 13.4 GB), then loads it with ``dinov3_geo.load_backbone`` in a
fresh process and prints one JSON object last: checkpoint size, RSS before loading and the peak
while loading. The loader builds the model on the meta device and takes the file's tensors as its
parameters, so the peak above baseline should be about one copy of the weights.

    python benchmarks/bench_load.py [--depth 2] [--dir /tmp] [--dtype bf16|fp32]
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

D, HEADS, HIDDEN = 4096, 32, 8192


def write_checkpoint(path: Path, depth: int) -> None:
    import torch

    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)

    sd = {"cls_token": rnd(1, 1, D), "storage_tokens": rnd(1, 4, D), "mask_token": rnd(1, D),
          "patch_embed.proj.weight": rnd(D, 3, 16, 16), "patch_embed.proj.bias": rnd(D),
          "rope_embed.periods": (100 ** (torch.arange(D // HEADS // 4) * 4 / (D // HEADS))).to(torch.bfloat16),
          "norm.weight": rnd(D), "norm.bias": rnd(D), "local_cls_norm.weight": rnd(D), "local_cls_norm.bias": rnd(D)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": rnd(D), b + "norm1.bias": rnd(D), b + "norm2.weight": rnd(D), b + "norm2.bias": rnd(D),
                   b + "attn.qkv.weight": rnd(3 * D, D), b + "attn.proj.weight": rnd(D, D), b + "attn.proj.bias": rnd(D),
                   b + "ls1.gamma": rnd(D), b + "ls2.gamma": rnd(D),
                   b + "mlp.w1.weight": rnd(HIDDEN, D), b + "mlp.w1.bias": rnd(HIDDEN),
                   b + "mlp.w2.weight": rnd(HIDDEN, D), b + "mlp.w2.bias": rnd(HIDDEN),
                   b + "mlp.w3.weight": rnd(D, HIDDEN), b + "mlp.w3.bias": rnd(D)})
    torch.save(sd, path)


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def load_and_measure(path: Path, dtype_name: str) -> dict:
    import torch

    import timm.models.eva  # noqa: F401  (imports are not part of loading)

    import dinov3_geo

    torch.zeros(1)
    base = rss_mb()
    t0 = time.perf_counter()
    bb = dinov3_geo.load_backbone(path, dtype=torch.bfloat16 if dtype_name == "bf16" else torch.float32)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in bb.parameters())
    return {"baseline_rss_mb": round(base), "peak_rss_mb": round(peak), "load_peak_over_baseline_mb": round(peak - base),
            "load_s": round(seconds, 2), "params_m": round(params / 1e6, 1), "embed_dim": bb.embed_dim,
            "depth": bb.depth, "dtype": dtype_name}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(load_and_measure(Path(a.measure), a.dtype)))
        return
    folder = Path(a.dir or tempfile.mkdtemp())
    path = folder / f"vit7b_shape_depth{a.depth}.pth"
    write_checkpoint(path, a.depth)
    out = subprocess.run([sys.executable, __file__, "--measure", str(path), "--dtype", a.dtype],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report["checkpoint_mb"] = round(path.stat().st_size / 2**20)
    report["benchmark"] = "load_7b_shape"
    path.unlink()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
