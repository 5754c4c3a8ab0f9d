"""The work of one scene or one row band, as it runs in the job's process or on a Dask worker.

A :class:`Runtime` holds one loaded model for the job's resolved request and runs any number of
scenes with it through the task's own writer (the one the single-scene functions use; on a Dask
worker it lives in :class:`~dinov3_geo.batch.cluster.ModelPlugin`, so each worker loads its model
once). Every function here returns a :class:`UnitResult` instead of raising for an expected
failure, so one bad scene is reported and the others go on; a scene's warnings come back with it.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from dinov3_geo.batch.plan import Band
from dinov3_geo.engine import StopToken, keep_engine, run_chips
from dinov3_geo.errors import DinoGeoError, DinoGeoWarning, short_message
from dinov3_geo.io.georef import georeference_profile
from dinov3_geo.io.readers import scene_reader
from dinov3_geo.io.atomic import atomic_output
from dinov3_geo.io.cog import BLOCK, bounded_gdal_cache
from dinov3_geo.io.stitch import StreamingStitcher
from dinov3_geo.io.tiling import ChipPlan
from dinov3_geo.io.vector import polygonize_classes, polygonize_threshold
from dinov3_geo.pipeline import DenseOutput, output_channels
from dinov3_geo.task_model import describe
from dinov3_geo.tasks.registry import Job, Request

ChipReport = Callable[[str, int], None]
"""``report(unit, chips)``: ``chips`` of the unit (a scene or a band) are done so far."""


@dataclass(frozen=True)
class BatchJob:
    """Everything a worker needs to run scenes as the single-scene functions do: the request
    resolved once by the job (task, model source, tiling, reading, run settings) and the writer's
    choices (output type, polygons, threshold). ``torch_threads``: torch's threads in a worker."""

    request: Request
    dtype: str = "float32"
    vector: bool = False
    min_height: float = 2.0
    torch_threads: Optional[int] = None

    def job(self, output: Path, stop: Optional[StopToken] = None) -> Job:
        """The writer's choices for one scene's ``output`` (its polygons beside it), stopped by
        ``stop`` when given."""
        return Job(dtype=self.dtype, vector=vector_path(output) if self.vector else None,
                   min_height=self.min_height, overwrite=True, progress=False, stop=stop)

    def spec(self, channels_info) -> Optional[DenseOutput]:
        """How a dense task's COG is written (for row bands and their assembly)."""
        if not self.request.task.dense:
            return None
        kind = self.request.task.output
        return DenseOutput(kind, "uint8" if kind == "classes" else self.dtype, channels_info.band_names,
                           channels_info.class_names, channels_info.colormap)


@dataclass
class SceneOutcome:
    """What happened to one scene: ``done``, ``skipped`` (complete already) or ``failed``."""

    scene: str
    output: str
    status: str
    reason: str = ""
    chips: int = 0
    seconds: float = 0.0
    bands: int = 1
    notes: list[str] = field(default_factory=list)


@dataclass
class UnitResult:
    """How one unit of work (a scene, a band, an assembly) went."""

    ok: bool
    reason: str = ""
    chips_total: int = 0
    chips_computed: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    spec: Optional[DenseOutput] = None      # a band's: how the scene's COG is written
    channels: int = 0
    precision: str = ""


def vector_path(output: Path) -> Path:
    """The per-scene GeoPackage beside a scene's output."""
    return output.with_suffix(".gpkg")


def band_path(output: Path, band: Band) -> Path:
    """The hidden file holding one band's owned rows until the scene is assembled."""
    return output.with_name(f".{output.name}.band-{band.index:04d}-of-{band.count:04d}.tif")


def unit_name(output: Path, band: Optional[Band] = None) -> str:
    """The name progress reports use for a scene or one of its bands."""
    return str(output) if band is None else f"{output}#band{band.index}"


def guarded(fn, *args) -> UnitResult:
    """``fn(*args)``, with an expected failure (or a bug) turned into a failed result of one line."""
    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except DinoGeoError as exc:
        return UnitResult(False, str(exc), seconds=time.perf_counter() - t0)
    except Exception as exc:  # a bug: still one line, the job goes on
        return UnitResult(False, f"internal error: {type(exc).__name__}: {short_message(exc)}",
                          seconds=time.perf_counter() - t0)
    result.seconds = time.perf_counter() - t0
    return result


@contextlib.contextmanager
def scene_warnings(notes: list[str]):
    """Our warnings raised inside the block collected into ``notes`` (said once, by the job, per
    scene), not printed where they arise."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DinoGeoWarning)
        yield
    for w in caught:
        if issubclass(w.category, DinoGeoWarning) and str(w.message) not in notes:
            notes.append(str(w.message))


class Runtime:
    """One model loaded for the job's request, reused scene after scene through the task's writer;
    ``stop``: the job's stop token (in the job's process; a Dask worker has none)."""

    def __init__(self, job: BatchJob, gpu_index: Optional[int] = None, stop: Optional[StopToken] = None):
        import torch

        if job.torch_threads:
            torch.set_num_threads(job.torch_threads)
        settings = job.request.settings
        if settings.device.type == "cuda" and settings.device.index is None and gpu_index is not None:
            settings = replace(settings, device=torch.device("cuda", gpu_index % torch.cuda.device_count()))
        self.job = job
        self.stop = stop
        self.request = replace(job.request, settings=settings)
        self.model = self.request.load_model()
        self.engine = keep_engine(self.model, settings)     # one move, compile and warm-up for every scene
        self.info = describe(self.model)

    def scene(self, scene: Path, output: Path, report: Optional[ChipReport] = None) -> UnitResult:
        """The whole scene into its output by the task's writer, as the single-scene function
        writes it; the scene's warnings come back as notes."""
        notes: list[str] = []
        with scene_warnings(notes), scene_reader(scene, self.request.reading) as sc:
            notes.extend(self.request.task.scene_notes(self.request, sc))
            view = SceneRows(sc, 0, sc.height, _unit_reporter(report, unit_name(output)))
            written = self.request.task.write(self.request, view, self.model, output, self.job.job(output, self.stop))
        stats = written.stats
        return UnitResult(True, chips_total=stats.chips_total, chips_computed=stats.chips_computed,
                          notes=_unique(notes + list(stats.notes)), precision=self.request.settings.precision)

    def band(self, scene: Path, output: Path, band: Band, report: Optional[ChipReport] = None) -> UnitResult:
        """One row band of a split scene: its owned rows into the band's hidden file."""
        notes: list[str] = []
        spec = self.job.spec(self.info)
        with scene_warnings(notes), scene_reader(scene, self.request.reading) as sc:
            if band.index == 0:
                notes.extend(self.request.task.scene_notes(self.request, sc))
            view = SceneRows(sc, band.read_start, band.read_stop, _unit_reporter(report, unit_name(output, band)))
            plan = ChipPlan.build(view.height, view.width, self.request.tiling.tile, self.request.tiling.overlap)
            channels = self.info.channels or output_channels(self.model, plan.tile, self.request.settings)
            with BandSink(band_path(output, band), sc, band, spec, channels) as sink:
                stitcher = StreamingStitcher(_Shifted(spec.encoder(sink), band.read_start), plan, channels,
                                             kind=spec.kind)
                stats = run_chips(view, self.model, stitcher, plan, self.request.settings, progress=False,
                                  stop=self.stop)
        return UnitResult(True, chips_total=stats.chips_total, chips_computed=stats.chips_computed,
                          notes=_unique(notes + list(stats.notes)), spec=spec, channels=channels,
                          precision=self.request.settings.precision)


def _unique(notes: list[str]) -> list[str]:
    return list(dict.fromkeys(notes))


def _unit_reporter(report: Optional[ChipReport], unit: str) -> Optional[Callable[[int], None]]:
    return None if report is None else (lambda chips: report(unit, chips))


def write_polygons(output: Path, job: BatchJob, class_names) -> None:
    """The per-scene polygons of an assembled COG ``output`` beside it, when the job asks for them
    (canopy above the threshold, or one polygon per region of equal class)."""
    if not job.vector:
        return
    layer = job.request.task.batch.layer
    if job.request.task.output == "classes":
        polygonize_classes(output, vector_path(output), class_names, layer=layer, overwrite=True)
    else:
        polygonize_threshold(output, vector_path(output), job.min_height, layer=layer, overwrite=True)


class SceneRows:
    """Rows ``[start, stop)`` of an open scene's working grid seen as a scene of their own (a band,
    or the whole scene), counting the chips read for progress (``report(chips)`` at most once
    every ``every`` seconds). Everything else (grid, path, profile) is the scene's."""

    def __init__(self, scene, start: int, stop: int, report: Optional[Callable[[int], None]] = None,
                 every: float = 1.0):
        self.scene, self.start, self.height = scene, start, stop - start
        self.report, self.every = report, every
        self.chips, self._last = 0, time.monotonic()
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self.scene, name)

    def read(self, window: Window):
        chip = self.scene.read(Window(window.col_off, window.row_off + self.start, window.width, window.height))
        if self.report is not None:
            self._count()
        return chip

    def _count(self) -> None:
        with self._lock:        # reader threads
            self.chips += 1
            now = time.monotonic()
            due = now - self._last >= self.every
            if due:
                self._last = now
            chips = self.chips
        if due:
            self.report(chips)


class _Shifted:
    """A sink adapter: rows of a :class:`SceneRows` view go on at their scene row numbers."""

    def __init__(self, sink, offset: int):
        self.sink, self.offset = sink, offset

    def write(self, row_off: int, array: np.ndarray) -> None:
        self.sink.write(row_off + self.offset, array)


class BandSink:
    """Keeps a band's owned rows (scene row numbers, encoded as the output's) in a GeoTIFF that
    appears only when complete."""

    def __init__(self, path: Path, scene, band: Band, spec: DenseOutput, channels: int):
        self.path, self.band = path, band
        self.height = band.own_stop - band.own_start
        count = 1 if spec.kind == "classes" else channels
        georef = georeference_profile(scene.crs, scene.transform)     # none for a scene without any
        if georef:
            georef["transform"] = georef["transform"] * Affine.translation(0, band.own_start)
        self.profile = dict(driver="GTiff", width=scene.width, height=self.height, count=count, dtype=spec.sink_dtype(),
                            tiled=True, blockxsize=BLOCK, blockysize=BLOCK, nodata=spec.nodata(),
                            bigtiff="IF_SAFER", **georef)
        self._stack = contextlib.ExitStack()
        self._ds = None
        self.rows = 0

    def __enter__(self) -> "BandSink":
        tmp = self._stack.enter_context(atomic_output(self.path, overwrite=True, tag="partial"))
        self._stack.enter_context(bounded_gdal_cache())
        self._ds = self._stack.enter_context(rasterio.open(tmp, "w", **self.profile))
        return self

    def write(self, row_off: int, array: np.ndarray) -> None:
        lo = max(row_off, self.band.own_start)
        hi = min(row_off + array.shape[1], self.band.own_stop)
        if hi > lo:
            part = array[:, lo - row_off:hi - row_off]
            self._ds.write(part, window=Window(0, lo - self.band.own_start, part.shape[2], hi - lo))
            self.rows += hi - lo

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.rows != self.height:
            exc = RuntimeError(f"band {self.band.index} got {self.rows} of {self.height} rows")
            self._stack.__exit__(type(exc), exc, None)
            raise exc
        self._stack.__exit__(exc_type, exc, tb)


def assemble(scene: Path, output: Path, bands: list[Band], job: BatchJob, spec: DenseOutput,
             channels: int) -> UnitResult:
    """The bands' files, in row order, streamed into the scene's COG (written as ``spec`` says for
    ``channels`` model outputs); the band files are removed."""
    try:        # the scene's warnings were said by its bands already
        with scene_warnings([]), scene_reader(scene, job.request.reading) as sc, \
                spec.cog_sink(output, sc, channels, overwrite=True) as sink:
            for band in bands:
                with rasterio.open(band_path(output, band)) as ds:
                    for off in range(0, ds.height, BLOCK):
                        rows = min(BLOCK, ds.height - off)
                        sink.write(band.own_start + off, ds.read(window=Window(0, off, ds.width, rows)))
        write_polygons(output, job, spec.class_names)
    finally:
        remove_band_files(output)
    return UnitResult(True)


def remove_band_files(output: Path) -> None:
    """Delete every band file (and partial band file) of ``output``."""
    for p in output.parent.glob(f".{glob.escape(output.name)}.band-*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


#: Hidden temporaries beside a target: ``.NAME.<tag>-XXXX`` (io.atomic.temp_path), ``.NAME.band-...``.
_TEMPORARY = re.compile(r"^\.(?P<target>.+?)\.(?:partial\d*|cog|ovr|vrt|probe|band|empty\d*|features)(?:-.*)?$")


def remove_temporaries(folder: Path, targets: set[str]) -> int:
    """Delete the hidden temporary files an interrupted or killed run left in ``folder`` beside
    the files named in ``targets`` (one listing of the folder); returns how many."""
    removed = 0
    for entry in os.scandir(folder):
        match = _TEMPORARY.match(entry.name)
        if match and match["target"] in targets:
            with contextlib.suppress(FileNotFoundError):
                if entry.is_dir(follow_symlinks=False):       # a Zarr store being written
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed += 1
    return removed
