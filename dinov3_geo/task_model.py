"""The task-model protocol: what plugs into the one pipeline (:func:`dinov3_geo.pipeline.predict`).

It sits beside the pipeline, below the tasks (:mod:`dinov3_geo.tasks`) that declare themselves with it.

A task model is any ``torch.nn.Module`` that maps a normalised float batch ``[B,3,T,T]`` to its
output. It may declare, as attributes, what it takes and what it gives; the pipeline reads them
with :func:`describe` and falls back to plain defaults, so a bare ``nn.Conv2d`` is a task model too.
The engine never learns a task's name; a task never builds a grid, a thread or a file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch

from dinov3_geo.errors import UsageError
from dinov3_geo.io.stitch import KINDS as STITCH_KINDS

#: What a task model gives per chip, and where it goes (the one vocabulary of outputs):
#: ``continuous`` [K,T,T] -> blended float COG; ``classes`` [K,T,T] scores -> blended, argmax -> uint8
#: COG; ``vector`` [K] -> one row a chip (GeoPackage); ``tokens`` [D, 1 + (T/16)²] -> one row a chip
#: (GeoParquet: CLS and mean patch); ``patches`` [D,T/16,T/16] -> a map at 16 px cells.
OUTPUTS = ("continuous", "classes", "vector", "tokens", "patches")
#: The outputs blended into a raster on the scene's grid (the stitcher's two ways of blending).
DENSE_OUTPUTS = STITCH_KINDS


@runtime_checkable
class TaskModel(Protocol):
    """The attributes a task model may declare (all optional except ``forward``).

    - ``output``: one of :data:`OUTPUTS` (default ``continuous``);
    - ``channels``: K (values or classes) or D (vector, patches); saves a probe batch when given;
    - ``mean``, ``std``: the RGB statistics its ``normalise`` applies to 0..1 chips;
    - ``normalise(x01)``: 0..1 chips -> its input (default: unchanged);
    - ``band_names``: names of the output bands; ``class_names``, ``colormap`` for classes;
    - ``chip_size``: the tile it was trained on, if it needs one;
    - ``dense_layers``: the backbone blocks it reads, for the record.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TaskInfo:
    """What the pipeline knows of a task model (read once by :func:`describe`)."""

    output: str = "continuous"
    channels: Optional[int] = None
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    band_names: Optional[tuple[str, ...]] = None
    class_names: Optional[tuple[str, ...]] = None
    colormap: Optional[dict] = None
    chip_size: Optional[int] = None
    dense_layers: Optional[tuple[int, ...]] = None


def describe(model: torch.nn.Module) -> TaskInfo:
    """The declared attributes of ``model`` as a :class:`TaskInfo` (defaults where it declares none)."""
    def tup(name: str) -> Optional[tuple]:
        value = getattr(model, name, None)
        return None if value is None else tuple(value)

    output = getattr(model, "output", "continuous")
    if output not in OUTPUTS:
        raise UsageError("model", f"{type(model).__name__}.output is {output!r}, not one of {', '.join(OUTPUTS)}")
    channels = getattr(model, "channels", None)
    chip = getattr(model, "chip_size", None)
    return TaskInfo(output=output, channels=None if channels is None else int(channels),
                    mean=tup("mean"), std=tup("std"), band_names=tup("band_names"),
                    class_names=tup("class_names"), colormap=getattr(model, "colormap", None),
                    chip_size=None if chip is None else int(chip), dense_layers=tup("dense_layers"))

