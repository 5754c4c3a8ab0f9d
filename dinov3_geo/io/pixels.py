"""The pixel contract: one definition of how the pixels of any source become the model's input.

Every route reads through it: a file (:class:`~dinov3_geo.io.scene.Scene`), a DataArray (the
``da.dinov3`` accessor, :class:`~dinov3_geo.xarray.DataArrayScene`) and training images
(:mod:`dinov3_geo.train.datasets`). Three rules, each defined once here:

- **Bands** (:func:`choose_bands`): given ``bands`` win; else red, green, blue by colour
  interpretation, then by band descriptions; else the first three (with a warning when there are
  more: their order is unknown); a single band is repeated to three channels (with a warning).
- **Scaling** (:func:`resolve_scaling`): uint8 is divided by 255; other types map a per-band
  ``(low, high)`` linearly to 0..1, clipped: ``scale`` when given (one pair for every band, or one
  pair per band), else the 2nd and 98th percentiles of the valid pixels of a decimated sample of the
  whole scene, or of the whole training set. Never per chip.
- **Validity** (:func:`valid_pixels`): a band's value is missing where its mask says so (nodata,
  alpha, an internal mask), where it equals the band's nodata value, or where it is not finite (NaN,
  infinity); a pixel is
  invalid when every selected band is missing (GDAL's dataset-mask rule). Invalid pixels are 0 in the
  model's input (:func:`model_input`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from dinov3_geo.errors import InputError, UsageError

#: Longest side of the decimated sample the percentile stretch is estimated from.
STATS_SIDE = 1024
PERCENTILES = (2.0, 98.0)

#: Per-band ``(low, high)`` of the linear stretch to 0..1; ``None``: bytes divided by 255.
Scaling = Optional[tuple[tuple[float, float], ...]]

#: Words in band descriptions that name a colour; band codes (Sentinel-2, Landsat 8/9) come second.
_COLOUR_WORDS = {"red": re.compile(r"\bred\b(?!.?edge)", re.I), "green": re.compile(r"\bgreen\b", re.I),
                 "blue": re.compile(r"\bblue\b", re.I)}
_COLOUR_CODES = {"red": {"r", "b4", "b04"}, "green": {"g", "b3", "b03"}, "blue": {"b", "b2", "b02"}}


@dataclass(frozen=True)
class BandFacts:
    """What the contract needs to know of a source's bands, however the source is held.

    ``colorinterp`` holds lower-case names (``red``, ``gray``, ``undefined``...), ``descriptions``
    the band descriptions (empty strings where none), ``nodata`` one value or ``None`` per band."""

    count: int
    dtype: str
    colorinterp: tuple[str, ...] = ()
    descriptions: tuple[str, ...] = ()
    nodata: tuple[Optional[float], ...] = ()

    @classmethod
    def of_dataset(cls, src) -> "BandFacts":
        """The facts of an open rasterio dataset."""
        return cls(src.count, src.dtypes[0], tuple(ci.name.lower() for ci in src.colorinterp),
                   tuple((d or "").strip() for d in src.descriptions),
                   tuple(None if v is None else float(v) for v in src.nodatavals))

    def band_nodata(self, bands: Sequence[int]) -> Optional[list[float]]:
        """The nodata values of the 1-based ``bands`` when every one has one, else ``None``."""
        values = [self.nodata[b - 1] if len(self.nodata) >= b else None for b in bands]
        return None if any(v is None for v in values) else [float(v) for v in values]


# -- bands ----------------------------------------------------------------------------------------

def choose_bands(facts: BandFacts, bands: Optional[Sequence[int]], where: str) -> tuple[list[int], list[str]]:
    """1-based band numbers to read (1 or 3) and the warnings the choice gives.

    Given ``bands`` win (checked against the source); else red, green, blue by colour
    interpretation, then by band description; else bands 1, 2, 3, with a warning when there are
    more than three (their order is unknown: Landsat 5/7 files start blue, green, red)."""
    count = facts.count
    if bands is not None:
        picked = check_bands(bands)
        missing = [b for b in picked if b > count]
        if missing:
            raise UsageError("bands", f"band {missing[0]} does not exist: {where} has {count} band(s)")
    elif count == 1:
        picked = [1]
    elif count < 3:
        raise InputError(where, f"{count} bands: cannot tell which are red, green, blue; choose 1 or 3 with `bands`")
    else:
        picked = _rgb_by_colour_interp(facts) or _rgb_by_description(facts)
        if picked is None:
            picked = [1, 2, 3]
            if count > 3:
                return picked, [f"{where}: {count} bands with no colour interpretation or band names: used bands "
                                "1,2,3 as red, green, blue; if the order differs (Landsat 5/7: 1,2,3 are blue, "
                                "green, red) choose them with `bands` 3,2,1"]
    warnings = []
    if len(picked) == 1:
        warnings.append(f"{where}: single band {picked[0]} (panchromatic?) repeated to 3 channels")
    return picked, warnings


def check_bands(bands: Sequence[int]) -> list[int]:
    """``bands`` as a list of 1 or 3 positive band numbers, or a UsageError naming ``bands``."""
    try:
        picked = [int(b) for b in bands]
    except (TypeError, ValueError):
        raise UsageError("bands", f"band numbers must be whole numbers, got {bands!r}") from None
    bad = [orig for b, orig in zip(picked, bands) if isinstance(orig, bool) or b < 1 or b != float(orig)]
    if bad:
        raise UsageError("bands", f"band {bad[0]} does not exist: bands are whole numbers from 1, got "
                                  f"{','.join(str(b) for b in bands)}")
    if len(picked) not in (1, 3):
        raise UsageError("bands", f"give 1 or 3 bands, got {len(picked)}")
    return picked


def _rgb_by_colour_interp(facts: BandFacts) -> Optional[list[int]]:
    """Red, green, blue band numbers from the colour interpretation, if all three are set."""
    interp = list(facts.colorinterp)
    rgb = ("red", "green", "blue")
    return [interp.index(ci) + 1 for ci in rgb] if all(ci in interp for ci in rgb) else None


def _rgb_by_description(facts: BandFacts) -> Optional[list[int]]:
    """Red, green, blue band numbers from band descriptions ('Red', 'B3 red', 'B4'...), if each
    colour is named by exactly one band."""
    names = list(facts.descriptions)
    for match in (lambda colour, name: bool(_COLOUR_WORDS[colour].search(name)),
                  lambda colour, name: name.lower() in _COLOUR_CODES[colour]):
        found = [[i + 1 for i, name in enumerate(names) if match(colour, name)] for colour in ("red", "green", "blue")]
        if all(len(f) == 1 for f in found):
            return [f[0] for f in found]
    return None


# -- scaling --------------------------------------------------------------------------------------

def check_scale(scale) -> Optional[tuple[tuple[float, float], ...]]:
    """``scale`` as given by a user: ``None``, one ``(MIN, MAX)`` pair, or one pair per band;
    returned as a tuple of pairs (one pair: for every band). A UsageError naming ``scale`` when it
    is not finite numbers with MIN < MAX."""
    if scale is None:
        return None
    try:
        values = np.asarray(scale, dtype=np.float64)
    except (TypeError, ValueError):
        raise UsageError("scale", f"expected MIN,MAX (or one MIN,MAX pair per band), got {scale!r}") from None
    pairs = values.reshape(1, 2) if values.shape == (2,) else values
    if pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) not in (1, 3):
        raise UsageError("scale", f"expected MIN,MAX (or one MIN,MAX pair per band), got {scale!r}")
    if not np.all(np.isfinite(pairs)) or not np.all(pairs[:, 1] > pairs[:, 0]):
        raise UsageError("scale", f"need finite MIN < MAX, got {scale!r}")
    return tuple((float(lo), float(hi)) for lo, hi in pairs)


def resolve_scaling(dtype: str, scale, nbands: int, sample: Callable[[], list[np.ndarray]]) -> Scaling:
    """Per-band ``(low, high)`` for ``nbands`` selected bands: ``scale`` when given (one pair for
    all, or one per band), ``None`` for uint8 (divided by 255), else :func:`stretch` of the valid
    values ``sample()`` returns per band (called only then: it reads pixels)."""
    pairs = check_scale(scale)
    if pairs is not None:
        if len(pairs) == 1:
            return pairs * nbands
        if len(pairs) != nbands:
            raise UsageError("scale", f"{len(pairs)} MIN,MAX pairs for {nbands} bands")
        return pairs
    if np.dtype(dtype) == np.uint8:
        return None
    return stretch(sample())


def stretch(values: Sequence[np.ndarray]) -> tuple[tuple[float, float], ...]:
    """The 2-98 % percentile stretch of each band's valid values (``(0, 1)`` for a band with none;
    ``high`` raised above ``low`` for a constant band)."""
    out = []
    for v in values:
        v = np.asarray(v, np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:  # all nodata: chips with no valid pixel are skipped, the output is all nodata
            out.append((0.0, 1.0))
            continue
        lo, hi = (float(x) for x in np.percentile(v, PERCENTILES))
        out.append((lo, hi if hi > lo else lo + 1.0))
    return tuple(out)


def sample_shape(height: int, width: int) -> tuple[int, int]:
    """The decimated (rows, cols) the stretch is estimated from: the longest side at most
    :data:`STATS_SIDE` px."""
    f = max(1.0, max(width, height) / STATS_SIDE)
    return max(1, int(height / f)), max(1, int(width / f))


def sample_index(size: int, out: int) -> np.ndarray:
    """Source indexes of a nearest-neighbour decimation of ``size`` pixels to ``out`` (the pixel
    under each output pixel's centre, as GDAL's nearest resampling picks it)."""
    return np.minimum(((np.arange(out) + 0.5) * (size / out)).astype(np.int64), size - 1)


def valid_values(data: np.ndarray, valid_bands: np.ndarray) -> list[np.ndarray]:
    """Per band, the values of ``data`` ``[b, h, w]`` where that band is present (``valid_bands``
    ``[b, h, w]``) and finite: what :func:`stretch` estimates from."""
    out = []
    for band, ok in zip(data, valid_bands):
        values = band[ok].astype(np.float64)
        out.append(values[np.isfinite(values)])
    return out


def to_unit(data: np.ndarray, scaling: Scaling) -> np.ndarray:
    """A chip ``[bands, h, w]`` as the model reads it: uint8 (``scaling`` None) passes through;
    other types map (low, high) per band to 0..1, clipped, float32, NaN to 0."""
    if scaling is None:
        return data.copy() if not data.flags.writeable else data
    out = np.empty(data.shape, dtype=np.float32)
    for i, (lo, hi) in enumerate(scaling):
        band = (data[i].astype(np.float32) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
        np.clip(band, 0.0, 1.0, out=out[i])
    np.nan_to_num(out, copy=False, nan=0.0)
    return out


# -- validity -------------------------------------------------------------------------------------

def valid_pixels(data: np.ndarray, masks: Optional[np.ndarray] = None,
                 nodata: Optional[Sequence[float]] = None) -> np.ndarray:
    """Validity ``[h, w]`` of ``data`` ``[b, h, w]``: a pixel is valid where any band is present.

    A band is missing where ``masks`` (per band, 0 = masked: GDAL's ``read_masks``, which covers
    nodata, alpha and internal masks) says so, else where it equals its ``nodata`` value (compared
    in the data's own type; NaN matches NaN), and always where it is not finite (NaN, infinity)."""
    floats = data.dtype.kind == "f"
    if masks is not None:
        present = masks > 0
        if floats:
            present &= np.isfinite(data)
        return present.any(axis=0)
    if not nodata:
        return np.ones(data.shape[1:], bool) if not floats else np.isfinite(data).any(axis=0)
    values = list(nodata) if len(nodata) == len(data) else [nodata[0]] * len(data)
    targets = [_comparable(band.dtype, value) for band, value in zip(data, values)]
    valid = np.zeros(data.shape[1:], bool)
    scratch = np.empty_like(valid)
    for band, target in zip(data, targets):
        np.logical_or(valid, _band_present(band, target, scratch), out=valid)
    return valid


def present_bands(data: np.ndarray, nodata: Optional[Sequence[Optional[float]]]) -> np.ndarray:
    """``[b, h, w]``: where each band of ``data`` holds a value (not its ``nodata`` value, ``None``
    for a band without one, and not NaN)."""
    values = list(nodata) if nodata else [None] * len(data)
    return np.stack([_band_present(band, None if v is None else _comparable(band.dtype, v), np.empty(band.shape, bool))
                     for band, v in zip(data, values)])


def _comparable(dtype: np.dtype, value: float):
    """``value`` as compared with data of ``dtype``: float data, the value itself (NaN included);
    integer data, the value in that integer type when it holds it exactly, else ``None`` (no pixel
    can equal it)."""
    value = float(value)
    if dtype.kind == "f":
        return value
    info = np.iinfo(dtype)
    if math.isfinite(value) and value.is_integer() and info.min <= value <= info.max:
        return dtype.type(int(value))
    return None


def _band_present(band: np.ndarray, target, out: np.ndarray) -> np.ndarray:
    """Where ``band`` holds a value: not its nodata ``target`` (see :func:`_comparable`; ``None``:
    everywhere) and finite."""
    if band.dtype.kind != "f":
        if target is None:
            out.fill(True)
            return out
        return np.not_equal(band, target, out=out)
    np.isfinite(band, out=out)
    if target is not None and math.isfinite(target):
        np.logical_and(out, band != target, out=out)
    return out


def model_input(data: np.ndarray, valid: np.ndarray, scaling: Scaling) -> np.ndarray:
    """The chip the model reads: ``data`` ``[b, h, w]`` scaled (:func:`to_unit`), invalid pixels 0,
    a single band repeated to three channels."""
    chip = to_unit(data, scaling)
    if not valid.all():
        mask = valid.view(np.uint8) if chip.dtype == np.uint8 else valid
        np.multiply(chip, mask, out=chip)     # NaN is already 0 here
    if chip.shape[0] == 1:
        chip = np.repeat(chip, 3, axis=0)
    return chip
