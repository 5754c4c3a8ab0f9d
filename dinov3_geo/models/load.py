"""Loading a backbone by name or path: the in-memory ones (:mod:`.builtin`), registry names found
locally (or downloaded when allowed), and checkpoint files in any layout (:mod:`.weights`)."""
from __future__ import annotations

import os
import warnings
from typing import Optional, Union

import torch

from ..errors import DinoGeoWarning
from .backbone import Backbone, build_backbone
from .builtin import builtin_backbone
from .weights import read_checkpoint, resolve_weights, verify_official_hash


def load_backbone(weights: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                  dtype: torch.dtype = torch.float32, verify: bool = True,
                  allow_download: Optional[bool] = None) -> Backbone:
    """Load a DINOv3 backbone offline from a path (Meta ``.pth``, HF directory, timm file) or a
    registry name such as ``dinov3-vitl16-sat493m`` (looked up in ``$DINOV3GEO_WEIGHTS`` and the cache).

    Official file names keep their hash prefix (``-eadcf0ff``) and are checked against the file's
    SHA-256 unless ``verify`` is False. Returns the module in eval mode on ``device``. The reserved
    name ``demo`` gives a small random backbone built in memory (for trying the API; no weights);
    ``standin`` a stand-in whose features are colour and texture statistics (:mod:`.standin`).
    """
    builtin = builtin_backbone(weights)
    if builtin is not None:
        warnings.warn(builtin.note, DinoGeoWarning, stacklevel=2)
        return builtin.build(device, dtype)
    path = resolve_weights(weights, allow_download)
    if verify:
        verify_official_hash(path)
    ckpt = read_checkpoint(path)
    backbone = build_backbone(ckpt, dtype)
    return backbone.to(device)
