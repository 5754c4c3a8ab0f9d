"""Loading a backbone by name or path: the in-memory ones (:mod:`.builtin`), registry names found
locally (or downloaded when allowed), and checkpoint files in any layout (:mod:`.weights`)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open

from ..errors import DinoGeoWarning
from . import registry
from .backbone import Backbone, build_backbone
from .builtin import builtin_backbone
from .locate import resolve_weights, verify_official_hash
from .weights import read_checkpoint


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


def width_without_loading(backbone) -> Optional[int]:
    """The embedding width of a backbone told without reading its weights: a loaded one, an in-memory one,
    a registry name or official file name, a Hugging Face folder (``config.json``) or a safetensors
    file (its header); ``None`` when only loading would tell (a ``.pth``)."""
    if hasattr(backbone, "embed_dim"):
        return int(backbone.embed_dim)
    if builtin_backbone(backbone) is not None:
        return builtin_backbone(backbone).width
    if backbone is None:
        return None
    path = Path(str(backbone)).expanduser()
    info = registry.find_by_name(path.name if path.exists() else str(backbone))
    if info is not None:
        return registry.WIDTHS[info.arch]
    try:
        if path.is_dir() and (path / "config.json").is_file():
            return int(json.loads((path / "config.json").read_text())["hidden_size"])
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as fh:
                key = next((k for k in fh.keys() if k.endswith("patch_embed.proj.weight")
                            or k.endswith("patch_embeddings.weight")), None)
                return None if key is None else int(fh.get_slice(key).get_shape()[0])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None
