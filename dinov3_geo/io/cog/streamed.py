"""The streamed write path: each strip and its overview levels cut into 512 blocks, encoded on
worker threads while the rows stream in (:mod:`dinov3_geo.io.cog.encoder`) and appended to hidden
block files; GDAL's COG of the *empty* result, made on its own thread meanwhile, gets the blocks
appended at the end. After the last row only bytes are copied.

Also here: that empty COG (the skeleton: every tag and IFD, no block) and the probe that this
GDAL lays COGs out as the appended blocks need.
"""
from __future__ import annotations

import contextlib
import functools
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import tifffile
from affine import Affine
from rasterio.errors import RasterioError

from dinov3_geo.errors import OutputError
from dinov3_geo.hostmem import usable_cores
from dinov3_geo.io.atomic import discard, require_space, temp_path
from dinov3_geo.io.cog import encoder
from dinov3_geo.io.cog.encoder import BLOCK
from dinov3_geo.io.cog.gdal import cog_options, create_gtiff
from dinov3_geo.io.cog.overviews import levels_below
from dinov3_geo.io.cog.spec import COGSpec
from dinov3_geo.io.cog.strips import StripWorker, joined

#: Most bands whose blocks are encoded while streaming: a pixel-interleaved block of ``b`` float32
#: bands takes ``b`` MB, three times per encoder thread; feature maps of hundreds of bands go
#: through GDAL's COG copy (which holds one block at a time in its cache).
STREAM_MAX_BANDS = 16
#: Most overview levels the streamed path takes from 512-row strips (scenes below 262144 px a side).
STREAM_MAX_LEVELS = 9


class StreamedWriter:
    """Writes ``spec``'s COG by encoding its blocks while the strips arrive: one block file and tiler
    per level, the encoder threads, one strip thread; GDAL's empty COG of the result is made
    meanwhile on its own thread (GDAL releases the GIL; it reads the whole empty raster to find no
    block, 1-2 ns per pixel)."""

    def __init__(self, spec: COGSpec):
        self.spec = spec
        self._skeleton: Path | None = None
        self._skeleton_job: ThreadPoolExecutor | None = None
        self._skeleton_made: Future | None = None
        self._block_files: list[encoder.BlockFile] = []
        self._tilers: list[encoder.LevelTiler] = []
        self._encoders: ThreadPoolExecutor | None = None
        self._strips: StripWorker | None = None

    def open(self) -> None:
        spec, levels = self.spec, self.spec.levels()
        self._skeleton = temp_path(spec.path, "cog")
        self._skeleton_job = ThreadPoolExecutor(1, thread_name_prefix="cog-skeleton")
        self._skeleton_made = self._skeleton_job.submit(
            empty_cog, self._skeleton, levels, spec.georeferenced_profile(), spec.describe, spec.zstd_level,
            needs_bigtiff(levels, spec.count, spec.stored_dtype), spec.path, spec.nbits)
        self._encoders = ThreadPoolExecutor(max(2, usable_cores()), thread_name_prefix="cog-encode")
        for k, (h, w) in enumerate(levels):
            self._block_files.append(encoder.BlockFile(temp_path(spec.path, f"partial{k}", ".bin")))
            self._tilers.append(encoder.LevelTiler(h, w, spec.dtype, spec.fill, self._block_files[-1],
                                                   self._encoders, spec.zstd_level, spec.stored_dtype))
        self._strips = StripWorker("cog-strips")

    def add(self, pieces: list[np.ndarray], row_off: int, rows: int) -> None:
        """Take the next strip (row blocks ``pieces``, joined on the strip thread, not the caller's)."""
        self._strips.submit(self._encode_strip, pieces)

    def _encode_strip(self, pieces: list[np.ndarray]) -> None:
        """Full-resolution rows and their overview levels into the block encoders (on the strip
        thread; strips arrive in order, whole 512-row blocks but the last)."""
        strip = joined(pieces)
        self._tilers[0].add(strip)
        for tiler, level in zip(self._tilers[1:], levels_below(strip, self.spec.dtype, self.spec.nodata)):
            tiler.add(level)        # while the level above encodes
        for tiler in self._tilers:      # the last strip's blocks; this one's encode meanwhile
            tiler.collect(all_blocks=False)

    def join(self) -> None:
        """Wait for the strips taken so far (raises the strip thread's error)."""
        self._strips.join()

    def finish(self) -> Path:
        """Encode the last block rows and append every level's blocks to GDAL's empty COG: the
        finished file, a hidden temporary beside the target, now the caller's."""
        for tiler in self._tilers:
            tiler.finish()
        require_space(self.spec.path, sum(f.nbytes for f in self._block_files))
        self._skeleton_made.result()
        try:
            tables = encoder.skeleton_tables(self._skeleton, self.spec.levels(), self.spec.count,
                                             np.dtype(self.spec.stored_dtype))
            encoder.assemble(self._skeleton, tables, self._block_files)
        except encoder.SkeletonMismatch as exc:
            raise OutputError(self.spec.path, f"blocks do not fit GDAL's COG layout ({exc})") from None
        self.spec.check_metadata(self._skeleton)
        cog, self._skeleton = self._skeleton, None
        return cog

    def abort(self) -> None:
        """Stop the threads and delete the block files and the skeleton."""
        if self._strips is not None:
            self._strips.shutdown()
        self._strips = None
        for pool in (self._encoders, self._skeleton_job):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._encoders = self._skeleton_job = self._skeleton_made = None
        for f in self._block_files:
            with contextlib.suppress(OSError):    # buffered bytes that cannot be written: dropped
                f.close()
            discard(f.path)
        self._block_files, self._tilers = [], []
        discard(self._skeleton)
        self._skeleton = None


def needs_bigtiff(levels: Sequence[tuple[int, int]], count: int, dtype: str) -> bool:
    """Whether a COG of these levels could pass 4 GB even with incompressible blocks."""
    raw = sum(h * w for h, w in levels) * count * np.dtype(dtype).itemsize
    return raw * 1.01 + (64 << 20) >= 1 << 32


def empty_cog(path: Path, levels: Sequence[tuple[int, int]], profile: dict, describe, zstd_level: int,
              bigtiff: bool, near: Path | None = None, nbits: int | None = None) -> None:
    """GDAL's COG at ``path`` of an empty raster of ``profile`` (count, dtype, nodata, crs and
    transform or gcps) with empty overviews of ``levels`` (``SPARSE_OK``: all IFDs, no block);
    ``describe(ds)`` adds metadata. The source is a VRT whose bands have no sources, made from a
    never-written sparse GeoTIFF that carries the metadata; these are hidden files named after
    ``near`` (default ``path``). ``nbits`` 16 stores float32 as half floats (GeoTIFF NBITS)."""
    near = Path(near or path)
    carrier = temp_path(near, "empty")
    vrts = [temp_path(near, f"empty{k}", ".vrt") for k in range(len(levels))]
    try:
        with create_gtiff(carrier, {**profile, "height": levels[0][0], "width": levels[0][1]}, tiled=True,
                          blockxsize=BLOCK, blockysize=BLOCK, sparse_ok=True) as ds:
            describe(ds)
        rasterio.shutil.copy(carrier, vrts[0], driver="VRT")
        _empty_levels(vrts, levels)
        opts = {**cog_options(profile["dtype"], zstd_level), "overviews": "FORCE_USE_EXISTING",
                "sparse_ok": True, "bigtiff": "YES" if bigtiff else "NO"}
        rasterio.shutil.copy(vrts[0], path, driver="COG", **opts)
        if nbits:
            _set_bits_per_sample(path, nbits)
    finally:
        for p in (carrier, *vrts):
            discard(p)


def _set_bits_per_sample(path: Path, nbits: int) -> None:
    """Set every IFD's BitsPerSample of the empty COG at ``path`` to ``nbits`` in place. GDAL writes
    half floats' blocks even when they hold only nodata, so the skeleton of an NBITS=16 result is
    made as float32 and changed here: that tag is all that differs between GDAL's two COGs (checked
    by the layout probe and the tests against GDAL's COG copy)."""
    with tifffile.TiffFile(path, mode="r+b") as tif:
        for page in tif.pages:
            tag = page.tags["BitsPerSample"]
            tag.overwrite((nbits,) * tag.count if tag.count > 1 else nbits)


def _empty_levels(vrts: list[Path], levels: Sequence[tuple[int, int]]) -> None:
    """Strip the sources from the full-resolution VRT ``vrts[0]``, write the empty overview VRTs
    ``vrts[1:]`` and list them as its bands' ``<Overview>`` levels."""
    tree = ET.parse(vrts[0])
    bands = list(tree.getroot().iter("VRTRasterBand"))
    for band in bands:
        for source in [c for c in band if c.tag.endswith("Source")]:
            band.remove(source)
    for vrt, (h, w) in zip(vrts[1:], levels[1:]):
        root = ET.Element("VRTDataset", rasterXSize=str(w), rasterYSize=str(h))
        for band in bands:
            level_band = ET.SubElement(root, "VRTRasterBand", dataType=band.get("dataType"), band=band.get("band"))
            for nodata in band.iter("NoDataValue"):
                ET.SubElement(level_band, "NoDataValue").text = nodata.text
            ovr = ET.SubElement(band, "Overview")
            ET.SubElement(ovr, "SourceFilename", relativeToVRT="0").text = str(Path(vrt).resolve())
            ET.SubElement(ovr, "SourceBand").text = band.get("band")
        ET.ElementTree(root).write(vrt)
    tree.write(vrts[0])


def layout_fits(spec: COGSpec) -> bool:
    """Whether this GDAL lays out ``spec``'s COG as the streamed blocks need (probed once per kind)."""
    bigtiff = needs_bigtiff(spec.levels(), spec.count, spec.stored_dtype)
    return _layout_fits(spec.count, spec.stored_dtype, bigtiff, spec.zstd_level)


@functools.cache
def _layout_fits(count: int, dtype: str, bigtiff: bool, zstd_level: int) -> bool:
    """Tried once per process on a small empty raster in the temporary folder."""
    with tempfile.TemporaryDirectory(prefix="dinov3geo-probe-") as folder:
        return _probe_layout(Path(folder) / "probe.tif", count, dtype, bigtiff, zstd_level)


def _probe_layout(probe: Path, count: int, dtype: str, bigtiff: bool, zstd_level: int) -> bool:
    levels = [(1100, 1030), (550, 515)]
    nodata = float("nan") if np.dtype(dtype).kind == "f" else float(np.iinfo(dtype).max)
    half = dtype == "float16"           # float32 stored as half floats (NBITS=16)
    profile = dict(count=count, dtype="float32" if half else dtype, nodata=nodata, crs="EPSG:32612",
                   transform=Affine(30, 0, 300000, 0, -30, 4500000))
    try:
        empty_cog(probe, levels, profile, lambda ds: None, zstd_level, bigtiff, nbits=16 if half else None)
        encoder.skeleton_tables(probe, levels, count, np.dtype(dtype))
        return True
    except (encoder.SkeletonMismatch, RasterioError, OSError):
        return False
