"""A rioxarray DataArray seen as a scene, through the same pixel contract as a file.

:class:`DataArrayScene` is what every library function reads when it is given a DataArray (the
``da.dinov3`` accessor passes its array): band choice, scaling and validity are those of
:mod:`dinov3_geo.io.pixels`, and an array read from a file takes what it cannot tell by itself
(colour interpretation, per-band nodata, alpha and internal masks) from that file.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from rasterio.windows import Window

from dinov3_geo.errors import InputError

if TYPE_CHECKING:
    import xarray
from dinov3_geo.io.pixels import (
    BandFacts,
    choose_bands,
    model_input,
    present_bands,
    resolve_scaling,
    sample_index,
    sample_shape,
    valid_pixels,
    valid_values,
)
from dinov3_geo.io.scene import MIN_SIZE, pixel_size_m, stats_sample


class DataArrayScene:
    """A rioxarray DataArray seen as a scene: ``read(window)`` gives ``(chip, valid)`` through the
    same pixel contract as :meth:`dinov3_geo.io.scene.Scene.read` (:mod:`dinov3_geo.io.pixels`),
    computing only that window of a dask array.

    An array read from a file by rioxarray (the file named in ``encoding["source"]``, the array still
    on the file's grid: the whole file or a window of it, any of its bands) takes what the array
    alone cannot tell from that file: the colour interpretation of its bands, their nodata values,
    alpha and internal masks, and (for the whole file) the same decimated sample for the percentile
    stretch, so it gives the same numbers as the file. ``masked=True`` arrays (NaN where the file
    had nodata) have their nodata values put back first. Other arrays use their attributes
    (``long_name`` band names, ``_FillValue``/``rio.nodata``) and a decimated sample of themselves."""

    def __init__(self, da: "xarray.DataArray", bands: Optional[Sequence[int]] = None, scale=None,
                 nodata: Optional[float] = None):
        da = da if "band" in da.dims else da.expand_dims("band")
        if da.ndim != 3:
            raise InputError(self._name(da), f"expected dims (band, y, x), got {da.dims}")
        self.da = da.transpose("band", da.rio.y_dim, da.rio.x_dim)
        self.path = self._name(da)
        self.height, self.width = int(self.da.shape[1]), int(self.da.shape[2])
        if self.height < MIN_SIZE or self.width < MIN_SIZE:
            raise InputError(self.path, f"too small: {self.width} x {self.height} px (need >= {MIN_SIZE})")
        self.crs, self.transform = self.da.rio.crs, self.da.rio.transform()
        self.pixel_size_m = pixel_size_m(self.crs, self.transform, self.width, self.height)
        self.source = _SourceFile.of(self.da)
        self.facts = self._facts(nodata)
        self.dtype = self.facts.dtype
        picked, self.warnings = choose_bands(self.facts, bands, self.path)
        self.bands = picked
        self.band_index = [b - 1 for b in picked]
        self.nodata = self.facts.band_nodata(picked)
        self.resampled, self.resampling_factor, self.gcps = False, 1.0, None     # read on its own grid
        self.input_profile = {"crs": self.crs, "transform": self.transform, "width": self.width,
                              "height": self.height}
        if self.crs is None:
            self.warnings.append(f"{self.path}: no georeference (no CRS): outputs carry pixel coordinates only")
        self._nodata_override = None if nodata is None else float(nodata)
        self.scaling = resolve_scaling(self.dtype, scale, len(picked), self._stats_sample)

    @staticmethod
    def _name(da: "xarray.DataArray") -> str:
        source = da.encoding.get("source")
        label = f"<DataArray {da.name}>" if da.name is not None else "<DataArray>"
        return f"{label} of {source}" if source else label

    def _facts(self, nodata: Optional[float]):
        """The pixel contract's facts of the array's bands: the source file's where it has one,
        with the array's own band names and nodata when it has them; ``nodata`` overrides."""
        count = int(self.da.shape[0])
        raw = self.da.encoding.get("rasterio_dtype") or self.da.encoding.get("dtype") or self.da.dtype
        names = self.da.attrs.get("long_name")
        names = (names,) if isinstance(names, str) else tuple(names or ())
        if self.source is not None:
            interp, descriptions, values = self.source.band_facts()
        else:
            interp, descriptions, values = (), (), (self._array_nodata(),) * count
        if len(names) == count:
            descriptions = tuple(str(n) for n in names)
        if nodata is not None:
            values = (float(nodata),) * count
        return BandFacts(count, np.dtype(raw).name, interp, descriptions, tuple(values))

    def _array_nodata(self) -> Optional[float]:
        value = self.da.rio.nodata if self.da.rio.encoded_nodata is None else self.da.rio.encoded_nodata
        return None if value is None else float(value)

    def _raw(self, data: np.ndarray) -> np.ndarray:
        """Values as the source holds them: a ``masked=True`` array's NaN back to each band's
        nodata value, in the source's data type."""
        raw = np.dtype(self.dtype)
        if data.dtype == raw:
            return data
        encoded = self.da.rio.encoded_nodata
        if data.dtype.kind == "f" and encoded is not None and not np.isnan(encoded):
            data = np.where(np.isnan(data), data.dtype.type(encoded), data)
        if data.dtype.kind == "f" and raw.kind != "f":      # NaN from masks (invalid by the masks)
            data = np.nan_to_num(data, nan=0.0)
        return data.astype(raw)

    def _stats_sample(self) -> list[np.ndarray]:
        """The decimated sample of the percentile stretch: the source file's own, as a scene reads
        it, when the array is the whole file; else a nearest decimation of the array itself."""
        if self.source is not None and self.source.is_whole:
            return self.source.stats_sample(self.band_index, self._nodata_override)
        h, w = sample_shape(self.height, self.width)
        rows, cols = sample_index(self.height, h), sample_index(self.width, w)
        data = self._raw(np.asarray(self.da[self.band_index][:, rows][:, :, cols].values))
        return valid_values(data, present_bands(data, self.nodata))

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        data = self._raw(np.asarray(self.da[self.band_index, r:r + h, c:c + w].values))
        if self.source is not None and self._nodata_override is None:
            valid = valid_pixels(data, masks=self.source.masks(self.band_index, window))
        else:
            valid = valid_pixels(data, nodata=self.nodata)
        return model_input(data, valid, self.scaling), valid

    def close(self) -> None:
        """Close the source file, if one was opened (the DataArray belongs to the caller)."""
        if self.source is not None:
            self.source.close()


class _SourceFile:
    """The file a DataArray was read from, when the array still lies on its grid: its bands by
    number (the array's ``band`` coordinate) and the array's window of it. Reader threads each get
    their own handle (a rasterio dataset is not shared between threads)."""

    def __init__(self, src, bands: list[int], row: int, col: int, height: int, width: int):
        self.path, self.bands, self.row, self.col = src.name, bands, row, col
        self.is_whole = (row, col, height, width) == (0, 0, src.height, src.width) and \
            sorted(bands) == list(range(1, src.count + 1))
        self._local = threading.local()
        self._local.src = src
        self._opened = [src]
        self._lock = threading.Lock()

    @classmethod
    def of(cls, da: "xarray.DataArray") -> Optional["_SourceFile"]:
        """The array's source file, or ``None`` (no source, unreadable, or not on its grid)."""
        import rasterio
        from rasterio.errors import RasterioError

        path = da.encoding.get("source")
        if not path:
            return None
        try:
            src = rasterio.open(path)
        except (RasterioError, OSError):
            return None
        placed = cls._place(src, da)
        if placed is None:
            src.close()
            return None
        return cls(src, *placed)

    @staticmethod
    def _place(src, da: "xarray.DataArray") -> Optional[tuple]:
        """(bands, row, col, height, width) of the array in ``src``, or ``None`` off its grid."""
        try:
            bands = [int(b) for b in da["band"].values]
        except (TypeError, ValueError, KeyError):
            return None
        if any(not 1 <= b <= src.count for b in bands) or src.crs != da.rio.crs:
            return None
        t, s = da.rio.transform(), src.transform
        col, row = ~s * (t.c, t.f)
        if not np.allclose((t.a, t.b, t.d, t.e), (s.a, s.b, s.d, s.e)) or \
                abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            return None
        row, col, height, width = int(round(row)), int(round(col)), int(da.shape[1]), int(da.shape[2])
        if row < 0 or col < 0 or row + height > src.height or col + width > src.width:
            return None
        return bands, row, col, height, width

    def _src(self):
        src = getattr(self._local, "src", None)
        if src is None:
            import rasterio

            src = self._local.src = rasterio.open(self.path)
            with self._lock:
                self._opened.append(src)
        return src

    def band_facts(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[Optional[float], ...]]:
        """(colour interpretation, descriptions, nodata) of the array's bands, from the file."""
        src = self._src()
        interp = tuple(src.colorinterp[b - 1].name.lower() for b in self.bands)
        descriptions = tuple((src.descriptions[b - 1] or "").strip() for b in self.bands)
        nodata = tuple(None if src.nodatavals[b - 1] is None else float(src.nodatavals[b - 1]) for b in self.bands)
        return interp, descriptions, nodata

    def masks(self, positions: list[int], window: Window) -> np.ndarray:
        """GDAL's masks of the array's bands at ``positions`` over ``window`` of the array."""
        shifted = Window(window.col_off + self.col, window.row_off + self.row, window.width, window.height)
        return self._src().read_masks([self.bands[p] for p in positions], window=shifted)

    def stats_sample(self, positions: list[int], nodata: Optional[float]) -> list[np.ndarray]:
        """The file's decimated sample of the bands at ``positions``, as a scene of it takes it."""
        return stats_sample(self._src(), [self.bands[p] for p in positions], nodata, self.path)

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for src in opened:
            src.close()
        self._local = threading.local()


