"""The block encoder of the streamed write path (:mod:`dinov3_geo.io.cog.streamed`): a Cloud-Optimised
GeoTIFF whose blocks are encoded while the result streams in.

GDAL's COG driver only copies a finished raster: after the last chip it reads the whole result back
and compresses every block again, which was the largest host cost per chip at GPU speeds. Here each
512 x 512 block is encoded as soon as its rows are final, the way libtiff encodes it for GDAL
(TIFF predictor, then a ZSTD frame), on worker threads that release the GIL, and appended to a
hidden block file per resolution level. Encoded here: float32 results (floating-point predictor),
float32 ones stored as half floats (GeoTIFF NBITS=16, converted as GDAL converts them), and uint16
and uint8 (classes) ones (horizontal differencing). The file's structure comes from GDAL: at the
start its COG driver writes the complete file from an *empty* raster with the result's size, georeferencing and
metadata (``SPARSE_OK``: every tag, every IFD, no block), so GeoTIFF keys, nodata, scales, colour
tables and the ghost header are GDAL's own. At the end the blocks are appended in COG order
(smallest overview first, full resolution last) with GDAL's block leader and trailer, and their
offsets and sizes go into the tile tables that tifffile locates in the skeleton.
"""
from __future__ import annotations

import errno
import os
import shutil
import struct
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import zstandard

BLOCK = 512
ZSTD = 50000            # TIFF compression code of ZSTD
FLOAT_PREDICTOR = 3     # TIFF predictor of floating-point data
HORIZONTAL_PREDICTOR = 2    # TIFF predictor of integers: differences of neighbouring samples
#: The sample types whose blocks are encoded here, with the predictor GDAL gives them in a COG.
PREDICTORS = {np.dtype("float32"): FLOAT_PREDICTOR, np.dtype("float16"): FLOAT_PREDICTOR,
              np.dtype("uint16"): HORIZONTAL_PREDICTOR, np.dtype("uint8"): HORIZONTAL_PREDICTOR}
LEADER = struct.Struct("<I")
#: What GDAL's ghost header must promise for the blocks appended here to match it.
GHOST_PROMISES = ("LAYOUT=IFDS_BEFORE_DATA", "BLOCK_ORDER=ROW_MAJOR", "BLOCK_LEADER=SIZE_AS_UINT4",
                  "BLOCK_TRAILER=LAST_4_BYTES_REPEATED", "KNOWN_INCOMPATIBLE_EDITION=NO")


class SkeletonMismatch(Exception):
    """GDAL's skeleton is not laid out as the streamed blocks need (another GDAL, another option)."""


# -- encoding one block -------------------------------------------------------------------------

def check_encodable(dtype: np.dtype) -> None:
    """ValueError unless blocks of ``dtype`` are encoded here (float32, float16, uint16, uint8)."""
    if np.dtype(dtype).newbyteorder("=") not in PREDICTORS:
        raise ValueError(f"blocks of {np.dtype(dtype)} are left to GDAL")


def predicted_rows(block: np.ndarray) -> np.ndarray:
    """Rows of a pixel-interleaved float32 or float16 block ``[rows, cols, bands]`` (little-endian)
    after the TIFF floating-point predictor, as libtiff applies it before compression: each row's
    words split into byte planes, most significant first, then each byte differenced with the one
    ``bands`` bytes before it (Adobe Photoshop TIFF Technical Note 3). The result is a buffer of
    this thread, valid until its next call."""
    if block.dtype.newbyteorder("=") not in (np.float32, np.float16):
        raise ValueError(f"the floating-point predictor takes float32 or float16, not {block.dtype}")
    rows, cols, bands = block.shape
    size = block.dtype.itemsize
    words = block.view(f"<u{size}").reshape(rows, cols * bands)
    planes = scratch(f"planes{size}", (rows, size, cols * bands), np.uint8)
    shifted = scratch(f"shifted{size}", words.shape, words.dtype.newbyteorder("="))
    for k in range(size):       # each byte plane by a shift and a cast: faster than gathering bytes
        np.right_shift(words, 8 * (size - 1 - k), out=shifted)
        planes[:, k] = shifted
    planes = planes.reshape(rows, size * cols * bands)
    out = scratch(f"predicted{size}", planes.shape, np.uint8)
    out[:, :bands] = planes[:, :bands]
    np.subtract(planes[:, bands:], planes[:, :-bands], out=out[:, bands:])
    return out


def differenced_rows(block: np.ndarray) -> np.ndarray:
    """Rows of a pixel-interleaved uint8 or uint16 block ``[rows, cols, bands]`` (little-endian) after
    the TIFF horizontal predictor, as libtiff applies it: each sample less the one ``bands`` samples
    before it in its row (modulo 2**8 or 2**16). A buffer of this thread, valid until its next call."""
    if block.dtype.newbyteorder("=") not in (np.uint8, np.uint16):
        raise ValueError(f"horizontal differencing is encoded for uint8 and uint16, not {block.dtype}")
    rows, cols, bands = block.shape
    words = block.reshape(rows, cols * bands)
    out = scratch(f"differenced{block.dtype.itemsize}", words.shape, block.dtype.newbyteorder("<"))
    out[:, :bands] = words[:, :bands]
    np.subtract(words[:, bands:], words[:, :-bands], out=out[:, bands:])
    return out


def truncated_half(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` as float16 the way GDAL stores it for NBITS=16 (``CPLFloatToHalf``): the
    mantissa truncated, not rounded (within one float16 step towards zero), 65536 and more as
    infinity, NaN payloads kept where they fit. numpy's ``astype`` rounds instead, which would
    make these files differ from GDAL's; it is exact on values already cut to float16's mantissa,
    which is all of them but subnormal float16, NaN and infinity, redone alone."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    with np.errstate(over="ignore"):           # 65536 and more: infinity, as GDAL makes them
        half = (bits & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float16)
    exponent = bits & np.uint32(0x7F800000)
    odd = np.flatnonzero(((exponent <= np.uint32(112 << 23)) | (exponent == np.uint32(0x7F800000))).reshape(-1))
    if odd.size:
        half.reshape(-1).view(np.uint16)[odd] = _special_halves(bits.reshape(-1)[odd])
    return half


def _special_halves(bits: np.ndarray) -> np.ndarray:
    """float16 bits of float32 ``bits`` outside float16's normal range: subnormal or zero,
    infinity (too large), NaN -- as ``CPLFloatToHalf`` makes them."""
    sign = (bits >> 16) & 0x8000
    exponent = ((bits >> 23) & 0xFF).astype(np.int64)
    mantissa = bits & 0x7FFFFF
    shift = 126 - exponent                  # subnormal: the implicit leading 1 shifted in
    subnormal = np.where(shift >= 32, 0, (mantissa | 0x800000) >> np.clip(shift, 0, 31).astype(np.uint32))
    nan = np.where(mantissa >> 13 != 0, 0x7C00 | (mantissa >> 13), 0x7E00)
    special = np.where(mantissa == 0, 0x7C00, nan)
    half = np.where(exponent == 255, special, np.where(exponent >= 143, 0x7C00, subnormal))
    return (half.astype(np.uint32) | sign).astype(np.uint16)


_per_thread = threading.local()


def scratch(name: str, shape: tuple, dtype) -> np.ndarray:
    """A buffer of this thread kept between calls: fresh large arrays cost page faults (the kernel
    zeroes every page) that are dearer than the work done on them."""
    buf = getattr(_per_thread, name, None)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = np.empty(shape, dtype)
        setattr(_per_thread, name, buf)
    return buf


def encode_block(block: np.ndarray, level: int, stored: np.dtype | None = None) -> bytes:
    """One TIFF block: ``block`` ``[bands, 512, 512]`` (float32, uint16, uint8) pixel-interleaved, through
    its type's predictor, one ZSTD frame; ``stored`` float16: float32 values stored as GDAL stores
    half floats (:func:`truncated_half`)."""
    cctx = getattr(_per_thread, f"zstd{level}", None)
    if cctx is None:        # a compressor is not thread-safe: one per thread and level
        cctx = zstandard.ZstdCompressor(level=level)
        setattr(_per_thread, f"zstd{level}", cctx)
    if stored is not None and np.dtype(stored) == np.float16:
        block = truncated_half(block).astype("<f2", copy=False)
    block = block.astype(block.dtype.newbyteorder("<"), copy=False)
    if block.shape[0] == 1:         # one band: its rows are the pixels, read in place
        pixels = block[0][:, :, None]
    else:
        pixels = np.ascontiguousarray(np.moveaxis(block, 0, -1))
    rows = predicted_rows(pixels) if pixels.dtype.kind == "f" else differenced_rows(pixels)
    return cctx.compress(rows)


# -- blocks of one level ------------------------------------------------------------------------

class BlockFile:
    """A hidden append-only file of one level's encoded blocks in row-major order, each framed as
    GDAL frames blocks in a COG: a leader (its size, uint32) and a trailer (its last 4 bytes)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self.offsets: list[int] = []     # of each block's bytes, from the start of this file
        self.sizes: list[int] = []
        self.nbytes = 0

    def append(self, data: bytes) -> None:
        n = len(data)
        for part in (LEADER.pack(n), data, data[-4:]):     # the block itself unbuffered, not copied
            self._file.write(part)
        self.offsets.append(self.nbytes + LEADER.size)
        self.sizes.append(n)
        self.nbytes += n + 8

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class LevelTiler:
    """Rows of one resolution level in, whole rows of 512 x 512 blocks out: rows are kept until a
    block row is complete (or the level ends), cut into blocks padded with ``fill`` and encoded on
    ``pool``; :meth:`collect` appends the encoded blocks to ``blocks`` in row-major order (so that
    the caller can prepare the next level, or the next strip, while these encode)."""

    def __init__(self, height: int, width: int, dtype: np.dtype, fill, blocks: BlockFile,
                 pool: ThreadPoolExecutor, level: int, stored: np.dtype | None = None):
        self.height, self.width, self.dtype, self.fill = height, width, np.dtype(dtype), fill
        self.blocks, self._pool, self._level = blocks, pool, level
        self.stored = np.dtype(stored or dtype)     # the file's samples (float16 from float32 rows)
        check_encodable(self.stored)
        self._parts: list[np.ndarray] = []
        self._held = 0
        self._jobs: deque[Future] = deque()     # encoding, in block order
        self._recent = 0             # of which submitted since the last collect
        self.rows_done = 0           # rows handed to the encoders

    def add(self, rows: np.ndarray) -> None:
        """Take the next rows ``[bands, n, >= width]`` of this level (columns past ``width`` and rows
        past ``height`` are dropped: the level's size is the floor of its halving)."""
        n = min(rows.shape[1], self.height - self.rows_done - self._held)
        if n <= 0:
            return
        self._parts.append(rows[:, :n, :self.width])
        self._held += n
        while self._held >= BLOCK:
            self._emit(BLOCK)

    def collect(self, all_blocks: bool = True) -> None:
        """Append encoded blocks in order: every one (waiting for them), or (``all_blocks`` False)
        those submitted before the last collect (waiting for them) and the ones done since, so
        that the encoders keep the latest rows' blocks while the caller prepares the next."""
        wait = len(self._jobs) - (0 if all_blocks else self._recent)
        while self._jobs and (wait > 0 or self._jobs[0].done()):
            self.blocks.append(self._jobs.popleft().result())
            wait -= 1
        self._recent = len(self._jobs)

    def finish(self) -> None:
        """Encode the rows left (the last block row, padded) and collect every block."""
        if self._held:
            self._emit(self._held)
        self.collect()
        if self.rows_done != self.height:
            raise RuntimeError(f"level of {self.height} rows got {self.rows_done}")

    def _emit(self, n: int) -> None:
        strip = np.concatenate(self._parts, axis=1) if len(self._parts) > 1 else self._parts[0]
        rest = strip[:, n:]
        self._parts, self._held = ([rest] if rest.shape[1] else []), rest.shape[1]
        strip = strip[:, :n].astype(self.dtype, copy=False)
        jobs = [self._pool.submit(encode_block, self._block(strip, c), self._level, self.stored)
                for c in range(0, self.width, BLOCK)]
        self._jobs.extend(jobs)
        self._recent += len(jobs)
        self.rows_done += n

    def _block(self, strip: np.ndarray, col: int) -> np.ndarray:
        part = strip[:, :, col:col + BLOCK]
        if part.shape[1:] == (BLOCK, BLOCK):
            return part
        block = np.full((strip.shape[0], BLOCK, BLOCK), self.fill, self.dtype)
        block[:, :part.shape[1], :part.shape[2]] = part
        return block


# -- the skeleton and the assembly ---------------------------------------------------------------

@dataclass(frozen=True)
class TileTable:
    """Where one IFD's tile offsets and byte counts lie in the skeleton, and their integer type."""
    blocks: int
    offsets_at: int
    counts_at: int
    offsets_type: str
    counts_type: str


_TYPES = {3: "H", 4: "I", 16: "Q"}       # TIFF SHORT, LONG, LONG8


def skeleton_tables(path: Path, levels: Sequence[tuple[int, int]], bands: int, dtype: np.dtype) -> list[TileTable]:
    """The tile tables of GDAL's empty COG at ``path`` (full resolution first), after checking that
    its layout is the one the streamed blocks are encoded for; :class:`SkeletonMismatch` if not."""
    check_encodable(dtype)
    dtype = np.dtype(dtype)
    with tifffile.TiffFile(path) as tif:
        ghost = _ghost_header(path)
        if tif.byteorder != "<" or not all(p in ghost for p in GHOST_PROMISES):
            raise SkeletonMismatch("ghost header or byte order")
        pages = list(tif.pages)
        if len(pages) != len(levels):
            raise SkeletonMismatch(f"{len(pages)} IFDs for {len(levels)} levels")
        tables = []
        for page, (h, w) in zip(pages, levels):
            expect = dict(shape=(h, w), compression=ZSTD, predictor=PREDICTORS[dtype], tilewidth=BLOCK,
                          tilelength=BLOCK, samplesperpixel=bands, planarconfig=1,
                          bitspersample=dtype.itemsize * 8)
            got = dict(shape=(page.imagelength, page.imagewidth), compression=int(page.compression),
                       predictor=int(page.predictor), tilewidth=page.tilewidth, tilelength=page.tilelength,
                       samplesperpixel=page.samplesperpixel, planarconfig=int(page.planarconfig),
                       bitspersample=page.bitspersample)
            if got != expect:
                raise SkeletonMismatch(f"IFD {got} != {expect}")
            offsets, counts = page.tags["TileOffsets"], page.tags["TileByteCounts"]
            n = -(-h // BLOCK) * -(-w // BLOCK)
            if offsets.count != n or counts.count != n or any(offsets.value) or \
                    offsets.dtype not in _TYPES or counts.dtype not in _TYPES:
                raise SkeletonMismatch("tile tables")
            tables.append(TileTable(n, offsets.valueoffset, counts.valueoffset,
                                    _TYPES[offsets.dtype], _TYPES[counts.dtype]))
    return tables


def _ghost_header(path: Path) -> str:
    with open(path, "rb") as f:
        return f.read(400).decode("latin-1")


def assemble(skeleton: Path, tables: Sequence[TileTable], levels: Sequence[BlockFile]) -> None:
    """Append every level's blocks to ``skeleton`` (smallest overview first, full resolution last,
    as GDAL orders a COG) and write their offsets and sizes into its tile tables."""
    if [t.blocks for t in tables] != [len(b.sizes) for b in levels]:
        raise SkeletonMismatch("block counts")
    with open(skeleton, "r+b") as out:
        out.seek(0, os.SEEK_END)
        starts = {}
        for i in reversed(range(len(levels))):
            levels[i].close()
            starts[i] = out.tell()
            with open(levels[i].path, "rb") as src:
                _copy(src, out, levels[i].nbytes)
        for i, (table, blocks) in enumerate(zip(tables, levels)):
            offsets = [starts[i] + o for o in blocks.offsets]
            _write_table(out, table.offsets_at, table.offsets_type, offsets)
            _write_table(out, table.counts_at, table.counts_type, blocks.sizes)


def _copy(src, out, nbytes: int) -> None:
    """Append ``nbytes`` of ``src`` to ``out`` in the kernel where it can (``copy_file_range``)."""
    out.flush()
    try:
        while nbytes:
            done = os.copy_file_range(src.fileno(), out.fileno(), nbytes)
            if done == 0:
                raise OSError("copy_file_range copied nothing")
            nbytes -= done
        out.seek(0, os.SEEK_END)
    except (AttributeError, OSError) as exc:      # no such call here, or not across these files
        if getattr(exc, "errno", None) == errno.ENOSPC:
            raise
        shutil.copyfileobj(src, out, 16 << 20)


def _write_table(out, at: int, kind: str, values: Sequence[int]) -> None:
    """Write ``values`` as the TIFF integer array ``kind`` (H, I, Q) at byte ``at``."""
    if values and max(values) >= 1 << (8 * struct.calcsize(kind)):
        raise SkeletonMismatch(f"value {max(values)} does not fit the tile table")
    out.seek(at)
    out.write(np.asarray(values, dtype={"H": "<u2", "I": "<u4", "Q": "<u8"}[kind]).tobytes())
