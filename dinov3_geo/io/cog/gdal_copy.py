"""The GDAL COG copy write path, for what the streamed encoder does not write (resampled scenes,
many bands, other types): the strips go into a hidden temporary tiled GeoTIFF beside the target
(uncompressed when it fits comfortably on disk, see ``TEMP_RAW_MAX_BYTES``); float results on the
scene's own grid whose sides halve evenly get their overviews while streaming (one small GeoTIFF
per level, read through a VRT with ``OVERVIEWS=FORCE_USE_EXISTING``); at the end the file is, if
the scene was resampled, warped back onto the exact input grid and converted by GDAL's COG driver.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from dinov3_geo.io.atomic import discard, require_space, temp_path
from dinov3_geo.io.cog.encoder import BLOCK
from dinov3_geo.io.cog.gdal import cog_options, create_gtiff, zstd_works
from dinov3_geo.io.cog.overviews import halves_evenly, levels_below, scaled
from dinov3_geo.io.cog.spec import COGSpec
from dinov3_geo.io.cog.strips import StripWorker, joined
from dinov3_geo.io.georef import georeference_profile

#: Largest temporary GeoTIFF (bytes, padded to whole 512 blocks) written uncompressed; larger ones,
#: or when the folder has less than ``TEMP_FREE_FACTOR`` times that free, use ZSTD level 1. The
#: default of ``COGSink(temp_raw_max_bytes=)``.
TEMP_RAW_MAX_BYTES = 4 << 30
TEMP_FREE_FACTOR = 3


def temp_creation_options(folder: Path, height: int, width: int, count: int, dtype: str,
                          raw_max_bytes: int = TEMP_RAW_MAX_BYTES) -> dict:
    """GDAL creation options of the temporary GeoTIFF of ``count`` bands of ``dtype``: none
    (uncompressed) when it is at most ``raw_max_bytes`` and ``folder`` has ``TEMP_FREE_FACTOR`` times
    that free, else fast compression (ZSTD level 1 costs a quarter of DEFLATE's CPU; GDAL compresses
    its blocks on worker threads, off the writer thread)."""
    raw = math.ceil(height / BLOCK) * math.ceil(width / BLOCK) * BLOCK * BLOCK * count * np.dtype(dtype).itemsize
    try:
        fits = raw <= raw_max_bytes and shutil.disk_usage(folder).free > TEMP_FREE_FACTOR * raw
    except OSError:
        fits = False
    if fits:
        return {}
    return {"compress": "ZSTD", "zstd_level": 1} if zstd_works() else {"compress": "DEFLATE", "zlevel": 1}


def progressive_overviews(spec: COGSpec) -> bool:
    """Whether overviews are built while streaming on this path: float results on the scene's own
    grid whose sides halve evenly (other sizes give GDAL fractional source windows, left to GDAL)."""
    return spec.dtype.startswith("float") and not spec.resampled and halves_evenly(spec.height, spec.width)


class GDALCopyWriter:
    """Writes ``spec``'s COG through a temporary tiled GeoTIFF and GDAL's COG driver. The strips are
    written on their own thread (off the caller's: the engine's writer thread stitches the next rows
    meanwhile), streamed overviews on another."""

    def __init__(self, spec: COGSpec, temp_raw_max_bytes: int = TEMP_RAW_MAX_BYTES):
        self.spec, self.temp_raw_max_bytes = spec, temp_raw_max_bytes
        self._tmp: Path | None = None
        self._ds = None
        self._strips: StripWorker | None = None
        self._ovr_paths: list[Path] = []
        self._ovr_ds: list = []
        self._ovr_worker: StripWorker | None = None

    def open(self) -> None:
        """The temporary tiled GeoTIFF on the working grid (and the overview files)."""
        spec = self.spec
        comp = temp_creation_options(spec.path.parent, spec.height, spec.width, spec.count, spec.dtype,
                                     self.temp_raw_max_bytes)
        zstd_works()               # probe GDAL now, not in the COG conversion after the last chip
        self._tmp = temp_path(spec.path)
        self._ds = create_gtiff(self._tmp, {**spec.georeferenced_profile(), "height": spec.height,
                                            "width": spec.width},
                                tiled=True, blockxsize=BLOCK, blockysize=BLOCK, bigtiff="IF_SAFER",
                                num_threads="ALL_CPUS", **comp)
        self._strips = StripWorker("cog-strips")
        if progressive_overviews(spec):
            for k, (h, w) in enumerate(spec.levels()[1:], 1):
                self._ovr_paths.append(temp_path(spec.path, "ovr"))
                self._ovr_ds.append(rasterio.open(
                    self._ovr_paths[-1], "w", driver="GTiff", width=w, height=h, count=spec.count,
                    dtype=spec.dtype, nodata=spec.nodata, tiled=True, blockxsize=BLOCK,
                    blockysize=BLOCK, bigtiff="IF_SAFER", **comp,
                    **georeference_profile(spec.scene.crs, scaled(spec.scene.transform, 2 ** k))))
            self._ovr_worker = StripWorker("cog-overviews")

    def add(self, pieces: list[np.ndarray], row_off: int, rows: int) -> None:
        """Take the next strip: into the temporary file, and its means into the overview files
        (strips arrive in order and are whole 512-row blocks except the last, so each level gets
        whole 2x2 cells)."""
        strip = joined(pieces)
        self._strips.submit(self._write_strip, strip, Window(0, row_off, self.spec.width, rows))
        if self._ovr_worker is not None:
            self._ovr_worker.submit(self._write_overviews, row_off, strip)

    def _write_strip(self, strip: np.ndarray, window: Window) -> None:
        """Full-resolution rows into the temporary file (on the strip thread)."""
        self._ds.write(strip, window=window)

    def _write_overviews(self, row_off: int, strip: np.ndarray) -> None:
        for ds, means in zip(self._ovr_ds, levels_below(strip, self.spec.dtype, self.spec.nodata)):
            row_off //= 2
            ds.write(means.astype(self.spec.dtype, copy=False), window=Window(0, row_off, ds.width, means.shape[1]))

    def join(self) -> None:
        """Wait for the strips taken so far (raises the writer threads' first error)."""
        self._strips.join()
        if self._ovr_worker is not None:
            self._ovr_worker.join()

    def finish(self) -> Path:
        """Close the temporary files and convert them by GDAL's COG driver (warped back onto the input
        grid when resampled): the finished file, a hidden temporary beside the target, now the caller's."""
        self.spec.describe(self._ds)
        self._ds.close()
        for ds in self._ovr_ds:
            ds.close()
        require_space(self.spec.path, os.path.getsize(self._tmp) // 4)    # the least the COG takes
        cog = temp_path(self.spec.path, "cog")
        try:
            self._to_cog(cog)
        except BaseException:
            discard(cog)
            raise
        return cog

    def _to_cog(self, cog: Path) -> None:
        """GDAL COG copy of the temporary file (warped back onto the input grid when resampled)."""
        opts = cog_options(self.spec.dtype, self.spec.zstd_level)
        if self.spec.nbits:
            opts["nbits"] = int(self.spec.nbits)
        if self._ovr_paths:
            vrt = temp_path(self.spec.path, "vrt", suffix=".vrt")
            try:
                self._overview_vrt(vrt)
                rasterio.shutil.copy(vrt, cog, driver="COG", **{**opts, "overviews": "FORCE_USE_EXISTING"})
            finally:
                discard(vrt)
        elif self.spec.resampled:
            back = temp_path(self.spec.path, "back")
            try:
                self._back_on_input_grid(back)
                rasterio.shutil.copy(back, cog, driver="COG", **opts)
            finally:
                discard(back)
        else:
            rasterio.shutil.copy(self._tmp, cog, driver="COG", **opts)
        self.spec.check_metadata(cog)

    def _back_on_input_grid(self, path: Path) -> None:
        """The working-grid result resampled onto the exact input grid, strip by strip, into the
        GeoTIFF ``path``: bilinear (nearest for classes), nearest where bilinear has no valid source
        pixel, and nodata exactly where the input is invalid (``scene.input_valid``)."""
        spec, grid = self.spec, self.spec.scene.input_profile
        kw = dict(crs=grid["crs"], transform=grid["transform"], width=grid["width"], height=grid["height"],
                  src_nodata=spec.nodata, nodata=spec.nodata)
        smooth = Resampling.nearest if spec.dtype == "uint8" else Resampling.bilinear
        input_valid = getattr(spec.scene, "input_valid", None)
        with rasterio.open(self._tmp) as src, WarpedVRT(src, resampling=smooth, **kw) as values, \
                WarpedVRT(src, resampling=Resampling.nearest, **kw) as nearest, \
                rasterio.open(path, "w", driver="GTiff", count=spec.count, dtype=spec.dtype, tiled=True,
                              blockxsize=BLOCK, blockysize=BLOCK, bigtiff="IF_SAFER",
                              **{k: v for k, v in kw.items() if k != "src_nodata"}) as dst:
            for row in range(0, grid["height"], BLOCK):
                window = Window(0, row, grid["width"], min(BLOCK, grid["height"] - row))
                out = values.read(window=window)
                gaps = values.read_masks(window=window) == 0
                out[gaps] = nearest.read(window=window)[gaps]
                if input_valid is not None:
                    out[:, ~input_valid(window)] = spec.nodata
                dst.write(out, window=window)
            spec.describe(dst)

    def _overview_vrt(self, vrt: Path) -> None:
        """A VRT of the temporary file (all its metadata) whose bands list the streamed overview
        files as explicit ``<Overview>`` levels."""
        rasterio.shutil.copy(self._tmp, vrt, driver="VRT")
        tree = ET.parse(vrt)
        for band in tree.getroot().iter("VRTRasterBand"):
            for level in self._ovr_paths:
                ovr = ET.SubElement(band, "Overview")
                ET.SubElement(ovr, "SourceFilename", relativeToVRT="0").text = str(Path(level).resolve())
                ET.SubElement(ovr, "SourceBand").text = band.get("band")
        tree.write(vrt)

    def abort(self) -> None:
        """Stop the threads, close and delete the temporary files."""
        for worker in (self._strips, self._ovr_worker):
            if worker is not None:
                worker.shutdown()
        self._strips = self._ovr_worker = None
        for ds in [self._ds, *self._ovr_ds]:
            if ds is not None and not ds.closed:
                with contextlib.suppress(Exception):
                    ds.close()
        self._ds, self._ovr_ds = None, []
        for p in [self._tmp, *self._ovr_paths]:
            discard(p)
        self._tmp, self._ovr_paths = None, []
