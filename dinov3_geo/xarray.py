"""The ``.dinov3`` accessor on rioxarray DataArrays: the library's tasks from the object you hold.

Importing this module (``import dinov3_geo`` does it when xarray is installed) registers
``da.dinov3`` on every DataArray ``(band, y, x)`` or ``(y, x)`` with a CRS and transform (rioxarray's
``da.rio``), in memory or dask-backed::

    import rioxarray, dinov3_geo
    da = rioxarray.open_rasterio("scene.tif", chunks=True)
    feats = da.dinov3.embed(patch=True, backbone="dinov3-vitl16-sat493m")   # (band, y, x) at 16-px cells
    sim = da.dinov3.similar(at=(x, y), backbone=...)                         # on da's grid
    heights = da.dinov3.canopy(weights=...)

Each method runs the same tiled pipeline as the command line (through :class:`DataArrayScene`,
which reads the array window by window: a dask array is never computed whole), writes into a
temporary folder that is removed before returning, and returns the result loaded in memory with
its CRS, transform and nodata.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import xarray as xr
from rasterio.windows import Window

from dinov3_geo.errors import InputError, UsageError

#: Longest side of the strided sample used for the percentile stretch of non-byte arrays.
STATS_SIDE = 1024


class DataArrayScene:
    """A rioxarray DataArray seen as a scene: ``read(window)`` gives ``(chip, valid)`` as
    :meth:`dinov3_geo.io.scene.Scene.read` does (band choice, global scaling to 0..1, validity from
    nodata and NaN), computing only that window of a dask array."""

    def __init__(self, da: xr.DataArray, bands: Optional[Sequence[int]] = None,
                 scale: Optional[tuple[float, float]] = None):
        from dinov3_geo.io.scene import MIN_SIZE, pixel_size_m

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
        self.dtype = np.dtype(self.da.dtype).name
        self.nodata = self.da.rio.nodata if self.da.rio.nodata is not None else self.da.rio.encoded_nodata
        self.band_index = self._bands(bands)
        self.warnings: list[str] = []
        self.resampled, self.resampling_factor, self.gcps = False, 1.0, None     # read on its own grid
        self.input_profile = {"crs": self.crs, "transform": self.transform, "width": self.width,
                              "height": self.height}
        self.scaling = self._scaling(scale)

    @staticmethod
    def _name(da: xr.DataArray) -> str:
        return f"<DataArray {da.name}>" if da.name is not None else "<DataArray>"

    def _bands(self, bands: Optional[Sequence[int]]) -> list[int]:
        """0-based band positions to read (3 of them; one band is repeated)."""
        count = self.da.shape[0]
        picked = [int(b) for b in bands] if bands is not None else ([1, 2, 3] if count >= 3 else [1])
        if len(picked) not in (1, 3) or any(not 1 <= b <= count for b in picked):
            raise UsageError("bands", f"give 1 or 3 of the array's {count} bands (1-based), got {picked}")
        return [b - 1 for b in (picked * 3 if len(picked) == 1 else picked)]

    def _scaling(self, scale) -> Optional[list[tuple[float, float]]]:
        """Per-band (lo, hi): ``scale`` for all, None for bytes (/255), else the 2-98 % percentiles
        of a strided sample."""
        from dinov3_geo.io.scene import PERCENTILES

        if scale is not None:
            lo, hi = (float(v) for v in scale)
            if not hi > lo:
                raise UsageError("scale", f"need MIN < MAX, got {scale!r}")
            return [(lo, hi)] * 3
        if self.dtype == "uint8":
            return None
        step = max(1, int(np.ceil(max(self.height, self.width) / STATS_SIDE)))
        sample = np.asarray(self.da[self.band_index, ::step, ::step].values, np.float64)
        out = []
        for band in sample:
            values = band[np.isfinite(band) & ((band != self.nodata) if self.nodata is not None else True)]
            lo, hi = (float(v) for v in np.percentile(values, PERCENTILES)) if values.size else (0.0, 1.0)
            out.append((lo, hi if hi > lo else lo + 1.0))
        return out

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        from dinov3_geo.io.scene import scale_to_unit

        r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        data = np.asarray(self.da[self.band_index, r:r + h, c:c + w].values)
        valid = np.ones((h, w), bool)
        if data.dtype.kind == "f":
            valid &= np.all(np.isfinite(data), axis=0)
        if self.nodata is not None and not (isinstance(self.nodata, float) and np.isnan(self.nodata)):
            valid &= np.any(data != self.nodata, axis=0)    # GDAL's rule: nodata only where every band is
        chip = scale_to_unit(data, self.scaling)
        if not valid.all():
            np.multiply(chip, valid, out=chip)
        return chip, valid

    def close(self) -> None:
        """Nothing to close (the DataArray belongs to the caller)."""


@contextlib.contextmanager
def _workdir():
    with tempfile.TemporaryDirectory(prefix="dinov3geo-") as folder:
        yield Path(folder)


def _load_raster(path: Path) -> xr.DataArray:
    """A single-band result file, loaded, with CRS, transform and nodata."""
    import rioxarray

    with rioxarray.open_rasterio(path, masked=False) as da:
        return da.squeeze("band", drop=True).load()


@xr.register_dataarray_accessor("dinov3")
class Dinov3Accessor:
    """``da.dinov3``: canopy, embed, segment and similar over this DataArray (see the module)."""

    def __init__(self, da: xr.DataArray):
        self._da = da

    def scene(self, bands: Optional[Sequence[int]] = None, scale=None) -> DataArrayScene:
        """This DataArray as a scene reader for the library's functions."""
        return DataArrayScene(self._da, bands=bands, scale=scale)

    def embed(self, patch: bool = True, backbone=None, pca: Optional[int] = None, bands=None, scale=None,
              **options):
        """Patch features ``(band, y, x)`` at 16-px cells (``patch=True``, see
        :func:`dinov3_geo.analysis.embed`), or the chip embeddings as a GeoDataFrame."""
        from dinov3_geo.analysis import embed
        from dinov3_geo.io.features import read_chip_embeddings
        from dinov3_geo.io.patchmap import open_features

        with _workdir() as work:
            out = work / ("features.zarr" if patch else "chips.parquet")
            embed(self.scene(bands, scale), out, backbone=backbone, patch=patch, pca=pca, **options)
            return open_features(out).load() if patch else read_chip_embeddings(out)

    def similar(self, at=None, like=None, backbone=None, bands=None, scale=None, **options) -> xr.DataArray:
        """Cosine similarity to a reference point or polygons, on this array's grid
        (:func:`dinov3_geo.analysis.similar`)."""
        from dinov3_geo.analysis import similar

        with _workdir() as work:
            similar(self.scene(bands, scale), work / "similar.tif", at=at, like=like, backbone=backbone, **options)
            return _load_raster(work / "similar.tif")

    def cluster(self, k: int = 8, backbone=None, bands=None, scale=None, **options) -> xr.DataArray:
        """k-means land units on this array's grid (:func:`dinov3_geo.analysis.cluster`)."""
        from dinov3_geo.analysis import cluster

        with _workdir() as work:
            cluster(self.scene(bands, scale), work / "clusters.tif", k=k, backbone=backbone, **options)
            return _load_raster(work / "clusters.tif")

    def segment(self, head="canopy", weights=None, bands=None, scale=None, **options) -> xr.DataArray:
        """A dense map on this array's grid: ``head="canopy"`` (CHMv2 heights in metres, as
        :func:`dinov3_geo.segment`) or a segmentation head file from training (uint8 classes, 255
        nodata, as ``dinov3geo segment --head``)."""
        from dinov3_geo.api import TASKS, segment
        from dinov3_geo.tasks.segment_head import segment_with_head

        with _workdir() as work:
            out = work / "segment.tif"
            if head in TASKS:
                segment(self.scene(bands, scale), task=head, output=out, weights=weights, **options)
            else:
                segment_with_head(self.scene(bands, scale), head, out, **options)
            return _load_raster(out)

    def canopy(self, weights=None, **options) -> xr.DataArray:
        """Canopy height in metres (float32, NaN nodata) on this array's grid."""
        return self.segment("canopy", weights=weights, **options)
