"""Model-only against end-to-end throughput, in one process, for one model, chip size and batch size.

(a) model-only: random uint8-range chips already on the device go through the same steps the
    engine runs on the device (to float, /255, normalise, forward, to float32), synchronised, after
    warm-up (the ``--compile`` warm-up is never timed);
(b) end to end: the real command path on a real GeoTIFF (``data_samples/`` tiled into a larger
    tiled GeoTIFF): reading, scaling, host-to-device copies, model, stitching and COG writing. For
    the canopy models this is the loaded canopy model through ``dinov3_geo.predict`` (the path
    ``segment`` takes), timed without model loading and the warm-up batch (``RunStats``) to the
    finished COG; for the embedding models the same ``predict`` with a small module that writes
    the patch-feature norm;
(d) with ``--ceiling``, the host pipeline's own limit: the same ``predict`` path on
    the same scene with a pass-through "model" (the first channel of the normalised chip), i.e.
    what end to end could reach with an infinitely fast model on this machine
    (``pipeline_ceiling_chips_per_s``, with and without the COG conversion after the last chip);
(c) the peer, when ``terratorch`` is importable: TerraTorch's ``tiled_inference`` (whole scene in
    RAM, cosine blending, LZW GeoTIFF) on the same scene, chip, stride and batch with the same
    transformers ``CHMv2ForDepthEstimation`` weights (canopy models only), as
    ``/work/shared/bench/peer_terratorch.py`` does.

Weights are random (speed does not depend on them) but go through our loaders: the canopy models
are written by transformers' ``save_pretrained`` and loaded by ``load_canopy_model``; the backbones
are generated on the device and built by ``dinov3_geo.models.backbone.build_backbone``.

Models: ``small`` (random small CHMv2, CPU-sized), ``vitl`` (CHMv2 = SAT ViT-L/16 + DPT head),
``small-backbone``, ``vitl-backbone`` and ``vit7b`` (backbone only, embeddings: the patch-feature
norm upsampled to the chip is what gets stitched and written).

    python benchmarks/bench_pipeline.py --model small --device cpu --tile 256 --overlap 32 --batch 8
    python benchmarks/bench_pipeline.py --model vitl --batch 16 --grid 32x32 [--compile] [--work DIR]

``--repeats N`` alternates (b) and (a) N times and reports the pair (an end-to-end run and the
model-only run right after it) whose ratio is the median; every pair's figures are kept in ``*_runs``.
On a shared or frequency-scaling CPU chips/s drift between runs, the ratio of adjacent runs much less.

Prints progress on stderr and one JSON object as the last line of stdout (also to ``--json FILE``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# As the dinov3geo command does (dinov3_geo/cli/__init__.py): idle OpenMP threads sleep instead of spinning,
# so the reader, writer and GDAL threads get the cores. Must precede the first torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:           # run from a checkout without installing
    sys.path.insert(0, str(REPO))
DEFAULT_SOURCE = REPO / "data_samples" / "landsat7_saltlake_truecolor_utm12n.tif"
PEER_SCRIPT = Path("/work/shared/bench/peer_terratorch.py")   # the reference; re-implemented below
CANOPY_MODELS = ("small", "vitl")
SLEEP_OUTPUTS = ("continuous", "classes", "patches")
BACKBONE_MODELS = ("small-backbone", "vitl-backbone", "vit7b")
SAT_MEAN, SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------
# the scene: a real sample tiled into a larger tiled GeoTIFF (never noise)

def scene_size(src_hw: tuple[int, int], tile: int, overlap: int, repeat: int | None,
               grid: tuple[int, int] | None) -> tuple[int, int]:
    """Pixel size of the benchmark scene: the source repeated ``repeat`` x ``repeat`` times, or
    exactly ``rows`` x ``cols`` chips of ``tile`` with ``overlap`` (so a compiled model never sees
    a short last batch when the chip count is a multiple of the batch)."""
    if grid is not None:
        stride = tile - overlap
        return stride * (grid[0] - 1) + tile, stride * (grid[1] - 1) + tile
    n = max(1, repeat or 1)
    return src_hw[0] * n, src_hw[1] * n


def make_scene(source: Path, path: Path, height: int, width: int) -> None:
    """Write ``source``'s first three bands, repeated and cropped to ``height`` x ``width``, as an
    uncompressed 512-tiled GeoTIFF on the source's grid (extended), in row strips."""
    import numpy as np
    import rasterio

    with rasterio.open(source) as s:
        arr = s.read([1, 2, 3])
        prof = s.profile.copy()
    sh, sw = arr.shape[1:]
    prof.update(driver="GTiff", count=3, width=width, height=height, compress=None, tiled=True,
                blockxsize=512, blockysize=512, photometric="RGB", interleave="pixel", bigtiff="IF_SAFER")
    cols = np.arange(width) % sw
    tmp = path.with_name(f".{path.name}.partial")
    with rasterio.open(tmp, "w", **prof) as d:
        for r0 in range(0, height, 512):
            r1 = min(height, r0 + 512)
            strip = arr[:, np.arange(r0, r1) % sh][:, :, cols]
            d.write(strip, window=rasterio.windows.Window(0, r0, width, r1 - r0))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# models with random weights

def chmv2_config(model: str):
    """The transformers CHMv2 config: small (CPU) or the real ViT-L + DPT shape."""
    from transformers import CHMv2Config

    if model == "small":      # as peer_terratorch.py --small
        return CHMv2Config(backbone_config=dict(
            model_type="dinov3_vit", hidden_size=64, intermediate_size=256, num_attention_heads=4,
            num_hidden_layers=4, num_register_tokens=4, key_bias=True, out_indices=[1, 2, 3, 4],
            reshape_hidden_states=True, apply_layernorm=True, layer_norm_eps=1e-5, return_class_token=True,
            patch_size=16), post_process_channels=[16, 32, 64, 64], fusion_hidden_size=32, head_hidden_size=16,
            number_output_channels=32)
    cfg = CHMv2Config()
    cfg.backbone_config.layer_norm_eps = 1e-5
    return cfg


def make_canopy_weights(model: str, folder: Path) -> None:
    """A random transformers ``CHMv2ForDepthEstimation`` saved with ``save_pretrained``."""
    import torch
    from transformers import CHMv2ForDepthEstimation

    torch.manual_seed(0)
    tmp = folder.with_name(f".{folder.name}.partial")
    CHMv2ForDepthEstimation(chmv2_config(model)).eval().save_pretrained(tmp)
    os.replace(tmp, folder)


def ensure_canopy_weights(model: str, work: Path) -> Path:
    """The weights folder in ``work`` (made once, in a child process so that this process's peak
    RSS is the pipeline's and not the weight generation's)."""
    folder = work / f"chmv2-{model}-random"
    if not (folder / "config.json").exists():
        log(f"writing random CHMv2 ({model}) weights to {folder}")
        subprocess.run([sys.executable, __file__, "--make-weights", str(folder), "--model", model],
                       check=True)
    return folder


def backbone_arch(model: str):
    from dinov3_geo.models.weights import ViTArch

    if model == "small-backbone":
        return ViTArch(embed_dim=64, depth=4, num_heads=4, mlp_hidden=256, gated_mlp=False, qkv_bias=True,
                       num_reg_tokens=4)
    if model == "vitl-backbone":      # SAT-493M ViT-L/16
        return ViTArch(embed_dim=1024, depth=24, num_heads=16, mlp_hidden=4096, gated_mlp=False, qkv_bias=True,
                       num_reg_tokens=4)
    if model == "vit7b":              # ViT-7B/16: SwiGLU 8192, no qkv bias
        return ViTArch(embed_dim=4096, depth=40, num_heads=32, mlp_hidden=8192, gated_mlp=True, qkv_bias=False,
                       num_reg_tokens=4)
    raise ValueError(model)


def random_backbone(model: str, device, dtype):
    """Our ``Backbone`` with random tensors generated directly on ``device`` in ``dtype`` (the
    ViT-7B's 6.7 B parameters never touch the host), built by ``build_backbone``."""
    import torch
    from timm.models.eva import Eva

    from dinov3_geo.models.backbone import build_backbone
    from dinov3_geo.models.weights import Checkpoint

    arch = backbone_arch(model)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Eva(**arch.timm_kwargs()).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        t = torch.empty(shape, device=device, dtype=dtype)
        if key.endswith("bias"):
            t.zero_()
        elif len(shape) == 1:
            t.fill_(1.0 if "norm" in key else 0.1)     # norms, layer scales
        else:
            t.normal_(0.0, 0.02, generator=gen)
        state[key] = t
    ckpt = Checkpoint(state=state, arch=arch, source=f"random-{model}", layout="timm")
    return build_backbone(ckpt, dtype, mean=SAT_MEAN, std=SAT_STD).to(device).eval()


def feature_norm_model(backbone):
    """Embeddings as a dense model for ``Engine``: normalise with the backbone's statistics; forward
    gives the L2 norm of the patch features, upsampled (nearest) to the chip, ``[B,1,T,T]`` float."""
    import torch
    import torch.nn.functional as F

    class FeatureNorm(torch.nn.Module):
        channels = 1
        band_names = ("feature_norm",)

        def __init__(self, bb):
            super().__init__()
            self.backbone = bb

        def normalise(self, x01):
            return self.backbone.normalise(x01)

        def compile_regions(self):        # --compile: the blocks, as for the canopy model
            return self.backbone.compile_regions()

        def forward(self, x):
            patches = self.backbone.forward_features(x)["patches"]
            norm = torch.linalg.vector_norm(patches.float(), dim=1, keepdim=True)
            return F.interpolate(norm, size=x.shape[-2:], mode="nearest")

    return FeatureNorm(backbone).eval()


def pass_through_model():
    """The pipeline without a model: normalise to 0..1 as the engine does, return the first
    channel ``[B,1,T,T]``; what remains is reading, transfer, stitching and writing."""
    import torch

    class PassThrough(torch.nn.Module):
        channels = 1

        def normalise(self, x01):
            return x01

        def forward(self, x):
            return x[:, :1]

    return PassThrough().eval()


# ------------------------------------------------------------------------------------------------
# (b) end to end

def load_canopy(dev, dtype, weights: Path):
    """The canopy model through our loader (what ``segment`` loads), and the seconds it took."""
    from dinov3_geo.models.canopy import load_canopy_model

    t = time.perf_counter()
    model = load_canopy_model(weights, device=dev, dtype=dtype, verify=False)
    return model, time.perf_counter() - t


def end_to_end(a, dev, precision: str, model, scene: Path, out: Path) -> dict:
    """``dinov3_geo.predict`` itself (the path ``segment`` takes once its model is loaded); the
    clock leaves out the warm-up batch (compile, kernels), which ``RunStats`` times."""
    from dinov3_geo import predict

    t0, c0 = time.perf_counter(), time.process_time()
    res = predict(scene, model, out, device=str(dev), batch_size=a.batch, precision=precision, tile=a.tile,
                  overlap=a.overlap, overwrite=True, compile=a.compile, progress=False, readers=a.readers)
    done, done_cpu = time.perf_counter(), time.process_time()
    s = res.stats
    return dict(seconds=done - t0 - s.warmup_seconds, cpu_s=done_cpu - c0, chips=s.chips_computed,
                chips_total=s.chips_total, skipped=s.chips_skipped, run_s=s.seconds, finalize_s=s.finalize_seconds,
                warmup_s=s.warmup_seconds, notes=list(s.notes), batch_final=s.batch_size)


# ------------------------------------------------------------------------------------------------
# (a) model only

def device_steps(model, x_uint8, dtype):
    """What the engine does on the device to uint8 chips already there: to float, /255, normalise,
    cast, the model (bf16 under autocast); float32 out."""
    import torch

    autocast = (torch.autocast(x_uint8.device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        x = x_uint8.float().div_(255.0)
        return model(model.normalise(x).to(dtype)).float()


def model_only(dev, dtype, model, batch: int, tile: int, chips: int, iters: int | None) -> dict:
    """Chips/s of uint8 chips already on the device through the engine's device-side steps."""
    import torch

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(1)
    xb = torch.randint(0, 256, (batch, 3, tile, tile), generator=gen, device=dev, dtype=torch.int32).to(torch.uint8)

    def step():
        return device_steps(model, xb, dtype)

    for _ in range(2):             # warm-up (allocator, kernels; compiled graphs are already built)
        step()
    sync()
    reps = iters or max(3, chips // batch)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(reps):
        step()
    sync()
    dt = time.perf_counter() - t
    return dict(chips_per_s=reps * batch / dt, reps=reps, seconds=dt, cpu_s=time.process_time() - c)


# ------------------------------------------------------------------------------------------------
# (e) a simulated device: does the host keep a device of R chips/s busy?

def sleep_benchmark(a, t_start: float) -> dict:
    """``--model sleep:R``: the end-to-end path with :class:`~dinov3_geo.testing.sleep_device.SleepModel`
    (R chips/s) on the CPU, ``--repeats`` times; the device's busy share of the wall time and the
    host's CPU per chip, the figures of the run with the median busy share."""
    from dinov3_geo.hostmem import usable_cores
    from dinov3_geo.testing.sleep_device import SleepModel

    model = SleepModel.parse(a.model, a.output, a.channels)
    result: dict = {"model": a.model, "device": f"simulated, {model.rate:g} chips/s", "output": a.output,
                    "channels": model.channels, "chip": a.tile, "batch": a.batch, "overlap": a.overlap,
                    "cores": usable_cores(), "readers": a.readers, "vector": a.vector,
                    "load_average_before": [round(v, 2) for v in os.getloadavg()],
                    "torch": __import__("torch").__version__, "python": platform.python_version()}
    with recorded(result, a.work, "bench-sleep-", t_start) as work:
        scene = bench_scene(a, work, result)
        if not a.cold:      # what a process pays once (GDAL's layout probe, first allocations) not timed
            t = time.perf_counter()
            warm = dict(vars(a), grid=(2, 2), repeat=None, vector=False)
            sleep_run(argparse.Namespace(**warm), SleepModel(math.inf, a.output, a.channels),
                      bench_scene(argparse.Namespace(**warm), work, {}), work)
            result["warmup_s"] = round(time.perf_counter() - t, 3)
        runs = [sleep_run(a, model, scene, work) for _ in range(max(1, a.repeats))]
        best = runs[median_index([r["busy_fraction"] for r in runs])]
        result.update(best)
        result["runs"] = len(runs)
        if len(runs) > 1:
            for key in ("busy_fraction", "busy_fraction_span", "chips_per_s", "host_cpu_ms_per_chip"):
                result[f"{key}_runs"] = [r[key] for r in runs]
        result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return result


def bench_scene(a, work: Path, result: dict) -> Path:
    """The benchmark scene in ``work`` (made once): ``--source`` tiled to ``--repeat``/``--grid``;
    its size goes into ``result``."""
    import rasterio

    with rasterio.open(a.source) as s:
        src_hw = (s.height, s.width)
    h, w = scene_size(src_hw, a.tile, a.overlap, a.repeat, a.grid)
    scene = work / f"scene_{a.source.stem}_{h}x{w}.tif"
    if not scene.exists():
        t = time.perf_counter()
        make_scene(a.source, scene, h, w)
        log(f"scene {scene.name} written in {time.perf_counter() - t:.1f} s")
    result.update(scene=f"{a.source.name} tiled to {h} x {w} px", scene_px=[h, w])
    return scene


def sleep_run(a, model, scene: Path, work: Path) -> dict:
    """One run of the simulated device end to end (GeoTIFF to COG, or Zarr for patches; then the
    GeoPackage with ``--vector``): wall seconds from the call to the finished file, the device's
    busy seconds (chips / R), its first start and last end, the process's CPU seconds."""
    from dinov3_geo import predict
    from dinov3_geo.analysis import patch_map

    model.timeline.reset()
    out = work / (f"sleep_{a.output}.zarr" if a.output == "patches" else f"sleep_{a.output}.tif")
    if out.is_dir():        # a Zarr store of an earlier run
        shutil.rmtree(out)
    t0, c0 = time.perf_counter(), time.process_time()
    if a.output == "patches":
        res = patch_map(scene, out, model, channels=model.channels, tile=a.tile, overlap=a.overlap,
                        batch_size=a.batch, device="cpu", overwrite=True, progress=False)
        chips = res.chips_computed
    else:
        res = predict(scene, model, out, kind="classes" if a.output == "classes" else "continuous", tile=a.tile,
                      overlap=a.overlap, batch_size=a.batch, device="cpu", overwrite=True, progress=False,
                      readers=a.readers)
        chips = res.stats.chips_computed
    t_file, c_file = time.perf_counter(), time.process_time()
    vector_s = None
    if a.vector and a.output != "patches":
        from dinov3_geo.io.vector import polygonize_classes, polygonize_threshold

        gpkg = work / f"sleep_{a.output}.gpkg"
        if a.output == "classes":
            polygonize_classes(out, gpkg, [f"class {k}" for k in range(model.channels)], overwrite=True)
        else:
            polygonize_threshold(out, gpkg, 0.5, overwrite=True)
        vector_s = time.perf_counter() - t_file
    tl = model.timeline
    wall = t_file - t0
    run = dict(chips=chips, end_to_end_s=round(wall, 3), device_busy_s=round(tl.busy_s, 3),
               # the device's busy share of the wall time, from the call to the finished file
               busy_fraction=round(tl.busy_s / wall, 4) if wall > 0 else None,
               # the same between its first batch's start and its last batch's end
               busy_fraction_span=round(tl.busy_s / tl.span_s(), 4) if tl.span_s() > 0 else None,
               start_s=round(tl.first_start - t0, 3) if tl.first_start else None,
               tail_s=round(t_file - tl.last_end, 3) if tl.last_end else None,
               chips_per_s=round(chips / wall, 2),
               host_cpu_ms_per_chip=round(1000 * (c_file - c0) / max(1, chips), 3),
               # what the simulated model spent making its outputs (a GPU's work, on the host here)
               model_output_cpu_ms_per_chip=round(1000 * tl.output_cpu_s / max(1, chips), 3),
               load_average=[round(v, 2) for v in os.getloadavg()])
    if vector_s is not None:
        run.update(vector_s=round(vector_s, 3), busy_fraction_with_vector=round(tl.busy_s / (wall + vector_s), 4))
    log(f"sleep {model.rate:g} chips/s, {a.output}: {chips} chips in {wall:.2f} s, device busy "
        f"{run['busy_fraction']:.3f} ({run['busy_fraction_span']} of its span), "
        f"{run['host_cpu_ms_per_chip']} ms CPU per chip")
    return run


# ------------------------------------------------------------------------------------------------
# (c) the peer: TerraTorch tiled_inference, as /work/shared/bench/peer_terratorch.py

from dinov3_geo.testing.peer import load_tiled_inference  # noqa: E402


def run_peer(a, dev, dtype, weights: Path, scene: Path, out: Path, reps: int) -> dict:

    import rasterio
    import torch
    from transformers import CHMv2ForDepthEstimation

    ti = load_tiled_inference()
    model = CHMv2ForDepthEstimation.from_pretrained(weights).to(dev, dtype).eval()
    mean = torch.tensor([0.420, 0.411, 0.296], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.213, 0.156, 0.143], device=dev).view(1, 3, 1, 1)
    count = [0]

    def fwd(chips):
        count[0] += chips.shape[0]
        with torch.inference_mode():
            x = ((chips.to(dev).float() - mean) / std).to(dtype)
            return model(pixel_values=x).predicted_depth[:, None].float()

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    fwd(torch.rand(a.batch, 3, a.tile, a.tile, device=dev))
    sync()
    count[0] = 0
    t0 = time.perf_counter()
    with rasterio.open(scene) as s:
        x = torch.from_numpy(s.read([1, 2, 3])).float().div_(255.0)[None]
        prof = s.profile.copy()
    t1 = time.perf_counter()
    y = ti(fwd, x, crop=a.tile, stride=a.tile - a.overlap, delta=8, batch_size=a.batch, padding=False, device=str(dev))
    sync()
    t2 = time.perf_counter()
    del x
    prof.update(count=1, dtype="float32", nodata=float("nan"), compress="lzw", tiled=True, blockxsize=512,
                blockysize=512, photometric="MINISBLACK")
    with rasterio.open(out, "w", **prof) as d:
        d.write(y[0, 0].cpu().numpy(), 1)
    t3 = time.perf_counter()
    chips = count[0]
    xb = torch.rand(a.batch, 3, a.tile, a.tile, device=dev)
    sync()
    tm = time.perf_counter()
    for _ in range(reps):
        fwd(xb)
    sync()
    mo = reps * a.batch / (time.perf_counter() - tm)
    e2e = chips / (t3 - t0)
    return {"peer": "terratorch.tiled_inference (cosine blend, whole scene in RAM, LZW GeoTIFF)",
            "peer_chips": chips, "peer_read_s": round(t1 - t0, 3), "peer_tiling_and_model_s": round(t2 - t1, 3),
            "peer_write_s": round(t3 - t2, 3), "peer_end_to_end_s": round(t3 - t0, 3),
            "peer_end_to_end_chips_per_s": round(e2e, 3), "peer_model_only_chips_per_s": round(mo, 3),
            "peer_ratio": round(e2e / mo, 3)}


# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", type=model_name,
                    help=f"{', '.join(CANOPY_MODELS + BACKBONE_MODELS)}, or sleep:R (a simulated device of R "
                         "chips/s, or inf; see 'simulated device' below)")
    ap.add_argument("--output", default="continuous", choices=SLEEP_OUTPUTS,
                    help="sleep:R only: continuous (canopy-like floats), classes (--channels class scores, uint8 "
                         "COG) or patches (embed --patch: --channels features per 16 px cell, Zarr)")
    ap.add_argument("--channels", type=int, default=None, help="sleep:R only: classes (default 6) or features "
                                                               "(default 384)")
    ap.add_argument("--vector", action="store_true",
                    help="sleep:R only: also the GeoPackage after the COG (values: pixels >= 0.5; classes)")
    ap.add_argument("--cold", action="store_true",
                    help="sleep:R only: no warm-up run (a 2 x 2 chip scene) before the timed runs")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp8")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--readers", type=int, default=None, help="reader threads (default: the engine's, half the cores, 2-8)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="torch.compile (warm-up not timed)")
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="real sample scene to tile")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--repeat", type=int, default=None, help="tile the source N x N times")
    size.add_argument("--grid", default=None, help="ROWSxCOLS: a scene of exactly that many chips")
    ap.add_argument("--iters", type=int, default=None, help="model-only batches (default: as many chips as end to end)")
    ap.add_argument("--repeats", type=int, default=1, help="alternate end to end and model-only N times; medians")
    ap.add_argument("--ceiling", action="store_true",
                    help="also run the pipeline with a pass-through model (the host's own limit)")
    ap.add_argument("--peer", default="auto", choices=("auto", "on", "off"),
                    help="run TerraTorch's tiled_inference too (auto: when importable, canopy models only)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the scene and weights (kept, reused)")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON object here")
    ap.add_argument("--make-weights", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.grid is not None:
        try:
            r, c = (int(v) for v in a.grid.lower().split("x"))
            a.grid = (r, c)
        except ValueError:
            ap.error("--grid must look like 16x16")
    return a


@contextlib.contextmanager
def recorded(result: dict, work: Path | None, prefix: str, t_start: float | None = None):
    """Yield the work folder (``work``, or a temporary one removed afterwards). Whatever fails
    inside, ``result`` gets ``error`` (the traceback goes to stderr) and always ``wall_s``, so one
    JSON object comes out whatever happens (gpu.sh records it)."""
    t_start = time.perf_counter() if t_start is None else t_start
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
        try:
            work.mkdir(parents=True, exist_ok=True)
            yield work
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            result["wall_s"] = round(time.perf_counter() - t_start, 1)


def model_name(text: str) -> str:
    """``--model``: one of the named models or ``sleep:R``."""
    if text in CANOPY_MODELS + BACKBONE_MODELS:
        return text
    if text.startswith("sleep:"):
        from dinov3_geo.testing.sleep_device import SleepModel

        try:
            SleepModel.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    raise argparse.ArgumentTypeError(f"unknown model {text!r} ({', '.join(CANOPY_MODELS + BACKBONE_MODELS)} "
                                     "or sleep:R)")


def emit(result: dict, path: Path | None = None) -> dict:
    """Print ``result`` as the JSON line the benchmarks end with (also into ``path``)."""
    text = json.dumps(result)
    if path is not None:
        path.write_text(text + "\n")
    print(text, flush=True)
    return result


def median_index(values: list[float]) -> int:
    """Index of the median (the lower one for an even count)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    return order[(len(values) - 1) // 2]


def device_name(dev) -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({os.cpu_count()} cores, {platform.machine()}, torch threads {torch.get_num_threads()})"


def main(argv=None) -> dict:
    """Run the benchmark; the result dict has ``error`` set when a phase failed."""
    a = parse_args(argv)
    if a.make_weights is not None:
        make_canopy_weights(a.model, a.make_weights)
        return {}
    import torch

    from dinov3_geo import RunSettings
    from dinov3_geo.hostmem import keep_freed_memory

    keep_freed_memory()     # as the dinov3geo command does; library runs leave the allocator alone

    t_start = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model.startswith("sleep:"):
        return sleep_benchmark(a, t_start)
    settings = RunSettings.resolve(a.device, a.precision, a.batch, a.compile, a.readers)
    dev, precision, dtype = settings.device, settings.precision, settings.dtype
    result: dict = {"device": device_name(dev), "model": a.model, "chip": a.tile, "batch": a.batch,
                    "overlap": a.overlap, "precision": precision, "compile": a.compile, "readers": settings.readers,
                    "torch": torch.__version__, "python": platform.python_version()}
    with recorded(result, a.work, "bench-pipeline-", t_start) as work:
        scene = bench_scene(a, work, result)

        # (b) end to end, the real path, alternating with (a) model only on the same model object
        # (and, with --compile, the same compiled forward)
        out = work / f"out_{a.model}_b{a.batch}{'_c' if a.compile else ''}.tif"
        rss0 = rss_peak_mb()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        weights = ensure_canopy_weights(a.model, work) if a.model in CANOPY_MODELS else None
        if weights is not None:
            model, load_s = load_canopy(dev, dtype, weights)
            what = f"canopy model ({a.model})"
        else:
            t = time.perf_counter()
            model = feature_norm_model(random_backbone(a.model, dev, dtype))
            load_s, what = time.perf_counter() - t, f"embeddings ({a.model})"
        runs_e2e, runs_mo = [], []
        for _ in range(max(1, a.repeats)):
            log(f"end to end: predict(), {what}, batch {a.batch}, {precision}{', compile' if a.compile else ''}")
            e2e = end_to_end(a, dev, precision, model, scene, out)
            e2e["load_s"] = load_s
            gpu_e2e = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
            e2e["chips_per_s"] = e2e["chips"] / e2e["seconds"]
            log(f"end to end: {e2e['chips']} chips in {e2e['seconds']:.2f} s = {e2e['chips_per_s']:.2f} chips/s")
            # with --compile the model's regions were compiled in place by the end-to-end run
            mo = model_only(dev, dtype, model, a.batch, a.tile, e2e["chips"], a.iters)
            log(f"model only: {mo['reps'] * a.batch} chips in {mo['seconds']:.2f} s = {mo['chips_per_s']:.2f} chips/s")
            runs_e2e.append(e2e)
            runs_mo.append(mo)
        ratios = [r["chips_per_s"] / m["chips_per_s"] for r, m in zip(runs_e2e, runs_mo)]
        pick = median_index(ratios)     # the pair with the median ratio: its figures all come from it
        e2e, mo = runs_e2e[pick], runs_mo[pick]
        e2e_cps = e2e["chips_per_s"]
        result.update(
            chips=e2e["chips"], chips_total=e2e["chips_total"], chips_skipped=e2e["skipped"],
            model_only_chips_per_s=round(mo["chips_per_s"], 3), model_only_chips=mo["reps"] * a.batch,
            end_to_end_chips_per_s=round(e2e_cps, 3), ratio=round(e2e_cps / mo["chips_per_s"], 3),
            end_to_end_s=round(e2e["seconds"], 3), engine_run_s=round(e2e["run_s"], 3),
            cog_finalize_s=round(e2e["finalize_s"], 3), load_s=round(e2e["load_s"], 3),
            compile_warmup_s=round(max(r["warmup_s"] for r in runs_e2e), 3),     # the first run's
            # CPU seconds (all threads of this process) per chip: on a shared CPU machine these
            # stay put when other processes steal cores, where chips/s does not
            cpu_s_per_chip_model_only=round(mo["cpu_s"] / (mo["reps"] * a.batch), 4),
            cpu_s_per_chip_end_to_end=round(e2e["cpu_s"] / max(1, e2e["chips"]), 4),
            load_average=[round(v, 2) for v in os.getloadavg()], batch_final=e2e["batch_final"], notes=e2e["notes"],
            output_mb=round(out.stat().st_size / 2**20, 2) if out.exists() else None,
            rss_before_mb=round(rss0), peak_rss_mb=round(rss_peak_mb()))
        if a.repeats > 1:
            result.update(repeats=a.repeats,
                          end_to_end_chips_per_s_runs=[round(r["chips_per_s"], 3) for r in runs_e2e],
                          model_only_chips_per_s_runs=[round(r["chips_per_s"], 3) for r in runs_mo],
                          ratio_runs=[round(v, 3) for v in ratios])
        if dev.type == "cuda":
            result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
            result["peak_gpu_mb_end_to_end"] = round(gpu_e2e)
        del model, runs_e2e, runs_mo
        if dev.type == "cuda":
            torch.cuda.empty_cache()

        # (d) the host pipeline's own limit
        if a.ceiling:
            log("pipeline ceiling: the same path with a pass-through model")
            saved = a.compile
            a.compile = False
            try:
                ceil = end_to_end(a, dev, precision, pass_through_model(), scene,
                                  work / f"out_passthrough_{a.tile}.tif")
            finally:
                a.compile = saved
            result.update(pipeline_ceiling_chips_per_s=round(ceil["chips"] / ceil["seconds"], 3),
                          pipeline_ceiling_run_chips_per_s=round(ceil["chips"] / ceil["run_s"], 3),
                          pipeline_ceiling_finalize_s=round(ceil["finalize_s"], 3),
                          pipeline_ceiling_cpu_s_per_chip=round(ceil["cpu_s"] / max(1, ceil["chips"]), 4))
            log(f"pipeline ceiling: {result['pipeline_ceiling_chips_per_s']} chips/s end to end, "
                f"{result['pipeline_ceiling_run_chips_per_s']} before the COG conversion")

        # (c) the peer
        have_tt = importlib.util.find_spec("terratorch") is not None
        if a.peer == "on" or (a.peer == "auto" and have_tt and weights is not None):
            if weights is None:
                result["peer_error"] = "the peer runs the canopy models only"
            elif not have_tt:
                result["peer_error"] = "terratorch is not importable (pip install --no-deps terratorch==1.2.13)"
            else:
                log("peer: TerraTorch tiled_inference")
                try:
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    result.update(run_peer(a, dev, dtype, weights, scene, work / f"peer_{a.model}.tif",
                                           mo["reps"]))
                    result["peer_peak_rss_mb"] = round(rss_peak_mb())
                    if dev.type == "cuda":
                        result["peer_peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
                    log(f"peer: {result['peer_end_to_end_chips_per_s']} chips/s end to end, "
                        f"ratio {result['peer_ratio']}")
                except Exception as exc:      # the peer must not cost us our own figures
                    result["peer_error"] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
    return result


if __name__ == "__main__":
    res = main()
    if res:
        emit(res, parse_args().json)
        sys.exit(1 if "error" in res else 0)
