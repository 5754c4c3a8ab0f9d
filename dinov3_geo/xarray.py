"""The ``.dinov3`` accessor on rioxarray DataArrays: the library's tasks from the object you hold.

``import dinov3_geo.xarray`` (or ``import dinov3_geo``) registers ``da.dinov3`` on every DataArray
``(band, y, x)`` or ``(y, x)`` with a CRS and transform (rioxarray's ``da.rio``), in memory or
dask-backed::

    import rioxarray, dinov3_geo
    da = rioxarray.open_rasterio("scene.tif", chunks=True)          # masked=True works the same
    feats = da.dinov3.embed(patch=True, backbone="dinov3-vitl16-sat493m")   # (band, y, x) at 16-px cells
    sim = da.dinov3.similar(at=(x, y), backbone=...)                         # on da's grid
    heights = da.dinov3.canopy(weights=...)

Each method calls the library function of the same name with the DataArray as the scene, so the
request is resolved and checked as the command resolves it and the pixels are read through the
same contract (:class:`~dinov3_geo.io.dataarray.DataArrayScene`: an array read from a file takes
that file's colour interpretation, nodata and masks; a dask array is never computed whole). The
result is written into a temporary folder removed before returning, and returned loaded in memory
with its CRS, transform and nodata: the same numbers as the command's file.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import xarray as xr

from dinov3_geo.analysis import cluster, embed, similar
from dinov3_geo.api import classify, segment
from dinov3_geo.io.dataarray import DataArrayScene
from dinov3_geo.io.features import read_chip_embeddings
from dinov3_geo.io.patchmap import open_features


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
    """``da.dinov3``: canopy, segment, classify, embed, similar and cluster over this DataArray."""

    def __init__(self, da: xr.DataArray):
        self._da = da

    def scene(self, bands: Optional[Sequence[int]] = None, scale=None, nodata: Optional[float] = None) -> DataArrayScene:
        """This DataArray as a scene reader (the pixel contract over it)."""
        return DataArrayScene(self._da, bands=bands, scale=scale, nodata=nodata)

    def embed(self, patch: bool = True, backbone=None, pca: Optional[int] = None, **options):
        """Patch features ``(band, y, x)`` at 16-px cells (``patch=True``, see
        :func:`dinov3_geo.analysis.embed`), or the chip embeddings as a GeoDataFrame."""
        with _workdir() as work:
            out = work / ("features.zarr" if patch else "chips.parquet")
            embed(self._da, out, backbone=backbone, patch=patch, pca=pca, **options)
            return open_features(out).load() if patch else read_chip_embeddings(out)

    def similar(self, at=None, like=None, backbone=None, **options) -> xr.DataArray:
        """Cosine similarity to a reference point or polygons, on this array's grid
        (:func:`dinov3_geo.analysis.similar`)."""
        with _workdir() as work:
            similar(self._da, work / "similar.tif", at=at, like=like, backbone=backbone, **options)
            return _load_raster(work / "similar.tif")

    def cluster(self, k: int = 8, backbone=None, **options) -> xr.DataArray:
        """k-means land units on this array's grid (:func:`dinov3_geo.analysis.cluster`)."""
        with _workdir() as work:
            cluster(self._da, work / "clusters.tif", k=k, backbone=backbone, **options)
            return _load_raster(work / "clusters.tif")

    def segment(self, head="canopy", weights=None, **options) -> xr.DataArray:
        """A dense map on this array's grid (:func:`dinov3_geo.segment`): ``head="canopy"`` (CHMv2
        heights in metres from ``weights``) or a segmentation head file from training (uint8 classes,
        255 nodata)."""
        with _workdir() as work:
            out = work / "segment.tif"
            if str(head) == "canopy":
                segment(self._da, "canopy", out, weights=weights, **options)
            else:
                segment(self._da, "segment", out, head=head, **options)
            return _load_raster(out)

    def canopy(self, weights=None, **options) -> xr.DataArray:
        """Canopy height in metres (float32, NaN nodata) on this array's grid."""
        return self.segment("canopy", weights=weights, **options)

    def classify(self, head, **options):
        """One row per chip with the probe's class and probabilities (a GeoDataFrame, see
        :func:`dinov3_geo.classify`)."""
        import geopandas as gpd


        with _workdir() as work:
            classify(self._da, head, work / "chips.gpkg", **options)
            return gpd.read_file(work / "chips.gpkg")
