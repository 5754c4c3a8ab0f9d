"""Opening a scene: band choice, global scaling to 0..1, validity masks, optional resampling.

A :class:`Scene` describes the *working grid* the model sees (the input grid, or the input
resampled to ``gsd`` metres) and reads chips from it with :meth:`Scene.read`, from any number of
threads (each thread gets its own rasterio handle).
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.transform import from_gcps
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from dinov3_geo.errors import InputError, UsageError, short_message
from dinov3_geo.io.georef import input_note
from dinov3_geo.io.pixels import (
    BandFacts,
    choose_bands,
    model_input,
    resolve_scaling,
    sample_shape,
    valid_pixels,
    valid_values,
)

MIN_SIZE = 16
#: Largest upsampling per axis that ``gsd`` may ask for unless the caller raises ``max_upsample``.
MAX_UPSAMPLE = 8.0
_ALLOWED_DTYPES = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"}


def metres_per_degree(lat: float) -> tuple[float, float]:
    """(metres per degree of longitude, of latitude) on the WGS84 ellipsoid at latitude ``lat``."""
    phi = math.radians(lat)
    m_lat = 111132.92 - 559.82 * math.cos(2 * phi) + 1.175 * math.cos(4 * phi)
    m_lon = 111412.84 * math.cos(phi) - 93.5 * math.cos(3 * phi)
    return m_lon, m_lat


def pixel_size_m(crs, transform: Affine, width: int, height: int) -> tuple[float, float] | None:
    """Metres per pixel (x, y) of a grid; ``None`` without a CRS."""
    px, py = math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e)
    if crs is None:
        return None
    if crs.is_geographic:
        _, lat = transform @ (width / 2, height / 2)
        m_lon, m_lat = metres_per_degree(max(-89.9, min(89.9, lat)))
        return px * m_lon, py * m_lat
    factor = crs.linear_units_factor[1] if crs.linear_units else 1.0
    return px * factor, py * factor


@dataclass(frozen=True)
class _Grid:
    """A raster grid: what the output must match."""

    crs: Any
    transform: Affine
    width: int
    height: int

    def as_dict(self) -> dict:
        return {"crs": self.crs, "transform": self.transform, "width": self.width, "height": self.height}


def _gcps_only(src) -> tuple[list, Any] | None:
    """``(gcps, crs)`` of a raster georeferenced by ground control points only (no geotransform)."""
    gcps, crs = src.gcps
    return (list(gcps), crs) if gcps and src.crs is None and crs is not None else None


def _missing_sources(src) -> list[str]:
    """Local files a dataset (a VRT, for one) refers to that do not exist."""
    return [f for f in src.files[1:] if "://" not in f and not f.startswith("/vsi") and not os.path.exists(f)]


def _open_dataset(path: str):
    """rasterio.open with failures turned into one-line :class:`InputError`."""
    if not str(path).startswith("/vsi") and "://" not in str(path) and not os.path.exists(path):
        raise InputError(path, "file not found")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise InputError(path, "empty file (0 bytes)")
    try:
        return rasterio.open(path)
    except RasterioError as exc:
        raise InputError(path, f"not a readable raster ({short_message(exc)})") from None


class Scene:
    """An opened scene on its working grid. Use :func:`open_scene`; close with ``close()`` or ``with``.

    Attributes: ``path``, ``height``, ``width``, ``crs``, ``transform`` (working grid), ``bands``
    (1-based), ``dtype`` (source), ``pixel_size_m`` (x, y metres per working pixel, ``None`` without
    CRS), ``input_profile`` (dict: crs, transform, width, height of the input grid), ``gcps``
    (``(gcps, crs)`` for a scene georeferenced by ground control points only, else ``None``; then
    ``crs`` is theirs and ``transform`` the affine fit to them), ``warnings``,
    ``resampled`` (True when ``gsd`` changed the grid), ``scaling`` (per-band (lo, hi) or ``None``).
    """

    def __init__(self, path, bands: Sequence[int] | None = None,
                 scale: tuple[float, float] | None = None, gsd: float | None = None,
                 nodata: float | None = None, max_upsample: float | None = MAX_UPSAMPLE,
                 grid: dict | None = None):
        self.path = str(path)
        self.nodata_override = _check_nodata(nodata)
        self.max_upsample = max_upsample
        self._local = threading.local()
        self._handles: list = []
        self._lock = threading.Lock()
        src = _open_dataset(self.path)
        try:
            self._inspect(src, bands, scale, gsd, grid)
        except BaseException:
            src.close()
            raise
        self._register(src)

    # -- set-up ---------------------------------------------------------------------------------
    def _inspect(self, src, bands, scale, gsd, grid=None) -> None:
        """Fill every attribute from the open source dataset."""
        if src.count == 0:
            subs = list(src.subdatasets)
            raise InputError(self.path, "no raster band" + (
                f" (a container of {len(subs)} subdatasets: open one of them, e.g. {subs[0]})" if subs else ""))
        self.dtype = src.dtypes[0]
        if src.tags(1, "IMAGE_STRUCTURE").get("NBITS") == "1":
            raise InputError(self.path, "1-bit (boolean) data: a mask, not an image")
        if self.dtype not in _ALLOWED_DTYPES:
            raise InputError(self.path, f"unsupported data type {self.dtype} (need integer or float)")
        if src.width < MIN_SIZE or src.height < MIN_SIZE:
            raise InputError(self.path, f"too small: {src.width} x {src.height} px (need >= {MIN_SIZE})")
        self.facts = BandFacts.of_dataset(src)
        self.bands, self.warnings = choose_bands(self.facts, bands, self.path)
        self.gcps = _gcps_only(src)
        self.crs = self.gcps[1] if self.gcps else src.crs
        self.input_profile = _Grid(src.crs, src.transform, src.width, src.height).as_dict()
        note = input_note(src, self.path)      # no CRS: what the outputs carry; a photo?
        if note:
            self.warnings.append(note)
        self._probe(src)
        self._warp = self._working_grid(src, gsd) if gsd is not None else self._target_grid(src, grid)
        self.resampled = self._warp is not None
        own = from_gcps(self.gcps[0]) if self.gcps else src.transform     # GCPs: their affine fit, for sizes
        grid = self._warp or _Grid(self.crs, own, src.width, src.height)
        self.transform, self.width, self.height = grid.transform, grid.width, grid.height
        if self.width < MIN_SIZE or self.height < MIN_SIZE:
            raise InputError(self.path, f"at gsd={gsd} m the scene is only {self.width} x {self.height} px")
        self.pixel_size_m = pixel_size_m(self.crs, self.transform, self.width, self.height)
        self.scaling = self._scaling(src, scale)
        self._nodata_values = self._validity_from_values(src)

    def _probe(self, src) -> None:
        """Read the last pixel so that truncated files fail now, not in a reader thread."""
        try:
            src.read(self.bands[0], window=Window(src.width - 1, src.height - 1, 1, 1))
        except RasterioError as exc:
            missing = _missing_sources(src)
            if missing:
                raise InputError(self.path, f"source file {missing[0]} is missing (the file points to it)") from None
            raise InputError(self.path, f"unreadable pixels (truncated or damaged file: {short_message(exc)})") from None

    def _target_grid(self, src, grid: dict | None) -> _Grid | None:
        """``grid`` (crs, transform, width, height: another scene's) when it differs from the input's."""
        if grid is None:
            return None
        if src.crs is None:
            raise InputError(self.path, "no georeference (no CRS): cannot be put on another scene's grid")
        target = _Grid(grid["crs"], grid["transform"], grid["width"], grid["height"])
        same = (src.crs == target.crs and src.transform.almost_equals(target.transform)
                and (src.width, src.height) == (target.width, target.height))
        return None if same else target

    def _working_grid(self, src, gsd: float) -> _Grid:
        """The input grid resampled to ``gsd`` metres per pixel, covering the same extent; refuses an
        upsampling of more than ``max_upsample`` times per axis (hours of work for no new detail)."""
        if gsd is None or not gsd > 0 or not math.isfinite(gsd):
            raise UsageError("gsd", f"gsd must be a positive number of metres, got {gsd!r}")
        if self.gcps:
            raise UsageError("gsd", "resampling to a gsd needs a geotransform; this file is georeferenced by "
                                    "ground control points (warp it first, e.g. with gdalwarp)")
        if src.crs is None:
            raise UsageError("gsd", "resampling to a gsd needs a georeferenced scene (no CRS)")
        px, py = pixel_size_m(src.crs, src.transform, src.width, src.height)
        width = max(1, round(src.width * px / gsd))
        height = max(1, round(src.height * py / gsd))
        factor = max(px, py) / gsd
        if self.max_upsample is not None and factor > self.max_upsample:
            raise UsageError("gsd", f"gsd={gsd:g} m upsamples the {max(px, py):.3g} m pixels {factor:.1f}x per axis "
                                    f"(to {width} x {height} px, {factor * factor:.0f}x the work); the limit is "
                                    f"{self.max_upsample:g}x: choose a larger gsd or allow it with `max_upsample`")
        transform = src.transform @ Affine.scale(src.width / width, src.height / height)
        return _Grid(src.crs, transform, width, height)

    @property
    def resampling_factor(self) -> float:
        """Input pixels per working pixel along an axis (> 1: the model sees finer pixels)."""
        return self.width / self.input_profile["width"]

    def _scaling(self, src, scale):
        """Per-band (lo, hi) of the global stretch (the pixel contract's rule); ``None`` for uint8
        sources (divide by 255)."""
        return resolve_scaling(self.dtype, scale, len(self.bands),
                               lambda: stats_sample(src, self.bands, self.nodata_override, self.path))

    # -- handles --------------------------------------------------------------------------------
    def _register(self, src) -> None:
        """Make ``src`` (plus its warped views) this thread's handle."""
        handle = (src,) + (self._warped(src) if self._warp else ())
        self._local.handle = handle
        with self._lock:
            self._handles.append(handle)

    def _warped(self, src) -> tuple:
        """(data VRT, mask VRT) on the working grid. Finer pixels: bilinear values, nearest mask.
        Coarser pixels: the average of the valid input pixels under each working pixel, valid where
        any is, so that every valid input pixel lies in a valid working pixel (written back exactly)."""
        kw = dict(crs=self._warp.crs, transform=self._warp.transform,
                  width=self._warp.width, height=self._warp.height)
        if self.nodata_override is not None:      # the user's nodata: excluded from resampling, kept as is
            kw.update(src_nodata=self.nodata_override, nodata=self.nodata_override)
        if self.resampling_factor < 1:
            data = WarpedVRT(src, resampling=Resampling.average, **kw)
            return data, data
        return (WarpedVRT(src, resampling=Resampling.bilinear, **kw),
                WarpedVRT(src, resampling=Resampling.nearest, **kw))

    def _handle(self) -> tuple:
        """This thread's (src[, data_vrt, mask_vrt]), opened on first use."""
        handle = getattr(self._local, "handle", None)
        if handle is None:
            if self._handles is None:
                raise InputError(self.path, "scene is closed")
            self._register(_open_dataset(self.path))
            handle = self._local.handle
        return handle

    # -- reading --------------------------------------------------------------------------------
    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Read ``window`` of the working grid.

        Returns ``(chip, valid)``: ``chip`` is uint8 ``[3, h, w]`` for uint8 sources (scale by 1/255
        on the device) else float32 ``[3, h, w]`` scaled to 0..1 with the scene-wide stretch;
        ``valid`` is bool ``[h, w]``: false where every selected band is masked (nodata, alpha,
        internal masks, as GDAL's dataset mask) or any band is NaN. Invalid
        pixels of ``chip`` are 0. Safe to call from several threads at once.
        """
        handle = self._handle()
        data_ds = handle[1] if len(handle) > 1 else handle[0]
        mask_ds = handle[2] if len(handle) > 1 else handle[0]
        try:
            data = data_ds.read(self.bands, window=window)
            if self._nodata_values is None:     # alpha, internal masks, warped grids: GDAL's masks
                valid = valid_pixels(data, masks=mask_ds.read_masks(self.bands, window=window))
            else:
                valid = valid_pixels(data, nodata=self._nodata_values)
        except RasterioError as exc:
            raise InputError(self.path, f"cannot read window {window} ({short_message(exc)})") from None
        return model_input(data, valid, self.scaling), valid

    def input_valid(self, window: Window) -> np.ndarray:
        """Validity ``[h, w]`` of ``window`` of the *input* grid, by the rule of :meth:`read` (any
        selected band unmasked, or not the ``nodata`` value; none NaN): where outputs written back on
        the input grid have values."""
        src = self._handle()[0]
        try:
            data = src.read(self.bands, window=window)
            if self.nodata_override is not None:
                return valid_pixels(data, nodata=[self.nodata_override])
            return valid_pixels(data, masks=src.read_masks(self.bands, window=window))
        except RasterioError as exc:
            raise InputError(self.path, f"cannot read window {window} ({short_message(exc)})") from None

    def _validity_from_values(self, src) -> list[float] | None:
        """Per-band nodata values when validity can be told from the values read (no second
        read of GDAL's mask): the user's ``nodata``, or per-band nodata values with no alpha or
        internal mask on the scene's own grid; ``[]`` when GDAL says every pixel is valid; else
        ``None``: GDAL's dataset mask is read."""
        if self.nodata_override is not None:
            return [self.nodata_override] * len(self.bands)
        if self._warp is not None:
            return None
        flags = [src.mask_flag_enums[b - 1] for b in self.bands]
        if all(f == [MaskFlags.all_valid] for f in flags):
            return []
        if all(f == [MaskFlags.nodata] for f in flags):
            return [float(src.nodatavals[b - 1]) for b in self.bands]
        return None

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every handle opened by any thread."""
        with self._lock:
            handles, self._handles = self._handles or [], None
        for handle in handles:
            for ds in reversed(dict.fromkeys(handle)):     # a VRT may serve data and mask
                ds.close()
        self._local = threading.local()

    def __enter__(self) -> "Scene":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Scene({self.path!r}, {self.width}x{self.height}, bands={self.bands}, "
                f"dtype={self.dtype}, resampled={self.resampled})")


def stats_sample(src, bands: Sequence[int], nodata: float | None = None, where: str | None = None) -> list[np.ndarray]:
    """The valid values of each of ``bands`` in a decimated read of the whole dataset ``src`` (from
    overviews where the file has them): what the percentile stretch of a scene is estimated from.
    ``nodata``: a value that replaces the file's own masks."""
    shape = (len(bands), *sample_shape(src.height, src.width))
    try:
        data = src.read(list(bands), out_shape=shape, resampling=Resampling.nearest)
        if nodata is None:
            masks = src.read_masks(list(bands), out_shape=shape, resampling=Resampling.nearest) > 0
        else:
            masks = np.stack([valid_pixels(band[None], nodata=[nodata]) for band in data])
    except RasterioError as exc:
        raise InputError(where or src.name, f"unreadable pixels ({short_message(exc)})") from None
    return valid_values(data, masks)


def _check_nodata(nodata: float | None) -> float | None:
    """The user's input nodata value as a float (NaN allowed), or a UsageError naming ``nodata``."""
    if nodata is None:
        return None
    try:
        return float(nodata)
    except (TypeError, ValueError):
        raise UsageError("nodata", f"nodata must be a number, got {nodata!r}") from None


def open_scene(path, bands: Sequence[int] | None = None, scale: tuple[float, float] | None = None,
               gsd: float | None = None, nodata: float | None = None,
               max_upsample: float | None = MAX_UPSAMPLE, grid: dict | None = None) -> Scene:
    """Open ``path`` (anything rasterio opens) as a :class:`Scene`.

    ``bands``: 1-based indexes (1 or 3); default red/green/blue by colour interpretation, else the
    first three; one band is repeated. ``scale=(MIN, MAX)`` maps values linearly to 0..1 instead of
    the default scene-wide 2-98 % stretch (uint8 is always /255). ``gsd``: metres per pixel of the
    working grid (the input is resampled; outputs go back to the input grid); a ``gsd`` that
    upsamples more than ``max_upsample`` times per axis is refused (``None``: no limit).
    ``nodata``: a value marking invalid input pixels (where every band has it), replacing the
    file's own masks. ``grid``: another scene's ``input_profile`` (crs, transform, width, height)
    to read this one on, warped (bilinear) when it differs; pixels outside this scene's footprint
    are invalid.
    Raises :class:`InputError` for unusable files, :class:`UsageError` for bad arguments.
    """
    return Scene(path, bands=bands, scale=scale, gsd=gsd, nodata=nodata, max_upsample=max_upsample, grid=grid)
