"""The work of one scene or one row band, as it runs in the job's process or on a Dask worker.

A :class:`Runtime` holds one loaded model and its engine and runs any number of scenes with it
(on a Dask worker it lives in :class:`~dinov3_geo.batch.cluster.ModelPlugin`, so each worker loads
its model once). Every function here returns a :class:`UnitResult` instead of raising for an
expected failure, so one bad scene is reported and the others go on.
"""
from __future__ import annotations

import contextlib
import glob
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from dinov3_geo.batch.plan import Band
from dinov3_geo.errors import DinoGeoError, short_message
from dinov3_geo.io.sinks import BLOCK, COGSink, atomic_output, bounded_gdal_cache

#: What each task writes: bands, dtype, how chips blend, band descriptions.
TASK_OUTPUTS: dict[str, dict[str, Any]] = {
    "canopy": dict(count=1, dtype="float32", kind="continuous", descriptions=["canopy_height_m"]),
}


@dataclass(frozen=True)
class JobOptions:
    """Everything a worker needs to load the model and run scenes like ``segment`` does."""

    task: str = "canopy"
    weights: Optional[str] = None
    backbone_weights: Optional[str] = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 8
    tile: int = 512
    overlap: int = 64
    bands: Optional[tuple[int, ...]] = None
    scale: Optional[tuple[float, float]] = None
    gsd: Optional[float] = None
    min_height: float = 2.0
    vector: bool = False
    compile: bool = False
    verify: bool = True
    readers: Optional[int] = None
    torch_threads: Optional[int] = None

    def scene_kwargs(self) -> dict[str, Any]:
        return dict(bands=list(self.bands) if self.bands else None, scale=self.scale, gsd=self.gsd)


@dataclass
class UnitResult:
    """How one unit of work (a scene, a band, an assembly) went."""

    ok: bool
    reason: str = ""
    chips_total: int = 0
    chips_computed: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def vector_path(output: Path) -> Path:
    """The per-scene GeoPackage beside a scene's output."""
    return output.with_suffix(".gpkg")


def band_path(output: Path, band: Band) -> Path:
    """The hidden file holding one band's owned rows until the scene is assembled."""
    return output.with_name(f".{output.name}.band-{band.index:04d}-of-{band.count:04d}.tif")


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


ChipReport = Callable[[str, int], None]
"""``report(unit, chips)``: ``chips`` of the unit (a scene or band) are done so far."""


class Runtime:
    """One model loaded for ``options`` and the engine that runs it, reused scene after scene."""

    def __init__(self, options: JobOptions, gpu_index: Optional[int] = None):
        import torch

        from dinov3_geo.api import _load_task_model
        from dinov3_geo.engine import Engine, dtype_for, resolve_device, resolve_precision

        if options.torch_threads:
            torch.set_num_threads(options.torch_threads)
        device = resolve_device(options.device)
        if device.type == "cuda" and device.index is None and gpu_index is not None:
            device = torch.device("cuda", gpu_index % torch.cuda.device_count())
        precision = resolve_precision(options.precision, device)
        model = _load_task_model(options.task, options.weights, options.backbone_weights, device,
                                 dtype_for(precision), options.verify)
        self.options = options
        self.engine = Engine(model, device, precision, options.batch_size, options.tile, options.overlap,
                             readers=options.readers, compile=options.compile)
        if options.compile or device.type == "cuda":
            self.engine.warm_up()

    def scene(self, scene: Path, output: Path, report: Optional[ChipReport] = None) -> UnitResult:
        """The whole scene into its COG (and its GeoPackage when the job asks for vectors)."""
        from dinov3_geo.io.scene import open_scene

        spec = TASK_OUTPUTS[self.options.task]
        with open_scene(scene, **self.options.scene_kwargs()) as sc:
            with COGSink(output, sc, count=spec["count"], dtype=spec["dtype"], overwrite=True,
                         band_descriptions=spec["descriptions"]) as sink:
                stats = self._run(sc, sink, _unit_reporter(report, unit_name(output)))
        _write_vector(output, self.options)
        return UnitResult(True, chips_total=stats.chips_total, chips_computed=stats.chips_computed,
                          notes=list(stats.notes))

    def band(self, scene: Path, output: Path, band: Band, report: Optional[ChipReport] = None) -> UnitResult:
        """One row band of a split scene: its owned rows into the band's hidden file."""
        from dinov3_geo.io.scene import open_scene

        with open_scene(scene, **self.options.scene_kwargs()) as sc:
            rows = SceneRows(sc, band.read_start, band.read_stop)
            with BandSink(band_path(output, band), sc, band, TASK_OUTPUTS[self.options.task]) as sink:
                stats = self._run(rows, _Shifted(sink, band.read_start),
                                  _unit_reporter(report, unit_name(output, band)))
        return UnitResult(True, chips_total=stats.chips_total, chips_computed=stats.chips_computed,
                          notes=list(stats.notes))

    def _run(self, scene, sink, report: Optional[Callable[[int], None]]):
        from dinov3_geo.io.stitch import StreamingStitcher

        spec = TASK_OUTPUTS[self.options.task]
        stitcher = StreamingStitcher(sink, scene.height, scene.width, spec["count"], self.options.tile,
                                     self.options.overlap, kind=spec["kind"])
        return self.engine.run(scene, ChipCounter(stitcher, report) if report else stitcher, progress=False)


def unit_name(output: Path, band: Optional[Band] = None) -> str:
    """The name progress reports use for a scene or one of its bands."""
    return str(output) if band is None else f"{output}#band{band.index}"


def _unit_reporter(report: Optional[ChipReport], unit: str) -> Optional[Callable[[int], None]]:
    return None if report is None else (lambda chips: report(unit, chips))


class ChipCounter:
    """A chip consumer in front of the stitcher that reports the chips done, at most once every
    ``every`` seconds and once at the end."""

    def __init__(self, stitcher, report: Callable[[int], None], every: float = 1.0):
        self.stitcher, self.report, self.every = stitcher, report, every
        self.chips, self._last = 0, time.monotonic()

    def add(self, window, values, valid) -> None:
        self.stitcher.add(window, values, valid)
        self._tick()

    def skip(self, window) -> None:
        self.stitcher.skip(window)
        self._tick()

    def close(self) -> None:
        self.stitcher.close()
        self.report(self.chips)

    def _tick(self) -> None:
        self.chips += 1
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self.report(self.chips)


def _write_vector(output: Path, options: JobOptions) -> None:
    """The per-scene polygons of ``output`` (the task's layer) beside it, when asked for."""
    if not options.vector:
        return
    from dinov3_geo.io.vector import polygonize_threshold

    polygonize_threshold(output, vector_path(output), options.min_height, layer=options.task, overwrite=True)


class SceneRows:
    """Rows ``[start, stop)`` of a scene's working grid seen as a scene of their own (what the
    engine reads for one band)."""

    def __init__(self, scene, start: int, stop: int):
        self.scene, self.start = scene, start
        self.height, self.width = stop - start, scene.width
        self.path = scene.path

    def read(self, window: Window):
        return self.scene.read(Window(window.col_off, window.row_off + self.start, window.width, window.height))


class _Shifted:
    """A sink adapter: rows of a :class:`SceneRows` view go on at their scene row numbers."""

    def __init__(self, sink, offset: int):
        self.sink, self.offset = sink, offset

    def write(self, row_off: int, array: np.ndarray) -> None:
        self.sink.write(row_off + self.offset, array)


class BandSink:
    """Keeps a band's owned rows (scene row numbers) in a GeoTIFF that appears only when complete."""

    def __init__(self, path: Path, scene, band: Band, spec: dict[str, Any]):
        self.path, self.band, self.spec = path, band, spec
        self.height = band.own_stop - band.own_start
        self.profile = dict(driver="GTiff", width=scene.width, height=self.height, count=spec["count"],
                            dtype=spec["dtype"], crs=scene.crs, tiled=True, blockxsize=BLOCK, blockysize=BLOCK,
                            transform=scene.transform * Affine.translation(0, band.own_start),
                            nodata=float("nan") if spec["dtype"].startswith("float") else 255,
                            bigtiff="IF_SAFER")
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


def assemble(scene: Path, output: Path, bands: list[Band], options: JobOptions) -> UnitResult:
    """The bands' files, in row order, streamed into the scene's COG; the band files are removed."""
    from dinov3_geo.io.scene import open_scene

    spec = TASK_OUTPUTS[options.task]
    try:
        with open_scene(scene, **options.scene_kwargs()) as sc, \
                COGSink(output, sc, count=spec["count"], dtype=spec["dtype"], overwrite=True,
                        band_descriptions=spec["descriptions"]) as sink:
            for band in bands:
                with rasterio.open(band_path(output, band)) as ds:
                    for off in range(0, ds.height, BLOCK):
                        rows = min(BLOCK, ds.height - off)
                        sink.write(band.own_start + off, ds.read(window=Window(0, off, ds.width, rows)))
        _write_vector(output, options)
    finally:
        remove_band_files(output)
    return UnitResult(True)


def remove_band_files(output: Path) -> None:
    """Delete every band file (and partial band file) of ``output``."""
    for p in output.parent.glob(f".{glob.escape(output.name)}.band-*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def remove_stale_temporaries(output: Path) -> None:
    """Delete hidden temporary files an interrupted or killed run left beside ``output``
    (``.NAME.partial-*``, ``.NAME.cog-*``, band files, the vector's temporaries)."""
    for target in (output, vector_path(output)):
        for p in target.parent.glob(f".{glob.escape(target.name)}.*"):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(p)
