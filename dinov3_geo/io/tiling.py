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

from functools import lru_cache

import numpy as np
from rasterio.windows import Window

from dinov3_geo.errors import UsageError

#: Smallest weight any chip gives any pixel it covers: every covered pixel gets a positive weight.
WEIGHT_FLOOR = 1e-6


def validate_tiling(tile: int, overlap: int) -> None:
    """Raise :class:`UsageError` unless ``tile`` is a positive multiple of 16 and
    ``0 <= overlap < tile / 2``."""
    if not isinstance(tile, (int, np.integer)) or tile <= 0 or tile % 16:
        raise UsageError("--tile", f"tile must be a positive multiple of 16, got {tile!r}")
    if not isinstance(overlap, (int, np.integer)) or overlap < 0 or 2 * overlap >= tile:
        raise UsageError("--overlap", f"overlap must be >= 0 and < tile/2 ({tile / 2:g}), got {overlap!r}")


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


def plan_chips(height: int, width: int, tile: int = 512, overlap: int = 64) -> list[Window]:
    """All chip windows of a ``height`` x ``width`` grid, row-major.

    Each window is ``min(tile, height)`` x ``min(tile, width)`` pixels; windows lie inside the grid.
    """
    validate_tiling(tile, overlap)
    if height <= 0 or width <= 0:
        raise UsageError("scene", f"empty grid {height} x {width}")
    h, w = min(tile, height), min(tile, width)
    return [Window(c, r, w, h)
            for r in axis_starts(height, tile, overlap)
            for c in axis_starts(width, tile, overlap)]


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
