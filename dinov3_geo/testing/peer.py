"""The peer we compare with: TerraTorch's ``tiled_inference`` (cosine blending, whole scene in memory).

TerraTorch is installed with ``--no-deps`` (its package ``__init__`` imports far more than this
module needs), so only ``terratorch/tasks/tiled_inference.py`` is loaded, as in
``../shared/bench/peer_terratorch.py``. Used by the seam tests and the pipeline benchmark.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
import types
from pathlib import Path
from typing import Callable


@functools.cache
def load_tiled_inference() -> Callable:
    """TerraTorch's ``tiled_inference`` function, loaded from its file alone."""
    spec = importlib.util.find_spec("terratorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("terratorch is not installed (pip install --no-deps terratorch==1.2.13)")
    root = Path(spec.submodule_search_locations[0])
    for name in ("terratorch", "terratorch.models"):
        sys.modules.setdefault(name, types.ModuleType(name))
    utils = types.ModuleType("terratorch.models.utils")
    utils.pad_images = lambda imgs, patch_size, padding: imgs
    sys.modules["terratorch.models.utils"] = utils
    s = importlib.util.spec_from_file_location("tt_tiled", root / "tasks" / "tiled_inference.py")
    module = importlib.util.module_from_spec(s)
    s.loader.exec_module(module)
    return module.tiled_inference
