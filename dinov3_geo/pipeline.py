"""The one pipeline every task runs through: a chip plan and run settings resolved once, a model,
and a sink. ``predict`` is its public, task-agnostic entry point; ``segment`` (canopy) is the canopy
model plus the same :func:`write_dense`.

    scene -> ChipPlan -> run_chips (readers -> device batches -> model) -> consumer
    consumer = StreamingStitcher -> COGSink (dense values or classes), or a per-chip collector
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from . import options as opts
from .engine import Engine, RunSettings, RunStats, StopToken, engine_for, run_chips
from .errors import UsageError
from .io.readers import scene_reader
from .io.scene import Scene
from .io.atomic import check_output
from .io.cog import COGSink
from .io.shards import make_stitcher
from .io.stac import describe_output
from .io.stitch import CLASS_NODATA
from .io.tiling import ChipPlan
from .task_model import DENSE_OUTPUTS, TaskInfo, describe

PathLike = Union[str, os.PathLike]
#: Output data types of continuous results: floats with NaN nodata, or uint16 counting ``quantum``
#: steps (decimetres for heights) with nodata 65535 and the step as the band's scale, so GIS tools
#: show the values in their unit.
DENSE_DTYPES = ("float32", "float16", "uint16")
UINT16_NODATA = 65535

__all__ = ["ChipPlan", "RunSettings", "RunStats", "run_chips", "predict", "PredictResult", "DenseOutput",
           "write_dense"]


@dataclass(frozen=True)
class DenseOutput:
    """How a dense result is written: blended values (float, NaN nodata) or classes (uint8, 255)."""

    kind: str = "continuous"
    dtype: str = "float32"
    band_names: Optional[tuple[str, ...]] = None
    class_names: Optional[tuple[str, ...]] = None
    colormap: Optional[dict] = None
    quantum: float = 0.1        # uint16 only: the value of one step (0.1: decimetres of metres)

    def __post_init__(self) -> None:
        if self.kind not in DENSE_OUTPUTS:
            raise UsageError("kind", f"unknown kind {self.kind!r} (continuous or classes)")
        if self.kind == "continuous" and self.dtype not in DENSE_DTYPES:
            raise UsageError("dtype", f"unsupported output dtype {self.dtype!r} ({', '.join(DENSE_DTYPES)})")
        if not (isinstance(self.quantum, (int, float)) and self.quantum > 0 and np.isfinite(self.quantum)):
            raise UsageError("quantum", f"quantum must be a positive number, got {self.quantum!r}")

    def sink_dtype(self) -> str:
        """The array type the sink writes (float16 is float32 stored as 16-bit floats)."""
        if self.kind == "classes":
            return "uint8"
        return "float32" if self.dtype == "float16" else self.dtype

    def nodata(self) -> float:
        if self.kind == "classes":
            return CLASS_NODATA
        return UINT16_NODATA if self.dtype == "uint16" else float("nan")

    def scales(self, channels: int) -> Optional[list[float]]:
        """Band scales of the file (uint16: the quantum), which GIS tools apply when reading."""
        return [float(self.quantum)] * channels if self.dtype == "uint16" and self.kind == "continuous" else None

    def encoder(self, sink):
        """``sink`` itself, or for uint16 a wrapper that rounds blended rows to ``quantum`` steps."""
        return _Quantised(sink, self.quantum) if self.dtype == "uint16" and self.kind == "continuous" else sink

    def cog_sink(self, output: PathLike, scene, channels: int, overwrite: bool = False) -> COGSink:
        """The COG writer of a result with ``channels`` model outputs on ``scene``'s grid (its rows
        go through :meth:`encoder`)."""
        return COGSink(output, scene, count=1 if self.kind == "classes" else channels, dtype=self.sink_dtype(),
                       nodata=self.nodata(), colormap=self.colormap, overwrite=overwrite,
                       band_descriptions=self.descriptions(channels), tags=self.tags(channels),
                       scales=self.scales(channels), nbits=16 if self.dtype == "float16" else None)

    def descriptions(self, channels: int) -> Optional[list[str]]:
        """Band descriptions of the file: the band names (continuous) or nothing (classes: the
        class names go into the file's metadata)."""
        if self.kind == "classes" or self.band_names is None:
            return None
        if len(self.band_names) != channels:
            raise UsageError("band_names", f"{len(self.band_names)} names for {channels} output bands")
        return list(self.band_names)

    def tags(self, channels: int) -> dict:
        """Dataset metadata: class names of a classes output (``CLASS_<value>=name``)."""
        if self.kind != "classes" or not self.class_names:
            return {}
        if len(self.class_names) != channels:
            raise UsageError("class_names", f"{len(self.class_names)} names for {channels} classes")
        return {f"CLASS_{i}": str(name) for i, name in enumerate(self.class_names)}


@dataclass
class PredictResult:
    """What ``predict`` wrote and how it went."""

    output: Path
    stats: RunStats
    seconds: float
    device: str
    precision: str
    channels: int
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The closing lines a command prints."""
        return "\n".join(summary_lines(self.stats, self.seconds, self.device, self.precision, [self.output]))


def summary_lines(stats: RunStats, seconds: float, device: str, precision: str, wrote: Sequence[object],
                  extra: str = "") -> list[str]:
    """A run's closing lines: time, device, chips, rate (plus ``extra``), what was written, notes."""
    lines = [f"done in {seconds:.1f} s on {device} ({precision}): {stats.chips_computed} chips computed "
             f"({stats.chips_skipped} empty skipped), {stats.chips_per_second:.2f} chips/s{extra}"]
    lines.extend(f"wrote {w}" for w in wrote)
    lines.extend(f"note: {n}" for n in stats.notes)
    return lines


def predict(scene: Union[PathLike, Scene], model: torch.nn.Module, output: PathLike, *,
            kind: str = "continuous", tile: Optional[int] = None, overlap: Optional[int] = None,
            tiling: Optional[opts.Tiling] = None, batch_size: int = 8, device: str = "auto", precision: str = "auto",
            compile: bool = False, readers: Optional[int] = None, settings: Optional[RunSettings] = None,
            bands: Optional[Sequence[int]] = None, scale=None, nodata: Optional[float] = None,
            reading: Optional[opts.ReadOptions] = None, mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None, dtype: str = "float32",
            band_names: Optional[Sequence[str]] = None, class_names: Optional[Sequence[str]] = None,
            colormap: Optional[dict] = None, overwrite: bool = False, progress: Optional[bool] = None,
            quantum: float = 0.1, stop: Optional[StopToken] = None) -> PredictResult:
    """Run any dense ``model`` over the raster ``scene`` and write a COG on its grid.

    ``model`` maps a normalised float batch ``[B,3,T,T]`` to ``[B,K,T,T]``. Chips are scaled to 0..1
    (uint8 /255, else ``scale=(MIN, MAX)`` or a scene-wide 2-98 % stretch), then normalised with
    ``mean``/``std`` when given, else the model's own ``normalise``, else left in 0..1.
    ``kind="continuous"`` blends values into a COG of ``dtype`` float32 or float16 (NaN where the
    input is invalid; nodata in the input given by ``nodata`` where the file has none) or uint16
    (counts of ``quantum``, stored as the band scale so GIS tools show the unit; 65535 nodata);
    ``kind="classes"`` blends per-class scores and writes the argmax as uint8 (255 nodata; with
    ``class_names`` in the metadata and ``colormap`` {class: (r, g, b)} as the colour table).
    Options may also be given as values: ``tiling`` (:class:`~dinov3_geo.options.Tiling`, default
    512/64), ``reading`` (:class:`~dinov3_geo.options.ReadOptions`) and ``settings``
    (:class:`RunSettings`); each is checked before the scene is read.
    Streaming (memory flat in the scene size), atomic (no file at ``output`` unless it succeeded;
    an existing one is kept unless ``overwrite``); the output has the scene's CRS, transform and
    size. ``stop``: a :class:`~dinov3_geo.engine.StopToken`; once it is requested the run raises
    its exception before the next chip and leaves no file. Returns a :class:`PredictResult`.
    """
    t0 = time.perf_counter()
    info = describe(model)
    spec = DenseOutput(kind, "uint8" if kind == "classes" else dtype,
                       _tuple(band_names, info.band_names), _tuple(class_names, info.class_names),
                       colormap if colormap is not None else info.colormap, quantum)
    chips = opts.tiling_of(tiling, tile, overlap)
    read = opts.reading(reading, bands=bands, scale=scale, nodata=nodata)
    settings = opts.resolve_run(device, precision, batch_size, compile, readers, settings)
    output = Path(output)
    with scene_reader(scene, read) as sc:
        check_output(output, overwrite, inputs=[sc.path])
        plan = ChipPlan.build(sc.height, sc.width, chips.tile, chips.overlap)
        stats, channels = write_dense(sc, model, output, plan, settings, spec, info, overwrite=overwrite,
                                      progress=progress, mean=mean, std=std, stop=stop)
        notes = list(sc.warnings)
    describe_output(output, getattr(sc, "path", None), model)      # QGIS style, STAC Item
    return PredictResult(output, stats, time.perf_counter() - t0, str(settings.device), settings.precision,
                         channels, notes)


def write_dense(scene: Scene, model: torch.nn.Module, output: Path, plan: ChipPlan, settings: RunSettings,
                spec: DenseOutput, info: Optional[TaskInfo] = None, *, overwrite: bool = False,
                progress: Optional[bool] = None, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None, engine: Optional[Engine] = None,
                stop: Optional[StopToken] = None) -> tuple[RunStats, int]:
    """Stream ``model`` over ``plan`` on the open ``scene`` into the COG ``output``, blended as
    ``spec`` says; returns the run's stats and the model's output channel count. ``engine``: one
    kept for many scenes; ``stop``: a stop token (see :func:`~dinov3_geo.engine.run_chips`)."""
    info = info or describe(model)
    engine = engine_for(model, settings, engine, mean=mean, std=std)
    channels = info.channels or output_channels(model, plan.tile, settings, engine=engine)
    if spec.kind == "classes" and channels > CLASS_NODATA:
        raise UsageError("model", f"{channels} classes do not fit uint8 with nodata {CLASS_NODATA}")
    with spec.cog_sink(output, scene, channels, overwrite=overwrite) as sink:
        stitcher = make_stitcher(spec.encoder(sink), plan, channels, kind=spec.kind)
        stats = run_chips(scene, model, stitcher, plan, settings, progress=progress, engine=engine, stop=stop)
        last_chip = time.perf_counter()
    stats.finalize_seconds = time.perf_counter() - last_chip
    return stats, channels


class _Quantised:
    """A sink wrapper: float rows -> uint16 counts of ``quantum`` (rounded; NaN -> 65535; values
    below 0 -> 0 and above the range -> 65534)."""

    def __init__(self, sink, quantum: float):
        self.sink, self.quantum = sink, float(quantum)

    def write(self, row_off: int, rows: np.ndarray) -> None:
        nodata = np.isnan(rows)
        q = np.clip(np.rint(np.nan_to_num(rows, nan=0.0) / np.float32(self.quantum)), 0, UINT16_NODATA - 1)
        q = q.astype(np.uint16)
        q[nodata] = UINT16_NODATA
        self.sink.write(row_off, q)


def output_channels(model: torch.nn.Module, tile: int, settings: RunSettings,
                    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                    engine: Optional[Engine] = None) -> int:
    """K of a dense model that does not declare ``channels``: one chip of zeros through it (through
    ``engine`` when given), checked to give ``[1, K, tile, tile]``."""
    engine = engine_for(model, settings, engine, mean=mean, std=std)
    y = engine.forward_zeros(1, tile)
    if y.ndim != 4 or tuple(y.shape[-2:]) != (tile, tile):
        raise UsageError("model", f"a dense model must map [B,3,{tile},{tile}] to [B,K,{tile},{tile}], "
                                  f"got {list(y.shape)}")
    return int(y.shape[1])


def _tuple(given: Optional[Sequence], declared: Optional[tuple]) -> Optional[tuple]:
    return tuple(given) if given is not None else declared
