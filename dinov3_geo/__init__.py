"""dinov3-geo: DINOv3 satellite backbones over georeferenced imagery.

Public API (imported lazily so ``import dinov3_geo`` stays cheap):

- ``load_backbone(weights, device=..., dtype=...)``: a DINOv3 ViT from Meta ``.pth``, HF folder or timm file.
- ``segment(scene, task="canopy", ...)``: run a dense task over a raster, write a COG (and GeoPackage).
- ``predict(scene, model, output, ...)``: any dense model over a raster into a COG (the one pipeline).
- ``ChipPlan``, ``RunSettings``, ``run_chips``: the pipeline's parts, for other consumers of chips.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_backbone": "dinov3_geo.models.backbone",
    "save_backbone": "dinov3_geo.models.backbone",
    "Backbone": "dinov3_geo.models.backbone",
    "resolve_weights": "dinov3_geo.models.weights",
    "segment": "dinov3_geo.api",
    "predict": "dinov3_geo.pipeline",
    "PredictResult": "dinov3_geo.pipeline",
    "ChipPlan": "dinov3_geo.pipeline",
    "RunSettings": "dinov3_geo.pipeline",
    "run_chips": "dinov3_geo.pipeline",
    "TaskModel": "dinov3_geo.tasks",
    "open_scene": "dinov3_geo.io.scene",
    "DinoGeoError": "dinov3_geo.errors",
    "DinoGeoWarning": "dinov3_geo.api",
    "SegmentResult": "dinov3_geo.api",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dinov3_geo' has no attribute {name!r}")
