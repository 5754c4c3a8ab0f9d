"""Streaming writer of results as a Cloud-Optimised GeoTIFF on the input grid, written atomically.

Rows arrive with ``write(row_off, array)`` and are gathered into whole 512-row strips. Two ways on:

* **blocks encoded while streaming** (results of up to ``STREAM_MAX_BANDS`` bands on the scene's
  own grid: float32, half floats, uint16 with a nodata number, classes): each strip and its
  overview levels are cut into 512 blocks, encoded on worker threads and appended to hidden block
  files; GDAL's COG of the empty result, made on its own thread meanwhile, gets the blocks
  appended at the end (:mod:`dinov3_geo.io.cog`). After the last row only bytes are copied.
  Overviews are exact 2x2 means of the pixels they cover (nodata ignored; integers rounded half
  up) or, for classes, the top-left pixel of each cell: GDAL's AVERAGE and NEAREST where the
  sides halve evenly;
* **GDAL's COG copy** (resampled scenes, many bands, other types): the strips
  go into a hidden temporary tiled GeoTIFF beside the target (uncompressed when it fits comfortably
  on disk, ``TEMP_RAW_MAX_BYTES``); float results on the scene's own grid whose sides halve evenly
  get their overviews while streaming (one small GeoTIFF per level, read through a VRT with
  ``OVERVIEWS=FORCE_USE_EXISTING``); on a clean exit the file is, if the scene was resampled,
  warped back onto the exact input grid and converted by GDAL's COG driver.

Both end with ZSTD level ``COG_ZSTD_LEVEL`` (1) and the TIFF predictor, 512 blocks, and a move onto
the target with ``os.replace``. On any exception (also ``KeyboardInterrupt``) every temporary file
is removed and the target is left as it was.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import shutil
import tempfile
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import tifffile
from affine import Affine
from pyogrio.errors import DataLayerError, DataSourceError
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from dinov3_geo.errors import DinoGeoError, OutputError, short_message
from dinov3_geo.hostmem import usable_cores
from dinov3_geo.io import cog as blocks
from dinov3_geo.io.georef import georeference_profile

BLOCK = blocks.BLOCK        # 512: the COG's block size, either way it is written


def check_output(path, overwrite: bool, inputs: Sequence = ()) -> Path:
    """Fail early with :class:`OutputError` if ``path`` cannot be written: folder missing or not
    writable, target exists (and not ``overwrite``), target is a folder or one of ``inputs``."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(path, f"folder {folder} does not exist")
    _probe_writable(path, folder)
    if path.is_dir() and not _is_zarr_store(path):
        raise OutputError(path, "is a folder")
    for src in inputs:
        src = getattr(src, "path", src)       # an open scene reader stands for its file
        if src is not None and os.path.exists(src) and os.path.realpath(src) == os.path.realpath(path):
            raise OutputError(path, "is the input file; choose another output")
    if path.exists() and not overwrite:
        raise OutputError(path, "exists (use `overwrite` to replace it)")
    return path


def _is_zarr_store(path: Path) -> bool:
    """A folder that is a Zarr store (v2 or v3): a feature map the same command may replace."""
    return path.suffix.lower() == ".zarr" and any((path / name).is_file() for name in (".zgroup", ".zattrs", "zarr.json"))


def _probe_writable(path: Path, folder: Path) -> None:
    """OutputError unless a file can be created in ``folder``: read-only folders and file systems,
    also for root, whom ``os.access`` does not stop."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=folder)
    except OSError as exc:
        raise OutputError(path, f"folder {folder} is not writable ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def temp_path(target: Path, tag: str = "partial", suffix: str | None = None) -> Path:
    """A new hidden file name beside ``target``: ``.NAME.<tag>-XXXX<suffix>`` (created empty)."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{tag}-", suffix=suffix or target.suffix or ".tmp",
                                dir=target.parent)
    os.close(fd)
    return Path(name)


def _remove(path: Path | None) -> None:
    """Delete ``path`` and GDAL side files (``.aux.xml``, ``.ovr``) if present."""
    if path is None:
        return
    for p in (path, Path(f"{path}.aux.xml"), Path(f"{path}.ovr")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _umask() -> int:
    """The process umask, read without changing it where the OS tells it (Linux), else set and reset."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished temporary file ``tmp`` onto ``target`` atomically, with the permissions a
    new file gets (``0666`` less the umask; ``mkstemp`` made it ``0600``)."""
    if target.exists() and not overwrite:
        raise OutputError(target, "appeared while writing (use `overwrite` to replace it)")
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, target)


#: Free bytes below which a failed write is reported as a full disk.
DISK_FULL_BYTES = 8 << 20


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC, GDAL's words for it, or (GDAL often reports
    only a later symptom) almost no free space left in ``folder``."""
    if getattr(exc, "errno", None) == errno.ENOSPC or "no space left" in str(exc).lower() \
            or "free disk space" in str(exc).lower():
        return True
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_BYTES
    except OSError:
        return False


def _folder(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


def _no_space(target: Path) -> OutputError:
    folder = _folder(Path(target))
    free = shutil.disk_usage(folder).free
    return OutputError(target, f"no space left on the disk of {folder.resolve()} ({free / 1e6:.1f} MB free): "
                               "free some space or choose another folder")


def require_space(target: Path, nbytes: int) -> None:
    """:class:`OutputError` (disk full) unless ``target``'s folder has ``nbytes`` free: checked
    before GDAL writes, since GDAL and libtiff print their own lines when a write hits a full disk."""
    with contextlib.suppress(OSError):
        if shutil.disk_usage(_folder(Path(target))).free < nbytes:
            raise _no_space(target)


@contextlib.contextmanager
def writing(target: Path) -> Iterator[None]:
    """Turn a failed write (GDAL, OGR or OS error) of an output into one :class:`OutputError`
    naming ``target``: 'no space left' with the folder and its free space when the disk is full."""
    try:
        yield
    except (DinoGeoError, KeyboardInterrupt):
        raise
    except (RasterioError, OSError, DataSourceError, DataLayerError) as exc:
        if _disk_full(exc, _folder(Path(target))):
            raise _no_space(target) from None
        raise OutputError(target, f"cannot be written ({short_message(exc)})") from None


@contextlib.contextmanager
def atomic_output(path, overwrite: bool = False, inputs: Sequence = (), tag: str = "partial") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path`` atomically, on any
    exception delete it. Checks as :func:`check_output` first."""
    target = check_output(path, overwrite, inputs)
    tmp = temp_path(target, tag)
    try:
        with writing(target):
            yield tmp
        publish(tmp, target, overwrite)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def outputs_together(raster, vector, overwrite: bool) -> Iterator[tuple[Path, Path | None]]:
    """Paths to write a raster and the vector made from it: with no vector, the raster itself;
    with one, hidden temporary paths beside both, moved onto them only when the whole block has
    succeeded, so that a failed or interrupted vector step leaves any earlier outputs as they were.
    Errors naming a temporary path name its target instead."""
    raster = Path(raster)
    if vector is None:
        yield raster, None
        return
    targets = [raster, Path(vector)]
    staged = [temp_path(t, "staged") for t in targets]
    try:
        yield staged[0], staged[1]
        for tmp, target in zip(staged, targets):
            publish(tmp, target, overwrite)
    except DinoGeoError as exc:
        exc.where = next((str(t) for s, t in zip(staged, targets) if exc.where == str(s)), exc.where)
        raise
    finally:
        for tmp in staged:
            _remove(tmp)


#: GDAL block cache (MB) while streaming. GDAL's default (5 % of RAM) fills with dirty blocks of the
#: output and blocks of the input and makes memory grow with the scene; a set GDAL_CACHEMAX wins.
GDAL_CACHE_MB = 256


def bounded_gdal_cache(mb: int | None = GDAL_CACHE_MB) -> contextlib.AbstractContextManager:
    """A ``rasterio.Env`` capping GDAL's block cache at ``mb`` MB, unless the user set
    ``GDAL_CACHEMAX`` (or ``mb`` is None)."""
    if mb is None or "GDAL_CACHEMAX" in os.environ:
        return contextlib.nullcontext()
    return rasterio.Env(GDAL_CACHEMAX=int(mb))


#: ZSTD level of the final COG. GDAL's COG default is 9; measured on a 10816 x 10816 float32 scene
#: (predictor 3, with overviews): level 1 is 292.6 MB in 1.8 CPU s, level 3 285.4 MB in 2.9 s, level
#: 9 279.6 MB in 7-8 s. Level 1 keeps the tail after the last chip short for 4.6 % more bytes; pass
#: ``zstd_level=9`` (or up to 22) to ``COGSink`` for archives.
COG_ZSTD_LEVEL = 1

#: Largest temporary file (bytes, padded to whole 512 blocks) written uncompressed; larger ones, or
#: when the folder has less than ``TEMP_FREE_FACTOR`` times that free, use ZSTD level 1.
TEMP_RAW_MAX_BYTES = 4 << 30
TEMP_FREE_FACTOR = 3


def _cog_options(dtype: str, level: int | None = COG_ZSTD_LEVEL) -> dict:
    """GDAL COG driver creation options (ZSTD at ``level`` when this GDAL has it, else DEFLATE).

    The predictor (3 for float: -19 % size for +0.9 CPU s on a 10816 x 10816 float32 scene) applies
    to the overviews too."""
    zstd = _zstd_works()
    opts = {
        "compress": "ZSTD" if zstd else "DEFLATE",
        "predictor": "3" if dtype.startswith("float") else "2",
        "blocksize": BLOCK,
        "overviews": "AUTO",
        "overview_resampling": overview_resampling(dtype),
        "bigtiff": "IF_SAFER",
        "num_threads": "ALL_CPUS",
    }
    if zstd and level is not None:
        opts["level"] = int(level)
    return opts


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


def _scaled(t: Affine, f: int) -> Affine:
    """``t`` with pixels ``f`` times larger (an overview level's grid)."""
    return Affine(t.a * f, t.b * f, t.c, t.d * f, t.e * f, t.f)


def _temp_raw_ok(folder: Path, height: int, width: int, count: int, itemsize: int) -> bool:
    """Whether an uncompressed temporary file (plus its overviews) fits comfortably on disk."""
    raw = math.ceil(height / BLOCK) * math.ceil(width / BLOCK) * BLOCK * BLOCK * count * itemsize
    if raw > TEMP_RAW_MAX_BYTES:
        return False
    try:
        return shutil.disk_usage(folder).free > TEMP_FREE_FACTOR * raw
    except OSError:
        return False


def _temp_compression() -> dict:
    """Fast compression for the intermediate file (ZSTD level 1 costs a quarter of DEFLATE's CPU);
    GDAL compresses its blocks on worker threads (``num_threads``), off the writer thread."""
    return {"compress": "ZSTD", "zstd_level": 1} if _zstd_works() else {"compress": "DEFLATE", "zlevel": 1}


@functools.cache
def _zstd_works() -> bool:
    """Whether this GDAL writes ZSTD-compressed GeoTIFFs (tried once, in memory)."""
    try:
        with warnings.catch_warnings(), rasterio.io.MemoryFile() as mem:
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with mem.open(driver="GTiff", width=16, height=16, count=1, dtype="uint8",
                          compress="ZSTD") as ds:
                ds.write(np.zeros((1, 16, 16), np.uint8))
        return True
    except RasterioError:
        return False


#: Most bands whose blocks are encoded while streaming: a pixel-interleaved block of ``b`` float32
#: bands takes ``b`` MB, three times per encoder thread; feature maps of hundreds of bands go
#: through GDAL's COG copy (which holds one block at a time in its cache).
STREAM_MAX_BANDS = 16


def _needs_bigtiff(levels: Sequence[tuple[int, int]], count: int, dtype: str) -> bool:
    """Whether a COG of these levels could pass 4 GB even with incompressible blocks."""
    raw = sum(h * w for h, w in levels) * count * np.dtype(dtype).itemsize
    return raw * 1.01 + (64 << 20) >= 1 << 32


def _create_gtiff(path: Path, profile: dict, **options):
    """A new GeoTIFF at ``path``, open for writing: ``profile`` (width, height, count, dtype, nodata,
    and crs and transform or ``gcps``) and GDAL creation ``options``. Ground control points are set
    after creation, so the file is not reported as not georeferenced meanwhile."""
    profile = dict(profile)
    gcps = profile.pop("gcps", None)
    with warnings.catch_warnings():
        if gcps is not None:
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        ds = rasterio.open(path, "w", driver="GTiff", **profile, **options)
    if gcps is not None:          # georeferenced by ground control points: keep them as they are
        ds.gcps = gcps
    return ds


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
        with _create_gtiff(carrier, {**profile, "height": levels[0][0], "width": levels[0][1]}, tiled=True,
                           blockxsize=BLOCK, blockysize=BLOCK, sparse_ok=True) as ds:
            describe(ds)
        rasterio.shutil.copy(carrier, vrts[0], driver="VRT")
        _empty_levels(vrts, levels)
        opts = {**_cog_options(profile["dtype"], zstd_level), "overviews": "FORCE_USE_EXISTING",
                "sparse_ok": True, "bigtiff": "YES" if bigtiff else "NO"}
        rasterio.shutil.copy(vrts[0], path, driver="COG", **opts)
        if nbits:
            _set_bits_per_sample(path, nbits)
    finally:
        for p in (carrier, *vrts):
            _remove(p)


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


@functools.cache
def _layout_fits(count: int, dtype: str, bigtiff: bool, zstd_level: int) -> bool:
    """Whether this GDAL lays out a COG of ``count`` bands of ``dtype`` as the streamed blocks need:
    tried once per process on a small empty raster in the temporary folder."""
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
        blocks.skeleton_tables(probe, levels, count, np.dtype(dtype))
        return True
    except (blocks.SkeletonMismatch, RasterioError, OSError):
        return False


def _first_rows(parts: list[np.ndarray], take: int) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The first ``take`` rows of consecutive row blocks ``parts`` (``[bands, rows, width]``) as
    views, and the rows after them in the last block (None when none are left)."""
    pieces, rest, left = [], None, take
    for part in parts:
        n = part.shape[1]
        if left == 0:
            raise ValueError(f"{take} rows asked of row blocks of {sum(p.shape[1] for p in parts)}")
        if n > left:
            pieces.append(part[:, :left])
            rest = part[:, left:]
            break
        pieces.append(part)
        left -= n
    return pieces, rest


def _joined(pieces: list[np.ndarray]) -> np.ndarray:
    """Row blocks as one array (the block itself when there is one)."""
    return np.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]


class _StripWorker:
    """One thread that runs jobs in order (writes to one GDAL dataset, which must not be shared
    between threads), with at most ``depth`` jobs waiting so that memory stays flat. A job's error
    is raised by the next ``submit`` or by ``join``."""

    def __init__(self, name: str, depth: int = 2):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._jobs: list[Future] = []
        self._depth = depth

    def submit(self, fn, *args, **kwargs) -> None:
        while len(self._jobs) >= self._depth:   # back-pressure; raises a failed job's error
            self._jobs.pop(0).result()
        self._jobs.append(self._pool.submit(fn, *args, **kwargs))

    def join(self) -> None:
        """Wait for every job; raise the first error."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.result()

    def shutdown(self) -> None:
        """Drop waiting jobs and wait for the running one (used when aborting)."""
        self._jobs = []
        self._pool.shutdown(wait=True, cancel_futures=True)


class COGSink:
    """Write result rows into a COG at ``path`` matching ``scene.input_profile`` exactly.

    ``count`` bands of ``dtype`` (``"float32"`` with ``nodata=nan``, or ``"uint8"`` with nodata 255 --
    the default for uint8 -- and a ``colormap`` ``{value: (r, g, b[, a])}``). Use as a context manager; ``write(row_off,
    array)`` takes ``[count, rows, width]`` on the scene's working grid, rows in any order (the sink
    keeps the arrays it is given: do not modify them afterwards). All
    checks (folder, overwrite, input file) happen in ``__init__``, before any model work. Inside the
    ``with`` block GDAL's block cache is capped at ``gdal_cache_mb`` (process-wide, so it also bounds
    the reader threads' cache) so memory stays flat on large scenes. ``zstd_level`` is the final
    file's ZSTD level (see ``COG_ZSTD_LEVEL``). With ``stream_blocks`` (the default) a result on the
    scene's own grid that :meth:`_can_stream_blocks` accepts is encoded block by block while it
    streams (:mod:`dinov3_geo.io.cog`), so nothing but appending bytes is left after the last row;
    other results, or ``stream_blocks=False``, go through GDAL's COG copy of a temporary GeoTIFF.
    """

    def __init__(self, path, scene, count: int = 1, dtype: str = "float32", nodata: float = float("nan"),
                 colormap: dict | None = None, overwrite: bool = False,
                 band_descriptions: Sequence[str] | None = None, tags: dict | None = None,
                 scales: Sequence[float] | None = None, nbits: int | None = None, *,
                 gdal_cache_mb: int | None = GDAL_CACHE_MB, zstd_level: int = COG_ZSTD_LEVEL,
                 stream_blocks: bool = True):
        self.path = check_output(path, overwrite, inputs=[getattr(scene, "path", None)])
        self.scene, self.count, self.dtype = scene, count, np.dtype(dtype).name
        if np.dtype(dtype).kind in "ui" and isinstance(nodata, float) and np.isnan(nodata):
            nodata = 255 if self.dtype == "uint8" else None  # NaN cannot be an integer nodata
        self.nodata, self.colormap, self.overwrite = nodata, colormap, overwrite
        self.band_descriptions = list(band_descriptions) if band_descriptions else None
        self.tags = dict(tags) if tags else {}
        self.scales = tuple(float(v) for v in scales) if scales else None
        self.nbits = nbits          # 16 with float32: half floats in the final file (GeoTIFF NBITS)
        self.zstd_level = zstd_level
        self._tmp: Path | None = None
        self._ds = None
        self._env = bounded_gdal_cache(gdal_cache_mb)
        self._pending: dict[int, np.ndarray] = {}
        self._next_row = 0  # rows [0, _next_row) are in the file
        # overviews built while streaming (float on the scene's own grid): one temp file per level
        self._ovr_paths: list[Path] = []
        self._ovr_ds: list = []
        self._ovr_worker: _StripWorker | None = None
        # full-resolution strips go to GDAL on their own thread, off the caller's (the engine's
        # writer thread, which stitches the next rows meanwhile)
        self._strip_worker: _StripWorker | None = None
        # blocks encoded while streaming: GDAL's empty COG, one block file and tiler per level
        self.stream_blocks = stream_blocks
        self._skeleton: Path | None = None
        self._block_files: list[blocks.BlockFile] = []
        self._tilers: list[blocks.LevelTiler] = []
        self._encoders: ThreadPoolExecutor | None = None
        self._skeleton_job: ThreadPoolExecutor | None = None
        self._skeleton_made: Future | None = None
        self.finished = False

    # -- context --------------------------------------------------------------------------------
    def __enter__(self) -> "COGSink":
        """Open the temporary file and cap GDAL's block cache until exit (see ``GDAL_CACHE_MB``)."""
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
        """Whether overviews are built while streaming: float results on the scene's own grid whose
        sides divide by ``2**levels`` (then every level is an exact 2x2 mean of the one above, as in
        GDAL; other sizes give GDAL fractional source windows, left to GDAL)."""
        h, w = self.scene.height, self.scene.width
        n = overview_count(h, w)
        return (self.dtype.startswith("float") and not getattr(self.scene, "resampled", False)
                and n > 0 and h % 2 ** n == 0 and w % 2 ** n == 0)

    @property
    def streams_blocks(self) -> bool:
        """Whether this sink encodes the COG's blocks while streaming (decided by :meth:`open`)."""
        return self._skeleton is not None

    @property
    def _stored_dtype(self) -> str:
        """The type of the file's samples: float16 for float32 rows with ``nbits=16``."""
        return "float16" if self.dtype == "float32" and self.nbits == 16 else self.dtype

    def _can_stream_blocks(self) -> bool:
        """float32 results (stored as float32, or as float16 with ``nbits=16``), uint16 ones with a
        nodata number and uint8 ones (classes), of up to ``STREAM_MAX_BANDS`` bands on the scene's
        own grid, whose overview levels come from 512-row strips (up to 9 levels: scenes below
        262144 px a side), with ZSTD in GDAL."""
        h, w = self.scene.height, self.scene.width
        floats = self.dtype == "float32" and self.nbits in (None, 16)
        uint16 = self.dtype == "uint16" and self.nodata is not None and np.isfinite(self.nodata)
        return (self.stream_blocks and (floats or uint16 or self.dtype == "uint8")
                and self.count <= STREAM_MAX_BANDS and not getattr(self.scene, "resampled", False)
                and overview_count(h, w) <= 9 and _zstd_works())

    def open(self) -> None:
        """Start the output: GDAL's empty COG and the block files when the blocks can be encoded
        while streaming, else the temporary tiled GeoTIFF on the working grid (and overview files)."""
        if self._can_stream_blocks():
            try:
                return self._open_streamed()
            except blocks.SkeletonMismatch:     # this GDAL lays COGs out otherwise: its COG copy
                self.abort()
            except BaseException:
                self.abort()
                raise
        self._open_partial()

    def _open_partial(self) -> None:
        h, w = self.scene.height, self.scene.width
        raw = _temp_raw_ok(self.path.parent, h, w, self.count, np.dtype(self.dtype).itemsize)
        comp = {} if raw else _temp_compression()
        _zstd_works()               # probe GDAL now, not in the COG conversion after the last chip
        self._tmp = temp_path(self.path)
        try:
            self._ds = _create_gtiff(self._tmp, {**self._georeferenced_profile(), "height": h, "width": w},
                                     tiled=True, blockxsize=BLOCK, blockysize=BLOCK, bigtiff="IF_SAFER",
                                     num_threads="ALL_CPUS", **comp)
            self._strip_worker = _StripWorker("cog-strips")
            if self.progressive_overviews:
                for k, (h, w) in enumerate(self._levels()[1:], 1):
                    self._ovr_paths.append(temp_path(self.path, "ovr"))
                    self._ovr_ds.append(rasterio.open(
                        self._ovr_paths[-1], "w", driver="GTiff", width=w, height=h, count=self.count,
                        dtype=self.dtype, nodata=self.nodata, tiled=True, blockxsize=BLOCK,
                        blockysize=BLOCK, bigtiff="IF_SAFER", **comp,
                        **georeference_profile(self.scene.crs, _scaled(self.scene.transform, 2 ** k))))
                self._ovr_worker = _StripWorker("cog-overviews")
        except BaseException:
            self.abort()
            raise

    # -- rows -----------------------------------------------------------------------------------
    def _open_streamed(self) -> None:
        """One block file and tiler per level, the encoders and the strip thread; GDAL's empty COG
        of the result is made meanwhile on its own thread (GDAL releases the GIL; it reads the whole
        empty raster to find no block, 1-2 ns per pixel), once this GDAL's layout is known to fit."""
        levels = self._levels()
        bigtiff = _needs_bigtiff(levels, self.count, self._stored_dtype)
        if not _layout_fits(self.count, self._stored_dtype, bigtiff, self.zstd_level):
            raise blocks.SkeletonMismatch("this GDAL lays out COGs otherwise")
        self._skeleton = temp_path(self.path, "cog")
        self._skeleton_job = ThreadPoolExecutor(1, thread_name_prefix="cog-skeleton")
        self._skeleton_made = self._skeleton_job.submit(
            empty_cog, self._skeleton, levels, self._georeferenced_profile(), self._describe,
            self.zstd_level, bigtiff, self.path, self.nbits)
        self._encoders = ThreadPoolExecutor(max(2, usable_cores()), thread_name_prefix="cog-encode")
        fill = self.nodata if self.nodata is not None and np.isfinite(self.nodata) else \
            (np.nan if np.dtype(self.dtype).kind == "f" else 0)
        for k, (h, w) in enumerate(levels):
            self._block_files.append(blocks.BlockFile(temp_path(self.path, f"partial{k}", ".bin")))
            self._tilers.append(blocks.LevelTiler(h, w, self.dtype, fill, self._block_files[-1],
                                                  self._encoders, self.zstd_level, self._stored_dtype))
        self._strip_worker = _StripWorker("cog-strips")

    def _levels(self) -> list[tuple[int, int]]:
        """(height, width) of the full resolution and of each overview (GDAL's halving, floored)."""
        h, w = self.scene.height, self.scene.width
        levels = [(h, w)]
        for _ in range(overview_count(h, w)):
            h, w = h // 2, w // 2
            levels.append((h, w))
        return levels

    def _georeferenced_profile(self) -> dict:
        """Bands, type, nodata and georeferencing of the result: the scene's GCPs (unless it was
        resampled onto a working grid), else its CRS and transform (none when it has none)."""
        gcps = None if getattr(self.scene, "resampled", False) else getattr(self.scene, "gcps", None)
        georef = georeference_profile(self.scene.crs, self.scene.transform) if gcps is None else dict(gcps=gcps)
        return dict(count=self.count, dtype=self.dtype, nodata=self.nodata, **georef)

    def write(self, row_off: int, array: np.ndarray) -> None:
        """Take rows ``[row_off, row_off + rows)``; written in whole 512-row strips when complete."""
        if self._strip_worker is None:
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
        """Write pending contiguous rows from ``_next_row`` in block-aligned strips."""
        while True:
            rows, parts = self._next_row, []
            while rows in self._pending and (rows - self._next_row) < BLOCK:
                parts.append(self._pending[rows])
                rows += parts[-1].shape[1]
            have = rows - self._next_row
            if have == 0 or not (have >= BLOCK or final or rows >= self.scene.height):
                return
            take = have if (final or rows >= self.scene.height) else (have // BLOCK) * BLOCK
            pieces, rest = _first_rows(parts, take)
            require_space(self.path, sum(p.nbytes for p in pieces))     # what it takes at most, uncompressed
            if self._skeleton is not None:      # joined on the strip thread, not the caller's
                self._strip_worker.submit(self._encode_strip, pieces)
            else:
                strip = _joined(pieces)
                self._strip_worker.submit(self._write_strip, strip, Window(0, self._next_row, self.scene.width, take))
                if self._ovr_worker is not None:
                    # strips arrive in order and are whole 512-row blocks except the last, so each
                    # level gets whole 2x2 cells
                    self._ovr_worker.submit(self._write_overviews, self._next_row, strip)
            for start in list(self._pending):
                if self._next_row <= start < rows:
                    del self._pending[start]
            if rest is not None:
                self._pending[self._next_row + take] = rest
            self._next_row += take

    def _encode_strip(self, pieces: list[np.ndarray]) -> None:
        """Full-resolution rows (``pieces`` of one strip, joined here) and their 2x2 means, level by
        level, into the block encoders (on the strip thread; strips arrive in order, whole 512-row
        blocks but the last)."""
        strip = _joined(pieces)
        self._tilers[0].add(strip)
        nearest = overview_resampling(self.dtype) == "NEAREST"
        below = self._level_picks(strip) if nearest else self._level_means(strip)
        for tiler, level in zip(self._tilers[1:], below):   # while the level above encodes
            tiler.add(level)
        for tiler in self._tilers:      # the last strip's blocks; this one's encode meanwhile
            tiler.collect(all_blocks=False)

    @staticmethod
    def _level_picks(strip: np.ndarray) -> Iterator[np.ndarray]:
        """The strip's levels by GDAL's NEAREST (classes): the top-left pixel of each 2x2 cell, each
        level from the one above (whole 512-row strips keep the cells aligned with the scene's)."""
        while True:
            strip = strip[..., ::2, ::2]
            yield strip

    def _level_means(self, strip: np.ndarray) -> Iterator[np.ndarray]:
        """The strip's 2x2 means, level after level, nodata ignored as GDAL's AVERAGE ignores it:
        nodata where no pixel under a cell is valid (NaN, or the sink's nodata number). Integer
        results are rounded half up at every level, and each level is the mean of the one above as
        stored, as GDAL computes them."""
        numeric = self.nodata is not None and not np.isnan(self.nodata)
        integer = np.dtype(self.dtype).kind in "iu"
        means = np.where(strip == self.nodata, np.float32(np.nan), strip) if numeric else strip
        while True:
            means = average_down(means)
            if integer:
                np.floor(means + np.float32(0.5), out=means)
            yield np.where(np.isnan(means), np.float32(self.nodata), means) if numeric else means

    def _write_strip(self, strip: np.ndarray, window: Window) -> None:
        """Full-resolution rows into the partial file (on the strip worker's thread)."""
        self._ds.write(strip, window=window)

    def _write_overviews(self, row_off: int, strip: np.ndarray) -> None:
        for ds, means in zip(self._ovr_ds, self._level_means(strip)):
            row_off //= 2
            ds.write(means.astype(self.dtype, copy=False), window=Window(0, row_off, ds.width, means.shape[1]))

    def _finish_overviews(self) -> None:
        """Wait for the overview worker and close the level files (raises the worker's error)."""
        if self._ovr_worker is not None:
            self._ovr_worker.join()
        for ds in self._ovr_ds:
            ds.close()

    # -- end ------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every row taken so far into the temporary file and wait for the writer threads
        (raises their first error); what is left for :meth:`finalize` is the COG conversion."""
        with writing(self.path):
            self._drain(final=True)
            self._strip_worker.join()
            if self._ovr_worker is not None:
                self._ovr_worker.join()

    def finalize(self) -> None:
        """Finish the file: resample back if needed, convert to COG, move onto the target."""
        cog = None
        try:
            with writing(self.path):
                if self._strip_worker is None:
                    self.open()
                self.flush()
                if self._next_row < self.scene.height:
                    raise OutputError(self.path, f"only {self._next_row} of {self.scene.height} rows were written")
                if self._skeleton is not None:
                    return self._finish_streamed()
                self._describe(self._ds)
                self._ds.close()
                self._finish_overviews()
                require_space(self.path, os.path.getsize(self._tmp) // 4)    # the least the COG takes
                cog = temp_path(self.path, "cog")
                self._to_cog(cog)
                publish(cog, self.path, self.overwrite)
            cog = None
            self.finished = True
        except BaseException:
            _remove(cog)
            self.abort()
            raise
        self.abort()  # removes the partial file

    def _finish_streamed(self) -> None:
        """Encode the last block rows, append every level's blocks to GDAL's empty COG and move it
        onto the target."""
        for tiler in self._tilers:
            tiler.finish()
        require_space(self.path, sum(f.nbytes for f in self._block_files))
        self._skeleton_made.result()
        try:
            tables = blocks.skeleton_tables(self._skeleton, self._levels(), self.count,
                                            np.dtype(self._stored_dtype))
            blocks.assemble(self._skeleton, tables, self._block_files)
        except blocks.SkeletonMismatch as exc:
            raise OutputError(self.path, f"blocks do not fit GDAL's COG layout ({exc})") from None
        if self.colormap or self.band_descriptions:
            self._check_metadata(self._skeleton)
        publish(self._skeleton, self.path, self.overwrite)
        self._skeleton = None
        self.finished = True
        self.abort()        # removes the block files

    def _to_cog(self, cog: Path) -> None:
        """GDAL COG copy of the partial file (warped back onto the input grid when resampled)."""
        opts = _cog_options(self.dtype, self.zstd_level)
        if self.nbits:
            opts["nbits"] = int(self.nbits)
        if self._ovr_paths:
            vrt = temp_path(self.path, "vrt", suffix=".vrt")
            try:
                self._overview_vrt(vrt)
                rasterio.shutil.copy(vrt, cog, driver="COG", **{**opts, "overviews": "FORCE_USE_EXISTING"})
            finally:
                _remove(vrt)
        elif getattr(self.scene, "resampled", False):
            back = temp_path(self.path, "back")
            try:
                self._back_on_input_grid(back)
                rasterio.shutil.copy(back, cog, driver="COG", **opts)
            finally:
                _remove(back)
        else:
            rasterio.shutil.copy(self._tmp, cog, driver="COG", **opts)
        if self.colormap or self.band_descriptions:
            self._check_metadata(cog)

    def _back_on_input_grid(self, path: Path) -> None:
        """The working-grid result resampled onto the exact input grid, strip by strip, into the
        GeoTIFF ``path``: bilinear (nearest for classes), nearest where bilinear has no valid source
        pixel, and nodata exactly where the input is invalid (``scene.input_valid``)."""
        grid = self.scene.input_profile
        kw = dict(crs=grid["crs"], transform=grid["transform"], width=grid["width"], height=grid["height"],
                  src_nodata=self.nodata, nodata=self.nodata)
        smooth = Resampling.nearest if self.dtype == "uint8" else Resampling.bilinear
        input_valid = getattr(self.scene, "input_valid", None)
        with rasterio.open(self._tmp) as src, WarpedVRT(src, resampling=smooth, **kw) as values, \
                WarpedVRT(src, resampling=Resampling.nearest, **kw) as nearest, \
                rasterio.open(path, "w", driver="GTiff", count=self.count, dtype=self.dtype, tiled=True,
                              blockxsize=BLOCK, blockysize=BLOCK, bigtiff="IF_SAFER",
                              **{k: v for k, v in kw.items() if k != "src_nodata"}) as dst:
            for row in range(0, grid["height"], BLOCK):
                window = Window(0, row, grid["width"], min(BLOCK, grid["height"] - row))
                out = values.read(window=window)
                gaps = values.read_masks(window=window) == 0
                out[gaps] = nearest.read(window=window)[gaps]
                if input_valid is not None:
                    out[:, ~input_valid(window)] = self.nodata
                dst.write(out, window=window)
            self._describe(dst)

    def _describe(self, ds) -> None:
        """Colour table, tags, band scales and descriptions onto the open dataset ``ds``."""
        if self.colormap:
            ds.write_colormap(1, self.colormap)
        if self.tags:
            ds.update_tags(**self.tags)
        if self.scales:
            ds.scales = self.scales
            ds.offsets = (0.0,) * len(self.scales)
        for i, d in enumerate(self.band_descriptions or [], 1):
            ds.set_band_description(i, d)

    def _overview_vrt(self, vrt: Path) -> None:
        """A VRT of the partial file (all its metadata) whose bands list the streamed overview
        files as explicit ``<Overview>`` levels."""
        rasterio.shutil.copy(self._tmp, vrt, driver="VRT")
        tree = ET.parse(vrt)
        for band in tree.getroot().iter("VRTRasterBand"):
            for level in self._ovr_paths:
                ovr = ET.SubElement(band, "Overview")
                ET.SubElement(ovr, "SourceFilename", relativeToVRT="0").text = str(Path(level).resolve())
                ET.SubElement(ovr, "SourceBand").text = band.get("band")
        tree.write(vrt)

    def _check_metadata(self, cog: Path) -> None:
        """Fail if the colour table or band descriptions did not survive the COG copy."""
        with rasterio.open(cog) as ds:
            lost = (self.colormap and not _has_colormap(ds)) or (
                self.band_descriptions and list(ds.descriptions) != self.band_descriptions)
        if lost:
            raise OutputError(self.path, "colour table or band descriptions were lost in the COG copy")

    def abort(self) -> None:
        """Close and delete the temporary files (the target is untouched)."""
        for worker in (self._strip_worker, self._ovr_worker):
            if worker is not None:
                worker.shutdown()
        self._strip_worker = self._ovr_worker = None
        for pool in (self._encoders, self._skeleton_job):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._encoders = self._skeleton_job = self._skeleton_made = None
        for f in self._block_files:
            with contextlib.suppress(OSError):    # buffered bytes that cannot be written: dropped
                f.close()
            _remove(f.path)
        self._block_files, self._tilers = [], []
        _remove(self._skeleton)
        self._skeleton = None
        for ds in [self._ds, *self._ovr_ds]:
            if ds is not None and not ds.closed:
                with contextlib.suppress(Exception):
                    ds.close()
        self._ds = None
        self._ovr_ds = []
        for p in [self._tmp, *self._ovr_paths]:
            _remove(p)
        self._tmp = None
        self._ovr_paths = []
        self._pending.clear()


def _has_colormap(ds) -> bool:
    try:
        return bool(ds.colormap(1))
    except ValueError:
        return False

