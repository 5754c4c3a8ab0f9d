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
from .errors import DinoGeoWarning, UsageError, WeightsNotFoundError
from .io.scene import MAX_UPSAMPLE, scene_reader
from .io.sinks import check_output, outputs_together
from .io.stac import describe_output
from .io.tiling import ChipPlan, validate_tiling
from .io.vector import check_threshold
from .models import registry
from .models.demo import DEMO_NOTE, demo_canopy_model, is_demo
from .models.registry import CHMV2_TRAINING_GSD
from .models.weights import search_dirs
from .pipeline import DenseOutput, summary_lines, write_dense

PathLike = Union[str, os.PathLike]
TASKS = ("canopy",)


@dataclass
class SegmentResult:
    """What ``segment`` wrote and how it went."""

    output: Path
    vector: Optional[Path]
    polygons: Optional[int]
    stats: RunStats
    area_km2: Optional[float]       # None: a scene without georeference (no metres to count)
    seconds: float
    device: str
    precision: str = "fp32"
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The closing lines the command prints."""
        wrote: list[object] = [self.output]
        if self.vector is not None:
            wrote.append(f"{self.vector} ({self.polygons} polygon{'' if self.polygons == 1 else 's'})")
        area = f"{self.area_km2:.3f} km²" if self.area_km2 is not None else "no georeference: sizes in pixels"
        lines = summary_lines(self.stats, self.seconds, self.device, self.precision, wrote, extra=f", {area}")
        return "\n".join(lines)


def segment(scene: PathLike, task: str = "canopy", output: Optional[PathLike] = None, *,
            weights: Optional[PathLike] = None, backbone_weights: Optional[PathLike] = None,
            vector: Optional[PathLike] = None, min_height: float = 2.0, device: str = "auto",
            batch_size: int = 8, precision: str = "auto", tile: int = 512, overlap: int = 64,
            bands: Optional[Sequence[int]] = None, gsd: Optional[float] = None,
            scale: Optional[tuple[float, float]] = None, overwrite: bool = False, compile: bool = False,
            progress: Optional[bool] = None, verify: bool = True, readers: Optional[int] = None,
            dtype: str = "float32", max_upsample: Optional[float] = MAX_UPSAMPLE) -> SegmentResult:
    """Run ``task`` over the raster ``scene`` and write a Cloud-Optimised GeoTIFF on its grid.

    ``canopy``: CHMv2 canopy height in metres (float32, NaN where the input is invalid; ``dtype``
    float16 halves the file, uint16 stores decimetres with scale 0.1 so GIS tools show metres,
    65535 nodata: both within 0.05 m of float32 below 96 m); with
    ``vector``, polygons of canopy at or above ``min_height`` m go to that GeoPackage (layer
    ``canopy``, the scene's CRS, with ``area_m2``, ``mean_height_m``, ``max_height_m``).
    ``output`` defaults to ``<scene>_<task>.tif`` beside the scene. ``weights="demo"`` runs a small
    random model built in memory (meaningless heights; a warning says so). A ``gsd`` that upsamples
    more than ``max_upsample`` times per axis is refused (``None``: no limit). With ``vector``,
    earlier outputs are replaced only once both new ones are complete.
    """
    t0 = time.perf_counter()
    collected: list[str] = []
    if is_demo(weights):
        _warn(DEMO_NOTE, collected)
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
    check_threshold(min_height, "min_height")
    _check_weights_exist(weights)
    encoding = DenseOutput("continuous", dtype, band_names=("canopy_height_m",))
    with outputs_together(output, vector, overwrite) as (raster_out, vector_out), \
            scene_reader(scene, bands=bands, scale=scale, gsd=gsd, max_upsample=max_upsample) as sc:
        collected.extend(sc.warnings)     # already issued by scene_reader
        _check_pixel_size(sc, gsd, collected)
        plan = ChipPlan.build(sc.height, sc.width, tile, overlap)
        _say_resampling(sc, plan, collected)
        model = _load_task_model(task, weights, backbone_weights, settings.device, settings.dtype, verify)
        stats, _ = write_dense(sc, model, raster_out, plan, settings, encoding,
                               overwrite=overwrite or vector is not None, progress=progress)
        if stats.chips_computed == 0:
            _warn(f"{sc.path}: no valid pixel (all nodata): wrote {output} entirely nodata (NaN)", collected)
        area = _area_km2(sc)
        polygons = None
        if vector is not None:      # both outputs replace earlier ones together, or neither does
            from .io.vector import polygonize_threshold

            polygons = polygonize_threshold(raster_out, vector_out, min_height, layer="canopy", overwrite=True)
    describe_output(output, sc.path, model, vector, {"task": task, "weights": weights})    # style, STAC
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


def _say_resampling(scene, plan: ChipPlan, collected: list[str]) -> None:
    """When ``gsd`` changes the grid a lot (2x or more per axis), say so before the work starts:
    the factor, the chips and the working grid's size."""
    factor = scene.resampling_factor
    if not scene.resampled or 0.5 < factor < 2.0:
        return
    size_gb = scene.width * scene.height * 4 / 1e9
    _warn(f"{scene.path}: gsd resamples {factor:.2g}x per axis: {scene.input_profile['width']} x "
          f"{scene.input_profile['height']} px -> {scene.width} x {scene.height} px, {len(plan.windows)} chips of "
          f"{plan.tile} px (~{size_gb:.2g} GB of temporary float32 heights; the output stays on the input grid)",
          collected)


def _area_km2(scene) -> Optional[float]:
    size = scene.pixel_size_m
    if size is None:
        return None
    return abs(size[0] * size[1]) * scene.width * scene.height / 1e6


def _load_task_model(task: str, weights: Optional[PathLike], backbone_weights: Optional[PathLike],
                     device: torch.device, dtype: torch.dtype, verify: bool) -> torch.nn.Module:
    from .models.canopy import load_canopy_model
    from .models.weights import verify_official_hash

    if is_demo(weights):
        return demo_canopy_model(device, dtype)
    weights = Path(weights) if weights is not None else _find_chmv2()
    if verify:
        for path in (weights, backbone_weights):
            if path is not None and Path(path).is_file():
                verify_official_hash(path)
    if backbone_weights is None and weights.is_file():
        backbone_weights = _find_backbone_beside(weights)
    return load_canopy_model(weights, backbone_weights=backbone_weights, device=device, dtype=dtype, verify=verify)


def _check_weights_exist(weights: Optional[PathLike]) -> None:
    """Before any work: a weights path that does not exist is an error saying where to get them."""
    from .models.canopy import get_chmv2_help

    if weights is not None and not is_demo(weights) and not Path(weights).exists():
        raise WeightsNotFoundError(weights, f"not found: {get_chmv2_help(weights)}")


def _find_chmv2() -> Path:
    """The CHMv2 weights in the search folders: the HF folder, or Meta's head file."""
    names = (registry.CHMV2_HF_REPO.split("/")[1], registry.CHMV2_HEAD_FILENAME)
    for folder in search_dirs():
        for name in names:
            if (folder / name).exists():
                return folder / name
    from .models.canopy import get_chmv2_help

    raise WeightsNotFoundError("canopy weights", f"not found (`weights`): {get_chmv2_help()}")


def _find_backbone_beside(head: Path) -> Optional[Path]:
    """Meta's head file needs the SAT ViT-L backbone: take the official file if it lies beside it."""
    info = registry.BACKBONES["dinov3-vitl16-sat493m"]
    for folder in [head.parent, *search_dirs()]:
        if (folder / info.filename).exists():
            return folder / info.filename
    return None
