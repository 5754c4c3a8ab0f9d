"""Options as public values, checked and resolved once at the entry of every route.

A request reaches the product by several routes (a command, a Python function, the ``da.dinov3``
accessor, a batch in this process or on Dask workers, training); each one turns what the user gave
into these values first, before any weights are read, any output is opened or any chip computed,
and hands them on. An option is spelled and checked here only:

- :class:`Tiling`: chip size and overlap;
- :class:`ReadOptions`: how pixels are read (bands, scaling, nodata, pixel size), for
  :func:`dinov3_geo.io.scene.open_scene` and the pixel contract (:mod:`dinov3_geo.io.pixels`);
- :class:`~dinov3_geo.engine.RunSettings`: device, precision, batch size, compile, reader threads,
  resolved by :func:`resolve_run` (``auto`` becomes a device and a precision);
- the checks of task options that need no data (``k``, ``pca``, thresholds, the C grid, epochs,
  learning rates): :func:`check_k`, :func:`check_pca`, :func:`check_positive_numbers`...
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from dinov3_geo.engine import RunSettings
from dinov3_geo.errors import UsageError
from dinov3_geo.io.pixels import check_bands, check_scale
from dinov3_geo.io.scene import MAX_UPSAMPLE
from dinov3_geo.io.tiling import validate_tiling

__all__ = ["Tiling", "ReadOptions", "RunSettings", "resolve_run", "check_k", "check_pca", "check_whole",
           "check_positive_numbers", "check_point", "check_threshold"]


@dataclass(frozen=True)
class Tiling:
    """Chip size and overlap in pixels (``tile`` a positive multiple of 16, ``0 <= overlap < tile/2``)."""

    tile: int = 512
    overlap: int = 64

    def __post_init__(self) -> None:
        validate_tiling(self.tile, self.overlap)
        object.__setattr__(self, "tile", int(self.tile))
        object.__setattr__(self, "overlap", int(self.overlap))

    @classmethod
    def complete(cls, tile: Optional[int], overlap: Optional[int], default: "Tiling",
                 default_overlap=None) -> "Tiling":
        """The tiling of what was given, the rest from a task's ``default``: its tile, and for a
        tile given alone ``default_overlap(tile)`` (else the default's overlap)."""
        tile = default.tile if tile is None else tile
        if overlap is None:
            overlap = default.overlap if default_overlap is None or tile == default.tile else default_overlap(tile)
        return cls(tile, overlap)


@dataclass(frozen=True)
class ReadOptions:
    """How a scene's pixels are read (see :mod:`dinov3_geo.io.pixels`).

    ``bands``: 1 or 3 band numbers (1-based) as red, green, blue (default: by colour interpretation
    or band names); ``scale``: one ``(MIN, MAX)`` for every band, or one pair per band (default: the
    scene-wide 2-98 % stretch; bytes are divided by 255); ``nodata``: a value marking invalid input
    pixels (where every band has it), replacing the file's own masks; ``gsd``: metres per pixel to
    run the model at (resampled, written back on the input grid); ``max_upsample``: the largest
    ``gsd`` upsampling per axis allowed (``None``: no limit)."""

    bands: Optional[tuple[int, ...]] = None
    scale: Optional[tuple[tuple[float, float], ...]] = None
    nodata: Optional[float] = None
    gsd: Optional[float] = None
    max_upsample: Optional[float] = MAX_UPSAMPLE

    def __post_init__(self) -> None:
        if self.bands is not None:
            object.__setattr__(self, "bands", tuple(check_bands(self.bands)))
        object.__setattr__(self, "scale", check_scale(self.scale))
        if self.nodata is not None:
            try:
                object.__setattr__(self, "nodata", float(self.nodata))
            except (TypeError, ValueError):
                raise UsageError("nodata", f"nodata must be a number, got {self.nodata!r}") from None
        if self.gsd is not None:
            object.__setattr__(self, "gsd", _positive(self.gsd, "gsd", "a positive number of metres"))
        if self.max_upsample is not None:
            object.__setattr__(self, "max_upsample", _positive(self.max_upsample, "max_upsample",
                                                               "a positive factor or None"))

    def scene_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`dinov3_geo.io.scene.open_scene`."""
        return dict(bands=list(self.bands) if self.bands else None,
                    scale=None if self.scale is None else [list(p) for p in self.scale],
                    nodata=self.nodata, gsd=self.gsd, max_upsample=self.max_upsample)

    def record(self) -> dict[str, Any]:
        """What changes values, as JSON-ready data (a batch's resume recipe)."""
        return dict(bands=list(self.bands) if self.bands else None,
                    scale=None if self.scale is None else [list(p) for p in self.scale],
                    nodata=self.nodata, gsd=self.gsd)

    def given(self) -> list[str]:
        """Names of the options set to something else than the defaults."""
        return [name for name in ("bands", "scale", "nodata", "gsd") if getattr(self, name) is not None]


def reading(options: Optional[ReadOptions] = None, **given) -> ReadOptions:
    """``options``, or a :class:`ReadOptions` of the keyword shortcuts (``bands``, ``scale``,
    ``nodata``, ``gsd``, ``max_upsample``); giving both is an error naming the shortcut."""
    return _value(ReadOptions, options, "reading", given)


def quarter_overlap(tile: int) -> int:
    """The default overlap of a tile given alone: a quarter of it, at most 64 px (512 -> 64)."""
    return min(64, int(tile) // 4)


def cell_overlap(tile: int) -> int:
    """:func:`quarter_overlap` on whole 16-px cells (patch features need chip offsets on cells)."""
    return quarter_overlap(tile) // 16 * 16


def tiling_of(options: Optional[Tiling] = None, tile: Optional[int] = None, overlap: Optional[int] = None,
              default: Optional[Tiling] = None, default_overlap=quarter_overlap) -> Tiling:
    """One :class:`Tiling` of a value or keywords, the rest from ``default`` (512/64)."""
    chips, tile, overlap = tiling(options, tile, overlap)
    return chips or Tiling.complete(tile, overlap, default or Tiling(), default_overlap)


def tiling(options: Optional[Tiling] = None, tile: Optional[int] = None,
           overlap: Optional[int] = None) -> tuple[Optional[Tiling], Optional[int], Optional[int]]:
    """``(tiling, tile, overlap)`` as given: the value ``options``, or the keywords checked alone
    (``tile`` a positive multiple of 16, ``overlap`` 0 or more); the task's default fills what is
    missing (:meth:`Tiling.complete`). Giving both the value and a keyword is an error."""
    if options is not None:
        if not isinstance(options, Tiling):
            raise UsageError("tiling", f"expected a Tiling, got {type(options).__name__}")
        given = [name for name, v in (("tile", tile), ("overlap", overlap)) if v is not None]
        if given:
            raise UsageError(given[0], "given twice: in `tiling` and as a keyword")
        return options, None, None
    if tile is not None:
        validate_tiling(tile, 0)
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or overlap < 0):
        raise UsageError("overlap", f"overlap must be a whole number of pixels >= 0, got {overlap!r}")
    return None, tile, overlap


def _value(cls, options, name: str, given: dict):
    set_ = {k: v for k, v in given.items() if v is not None and not (k == "max_upsample" and v == MAX_UPSAMPLE)}
    if options is not None:
        if not isinstance(options, cls):
            raise UsageError(name, f"expected a {cls.__name__}, got {type(options).__name__}")
        if set_:
            raise UsageError(next(iter(set_)), f"given twice: in `{name}` and as a keyword")
        return options
    return cls(**{k: v for k, v in given.items() if v is not None or k == "max_upsample"})


def resolve_run(device: Any = "auto", precision: str = "auto", batch_size: int = 8, compile: bool = False,
                readers: Optional[int] = None, settings: Optional[RunSettings] = None) -> RunSettings:
    """The run settings: ``settings`` as given, else resolved once from the keywords (``auto``
    device and precision decided, reader threads counted). Errors name the parameter."""
    if settings is not None:
        if not isinstance(settings, RunSettings):
            raise UsageError("settings", f"expected RunSettings, got {type(settings).__name__}")
        return settings
    return RunSettings.resolve(device, precision, batch_size, compile, readers)


# -- checks of task options that need no data ----------------------------------------------------

def check_whole(value, name: str, least: int = 1, most: Optional[int] = None) -> int:
    """``value`` as a whole number in ``least..most``, or a UsageError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least or \
            (most is not None and value > most):
        span = f"from {least} to {most}" if most is not None else f"of at least {least}"
        raise UsageError(name, f"{name} must be a whole number {span}, got {value!r}")
    return int(value)


def check_k(k) -> int:
    """The number of k-means clusters: 2..254 (uint8 classes with 255 as nodata)."""
    return check_whole(k, "k", 2, 254)


def check_pca(pca, width: Optional[int] = None) -> Optional[int]:
    """PCA components: ``None``, or 1..``width`` (the feature width, when known)."""
    if pca is None:
        return None
    k = check_whole(pca, "pca", 1)
    if width is not None and k > width:
        raise UsageError("pca", f"pca={k} exceeds the feature width {width}")
    return k


def check_positive_numbers(values: Sequence[float], name: str) -> tuple[float, ...]:
    """A non-empty list of finite numbers above 0 (learning rates, a C grid), or a UsageError."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise UsageError(name, f"{name} must be numbers, got {values!r}") from None
    if not out or not all(math.isfinite(v) and v > 0 for v in out):
        raise UsageError(name, f"{name} must be one or more numbers above 0, got {list(values)!r}")
    return out


def check_threshold(value, name: str = "min_height") -> float:
    """A height threshold in metres: a finite number above 0 (NaN would select nothing, a negative
    or zero height everything)."""
    return _positive(value, name, "a finite height above 0 m")


def check_point(at) -> tuple[float, float]:
    """A point ``(x, y)`` of two finite numbers, or a UsageError naming ``at``."""
    try:
        x, y = (float(v) for v in at)
    except (TypeError, ValueError):
        raise UsageError("at", f"expected a point (x, y), got {at!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise UsageError("at", f"expected a finite point (x, y), got {at!r}")
    return x, y


def _positive(value, name: str, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(name, f"{name} must be {what}, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise UsageError(name, f"{name} must be {what}, got {value!r}")
    return number
