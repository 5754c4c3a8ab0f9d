"""The Python API behind the canopy command: ``segment(scene, task="canopy", ...)``.

One call validates every option and output path first (before any model loads), opens the scene,
loads the model offline, streams the result through the one pipeline (:func:`pipeline.write_dense`)
into a COG on the input grid and, if asked, writes the GeoPackage of polygons. Notebooks and the
command line call exactly this; any other dense model goes through :func:`pipeline.predict`.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .engine import RunSettings, RunStats
from .errors import UsageError, WeightsNotFoundError
from .io.scene import scene_reader
from .io.sinks import check_output
from .io.tiling import ChipPlan, validate_tiling
from .models import registry
from .models.registry import CHMV2_TRAINING_GSD
from .models.weights import search_dirs
from .pipeline import DenseOutput, summary_lines, write_dense

PathLike = Union[str, os.PathLike]
TASKS = ("canopy",)


class DinoGeoWarning(UserWarning):
    """Something the user should know that does not stop the run (pixel size, band choice)."""


@dataclass
class SegmentResult:
    """What ``segment`` wrote and how it went."""

    output: Path
    vector: Optional[Path]
    polygons: Optional[int]
    stats: RunStats
    area_km2: float
    seconds: float
    device: str
    precision: str = "fp32"
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The closing lines the command prints."""
        wrote: list[object] = [self.output]
        if self.vector is not None:
            wrote.append(f"{self.vector} ({self.polygons} polygon{'' if self.polygons == 1 else 's'})")
        lines = summary_lines(self.stats, self.seconds, self.device, self.precision, wrote,
                              extra=f", {self.area_km2:.3f} km²")
        return "\n".join(lines)


def segment(scene: PathLike, task: str = "canopy", output: Optional[PathLike] = None, *,
            weights: Optional[PathLike] = None, backbone_weights: Optional[PathLike] = None,
            vector: Optional[PathLike] = None, min_height: float = 2.0, device: str = "auto",
            batch_size: int = 8, precision: str = "auto", tile: int = 512, overlap: int = 64,
            bands: Optional[Sequence[int]] = None, gsd: Optional[float] = None,
            scale: Optional[tuple[float, float]] = None, overwrite: bool = False, compile: bool = False,
            progress: Optional[bool] = None, verify: bool = True, readers: Optional[int] = None,
            dtype: str = "float32") -> SegmentResult:
    """Run ``task`` over the raster ``scene`` and write a Cloud-Optimised GeoTIFF on its grid.

    ``canopy``: CHMv2 canopy height in metres (float32, NaN where the input is invalid; ``dtype``
    float16 halves the file, uint16 stores decimetres with scale 0.1 so GIS tools show metres,
    65535 nodata: both within 0.05 m of float32 below 96 m); with
    ``vector``, polygons of canopy at or above ``min_height`` m go to that GeoPackage (layer
    ``canopy``, the scene's CRS, with ``area_m2``, ``mean_height_m``, ``max_height_m``).
    ``output`` defaults to ``<scene>_<task>.tif`` beside the scene.
    """
    t0 = time.perf_counter()
    if task not in TASKS:
        raise UsageError("task", f"unknown task '{task}' (available: {', '.join(TASKS)})")
    validate_tiling(tile, overlap)      # before any file is opened; the plan checks the same rule
    settings = RunSettings.resolve(device, precision, batch_size, compile, readers)
    output = Path(output) if output is not None else _default_output(scene, task)
    check_output(output, overwrite, inputs=[scene])
    if vector is not None:
        if Path(vector).resolve() == output.resolve():
            raise UsageError("vector", "the vector output must differ from the raster output")
        check_output(vector, overwrite, inputs=[scene, output])
    encoding = DenseOutput("continuous", dtype, band_names=("canopy_height_m",))
    collected: list[str] = []
    with scene_reader(scene, bands=bands, scale=scale, gsd=gsd) as sc:
        for text in sc.warnings:
            _warn(text, collected)
        _check_pixel_size(sc, gsd, collected)
        plan = ChipPlan.build(sc.height, sc.width, tile, overlap)
        model = _load_task_model(task, weights, backbone_weights, settings.device, settings.dtype, verify)
        stats, _ = write_dense(sc, model, output, plan, settings, encoding, overwrite=overwrite,
                               progress=progress)
        if stats.chips_computed == 0:
            _warn(f"{sc.path}: no valid pixel (all nodata): wrote {output} entirely nodata (NaN)", collected)
        area = _area_km2(sc)
    polygons = None
    if vector is not None:
        from .io.vector import polygonize_threshold

        try:
            polygons = polygonize_threshold(output, vector, min_height, layer="canopy", overwrite=overwrite)
        except BaseException:  # failed or interrupted: no half job, so that the same command can be rerun
            output.unlink(missing_ok=True)
            raise
    return SegmentResult(output, Path(vector) if vector is not None else None, polygons, stats, area,
                         time.perf_counter() - t0, str(settings.device), settings.precision, collected)


def _default_output(scene: PathLike, task: str) -> Path:
    p = Path(str(scene))
    return p.with_name(f"{p.stem}_{task}.tif")


def _warn(text: str, collected: list[str]) -> None:
    collected.append(text)
    warnings.warn(text, DinoGeoWarning, stacklevel=3)


def _check_pixel_size(scene, gsd: Optional[float], collected: list[str]) -> None:
    """CHMv2 was trained near 0.6 m per pixel: far from that, say so and point to the gsd option."""
    size = scene.pixel_size_m
    if size is None:
        return
    mean = math.sqrt(abs(size[0] * size[1]))
    if scene.crs is not None and scene.crs.is_geographic:
        _, lat = scene.transform * (scene.width / 2, scene.height / 2)
        _warn(f"{scene.path}: geographic CRS (degrees): pixel size taken as {abs(size[0]):.2f} x {abs(size[1]):.2f} m "
              f"at latitude {lat:.2f}; the output stays in degrees", collected)
    if gsd is None and (mean > 2.0 or mean < 0.2):
        _warn(f"{scene.path}: pixel size is {mean:.2f} m, far from the ~{CHMV2_TRAINING_GSD} m the canopy model "
              f"was trained on; heights may be unreliable (try `gsd` {CHMV2_TRAINING_GSD})", collected)


def _area_km2(scene) -> float:
    size = scene.pixel_size_m
    if size is None:
        return 0.0
    return abs(size[0] * size[1]) * scene.width * scene.height / 1e6


def _load_task_model(task: str, weights: Optional[PathLike], backbone_weights: Optional[PathLike],
                     device: torch.device, dtype: torch.dtype, verify: bool) -> torch.nn.Module:
    from .models.canopy import load_canopy_model
    from .models.weights import verify_official_hash

    weights = Path(weights) if weights is not None else _find_chmv2()
    if verify:
        for path in (weights, backbone_weights):
            if path is not None and Path(path).is_file():
                verify_official_hash(path)
    if backbone_weights is None and weights.is_file():
        backbone_weights = _find_backbone_beside(weights)
    return load_canopy_model(weights, backbone_weights=backbone_weights, device=device, dtype=dtype, verify=verify)


def _find_chmv2() -> Path:
    """The CHMv2 weights in the search folders: the HF folder, or Meta's head file."""
    names = (registry.CHMV2_HF_REPO.split("/")[1], registry.CHMV2_HEAD_FILENAME)
    for folder in search_dirs():
        for name in names:
            if (folder / name).exists():
                return folder / name
    raise WeightsNotFoundError(
        "canopy weights",
        f"not found. Request the gated CHMv2 weights at https://huggingface.co/{registry.CHMV2_HF_REPO} "
        f"(or Meta's {registry.CHMV2_HEAD_FILENAME} with the SAT ViT-L backbone from {registry.GATED_WEIGHTS_URL}), "
        f"put them in {search_dirs()[0]} (or set DINOV3GEO_WEIGHTS), or pass `weights` PATH")


def _find_backbone_beside(head: Path) -> Optional[Path]:
    """Meta's head file needs the SAT ViT-L backbone: take the official file if it lies beside it."""
    info = registry.BACKBONES["dinov3-vitl16-sat493m"]
    for folder in [head.parent, *search_dirs()]:
        if (folder / info.filename).exists():
            return folder / info.filename
    return None
