"""What a batch job is made of: the input scenes, their outputs, and the row bands of huge scenes.

Inputs are glob patterns, paths, or ``@list.txt`` files (one path or pattern a line, ``#`` comments).
Each scene's output lies in the output folder under the scene's name with the task's suffix
(``a.tif`` -> ``a_canopy.tif``, ``a_classes.tif``, ``a_chips.gpkg``, ``a_embed.parquet``,
``a_features.zarr``: each task's :class:`~dinov3_geo.tasks.registry.BatchFiles`). A scene of more than ``split_above`` pixels is cut into row bands that own
disjoint output rows and read one chip row more on each side (see :func:`plan_bands`).
"""
from __future__ import annotations

import glob
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from dinov3_geo.errors import InputError, UsageError, short_message
from dinov3_geo.io.tiling import axis_starts
from dinov3_geo.tasks.registry import get_task

GLOB_CHARS = set("*?[")


def is_batch(scenes: Sequence[str], output=None, dask: Optional[str] = None,
             split_above: Optional[int] = None) -> bool:
    """Whether a request runs as a batch (:func:`~dinov3_geo.batch.run_batch`): several scenes, a
    glob or ``@list.txt``, an output folder (a path ending in ``/``, or an existing folder that is
    not a Zarr store), or Dask or row bands asked for."""
    out = None if output is None else str(output)
    folder = out is not None and (out.endswith(("/", os.sep)) or
                                  (os.path.isdir(out) and not out.lower().endswith(".zarr")))
    named = any(str(s).startswith("@") or GLOB_CHARS & set(str(s)) for s in scenes)
    return len(scenes) > 1 or named or folder or bool(dask or split_above)


def check_output_folder(out_dir) -> None:
    """A batch writes into a folder: ``out_dir`` must end in ``/``, be a folder, or have no file
    extension (a new folder); a UsageError naming ``output`` otherwise."""
    out = str(out_dir)
    if not out.endswith(("/", os.sep)) and not os.path.isdir(out) and os.path.splitext(out)[1]:
        raise UsageError("output", "many scenes (or `dask`, `split_above`) need an output folder "
                                   "(a path ending in /)")


def expand_inputs(items: Sequence[str]) -> list[Path]:
    """The scene paths named by ``items`` (globs, paths, ``@list.txt``), in order, without repeats.

    A pattern that matches nothing, or a list file that cannot be read, is a :class:`UsageError`
    naming it; a plain path is passed on as it is (a missing file fails as that scene's input)."""
    paths: list[Path] = []
    for item in items:
        for name in _names_in(str(item)):
            if "://" in name or name.startswith("/vsi"):
                raise UsageError(name, "a batch reads files (local or on a shared file system); run remote "
                                       "scenes one at a time, or mount them")
            if GLOB_CHARS & set(name):
                matches = sorted(glob.glob(os.path.expanduser(name), recursive=True))
                if not matches:
                    raise UsageError(name, "no file matches this pattern")
                paths.extend(Path(m) for m in matches if not Path(m).is_dir())
            else:
                paths.append(Path(os.path.expanduser(name)))
    unique = list(dict.fromkeys(p.absolute() for p in paths))
    if not unique:
        raise UsageError("scenes", "no input scene given")
    return unique


def _names_in(item: str) -> list[str]:
    """``[item]``, or the lines of the list file when ``item`` is ``@FILE`` (relative lines are
    taken from the list file's folder)."""
    if not item.startswith("@"):
        return [item]
    path = Path(item[1:])
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsageError(path, f"cannot read the list of scenes ({exc.strerror})") from None
    names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return [n if os.path.isabs(os.path.expanduser(n)) else str(path.parent / n) for n in names]


def output_for(scene: Path, out_dir: Path, task: str) -> Path:
    """``OUT_DIR/<scene stem>_<suffix><ext>`` of the task (``a_canopy.tif``)."""
    files = get_task(task).batch
    return out_dir / f"{scene.stem}_{files.suffix}{files.ext}"


def check_distinct_outputs(scenes: Sequence[Path], out_dir: Path, task: str) -> None:
    """UsageError when two scenes (same name in different folders) would write the same output."""
    counts = Counter(output_for(s, out_dir, task) for s in scenes)
    clash = [str(p) for p, n in counts.items() if n > 1]
    if clash:
        raise UsageError("scenes", f"several scenes would write {clash[0]} (scenes with the same file name "
                                   "in different folders): run them into different output folders")


@dataclass(frozen=True)
class Grid:
    """The input grid of a scene as the client sees it (no pixels read)."""

    height: int
    width: int
    crs: Optional[str]
    transform: tuple[float, ...]


def read_grid(path: Path) -> Grid:
    """The grid of ``path`` from its header; InputError naming the file when it cannot be opened."""
    import rasterio
    from rasterio.errors import RasterioError

    if not os.path.exists(path) and "://" not in str(path) and not str(path).startswith("/vsi"):
        raise InputError(path, "no such file")
    try:
        with rasterio.open(path) as ds:
            return Grid(ds.height, ds.width, ds.crs.to_string() if ds.crs else None, tuple(ds.transform)[:6])
    except RasterioError as exc:
        raise InputError(path, f"not a readable raster ({short_message(exc)})") from None


@dataclass(frozen=True)
class Band:
    """Rows ``[own_start, own_stop)`` of the output, computed from the working-grid rows
    ``[read_start, read_stop)`` (whole chips: one chip row more on each side where there is one)."""

    index: int
    count: int
    own_start: int
    own_stop: int
    read_start: int
    read_stop: int


@dataclass
class SceneJob:
    """One scene to run: where its output goes and, when split, its bands."""

    scene: Path
    output: Path
    chips: int
    bands: Optional[list[Band]] = None


#: Most chips a split scene computes beyond the unsplit run's, as a share of them.
MAX_EXTRA_CHIPS = 0.10


def band_count(height: int, width: int, tile: int, overlap: int, split_above: Optional[int]) -> int:
    """How many row bands a ``height`` x ``width`` grid is cut into: enough that each owns about
    ``split_above`` pixels, but no more than keep the chips computed within ``MAX_EXTRA_CHIPS``
    of the unsplit run; 1 when not split.

    Chips overlap, so every band boundary lies inside at least one chip row, which both bands
    around it must compute (their rows next to the boundary blend it). Boundaries are placed where
    exactly one chip row covers them (:func:`plan_bands`), so ``n`` bands compute ``n - 1`` chip
    rows twice: with ``R`` chip rows, at most ``1 + R * MAX_EXTRA_CHIPS`` bands (a scene of fewer
    than 10 chip rows is not split)."""
    if not split_above or height * width <= split_above:
        return 1
    starts = axis_starts(height, tile, overlap)
    wanted = math.ceil(height * width / split_above)
    return max(1, min(wanted, 1 + math.floor(MAX_EXTRA_CHIPS * len(starts) + 1e-9),
                      len(_boundary_ranges(starts, min(tile, height), height)) + 1))


def plan_bands(height: int, width: int, tile: int, overlap: int, count: int) -> list[Band]:
    """``count`` row bands over a grid, each owning about ``height / count`` rows and reading every
    chip row that touches them.

    Each boundary between two bands lies in rows that one chip row alone covers (the nearest such
    rows to an even split), so the two bands share that one chip row and no other: the bands
    compute ``count - 1`` chip rows more than the unsplit run. The chip rows a band reads start on
    the scene's chip grid and end on a chip's end, so the band's own chip grid is exactly those
    chips of the scene's grid, and their blend weights over the owned rows are the scene's: the
    owned rows come out equal to the unsplit run.
    """
    starts = axis_starts(height, tile, overlap)
    th = min(tile, height)
    edges = [0, *_boundaries(starts, th, height, count), height]
    bands = []
    for k, (own_start, own_stop) in enumerate(zip(edges, edges[1:])):
        touching = [r for r in starts if r < own_stop and r + th > own_start]
        bands.append(Band(k, len(edges) - 1, own_start, own_stop, touching[0], touching[-1] + th))
    return bands


def _boundary_ranges(starts: Sequence[int], th: int, height: int) -> list[tuple[int, int]]:
    """Per chip row, the band boundaries ``b`` (a band ends before row ``b``, the next starts at
    it) that only this chip row straddles (``r < b < r + th``), as inclusive ``(lo, hi)``; chip
    rows where every boundary would be straddled by a neighbour too are left out."""
    ranges = []
    for k, r in enumerate(starts):
        lo = max(r + 1, starts[k - 1] + th if k else 1)
        hi = min(r + th - 1, starts[k + 1] if k + 1 < len(starts) else height - 1)
        if lo <= hi:
            ranges.append((lo, hi))
    return ranges


def _boundaries(starts: Sequence[int], th: int, height: int, count: int) -> list[int]:
    """Up to ``count - 1`` increasing band boundaries, each in another chip row's
    :func:`_boundary_ranges`, each the nearest such row to its place in an even split."""
    ranges = _boundary_ranges(starts, th, height)
    chosen, next_range = [], 0
    for j in range(1, count):
        target = j * height // count
        left = len(ranges) - next_range - (count - 1 - j)     # keep a range for each boundary after it
        if left <= 0:
            break
        options = ranges[next_range:next_range + left]
        dist = [0 if lo <= target <= hi else min(abs(target - lo), abs(target - hi)) for lo, hi in options]
        pick = next_range + dist.index(min(dist))
        lo, hi = ranges[pick]
        chosen.append(min(max(target, lo), hi))
        next_range = pick + 1
    return chosen