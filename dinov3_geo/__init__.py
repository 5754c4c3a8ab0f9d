"""dinov3-geo: DINOv3 satellite backbones over georeferenced imagery.

Public API (imported lazily so ``import dinov3_geo`` stays cheap):

- ``load_backbone(weights, device=..., dtype=...)``: a DINOv3 ViT from Meta ``.pth``, HF folder or timm file.
- ``segment(scene, task="canopy", ...)``: run a dense task over a raster, write a COG (and GeoPackage).
- ``run_batch(["scenes/*.tif"], "out/", task="canopy", dask="local:2")``: many scenes, resumable, on Dask.
- ``predict(scene, model, output, ...)``: any dense model over a raster into a COG (the one pipeline).
- ``ChipPlan``, ``RunSettings``, ``run_chips``: the pipeline's parts, for other consumers of chips.
- ``StopToken``: created by the caller and passed to a run (``stop=``) to stop it from a signal
  handler or another thread; the run leaves no partial file.
- ``embed``, ``similar``, ``cluster``, ``change``, ``patch_map``: land analysis with frozen features
  (:mod:`dinov3_geo.analysis`).
- ``classify(scene, head, output)``: a trained probe's class per chip into a GeoPackage.
- ``Tiling``, ``ReadOptions``, ``RunSettings``: the options as values, checked at the door
  (:mod:`dinov3_geo.options`); ``get_task``/``TASKS``: the task registry
  (:mod:`dinov3_geo.tasks.registry`).
- ``explore(scene, *outputs)``: the scene and its results as one self-contained interactive web page
  (:mod:`dinov3_geo.explorer`), with similarity search on click.
- ``da.dinov3`` on xarray DataArrays: ``import dinov3_geo.xarray`` registers it (as ``import
  rioxarray`` registers ``da.rio``); ``import dinov3_geo`` changes nothing in other libraries, and
  no run changes the process (the ``dinov3geo`` command alone tunes the allocator:
  :func:`dinov3_geo.hostmem.keep_freed_memory`).
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_backbone": "dinov3_geo.models.load",
    "save_backbone": "dinov3_geo.models.backbone",
    "Backbone": "dinov3_geo.models.backbone",
    "resolve_weights": "dinov3_geo.models.locate",
    "segment": "dinov3_geo.api",
    "run_batch": "dinov3_geo.batch",
    "BatchResult": "dinov3_geo.batch",
    "predict": "dinov3_geo.pipeline",
    "PredictResult": "dinov3_geo.pipeline",
    "ChipPlan": "dinov3_geo.pipeline",
    "RunSettings": "dinov3_geo.options",
    "run_chips": "dinov3_geo.pipeline",
    "StopToken": "dinov3_geo.engine",
    "TaskModel": "dinov3_geo.task_model",
    "open_scene": "dinov3_geo.io.scene",
    "DinoGeoError": "dinov3_geo.errors",
    "DinoGeoWarning": "dinov3_geo.errors",
    "SegmentResult": "dinov3_geo.api",
    "classify": "dinov3_geo.api",
    "ClassifyResult": "dinov3_geo.api",
    "Tiling": "dinov3_geo.options",
    "ReadOptions": "dinov3_geo.options",
    "get_task": "dinov3_geo.tasks.registry",
    "task_names": "dinov3_geo.tasks.registry",
    "embed": "dinov3_geo.analysis",
    "similar": "dinov3_geo.analysis",
    "cluster": "dinov3_geo.analysis",
    "change": "dinov3_geo.analysis",
    "patch_map": "dinov3_geo.analysis",
    "explore": "dinov3_geo.explorer",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dinov3_geo' has no attribute {name!r}")
