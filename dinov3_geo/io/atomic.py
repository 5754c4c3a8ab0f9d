"""Outputs published atomically: checked before any work, written to a hidden temporary file
beside the target (``.NAME.<tag>-XXXX``), moved onto it with ``os.replace`` only once complete.

A failed write (GDAL, OGR or OS error) becomes one :class:`OutputError` naming the target -- a
full disk said as such, with the folder and its free space -- and the temporary file is removed:
the target is left as it was, also on ``KeyboardInterrupt``. Every writer of files uses these: the
COG sink, vectors, feature maps, STAC items, heads and training.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from pyogrio.errors import DataLayerError, DataSourceError
from rasterio.errors import RasterioError

from dinov3_geo.errors import DinoGeoError, OutputError, short_message


def check_output(path, overwrite: bool, inputs: Sequence = ()) -> Path:
    """Fail early with :class:`OutputError` if ``path`` cannot be written: folder missing or not
    writable, target exists (and not ``overwrite``), target is a folder or one of ``inputs``."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(path, f"folder {folder} does not exist")
    _probe_writable(path, folder)
    if path.is_dir() and not is_zarr_store(path):
        raise OutputError(path, "is a folder")
    for src in inputs:
        src = getattr(src, "path", src)       # an open scene reader stands for its file
        if src is not None and os.path.exists(src) and os.path.realpath(src) == os.path.realpath(path):
            raise OutputError(path, "is the input file; choose another output")
    if path.exists() and not overwrite:
        raise OutputError(path, "exists (use `overwrite` to replace it)")
    return path


def is_zarr_store(path: Path) -> bool:
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


def discard(path: Path | None) -> None:
    """Delete the temporary file ``path`` and GDAL's side files (``.aux.xml``, ``.ovr``) if present."""
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
        discard(tmp)
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
            discard(tmp)
