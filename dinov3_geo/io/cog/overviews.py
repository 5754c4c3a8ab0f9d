"""Overview arithmetic of the COG: how many levels GDAL's COG driver makes and their sizes, which
resampling a result gets, and a strip's levels computed as GDAL's resamplings compute them.

Overviews are exact 2x2 means of the pixels they cover (nodata ignored; integers rounded half up)
or, for classes, the top-left pixel of each cell: GDAL's AVERAGE and NEAREST where the sides halve
evenly. Both write paths take their overviews from here while the rows stream in.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from affine import Affine

from dinov3_geo.io.cog.encoder import BLOCK


def overview_resampling(dtype: str) -> str:
    """GDAL's overview resampling for results of ``dtype``: classes (uint8) keep a class, the top-left
    pixel of each 2x2 cell (``NEAREST``); values are averaged."""
    return "NEAREST" if dtype == "uint8" else "AVERAGE"


def overview_count(height: int, width: int, block: int = BLOCK) -> int:
    """Overview levels GDAL's COG driver makes with ``OVERVIEWS=AUTO``: level k is
    ``floor(size / 2**k)``, added until both sides fit one block."""
    n = 0
    while height > block or width > block:
        height, width, n = height // 2, width // 2, n + 1
    return n


def level_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """(height, width) of the full resolution and of each overview (GDAL's halving, floored)."""
    levels = [(height, width)]
    for _ in range(overview_count(height, width)):
        height, width = height // 2, width // 2
        levels.append((height, width))
    return levels


def halves_evenly(height: int, width: int) -> bool:
    """Whether both sides divide by ``2**levels`` (at least one level): then every level is an exact
    2x2 mean of the one above, as in GDAL; other sizes give GDAL fractional source windows."""
    n = overview_count(height, width)
    return n > 0 and height % 2 ** n == 0 and width % 2 ** n == 0


def scaled(t: Affine, f: int) -> Affine:
    """``t`` with pixels ``f`` times larger (an overview level's grid)."""
    return Affine(t.a * f, t.b * f, t.c, t.d * f, t.e * f, t.f)


def levels_below(strip: np.ndarray, dtype: str, nodata) -> Iterator[np.ndarray]:
    """A strip's overview levels, one after the other, by :func:`overview_resampling` of ``dtype``
    (the results' type): top-left picks for classes, else 2x2 means ignoring ``nodata``. The strip
    must start on a row of whole 2x2 cells of every level (whole 512-row strips in order do)."""
    if overview_resampling(dtype) == "NEAREST":
        return _level_picks(strip)
    return _level_means(strip, dtype, nodata)


def _level_picks(strip: np.ndarray) -> Iterator[np.ndarray]:
    """The strip's levels by GDAL's NEAREST (classes): the top-left pixel of each 2x2 cell, each
    level from the one above (whole 512-row strips keep the cells aligned with the scene's)."""
    while True:
        strip = strip[..., ::2, ::2]
        yield strip


def _level_means(strip: np.ndarray, dtype: str, nodata) -> Iterator[np.ndarray]:
    """The strip's 2x2 means, level after level, nodata ignored as GDAL's AVERAGE ignores it:
    nodata where no pixel under a cell is valid (NaN, or the number ``nodata``). Integer results
    are rounded half up at every level, and each level is the mean of the one above as stored, as
    GDAL computes them."""
    numeric = nodata is not None and not np.isnan(nodata)
    integer = np.dtype(dtype).kind in "iu"
    means = np.where(strip == nodata, np.float32(np.nan), strip) if numeric else strip
    while True:
        means = average_down(means)
        if integer:
            np.floor(means + np.float32(0.5), out=means)
        yield np.where(np.isnan(means), np.float32(nodata), means) if numeric else means


def average_down(x: np.ndarray) -> np.ndarray:
    """NaN-aware 2x2 mean of ``x`` (``[..., h, w]`` float32): NaN where all four are NaN; an odd last
    row or column averages what exists. Sums in float32, rows first: within one ulp of GDAL's
    AVERAGE (which sums in float64). The plain sums are taken everywhere; a cell whose sum is NaN
    is right as it is when all four of its pixels are NaN (nodata areas), so only cells with both
    NaN and valid pixels (the edges of nodata areas) are summed again without their NaNs (the
    overview work must keep up with the writer); when such cells are many (NaN scattered through
    the data) every cell is masked, which is then the faster way. All three give the same bits."""
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        pad = [(0, 0)] * (x.ndim - 2) + [(0, h % 2), (0, w % 2)]
        x = np.pad(x, pad, constant_values=np.nan)
    x = x.astype(np.float32, copy=False)
    s = x[..., 0::2, :] + x[..., 1::2, :]
    s = s[..., :, 0::2] + s[..., :, 1::2]
    np.divide(s, np.float32(4), out=s)
    nan = np.isnan(s)
    if not nan.any():
        return s
    np.logical_and(nan, _any_valid(x), out=nan)     # NaN sums with a valid pixel under them
    count = np.count_nonzero(nan)
    if count > MASK_ALL_ABOVE * nan.size:
        return _masked_means(x)
    if count:       # (the flat indexes: np.nonzero of a 3-d mask is 10x slower)
        s[nan] = _nan_aware_means(x, np.unravel_index(np.flatnonzero(nan), nan.shape))
    return s


def _any_valid(x: np.ndarray) -> np.ndarray:
    """Per 2x2 cell of even-sided ``x``: whether any of its four pixels is not NaN (``fmax`` skips NaN)."""
    m = np.fmax(x[..., 0::2, :], x[..., 1::2, :])
    m = np.isnan(np.fmax(m[..., :, 0::2], m[..., :, 1::2]))
    return np.logical_not(m, out=m)


#: Share of cells with both NaN and valid pixels above which :func:`average_down` masks every cell
#: instead of redoing those cells alone.
MASK_ALL_ABOVE = 0.02


def _masked_means(x: np.ndarray) -> np.ndarray:
    """2x2 means of even-sided ``x`` ignoring NaN, every cell masked (sums in the plain order)."""
    nan = np.isnan(x)
    z = np.where(nan, np.float32(0), x)
    s = z[..., 0::2, :] + z[..., 1::2, :]
    s = s[..., :, 0::2] + s[..., :, 1::2]
    valid = ~nan
    n = valid[..., 0::2, :].view(np.uint8) + valid[..., 1::2, :].view(np.uint8)
    n = n[..., :, 0::2] + n[..., :, 1::2]
    with np.errstate(invalid="ignore", divide="ignore"):
        np.divide(s, n, out=s)
    return s


def _nan_aware_means(x: np.ndarray, cells: tuple[np.ndarray, ...]) -> np.ndarray:
    """The 2x2 means of ``x`` at output ``cells`` ignoring NaN, summed in the order of the plain sums."""
    *lead, i, j = cells
    quad = [x[(*lead, 2 * i + di, 2 * j + dj)] for dj in (0, 1) for di in (0, 1)]
    valid = [~np.isnan(v) for v in quad]
    z = [np.where(ok, v, np.float32(0)) for v, ok in zip(quad, valid)]
    total = (z[0] + z[1]) + (z[2] + z[3])
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / np.sum(valid, axis=0, dtype=np.uint8)
