"""The peer we compare with: TerraTorch's ``tiled_inference`` (cosine blending, whole scene in memory).

TerraTorch is installed with ``--no-deps`` (its package ``__init__`` imports far more than this
module needs), so only ``terratorch/tasks/tiled_inference.py`` is loaded, as in
``../shared/bench/peer_terratorch.py``. Its one import from the rest of TerraTorch
(``terratorch.models.utils.pad_images``, a no-op at the sizes we use) is answered inside the
module's own namespace: ``sys.modules`` is left as it was. Used by the seam tests and the benchmark.
"""
from __future__ import annotations

import builtins
import functools
import importlib.util
import types
from pathlib import Path
from typing import Callable


def _pad_images(imgs, patch_size, padding):
    return imgs


def _import_for_peer(name, globals=None, locals=None, fromlist=(), level=0):
    """``__import__`` for the peer's module: its TerraTorch import gets a stub, the rest is normal."""
    if name == "terratorch.models.utils":
        return types.SimpleNamespace(pad_images=_pad_images)
    return builtins.__import__(name, globals, locals, fromlist, level)


@functools.cache
def load_tiled_inference() -> Callable:
    """TerraTorch's ``tiled_inference`` function, loaded from its file alone."""
    spec = importlib.util.find_spec("terratorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("terratorch is not installed (pip install --no-deps terratorch==1.2.13)")
    path = Path(spec.submodule_search_locations[0]) / "tasks" / "tiled_inference.py"
    # classes defined there report this module as theirs: dataclasses looks the module up in
    # sys.modules, and this one is there already
    module = types.ModuleType(__name__)
    module.__file__ = str(path)
    module.__builtins__ = {**vars(builtins), "__import__": _import_for_peer}
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module.tiled_inference
