"""The chip grid over a scene and the blending weights of each chip.

Chips are ``tile`` pixels square, laid out row-major with stride ``tile - overlap``. The last chip
of each row and column is shifted inward so that it ends exactly on the scene edge; where the scene
is smaller than ``tile`` in a dimension the chip spans that whole dimension (the caller pads it, see
:func:`pad_to_tile`).

Weights are separable (row profile x column profile). On a side where a chip overlaps its
neighbour, the profile rises over the overlap: it stays at a tiny floor over the outer quarter
(``margin``, where models that pad at chip borders are least reliable, cf. TerraTorch's ``delta``
crop), follows a raised-cosine ramp over the middle half and is 1 over the inner quarter. Mirrored
ramps of two neighbours over the same overlap sum to one. On the scene's own border a chip keeps
weight 1 right to the edge. The stitcher divides by the sum of weights at each pixel, so blending is
exact for identical predictions whatever the overlap pattern (shifted border chips included).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from rasterio.windows import Window

from dinov3_geo.errors import UsageError

#: Smallest weight any chip gives any pixel it covers: every covered pixel gets a positive weight.
WEIGHT_FLOOR = 1e-6


def validate_tiling(tile: int, overlap: int) -> None:
    """Raise :class:`UsageError` unless ``tile`` is a positive multiple of 16 and
    ``0 <= overlap < tile / 2``."""
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile <= 0 or tile % 16:
        raise UsageError("tile", f"tile must be a positive multiple of 16, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or overlap < 0 or 2 * overlap >= tile:
        raise UsageError("overlap", f"overlap must be >= 0 and < tile/2 ({tile / 2:g}), got {overlap!r}")


def axis_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Chip offsets along one axis of ``size`` pixels: stride ``tile - overlap``, the last one moved
    inward to end on the edge; ``[0]`` when ``size <= tile``."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


@dataclass(frozen=True)
class ChipPlan:
    """The chip grid of one run, built once: size, tile, overlap, the windows and their blend weights.

    ``windows`` are ``min(tile, height)`` x ``min(tile, width)`` rasterio windows, row-major, inside
    the grid (border chips shifted inward). The engine reads them, the stitcher blends with
    :meth:`weights`; nothing else derives the grid. Build with :meth:`build` (validates).
    """

    height: int
    width: int
    tile: int = 512
    overlap: int = 64
    row_starts: tuple[int, ...] = field(init=False, repr=False)
    col_starts: tuple[int, ...] = field(init=False, repr=False)
    windows: tuple[Window, ...] = field(init=False, repr=False)
    _weights: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        validate_tiling(self.tile, self.overlap)
        if self.height <= 0 or self.width <= 0:
            raise UsageError("scene", f"empty grid {self.height} x {self.width}")
        rows = tuple(axis_starts(self.height, self.tile, self.overlap))
        cols = tuple(axis_starts(self.width, self.tile, self.overlap))
        h, w = self.chip_shape
        object.__setattr__(self, "row_starts", rows)
        object.__setattr__(self, "col_starts", cols)
        object.__setattr__(self, "windows", tuple(Window(c, r, w, h) for r in rows for c in cols))

    @classmethod
    def build(cls, height: int, width: int, tile: int = 512, overlap: int = 64) -> "ChipPlan":
        """The plan of a ``height`` x ``width`` grid; :class:`UsageError` naming ``tile`` or
        ``overlap`` when they are not usable."""
        return cls(int(height), int(width), tile, overlap)

    @property
    def chip_shape(self) -> tuple[int, int]:
        """(rows, cols) of every chip before padding to the tile."""
        return min(self.tile, self.height), min(self.tile, self.width)

    def __len__(self) -> int:
        return len(self.windows)

    def weights(self, window: Window) -> np.ndarray:
        """Blend weights of ``window`` (one of :attr:`windows`), float32 ``[h, w]``, all > 0,
        read-only; chips with the same row and column profiles share one array."""
        r, c = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        key = (_axis_profile(self.height, self.tile, self.overlap, r, h).tobytes(),
               _axis_profile(self.width, self.tile, self.overlap, c, w).tobytes())
        weights = self._weights.get(key)
        if weights is None:
            weights = chip_weights(window, self.height, self.width, self.tile, self.overlap)
            weights.setflags(write=False)
            self._weights[key] = weights
        return weights


def plan_chips(height: int, width: int, tile: int = 512, overlap: int = 64) -> list[Window]:
    """All chip windows of a ``height`` x ``width`` grid, row-major (:attr:`ChipPlan.windows`)."""
    return list(ChipPlan.build(height, width, tile, overlap).windows)


def _ramp(n: int) -> np.ndarray:
    """Rising edge profile over an overlap of ``n`` px, from the chip edge inward: floor over the
    outer quarter, raised cosine over the middle half, 1 over the inner quarter. ``_ramp(n)[t] +
    _ramp(n)[n-1-t] == 1`` (up to the floor)."""
    margin = n // 4
    core = n - 2 * margin
    t = (np.arange(core, dtype=np.float64) + 0.5) / core
    rise = np.sin(0.5 * np.pi * t) ** 2
    ramp = np.concatenate([np.zeros(margin), rise, np.ones(margin)])
    return np.maximum(ramp, WEIGHT_FLOOR)


@lru_cache(maxsize=4096)
def _axis_profile(size: int, tile: int, overlap: int, start: int, length: int) -> np.ndarray:
    """Weight profile of the chip ``[start, start+length)`` along an axis (read-only array)."""
    starts = axis_starts(size, tile, overlap)
    if start not in starts:
        raise UsageError("window", f"offset {start} is not on the chip grid {starts[:4]}...")
    k = starts.index(start)
    prof = np.ones(length, dtype=np.float64)
    if k > 0:  # overlap with the previous chip on the low side
        n = min(starts[k - 1] + tile - start, length)
        if n > 0:
            prof[:n] *= _ramp(n)
    if k + 1 < len(starts):  # overlap with the next chip on the high side
        n = min(start + length - starts[k + 1], length)
        if n > 0:
            prof[length - n:] *= _ramp(n)[::-1]
    prof = np.maximum(prof, WEIGHT_FLOOR)
    prof.setflags(write=False)
    return prof


def chip_weights(window: Window, height: int, width: int, tile: int, overlap: int) -> np.ndarray:
    """Blending weights of ``window`` (a chip of :func:`plan_chips`) as float32 ``[h, w]``, all > 0.

    Raises :class:`UsageError` if the window is not on the chip grid of these parameters.
    """
    r, c = int(window.row_off), int(window.col_off)
    h, w = int(window.height), int(window.width)
    rows = _axis_profile(height, tile, overlap, r, h)
    cols = _axis_profile(width, tile, overlap, c, w)
    return np.maximum(np.outer(rows, cols), WEIGHT_FLOOR).astype(np.float32)


def pad_to_tile(chip: np.ndarray, tile: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad ``chip`` (``[..., h, w]``) at the bottom and right up to ``tile`` x ``tile``.

    Uses reflection (repeated where the pad is longer than the chip); a side of one pixel cannot be
    reflected, then 'symmetric' (which repeats it, like 'edge') is used. Returns
    ``(padded, (h, w))``; crop ``[..., :h, :w]`` to undo.
    """
    h, w = chip.shape[-2:]
    ph, pw = max(tile - h, 0), max(tile - w, 0)
    if ph == 0 and pw == 0:
        return chip, (h, w)
    pads = [(0, 0)] * (chip.ndim - 2) + [(0, ph), (0, pw)]
    mode = "reflect" if min(h, w) > 1 else "symmetric"
    return np.pad(chip, pads, mode=mode), (h, w)
