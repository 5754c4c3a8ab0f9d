"""Plain helpers shared by the test modules (fixtures live in ``conftest.py``).

One rule: a function, class or constant that more than one test module uses is defined here, once;
a test module never imports another test module.
"""
from __future__ import annotations

import json
import os
import pickle
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform
from rasterio.windows import Window
from transformers import CHMv2Config, CHMv2ForDepthEstimation, CHMv2ImageProcessor

from dinov3_geo.cli import main
from dinov3_geo.io.stitch import CLASS_NODATA, StreamingStitcher
from dinov3_geo.io.tiling import ChipPlan
from dinov3_geo.models.heads.chmv2 import read_chmv2_weights
from dinov3_geo.models.weights import hf_to_meta_backbone_state
from dinov3_geo.pipeline import RunSettings, run_chips

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data_samples"
#: The five real Chesapeake image chips (each ``*_image.tif`` has its ``*_label.tif``).
CHESAPEAKE = sorted((SAMPLES / "chesapeake").glob("*_image.tif"))
#: The Chesapeake land-cover classes, as ``--classes`` takes them.
LANDCOVER = "unused,water,tree canopy,low vegetation,barren,impervious other,impervious road"
#: Training options that keep a segmentation head's training to seconds.
FAST_SEG = ["--epochs", "1", "--lrs", "1e-3", "--chip", "64", "--batch-size", "4", "--device", "cpu"]
#: Batch scenes, name: (sample, window); the two Salt Lake crops lie side by side on one grid.
CROPS = {
    "a_saltlake": ("landsat7_saltlake_truecolor_utm12n.tif", Window(200, 300, 300, 260)),
    "b_saltlake": ("landsat7_saltlake_truecolor_utm12n.tif", Window(500, 300, 280, 300)),
    "c_naip": ("opengeos_naip_m_4709963_se_14_1_20200831.tif", Window(100, 100, 300, 290)),
}
#: A UTM 18N grid of 0.6 m pixels, where tests place arrays cut from ``rasterio_RGB.byte.tif``.
UTM = dict(crs="EPSG:32618", transform=Affine(0.6, 0, 500000.0, 0, -0.6, 4000000.0))
#: GeoPackage 1.2's R-tree triggers (1.4 replaced update1 and update3 by update5-7).
RTREE_TRIGGERS_12 = ("insert", "update1", "update2", "update3", "update4", "delete")


# -------------------------------------------------------------------------------------------------
# Running the command


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child ``dinov3geo``: none of the caller's ``DINOV3GEO_*`` settings nor
    pytest's, this tree first on ``PYTHONPATH``, no GPU; ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DINOV3GEO_", "PYTEST_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


def cli_subprocess(*args, env: Optional[dict] = None, **kw) -> subprocess.CompletedProcess:
    """``python -m dinov3_geo.cli *args`` in a child process (this environment, ``env`` on top),
    its output captured as text; ``kw`` go to ``subprocess.run``."""
    return subprocess.run([sys.executable, "-m", "dinov3_geo.cli", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, **kw)


def run_cli(args: list, capsys) -> tuple[int, str]:
    """The command's ``main(args)`` in this process: its exit code and what it wrote to stderr."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def run_benchmark(script: str, *args, timeout: int = 240,
                  **env: str) -> tuple[subprocess.CompletedProcess, Optional[dict]]:
    """``python benchmarks/<script> *args`` from the repository root (unbuffered, ``env`` on top of
    this environment): the finished process and the JSON of its last line (what a benchmark
    reports; None when it printed nothing)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    return proc, json.loads(lines[-1]) if lines else None


# -------------------------------------------------------------------------------------------------
# Files in, files out


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


def rgb_crop(size: int = 64, row: int = 300, col: int = 350) -> np.ndarray:
    """A ``[3, size, size]`` uint8 crop of the real scene ``rasterio_RGB.byte.tif`` (all pixels
    valid at the default place)."""
    with rasterio.open(SAMPLES / "rasterio_RGB.byte.tif") as src:
        return src.read(window=Window(col, row, size, size))


def write_crop(sample: str, window: Window, out: Path, crs: Optional[str] = None) -> Path:
    """``window`` of the sample ``data_samples/<sample>`` as a GeoTIFF at ``out`` (its profile,
    placed where the window lies), warped into ``crs`` (nodata 0) when given."""
    with rasterio.open(SAMPLES / sample) as src:
        profile = src.profile | dict(width=window.width, height=window.height, transform=src.window_transform(window))
        data = src.read(window=window)
    if crs is not None:
        profile, data = _warped(profile, data, crs)
    with rasterio.open(out, "w", **(profile | dict(driver="GTiff"))) as dst:
        dst.write(data)
    return Path(out)


def _warped(profile: dict, data: np.ndarray, crs: str) -> tuple[dict, np.ndarray]:
    """``data`` on ``profile``'s grid warped into ``crs`` by rasterio's WarpedVRT (nodata 0)."""
    with rasterio.MemoryFile() as mem:
        with mem.open(**profile) as part:
            part.write(data)
        with mem.open() as part:
            transform, width, height = calculate_default_transform(part.crs, crs, part.width, part.height,
                                                                   *part.bounds)
            with WarpedVRT(part, crs=crs, transform=transform, width=width, height=height, nodata=0) as vrt:
                return (part.profile | dict(crs=crs, transform=transform, width=width, height=height, nodata=0),
                        vrt.read())


def read_raster(path, band: Optional[int] = None) -> np.ndarray:
    """Every band of the raster at ``path`` (``[bands, h, w]``), or band ``band`` alone (``[h, w]``)."""
    with rasterio.open(path) as ds:
        return ds.read() if band is None else ds.read(band)


def leftovers(folder: Path) -> list[str]:
    """What a run may leave behind in ``folder`` and must not: hidden (temporary) files and
    anything named partial."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".") or "partial" in p.name)


def label_of(image: Path) -> Path:
    """The label raster of a Chesapeake ``*_image.tif``."""
    return image.with_name(image.name.replace("_image", "_label"))


# -------------------------------------------------------------------------------------------------
# Stitching against whole-scene numpy


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


def stream(scene, sink, model, channels: int, tile: int, overlap: int, kind="continuous",
           batch_size=4) -> StreamingStitcher:
    """Run ``model`` (chip ``[3, tile, tile]`` float in 0..1 -> ``[channels, tile, tile]``) over a
    scene through the public pipeline (``run_chips`` into a ``StreamingStitcher`` on ``sink``)."""
    plan = ChipPlan.build(scene.height, scene.width, tile, overlap)
    stitcher = StreamingStitcher(sink, plan, channels, kind=kind)
    run_chips(scene, ChipFunction(model), stitcher, plan, RunSettings.resolve("cpu", "fp32", batch_size),
              progress=False)
    return stitcher


def mean_model(x: np.ndarray) -> np.ndarray:
    """A one-channel model of a chip: the mean of its bands."""
    return x.mean(0, keepdims=True)


def bits(a: np.ndarray) -> np.ndarray:
    """``a``'s bits (float32 as uint32): equality of these is equality to the last bit, NaN payloads
    and signed zeros included."""
    return np.ascontiguousarray(a).view(np.uint32 if a.dtype == np.float32 else np.uint8)


def window_of(array: np.ndarray, win: Window) -> np.ndarray:
    """The part of ``array`` (``[bands, h, w]``) under the window."""
    r, c, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
    return array[:, r:r + h, c:c + w]


def arrival_order(plan: ChipPlan, seed: int, rng) -> list:
    """The plan's windows in plan order, reversed or shuffled (by ``seed`` modulo 3)."""
    order = list(plan.windows)
    if seed % 3 == 1:
        order.reverse()
    elif seed % 3 == 2:
        order = [order[i] for i in rng.permutation(len(order))]
    return order


def feed(stitcher, order, values: np.ndarray, valid: np.ndarray, skipped) -> None:
    """Every chip of ``order`` (windows) into ``stitcher``: its part of the whole-scene ``values``
    and ``valid``, or a skip; then close."""
    for win in order:
        if win in skipped:
            stitcher.skip(win)
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                stitcher.add(win, window_of(values, win), window_of(valid[None], win)[0])
    stitcher.close()


def reference_blend(plan: ChipPlan, order, values: Callable, valid: np.ndarray, skipped=(),
                    kind="continuous") -> np.ndarray:
    """The stitcher's result computed on whole-scene arrays: for each chip in ``order`` (windows),
    ``acc += values(chip) * weights`` and ``wsum += weights`` with weights 0 where the chip's
    ``valid`` is false; then ``acc / wsum`` (argmax for classes) and nodata where no chip was valid."""
    first = values(order[0])
    acc = np.zeros((first.shape[0], plan.height, plan.width), np.float32)
    wsum = np.zeros((plan.height, plan.width), np.float32)
    seen = np.zeros((plan.height, plan.width), bool)
    for win in order:
        if win in skipped:
            continue
        r, c, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
        ok = valid[r:r + h, c:c + w]
        weights = np.where(ok, plan.weights(win), np.float32(0))
        with np.errstate(invalid="ignore", over="ignore"):
            acc[:, r:r + h, c:c + w] += values(win)[:, :h, :w] * weights
        wsum[r:r + h, c:c + w] += weights
        seen[r:r + h, c:c + w] |= ok
    if kind == "classes":
        out = np.argmax(acc, axis=0).astype(np.uint8)
        out[~seen] = CLASS_NODATA
        return out[None]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = acc / wsum
    out[:, ~seen] = np.float32(np.nan)
    return out


# -------------------------------------------------------------------------------------------------
# CHMv2 as transformers builds it (the oracle)


def small_chmv2(key_bias: bool = True, eps: float = 1e-5, readout: str = "project",
                seed: int = 0) -> CHMv2ForDepthEstimation:
    """A tiny random CHMv2 (hidden 64, 4 blocks) with every tensor random, biases included."""
    bb = dict(model_type="dinov3_vit", hidden_size=64, intermediate_size=256, num_attention_heads=4,
              num_hidden_layers=4, num_register_tokens=4, key_bias=key_bias, out_indices=[1, 2, 3, 4],
              reshape_hidden_states=True, apply_layernorm=True, layer_norm_eps=eps, return_class_token=True,
              patch_size=16, layerscale_value=0.5)
    cfg = CHMv2Config(backbone_config=bb, post_process_channels=[16, 32, 64, 64], fusion_hidden_size=32,
                      head_hidden_size=16, number_output_channels=32, readout_type=readout)
    torch.manual_seed(seed)
    model = CHMv2ForDepthEstimation(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("backbone."):
                p.normal_(0.0, 0.2)
            elif p.dim() == 1:
                p.normal_(0.0, 0.01)
            else:                                   # unit-gain init, so heights vary across the image
                p.normal_(0.0, p[0].numel() ** -0.5)
    return model


def write_meta_pair(folder: Path, out: Path) -> tuple[Path, Path]:
    """Convert an HF CHMv2 folder to (head.pth, backbone.pth) in Meta's key names."""
    w = read_chmv2_weights(folder)
    head, backbone = out / "dinov3_vitl16_chmv2_dpt_head-3703d643.pth", out / "backbone.pth"
    torch.save(w.head_state, head)
    torch.save(hf_to_meta_backbone_state(w.backbone_state, w.backbone_config), backbone)
    return head, backbone


def processed(img: torch.Tensor) -> torch.Tensor:
    """``pixel_values`` exactly as transformers' CHMv2 processor makes them (normalise, center-pad)."""
    return CHMv2ImageProcessor()(images=img, return_tensors="pt")["pixel_values"]


def oracle(model: CHMv2ForDepthEstimation, pixel_values: torch.Tensor) -> torch.Tensor:
    """transformers' heights [B,1,h,w] at the network's output size."""
    with torch.no_grad():
        return model(pixel_values=pixel_values).predicted_depth[:, None]


# -------------------------------------------------------------------------------------------------
# GEO-Bench task folders, in GEO-Bench's own on-disk format


def real_chips(scene: Path, size: int, count: int, bands=(1, 2, 3)) -> list[np.ndarray]:
    """``count`` chips [3,size,size] of a real scene, from fully valid windows along the diagonal."""
    out = []
    with rasterio.open(scene) as src:
        step = max(1, (min(src.width, src.height) - size) // (3 * count))
        for i in range(10 * count):
            w = Window(size + i * step, size + i * step, size, size)
            data = src.read(list(bands), window=w)
            if (src.read_masks(1, window=w) > 0).all() and data.std() > 0:
                out.append(data)
            if len(out) == count:
                break
    assert len(out) == count
    return out


def write_geobench_sample(path: Path, bands: dict, label=None, pickle_label=None) -> None:
    """One sample in GEO-Bench's HDF5 layout: a dataset per band, the label as a dataset
    (segmentation) or in the ``pickle`` attribute (classification), stored as repr(bytes)."""
    with h5py.File(path, "w") as h5:
        for name, arr in bands.items():
            h5.create_dataset(name, data=arr)
        if label is not None:
            h5.create_dataset("label", data=label.astype(np.int64))
        h5.attrs["pickle"] = repr(pickle.dumps({"label": pickle_label} if pickle_label is not None else {}))


def write_band_stats(folder: Path, samples: list[dict]) -> None:
    """GEO-Bench's ``band_stats.json`` of ``samples`` (band name: array)."""
    stats = {}
    for name in samples[0]:
        v = np.concatenate([s[name].ravel() for s in samples]).astype(np.float64)
        stats[name] = {"min": v.min(), "max": v.max(), "mean": v.mean(), "std": v.std(),
                       "percentile_0_1": np.percentile(v, 0.1), "percentile_99_9": np.percentile(v, 99.9)}
    (folder / "band_stats.json").write_text(json.dumps(stats))


def geobench_classification(folder: Path) -> Path:
    """Two classes of real 32 px chips (Bahamas Landsat vs North Dakota NAIP), 8 each, S2 band names."""
    folder.mkdir(parents=True)
    chips = [(0, c) for c in real_chips(SAMPLES / "rasterio_RGB.byte.tif", 32, 8)]
    chips += [(1, c) for c in real_chips(SAMPLES / "opengeos_naip_m_4709963_se_14_1_20200831.tif", 32, 8)]
    names = {"train": [], "valid": [], "test": []}
    samples = []
    for i, (label, chip) in enumerate(chips):
        bands = {"04 - Red": chip[0].astype(np.float64) * 10, "03 - Green": chip[1].astype(np.float64) * 10,
                 "02 - Blue": chip[2].astype(np.float64) * 10, "08 - NIR": chip[0].astype(np.float64)}
        write_geobench_sample(folder / f"examples_{i}.hdf5", bands, pickle_label=label)
        samples.append(bands)
        names[(("train",) * 4 + ("valid",) * 2 + ("test",) * 2)[i % 8]].append(f"examples_{i}")
    write_band_stats(folder, samples)
    (folder / "default_partition.json").write_text(json.dumps(names))
    return folder


def geobench_segmentation(folder: Path, size: int = 256) -> Path:
    """The five real Chesapeake pairs (top-left ``size`` px) as a GEO-Bench segmentation task
    (float 0..1 bands + label)."""
    folder.mkdir(parents=True)
    samples, ids = [], []
    for image in CHESAPEAKE:
        with rasterio.open(image) as src:
            data = src.read(window=Window(0, 0, size, size)).astype(np.float32) / 255
        with rasterio.open(label_of(image)) as src:
            label = src.read(1, window=Window(0, 0, size, size))
        bands = {"Red": data[0], "Green": data[1], "Blue": data[2], "NearInfrared": data[3]}
        sid = image.name.replace("_image.tif", "")
        write_geobench_sample(folder / f"{sid}.hdf5", bands, label=label)
        samples.append(bands)
        ids.append(sid)
    write_band_stats(folder, samples)
    (folder / "default_partition.json").write_text(json.dumps({"train": ids[:3], "valid": ids[3:4], "test": ids[4:]}))
    return folder


# -------------------------------------------------------------------------------------------------
# GIS files as GIS tools read them


def assert_geopackage_12(path) -> None:
    """``path`` is a GeoPackage 1.2 (what GDAL 3.6 writes and validates) with 1.2's R-tree triggers
    on every feature table, and QGIS's layer_styles table among its registered contents."""
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47        # 'GPKG'
        assert db.execute("PRAGMA user_version").fetchone()[0] == 10200
        tables = db.execute("SELECT table_name, column_name FROM gpkg_geometry_columns").fetchall()
        triggers = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    assert tables
    for table, column in tables:
        ours = {t for t in triggers if t.startswith(f"rtree_{table}_{column}_")}
        assert ours == {f"rtree_{table}_{column}_{kind}" for kind in RTREE_TRIGGERS_12}, ours


def categories(qml: str) -> tuple[str, list[tuple[str, str, tuple]]]:
    """(attribute, [(value, label, fill colour)]) of a categorised vector style."""
    root = ET.fromstring(qml.split("\n", 1)[1])
    renderer = root.find("renderer-v2")
    assert root.tag == "qgis" and renderer.get("type") == "categorizedSymbol"
    symbols = {s.get("name"): s for s in renderer.find("symbols")}
    out = []
    for cat in renderer.find("categories"):
        layer = symbols[cat.get("symbol")].find("layer")
        assert layer.get("class") == "SimpleFill"
        colour = layer.find("Option/Option[@name='color']").get("value")
        assert layer.find("prop[@k='color']").get("v") == colour     # both forms QGIS reads
        out.append((cat.get("value"), cat.get("label"), tuple(int(v) for v in colour.split(",")[:3])))
    return renderer.get("attr"), out
