"""The work of one scene or one row band, as it runs in the job's process or on a Dask worker.

A :class:`Runtime` holds one loaded model and its run settings and runs any number of scenes with
it through the pipeline (on a Dask worker it lives in
:class:`~dinov3_geo.batch.cluster.ModelPlugin`, so each worker loads its model once). Every
function here returns a :class:`UnitResult` instead of raising for an expected failure, so one bad
scene is reported and the others go on.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from dinov3_geo.batch.plan import TASKS, Band
from dinov3_geo.errors import DinoGeoError, short_message
from dinov3_geo.io.georef import georeference_profile
from dinov3_geo.io.scene import MAX_UPSAMPLE
from dinov3_geo.io.sinks import BLOCK, atomic_output, bounded_gdal_cache
from dinov3_geo.pipeline import DenseOutput

ChipReport = Callable[[str, int], None]
"""``report(unit, chips)``: ``chips`` of the unit (a scene or a band) are done so far."""


@dataclass(frozen=True)
class JobOptions:
    """Everything a worker needs to load the model and run scenes like ``segment`` (or ``segment
    --head``, ``classify``, ``embed``) does."""

    task: str = "canopy"
    weights: Optional[str] = None
    backbone_weights: Optional[str] = None
    head: Optional[str] = None              # segment, classify: the head file
    backbone: Optional[str] = None          # the head's (None: the one its file names) or embed's
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 8
    tile: int = 512
    overlap: int = 64
    bands: Optional[tuple[int, ...]] = None
    scale: Optional[tuple[float, float]] = None
    gsd: Optional[float] = None
    min_height: float = 2.0
    dtype: str = "float32"
    vector: bool = False
    compile: bool = False
    verify: bool = True
    readers: Optional[int] = None
    torch_threads: Optional[int] = None
    max_upsample: Optional[float] = MAX_UPSAMPLE

    def scene_kwargs(self) -> dict[str, Any]:
        return dict(bands=list(self.bands) if self.bands else None, scale=self.scale, gsd=self.gsd,
                    max_upsample=self.max_upsample)


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


class Runtime:
    """One model loaded for ``options`` and its run settings, reused scene after scene through the
    pipeline (:func:`~dinov3_geo.pipeline.write_dense`, :func:`~dinov3_geo.engine.run_chips`)."""

    def __init__(self, options: JobOptions, gpu_index: Optional[int] = None):
        import torch

        from dinov3_geo.api import _load_task_model
        from dinov3_geo.engine import RunSettings, resolve_device
        from dinov3_geo.tasks import describe

        if options.torch_threads:
            torch.set_num_threads(options.torch_threads)
        device = resolve_device(options.device)
        if device.type == "cuda" and device.index is None and gpu_index is not None:
            device = torch.device("cuda", gpu_index % torch.cuda.device_count())
        self.settings = RunSettings.resolve(device, options.precision, options.batch_size, options.compile,
                                            options.readers)
        if options.task == "canopy":
            self.model = _load_task_model(options.task, options.weights, options.backbone_weights,
                                          self.settings.device, self.settings.dtype, options.verify)
        else:
            self.model = load_backbone_model(options).to(self.settings.device)
        self.options = options
        self.info = describe(self.model)
        kind = TASKS[options.task].output
        self.spec = DenseOutput(kind, "uint8" if kind == "classes" else options.dtype, self.info.band_names,
                                self.info.class_names, self.info.colormap) if TASKS[options.task].dense else None

    def scene(self, scene: Path, output: Path, report: Optional[ChipReport] = None) -> UnitResult:
        """The whole scene into its output: a COG (and its GeoPackage when the job asks for
        vectors), the GeoPackage of its chips' classes, or the GeoParquet of its chip embeddings."""
        from dinov3_geo.analysis import chip_embedding_writer
        from dinov3_geo.engine import run_chips
        from dinov3_geo.io.scene import open_scene
        from dinov3_geo.pipeline import write_dense
        from dinov3_geo.tasks.classify import write_chips

        with open_scene(scene, **self.options.scene_kwargs()) as sc:
            view = SceneRows(sc, 0, sc.height, _unit_reporter(report, unit_name(output)))
            plan = self._plan(view)
            if self.options.task == "embed":
                writer = chip_embedding_writer(output, view, plan, self.model, overwrite=True)
                stats = run_chips(view, self.model, writer, plan, self.settings, progress=False)
            elif self.spec is None:
                stats, _ = write_chips(view, self.model, output, plan, self.settings, overwrite=True, progress=False)
            else:
                stats, _ = write_dense(view, self.model, output, plan, self.settings, self.spec, self.info,
                                       overwrite=True, progress=False)
        _write_vector(output, self.options, self.info.class_names)
        return UnitResult(True, chips_total=stats.chips_total, chips_computed=stats.chips_computed,
                          notes=list(stats.notes))

    def band(self, scene: Path, output: Path, band: Band, report: Optional[ChipReport] = None) -> UnitResult:
        """One row band of a split scene: its owned rows into the band's hidden file."""
        from dinov3_geo.engine import run_chips
        from dinov3_geo.io.scene import open_scene
        from dinov3_geo.io.stitch import StreamingStitcher
        from dinov3_geo.pipeline import output_channels

        with open_scene(scene, **self.options.scene_kwargs()) as sc:
            view = SceneRows(sc, band.read_start, band.read_stop, _unit_reporter(report, unit_name(output, band)))
            plan = self._plan(view)
            channels = self.info.channels or output_channels(self.model, plan.tile, self.settings)
            with BandSink(band_path(output, band), sc, band, self.spec, channels) as sink:
                stitcher = StreamingStitcher(_Shifted(self.spec.encoder(sink), band.read_start), plan, channels,
                                             kind=self.spec.kind)
                stats = run_chips(view, self.model, stitcher, plan, self.settings, progress=False)
        return UnitResult(True, chips_total=stats.chips_total, chips_computed=stats.chips_computed,
                          notes=list(stats.notes), spec=self.spec, channels=channels)

    def _plan(self, view: "SceneRows"):
        """The chip plan of a view. A band's rows start on the scene's chip grid and end on a chip's
        end (:func:`~dinov3_geo.batch.plan.plan_bands`), so its plan is those chips of the scene's
        plan, with the scene plan's blend weights over the rows the band owns."""
        from dinov3_geo.io.tiling import ChipPlan

        return ChipPlan.build(view.height, view.width, self.options.tile, self.options.overlap)


def load_backbone_model(options: JobOptions):
    """The model of a ``segment``, ``classify`` or ``embed`` job (a backbone and its head, or the
    backbone's chip tokens), as the single-scene commands build it."""
    from dinov3_geo.tasks.classify import ChipClassifier, load_classify_head
    from dinov3_geo.tasks.segment_head import SegmentHeadModel, backbone_for_head, load_segment_head

    if options.task == "embed":
        from dinov3_geo.analysis import _load_backbone
        from dinov3_geo.tasks.embed import ChipTokens

        return ChipTokens(_load_backbone(options.backbone))
    if options.task == "segment":
        hf = load_segment_head(options.head)
        return SegmentHeadModel(backbone_for_head(hf, options.backbone, options.verify), hf)
    hf = load_classify_head(options.head)
    return ChipClassifier(backbone_for_head(hf, options.backbone, options.verify), hf)


def _unit_reporter(report: Optional[ChipReport], unit: str) -> Optional[Callable[[int], None]]:
    return None if report is None else (lambda chips: report(unit, chips))


def _write_vector(output: Path, options: JobOptions, class_names: Optional[tuple[str, ...]]) -> None:
    """The per-scene polygons of a COG ``output`` (the task's layer) beside it, when asked for:
    canopy above ``min_height``, or one polygon per region of equal class."""
    if not options.vector:
        return
    from dinov3_geo.io.vector import polygonize_classes, polygonize_threshold

    if options.task == "canopy":
        polygonize_threshold(output, vector_path(output), options.min_height, layer="canopy", overwrite=True)
    else:
        polygonize_classes(output, vector_path(output), class_names, overwrite=True)


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


def assemble(scene: Path, output: Path, bands: list[Band], options: JobOptions, spec: DenseOutput,
             channels: int) -> UnitResult:
    """The bands' files, in row order, streamed into the scene's COG (written as ``spec`` says for
    ``channels`` model outputs); the band files are removed."""
    from dinov3_geo.io.scene import open_scene

    try:
        with open_scene(scene, **options.scene_kwargs()) as sc, \
                spec.cog_sink(output, sc, channels, overwrite=True) as sink:
            for band in bands:
                with rasterio.open(band_path(output, band)) as ds:
                    for off in range(0, ds.height, BLOCK):
                        rows = min(BLOCK, ds.height - off)
                        sink.write(band.own_start + off, ds.read(window=Window(0, off, ds.width, rows)))
        _write_vector(output, options, spec.class_names)
    finally:
        remove_band_files(output)
    return UnitResult(True)


def remove_band_files(output: Path) -> None:
    """Delete every band file (and partial band file) of ``output``."""
    for p in output.parent.glob(f".{glob.escape(output.name)}.band-*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


#: Hidden temporaries beside a target: ``.NAME.<tag>-XXXX`` (io.sinks.temp_path), ``.NAME.band-...``.
_TEMPORARY = re.compile(r"^\.(?P<target>.+?)\.(?:partial\d*|cog|ovr|vrt|probe|band|empty\d*)(?:-.*)?$")


def remove_temporaries(folder: Path, targets: set[str]) -> int:
    """Delete the hidden temporary files an interrupted or killed run left in ``folder`` beside
    the files named in ``targets`` (one listing of the folder); returns how many."""
    removed = 0
    for entry in os.scandir(folder):
        match = _TEMPORARY.match(entry.name)
        if match and match["target"] in targets and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed
