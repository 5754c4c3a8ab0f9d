"""The COG sink: results streamed as rows into a Cloud-Optimised GeoTIFF on the input grid, written
atomically -- the one interface the pipeline and the stitchers write to.

Rows arrive with ``write(row_off, array)`` in any order and are gathered into whole 512-row strips,
handed in order to one of two write paths, chosen in one place (:func:`write_path_for`):

* **streamed** (:class:`~dinov3_geo.io.cog.streamed.StreamedWriter`): results of up to
  ``STREAM_MAX_BANDS`` bands on the scene's own grid (float32, half floats, uint16 with a nodata
  number, classes) have their blocks encoded while they stream in; after the last row only bytes
  are copied;
* **GDAL's COG copy** (:class:`~dinov3_geo.io.cog.gdal_copy.GDALCopyWriter`): anything else
  (resampled scenes, many bands, other types) goes into a temporary tiled GeoTIFF converted by
  GDAL's COG driver at the end.

Both end with ZSTD level ``COG_ZSTD_LEVEL`` (1) and the TIFF predictor, 512 blocks, overviews as
:mod:`dinov3_geo.io.cog.overviews` computes them, and a move onto the target with ``os.replace``
(:mod:`dinov3_geo.io.atomic`). On any exception (also ``KeyboardInterrupt``) every temporary file
is removed and the target is left as it was.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dinov3_geo.errors import OutputError
from dinov3_geo.io.atomic import check_output, discard, publish, require_space, writing
from dinov3_geo.io.cog.encoder import BLOCK
from dinov3_geo.io.cog.gdal import COG_ZSTD_LEVEL, GDAL_CACHE_MB, bounded_gdal_cache, zstd_works
from dinov3_geo.io.cog.gdal_copy import TEMP_RAW_MAX_BYTES, GDALCopyWriter, progressive_overviews
from dinov3_geo.io.cog.overviews import overview_count
from dinov3_geo.io.cog.spec import COGSpec
from dinov3_geo.io.cog.streamed import STREAM_MAX_BANDS, STREAM_MAX_LEVELS, StreamedWriter, layout_fits
from dinov3_geo.io.cog.strips import first_rows


@dataclass(frozen=True)
class WritePath:
    """Which way a COG is written -- ``"streamed"`` or ``"gdal_copy"`` -- and why."""
    name: str
    reason: str

    @property
    def streamed(self) -> bool:
        return self.name == "streamed"


def write_path_for(spec: COGSpec, stream_blocks: bool = True) -> WritePath:
    """The write path of ``spec``'s COG: blocks encoded while streaming for float32 results (stored
    as float32, or as float16 with ``nbits=16``), uint16 ones with a nodata number and uint8 ones
    (classes), of up to ``STREAM_MAX_BANDS`` bands on the scene's own grid, whose overview levels
    come from 512-row strips, when this GDAL has ZSTD and lays COGs out as the blocks need (probed
    once); anything else, or ``stream_blocks`` False, through GDAL's COG copy."""
    def gdal_copy(reason: str) -> WritePath:
        return WritePath("gdal_copy", reason)

    floats = spec.dtype == "float32" and spec.nbits in (None, 16)
    uint16 = spec.dtype == "uint16" and spec.nodata is not None and np.isfinite(spec.nodata)
    if not stream_blocks:
        return gdal_copy("stream_blocks is off")
    if not (floats or uint16 or spec.dtype == "uint8"):
        kind = spec.dtype + (f" with nbits {spec.nbits}" if spec.nbits else "") + \
            (" without a nodata number" if spec.dtype == "uint16" else "")
        return gdal_copy(f"{kind} results are not encoded while streaming")
    if spec.count > STREAM_MAX_BANDS:
        return gdal_copy(f"{spec.count} bands: more than {STREAM_MAX_BANDS}")
    if spec.resampled:
        return gdal_copy("the scene was resampled: the result is warped back onto the input grid")
    if overview_count(spec.height, spec.width) > STREAM_MAX_LEVELS:
        return gdal_copy(f"more than {STREAM_MAX_LEVELS} overview levels")
    if not zstd_works():
        return gdal_copy("this GDAL has no ZSTD")
    if not layout_fits(spec):
        return gdal_copy("this GDAL lays COGs out otherwise")
    return WritePath("streamed", f"{spec.count} band(s) of {spec.stored_dtype} on the scene's grid")


class COGSink:
    """Write result rows into a COG at ``path`` matching ``scene.input_profile`` exactly.

    ``count`` bands of ``dtype`` (``"float32"`` with ``nodata=nan``, or ``"uint8"`` with nodata 255 --
    the default for uint8 -- and a ``colormap`` ``{value: (r, g, b[, a])}``). Use as a context manager; ``write(row_off,
    array)`` takes ``[count, rows, width]`` on the scene's working grid, rows in any order (the sink
    keeps the arrays it is given: do not modify them afterwards). All
    checks (folder, overwrite, input file) happen in ``__init__``, before any model work. Inside the
    ``with`` block GDAL's block cache is capped at ``gdal_cache_mb`` (process-wide, so it also bounds
    the reader threads' cache) so memory stays flat on large scenes. ``zstd_level`` is the final
    file's ZSTD level (see ``COG_ZSTD_LEVEL``). With ``stream_blocks`` (the default) a result that
    :func:`write_path_for` accepts is encoded block by block while it streams, so nothing but
    appending bytes is left after the last row; other results, or ``stream_blocks=False``, go
    through GDAL's COG copy of a temporary GeoTIFF, written uncompressed up to
    ``temp_raw_max_bytes`` (see ``TEMP_RAW_MAX_BYTES``). :attr:`write_path` says which, once open.
    """

    def __init__(self, path, scene, count: int = 1, dtype: str = "float32", nodata: float = float("nan"),
                 colormap: dict | None = None, overwrite: bool = False,
                 band_descriptions: Sequence[str] | None = None, tags: dict | None = None,
                 scales: Sequence[float] | None = None, nbits: int | None = None, *,
                 gdal_cache_mb: int | None = GDAL_CACHE_MB, zstd_level: int = COG_ZSTD_LEVEL,
                 stream_blocks: bool = True, temp_raw_max_bytes: int = TEMP_RAW_MAX_BYTES):
        self.path = check_output(path, overwrite, inputs=[getattr(scene, "path", None)])
        self.scene, self.count, self.dtype = scene, count, np.dtype(dtype).name
        if np.dtype(dtype).kind in "ui" and isinstance(nodata, float) and np.isnan(nodata):
            nodata = 255 if self.dtype == "uint8" else None  # NaN cannot be an integer nodata
        self.nodata, self.overwrite = nodata, overwrite
        self.spec = COGSpec(
            path=self.path, scene=scene, count=count, dtype=self.dtype, nodata=nodata, colormap=colormap,
            band_descriptions=list(band_descriptions) if band_descriptions else None,
            tags=dict(tags) if tags else {}, scales=tuple(float(v) for v in scales) if scales else None,
            nbits=nbits, zstd_level=zstd_level)
        self.stream_blocks, self.temp_raw_max_bytes = stream_blocks, temp_raw_max_bytes
        self.write_path: WritePath | None = None        # chosen by open()
        self._writer: StreamedWriter | GDALCopyWriter | None = None
        self._env = bounded_gdal_cache(gdal_cache_mb)
        self._pending: dict[int, np.ndarray] = {}
        self._next_row = 0  # rows [0, _next_row) are handed to the writer
        self.finished = False

    # -- context --------------------------------------------------------------------------------
    def __enter__(self) -> "COGSink":
        """Open the output and cap GDAL's block cache until exit (see ``GDAL_CACHE_MB``)."""
        self._env.__enter__()
        try:
            with writing(self.path):
                self.open()
        except BaseException:
            self._env.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.finalize()
            else:
                self.abort()
        finally:
            self._env.__exit__(None, None, None)

    @property
    def progressive_overviews(self) -> bool:
        """Whether GDAL's COG copy path builds the overviews while streaming: float results on the
        scene's own grid whose sides divide by ``2**levels`` (the streamed path always does)."""
        return progressive_overviews(self.spec)

    @property
    def streams_blocks(self) -> bool:
        """Whether this sink encodes the COG's blocks while streaming (decided by :meth:`open`)."""
        return self.write_path is not None and self.write_path.streamed

    def open(self) -> None:
        """Start the output on the path :func:`write_path_for` chooses."""
        self.write_path = write_path_for(self.spec, self.stream_blocks)
        self._writer = StreamedWriter(self.spec) if self.write_path.streamed else \
            GDALCopyWriter(self.spec, self.temp_raw_max_bytes)
        try:
            self._writer.open()
        except BaseException:
            self.abort()
            raise

    # -- rows -----------------------------------------------------------------------------------
    def write(self, row_off: int, array: np.ndarray) -> None:
        """Take rows ``[row_off, row_off + rows)``; handed on in whole 512-row strips when complete."""
        if self._writer is None:
            self.open()
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[None]
        if array.shape[0] != self.count or array.shape[2] != self.scene.width:
            raise OutputError(self.path, f"rows of shape {array.shape} do not fit "
                                         f"({self.count}, rows, {self.scene.width})")
        self._pending[int(row_off)] = array.astype(self.dtype, copy=False)
        with writing(self.path):
            self._drain(final=False)

    def _drain(self, final: bool) -> None:
        """Hand pending contiguous rows from ``_next_row`` to the writer in block-aligned strips."""
        while True:
            rows, parts = self._next_row, []
            while rows in self._pending and (rows - self._next_row) < BLOCK:
                parts.append(self._pending[rows])
                rows += parts[-1].shape[1]
            have = rows - self._next_row
            if have == 0 or not (have >= BLOCK or final or rows >= self.scene.height):
                return
            take = have if (final or rows >= self.scene.height) else (have // BLOCK) * BLOCK
            pieces, rest = first_rows(parts, take)
            require_space(self.path, sum(p.nbytes for p in pieces))     # what it takes at most, uncompressed
            self._writer.add(pieces, self._next_row, take)
            for start in list(self._pending):
                if self._next_row <= start < rows:
                    del self._pending[start]
            if rest is not None:
                self._pending[self._next_row + take] = rest
            self._next_row += take

    # -- end ------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Hand every row taken so far to the writer and wait for its threads (raises their first
        error); what is left for :meth:`finalize` is finishing the COG."""
        with writing(self.path):
            self._drain(final=True)
            self._writer.join()

    def finalize(self) -> None:
        """Finish the file on its write path and move it onto the target."""
        cog = None
        try:
            with writing(self.path):
                if self._writer is None:
                    self.open()
                self.flush()
                if self._next_row < self.scene.height:
                    raise OutputError(self.path, f"only {self._next_row} of {self.scene.height} rows were written")
                cog = self._writer.finish()
                publish(cog, self.path, self.overwrite)
            cog = None
            self.finished = True
        finally:
            discard(cog)
            self.abort()  # removes what is left of the temporary files

    def abort(self) -> None:
        """Close and delete the temporary files (the target is untouched)."""
        if self._writer is not None:
            self._writer.abort()
        self._writer = None
        self._pending.clear()

