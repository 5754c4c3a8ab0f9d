"""dinov3-geo: DINOv3 satellite backbones over georeferenced imagery.

Public API (imported lazily so ``import dinov3_geo`` stays cheap):

- ``load_backbone(weights, device=..., dtype=...)``: a DINOv3 ViT from Meta ``.pth``, HF folder or timm file.
- ``segment(scene, task="canopy", ...)``: run a dense task over a raster, write a COG (and GeoPackage).
- ``run_batch(["scenes/*.tif"], "out/", task="canopy", dask="local:2")``: many scenes, resumable, on Dask.
- ``predict(scene, model, output, ...)``: any dense model over a raster into a COG (the one pipeline).
- ``ChipPlan``, ``RunSettings``, ``run_chips``: the pipeline's parts, for other consumers of chips.
- ``embed``, ``similar``, ``cluster``, ``change``, ``patch_map``: land analysis with frozen features
  (:mod:`dinov3_geo.analysis`).
- ``explore(scene, *outputs)``: the scene and its results as one self-contained interactive web page
  (:mod:`dinov3_geo.explore`), with similarity search on click.
- ``da.dinov3`` on xarray DataArrays (:mod:`dinov3_geo.xarray`): registered as soon as xarray is
  imported, before or after ``dinov3_geo``, without importing xarray here.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_backbone": "dinov3_geo.models.backbone",
    "save_backbone": "dinov3_geo.models.backbone",
    "Backbone": "dinov3_geo.models.backbone",
    "resolve_weights": "dinov3_geo.models.weights",
    "segment": "dinov3_geo.api",
    "run_batch": "dinov3_geo.batch",
    "BatchResult": "dinov3_geo.batch",
    "predict": "dinov3_geo.pipeline",
    "PredictResult": "dinov3_geo.pipeline",
    "ChipPlan": "dinov3_geo.pipeline",
    "RunSettings": "dinov3_geo.pipeline",
    "run_chips": "dinov3_geo.pipeline",
    "TaskModel": "dinov3_geo.tasks",
    "open_scene": "dinov3_geo.io.scene",
    "DinoGeoError": "dinov3_geo.errors",
    "DinoGeoWarning": "dinov3_geo.errors",
    "SegmentResult": "dinov3_geo.api",
    "embed": "dinov3_geo.analysis",
    "similar": "dinov3_geo.analysis",
    "cluster": "dinov3_geo.analysis",
    "change": "dinov3_geo.analysis",
    "patch_map": "dinov3_geo.analysis",
    "explore": "dinov3_geo.explore",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dinov3_geo' has no attribute {name!r}")


class _AccessorAfterXarray(importlib.abc.MetaPathFinder):
    """Registers ``da.dinov3`` right after xarray's first import, so ``import dinov3_geo`` stays
    cheap and the accessor is there whichever of the two a notebook imports first."""

    def find_spec(self, name, path=None, target=None):
        if name != "xarray":
            return None
        sys.meta_path.remove(self)          # find xarray's own spec; one registration is enough
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def load_then_register(module) -> None:
            load(module)
            import_module("dinov3_geo.xarray")

        spec.loader.exec_module = load_then_register
        return spec


if "xarray" in sys.modules:
    import_module("dinov3_geo.xarray")
elif not any(isinstance(f, _AccessorAfterXarray) for f in sys.meta_path):
    sys.meta_path.insert(0, _AccessorAfterXarray())
