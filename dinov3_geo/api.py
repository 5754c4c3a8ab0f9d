"""The Python API of the scene tasks: ``segment`` (canopy heights or a trained head's classes) and
``classify`` (a probe's class per chip).

One call resolves its request at the door (:func:`dinov3_geo.tasks.registry.request_for`: the
task, the model's source, tiling, reading and run settings, every option checked before any
weights are read), checks the outputs, opens the scene through the pixel contract, loads the model
and hands it to the task's writer (the same one a batch uses). Notebooks, the accessor and the
command line call exactly these; any other dense model goes through :func:`pipeline.predict`.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from .engine import RunStats, StopToken
from .errors import DinoGeoWarning, UsageError
from .io.atomic import check_output
from .io.readers import scene_reader
from .io.scene import MAX_UPSAMPLE
from .io.stac import describe_output
from .options import ReadOptions, RunSettings, Tiling, check_threshold
from .pipeline import DENSE_DTYPES, summary_lines
from .tasks.registry import Job, ModelSource, request_for

PathLike = Union[str, os.PathLike]


@dataclass
class SegmentResult:
    """What ``segment`` wrote and how it went."""

    output: Path
    vector: Optional[Path]
    polygons: Optional[int]
    stats: RunStats
    area_km2: Optional[float]
    seconds: float
    device: str
    precision: str = "fp32"
    warnings: list[str] = field(default_factory=list)
    task: str = "canopy"

    def summary(self) -> str:
        """The closing lines the command prints."""
        wrote: list[object] = [self.output]
        if self.vector is not None:
            wrote.append(f"{self.vector} ({self.polygons} polygon{'' if self.polygons == 1 else 's'})")
        area = f", {self.area_km2:.3f} km²" if self.area_km2 is not None else ""
        return "\n".join(summary_lines(self.stats, self.seconds, self.device, self.precision, wrote, extra=area))


def segment(scene, task: str = "canopy", output: Optional[PathLike] = None, *, head: Optional[PathLike] = None,
            weights: Optional[PathLike] = None, backbone_weights: Optional[PathLike] = None, backbone=None,
            vector: Optional[PathLike] = None, min_height: float = 2.0, dtype: str = "float32",
            tile: Optional[int] = None, overlap: Optional[int] = None, tiling: Optional[Tiling] = None,
            bands: Optional[Sequence[int]] = None, scale=None, nodata: Optional[float] = None,
            gsd: Optional[float] = None, max_upsample: Optional[float] = MAX_UPSAMPLE,
            reading: Optional[ReadOptions] = None, device: str = "auto", precision: str = "auto",
            batch_size: int = 8, compile: bool = False, readers: Optional[int] = None,
            settings: Optional[RunSettings] = None, overwrite: bool = False, progress: Optional[bool] = None,
            verify: bool = True, stop: Optional[StopToken] = None) -> SegmentResult:
    """Run a dense task over the raster ``scene`` (a path, a rioxarray DataArray or an open scene)
    and write a Cloud-Optimised GeoTIFF on its grid.

    ``task="canopy"``: CHMv2 canopy height in metres from ``weights`` (a CHMv2 folder, Meta's head
    ``.pth`` with ``backbone_weights``, or ``demo``: a small random model built in memory); float32,
    NaN where the input is invalid (``dtype`` float16 halves the file, uint16 stores decimetres with
    scale 0.1 so GIS tools show metres, 65535 nodata); with ``vector``, polygons of canopy at or above
    ``min_height`` m (layer ``canopy``: ``area_m2``, ``mean_height_m``, ``max_height_m``).
    ``head=FILE`` (or ``task="segment"``): a segmentation head from training on its ``backbone``
    (default: the one the head names): uint8 classes with the colour table and class names, 255
    nodata; with ``vector``, one polygon per region of equal class (layer ``classes``). Tiling
    defaults to 512/64 (canopy) or the head's training chip with a quarter of it as overlap; a head
    reads bands and scaling as it was trained unless given. A ``gsd`` that upsamples more than ``max_upsample``
    times per axis is refused (``None``: no limit). With ``vector``, earlier outputs are replaced only
    once both new ones are complete. Option values ``tiling``, ``reading`` and ``settings``
    (:mod:`dinov3_geo.options`) may replace their keywords. ``stop``: a
    :class:`~dinov3_geo.engine.StopToken` the caller may request from a signal handler or another
    thread; the run then raises its exception before the next chip and leaves no file.
    """
    t0 = time.perf_counter()
    if head is not None and task == "canopy":
        task = "segment"
    request = request_for(task, ModelSource(weights=weights, backbone_weights=backbone_weights, head=head,
                                            backbone=backbone, verify=verify),
                          tile=tile, overlap=overlap, tiling=tiling, bands=bands, scale=scale, nodata=nodata,
                          gsd=gsd, max_upsample=max_upsample, reading=reading, device=device, precision=precision,
                          batch_size=batch_size, compile=compile, readers=readers, settings=settings)
    if not request.task.dense:
        raise UsageError("task", f"segment runs the dense tasks (canopy, segment), not {task}")
    if dtype not in DENSE_DTYPES:
        raise UsageError("dtype", f"unsupported output dtype {dtype!r} ({', '.join(DENSE_DTYPES)})")
    check_threshold(min_height, "min_height")
    if output is None:
        raise UsageError("output", "give the COG to write (every command and function names its output)")
    output = Path(output)
    _check_outputs(scene, output, vector, overwrite)
    collected: list[str] = []
    for note in request.notes:
        _warn(note, collected)
    with scene_reader(scene, request.reading) as sc:
        collected.extend(sc.warnings)     # already issued by scene_reader
        for note in request.task.scene_notes(request, sc):
            _warn(note, collected)
        model = request.load_model()
        job = Job(dtype=dtype, vector=Path(vector) if vector is not None else None, min_height=min_height,
                  overwrite=overwrite, progress=progress, stop=stop)
        written = request.task.write(request, sc, model, output, job)
        if written.stats.chips_computed == 0:
            _warn(f"{sc.path}: no valid pixel (all nodata): wrote {output} entirely nodata", collected)
        area = area_km2(sc)
    describe_output(output, _path_of(scene), model, job.vector, {"task": request.task.name})   # style, STAC
    return SegmentResult(output, job.vector, written.polygons, written.stats, area, time.perf_counter() - t0,
                         str(request.settings.device), request.settings.precision, collected, request.task.name)


def segment_with_head(scene, head: PathLike, output: PathLike, **options) -> SegmentResult:
    """``segment(scene, output=output, head=head, **options)``: a trained segmentation head's
    classes over ``scene`` (kept for the name earlier versions used)."""
    return segment(scene, "segment", output, head=head, **options)


@dataclass
class ClassifyResult:
    """What classifying a scene wrote."""

    output: Path
    chips: int
    counts: dict
    stats: RunStats
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        shown = ", ".join(f"{k} {v}" for k, v in self.counts.items() if v)
        return (f"done in {self.seconds:.1f} s: {self.chips} chips classified ({self.stats.chips_skipped} empty "
                f"skipped): {shown or 'none'}\nwrote {self.output}")


def classify(scene, head: PathLike, output: PathLike, *, backbone=None, tile: Optional[int] = None,
             tiling: Optional[Tiling] = None, bands: Optional[Sequence[int]] = None, scale=None,
             nodata: Optional[float] = None, reading: Optional[ReadOptions] = None, device: str = "auto",
             precision: str = "auto", batch_size: int = 8, settings: Optional[RunSettings] = None,
             overwrite: bool = False, progress: Optional[bool] = None, verify: bool = True,
             stop: Optional[StopToken] = None) -> ClassifyResult:
    """Classify every chip of ``scene`` with a probe head file (``tile`` px, default the probe's
    chip size, no overlap; border chips shifted inward) into a GeoPackage layer ``chips``: one
    polygon per chip with ``class``, ``probability`` and every class's ``p_<class>``. ``stop``: as
    :func:`segment` takes it."""
    t0 = time.perf_counter()
    request = request_for("classify", ModelSource(head=head, backbone=backbone, verify=verify),
                          tile=tile, tiling=tiling, bands=bands, scale=scale,
                          nodata=nodata, reading=reading, device=device, precision=precision, batch_size=batch_size,
                          settings=settings)
    output = Path(output)
    check_output(output, overwrite, inputs=[_path_of(scene)])
    with scene_reader(scene, request.reading) as sc:
        model = request.load_model()
        job = Job(overwrite=overwrite, progress=progress, stop=stop)
        written = request.task.write(request, sc, model, output, job)
        notes = list(sc.warnings)
    describe_output(output, _path_of(scene), model, properties={"task": "classify"})     # STAC Item
    return ClassifyResult(output, written.extra["chips"], written.extra["counts"], written.stats,
                          time.perf_counter() - t0, notes)


classify_scene = classify


def _path_of(scene) -> Optional[str]:
    if isinstance(scene, (str, os.PathLike)):
        return str(scene)
    return getattr(scene, "path", None) or getattr(scene, "encoding", {}).get("source")


def _check_outputs(scene, output: Path, vector: Optional[PathLike], overwrite: bool) -> None:
    check_output(output, overwrite, inputs=[_path_of(scene)])
    if vector is not None:
        if Path(vector).resolve() == output.resolve():
            raise UsageError("vector", "the vector output must differ from the raster output")
        check_output(vector, overwrite, inputs=[_path_of(scene), output])


def _warn(text: str, collected: list[str]) -> None:
    collected.append(text)
    warnings.warn(text, DinoGeoWarning, stacklevel=3)


def area_km2(scene) -> Optional[float]:
    """The scene's area in km², or ``None`` without a georeference."""
    size = scene.pixel_size_m
    if size is None:
        return None
    return abs(size[0] * size[1]) * scene.width * scene.height / 1e6
