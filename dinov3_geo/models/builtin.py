"""Backbones built in memory by name, with no weights file: ``demo`` (random weights, to try the
tools) and ``standin`` (hand-set weights whose features are colour and texture statistics, for
tests, examples and notebooks). Neither is DINOv3, and loading either says so.

One entry says everything the rest of the package needs: the name, the note a load prints, the
feature width, and the builder. ``load_backbone`` and the task registry look names up here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

from .demo import DEMO_ARCH, DEMO_BACKBONE_NOTE, demo_backbone
from .standin import STANDIN_ARCH, STANDIN_NOTE, standin_backbone


@dataclass(frozen=True)
class BuiltinBackbone:
    """A backbone built in memory: its ``name``, the ``note`` a load prints, its feature ``width``
    and ``build(device, dtype)``."""

    name: str
    note: str
    width: int
    build: Callable


BUILTIN_BACKBONES = {
    "demo": BuiltinBackbone("demo", DEMO_BACKBONE_NOTE, int(DEMO_ARCH["embed_dim"]), demo_backbone),
    "standin": BuiltinBackbone("standin", STANDIN_NOTE, int(STANDIN_ARCH["embed_dim"]), standin_backbone),
}


def builtin_backbone(name: Optional[Union[str, os.PathLike]]) -> Optional[BuiltinBackbone]:
    """The in-memory backbone reserved under ``name`` (a file or folder so named must be given as
    a path, e.g. ``./demo``), or ``None``."""
    return BUILTIN_BACKBONES.get(name) if isinstance(name, str) else None
