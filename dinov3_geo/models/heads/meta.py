"""A head file's metadata as a typed value, checked when the file is read and read in one place.

:func:`read_head_meta` reads only the JSON in the safetensors header (no tensor), so a route can
take a head's task, tiling, bands and scaling before any weights are read.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ...errors import InputError, WeightsError, short_message

PathLike = Union[str, os.PathLike]
FORMAT = "dinov3-geo-head"
VERSION = 1
META_KEY = "dinov3_geo_head"
#: Head kinds by the task (in :mod:`dinov3_geo.tasks.registry`) they serve.
HEAD_KINDS = {"classify": ("probe",), "segment": ("linear", "dpt")}


@dataclass(frozen=True)
class BackboneIdentity:
    """The backbone a head was trained on (a head loads only onto it)."""

    name: str
    embed_dim: int
    depth: int
    fingerprint: str

    def as_dict(self) -> dict:
        return {"name": self.name, "embed_dim": self.embed_dim, "depth": self.depth, "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class HeadMeta:
    """What a head file says about how to use it (``raw`` keeps every field, for the record)."""

    task: str
    head: str
    class_names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    backbone: BackboneIdentity
    layers: tuple[int, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    chip_size: int
    bands: Optional[tuple[int, ...]] = None
    scale: Optional[tuple[tuple[float, float], ...]] = None
    pooling: str = "cls"
    ignore_classes: tuple[int, ...] = ()
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, meta: Any, where: PathLike) -> "HeadMeta":
        """Check ``meta`` (the parsed JSON) field by field; a WeightsError naming ``where`` and the
        field when one is missing or of the wrong kind."""
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise WeightsError(where, "not a dinov3-geo head file (unknown format)")
        if int(_field(meta, "version", where, (int,))) > VERSION:
            raise WeightsError(where, f"head file version {meta['version']} is newer than this dinov3-geo reads ({VERSION})")
        task, kind = meta.get("task"), meta.get("head")
        if task not in HEAD_KINDS or kind not in HEAD_KINDS[task]:
            raise WeightsError(where, f"not a dinov3-geo head file (unknown task or head kind: {task!r}, {kind!r})")
        names = tuple(str(n) for n in _field(meta, "class_names", where, (list,)))
        colors = tuple(tuple(int(v) for v in c) for c in _field(meta, "colors", where, (list,)))
        if not names or len(colors) != len(names) or any(len(c) != 3 for c in colors):
            raise WeightsError(where, "damaged head metadata: class names and colours do not match")
        bb = _field(meta, "backbone", where, (dict,))
        norm = _field(meta, "normalisation", where, (dict,))
        mean, std = _three(norm.get("mean"), "normalisation mean", where), _three(norm.get("std"), "normalisation std", where)
        if not all(s > 0 for s in std):
            raise WeightsError(where, "damaged head metadata: normalisation std must be above 0")
        chip = _field(meta, "chip_size", where, (int,))
        if chip <= 0 or chip % 16:
            raise WeightsError(where, f"damaged head metadata: chip size {chip} is not a multiple of 16")
        try:
            identity = BackboneIdentity(str(bb.get("name")), int(bb["embed_dim"]), int(bb["depth"]),
                                        str(bb.get("fingerprint")))
            layers = tuple(int(i) for i in _field(meta, "layers", where, (list,)))
        except (KeyError, TypeError, ValueError):
            raise WeightsError(where, "damaged head metadata: backbone or layers") from None
        return cls(task, kind, names, colors, identity, layers, mean, std, int(chip), _bands(meta.get("bands")),
                   _scale(meta.get("scaling", meta.get("scale"))), str(meta.get("pooling", "cls")),
                   tuple(int(i) for i in meta.get("ignore_classes") or ()), meta)

    def colormap(self) -> dict[int, tuple[int, int, int]]:
        """{class value: (r, g, b)} for the class COG's colour table."""
        return {i: c for i, c in enumerate(self.colors)}

    def default_tiling(self) -> tuple[int, int]:
        """(tile, overlap) to map a scene with: the training chip size; a segmentation head overlaps
        by a quarter of it (at most 64), a probe classifies whole chips (no overlap)."""
        if self.task == "classify":
            return self.chip_size, 0
        return self.chip_size, min(64, self.chip_size // 4)


def _field(meta: dict, name: str, where: PathLike, kinds: tuple):
    value = meta.get(name)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise WeightsError(where, f"damaged head metadata: field '{name}' is missing or not a {kinds[0].__name__}")
    return value


def _three(values, name: str, where: PathLike) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise WeightsError(where, f"damaged head metadata: {name} must be three numbers")
    return out  # type: ignore[return-value]


def _bands(values) -> Optional[tuple[int, ...]]:
    """Band numbers a head was trained with, when they are raster band numbers (1 or 3 of them)."""
    if not values or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in values):
        return None
    return tuple(values) if len(values) in (1, 3) else None


def _scale(values) -> Optional[tuple[tuple[float, float], ...]]:
    """How a head's chips were scaled: one (MIN, MAX) or one pair per band; ``None`` when not
    recorded or not in that form (per-band statistics of a benchmark do not transfer to a scene)."""
    if not values:
        return None
    try:
        pairs = [tuple(float(v) for v in values)] if all(isinstance(v, (int, float)) for v in values) \
            else [tuple(float(v) for v in pair) for pair in values]
    except (TypeError, ValueError):
        return None
    if len(pairs) not in (1, 3) or any(len(p) != 2 or not p[1] > p[0] for p in pairs):
        return None
    return tuple(pairs)  # type: ignore[return-value]


def read_head_meta(path: PathLike) -> HeadMeta:
    """The checked metadata of the head file ``path``, from the safetensors header only (no tensor
    is read). A missing file is an InputError; anything else that is not a head file, a WeightsError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "head file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(path, f"not a dinov3-geo head file (not safetensors: {short_message(exc)})") from None
    if raw is None:
        raise WeightsError(path, "not a dinov3-geo head file (safetensors without head metadata; "
                                 "make one with 'dinov3geo train')")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise WeightsError(path, "damaged head metadata (not JSON)") from None
    return HeadMeta.from_dict(meta, path)
