"""The task registry: every task declared once, and the request every route resolves at its door.

In the manner of timm's model registry, one :class:`TaskSpec` entry says everything about a task:
what its model is and how it loads, its default tiling, what it outputs and which writer receives
it, and its file names in a batch. The command line, the Python functions, the ``da.dinov3``
accessor, batches in this process and on Dask workers all look tasks up here (:func:`get_task`)
and resolve what the user gave into one :class:`Request` (:func:`resolve_request`): the task, the
model's source (paths checked, a head file's metadata read, no weights), the tiling, the reading
options and the run settings. Everything that can be checked without the data is checked there.

Tasks: ``canopy`` (CHMv2 heights), ``segment`` (a trained segmentation head's classes),
``classify`` (a probe's class per chip), ``embed`` (chip embeddings), ``features`` (the patch
feature map), and the land analyses over patch features ``similar``, ``cluster``, ``change``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from dinov3_geo import options as opts
from dinov3_geo.engine import RunSettings, StopToken
from dinov3_geo.errors import UsageError, WeightsError, WeightsNotFoundError
from dinov3_geo.io.atomic import outputs_together
from dinov3_geo.io.patchmap import check_patch_overlap
from dinov3_geo.io.scene import MAX_UPSAMPLE
from dinov3_geo.io.tiling import ChipPlan
from dinov3_geo.io.vector import polygonize_classes, polygonize_threshold
from dinov3_geo.models.backbone import Backbone
from dinov3_geo.models.builtin import builtin_backbone
from dinov3_geo.models.canopy import (
    demo_canopy_model,
    find_backbone_beside,
    find_chmv2,
    get_chmv2_help,
    load_canopy_model,
)
from dinov3_geo.models.demo import DEMO_NOTE, is_demo
from dinov3_geo.models.heads.io import load_head
from dinov3_geo.models.heads.meta import HeadMeta, read_head_meta
from dinov3_geo.models.load import load_backbone
from dinov3_geo.models.registry import CHMV2_TRAINING_GSD
from dinov3_geo.models.locate import resolve_weights, verify_official_hash
from dinov3_geo.options import ReadOptions, Tiling
from dinov3_geo.pipeline import DenseOutput, write_dense
from dinov3_geo.task_model import OUTPUTS, describe
from dinov3_geo.tasks.classify import ChipClassifier, write_chips
from dinov3_geo.tasks.embed import ChipTokens, PatchTokens, write_chip_embeddings
from dinov3_geo.tasks.features import write_patch_features
from dinov3_geo.tasks.segment_head import SegmentHeadModel

PathLike = Union[str, os.PathLike]
DEFAULT_BACKBONE = "dinov3-vitl16-sat493m"


@dataclass(frozen=True)
class ModelSource:
    """What names a task's model: canopy ``weights`` (a CHMv2 folder or Meta head ``.pth``, or
    ``demo``) and their ``backbone_weights``; a ``head`` file from training; a ``backbone`` (a
    registry name such as ``dinov3-vitl16-sat493m``, a path, ``demo``, or a loaded Backbone)."""

    weights: Optional[str] = None
    backbone_weights: Optional[str] = None
    head: Optional[str] = None
    backbone: Any = None
    verify: bool = True

    def record(self) -> dict:
        """The source as JSON-ready data (a loaded backbone by its name)."""
        backbone = self.backbone if self.backbone is None or isinstance(self.backbone, str) else \
            getattr(self.backbone, "name", type(self.backbone).__name__)
        return dict(weights=self.weights, backbone_weights=self.backbone_weights, head=self.head, backbone=backbone)


@dataclass(frozen=True)
class BatchFiles:
    """A task's files in a batch: ``<scene stem>_<suffix><ext>`` per scene, the vector ``layer``,
    and how outputs combine: ``mosaic`` (a VRT of the COGs), ``layer`` (one GeoPackage layer of
    every scene's rows) or ``None``."""

    suffix: str
    ext: str
    layer: Optional[str] = None
    combine: Optional[str] = None


@dataclass(frozen=True)
class TaskSpec:
    """Everything about one task, declared once (see the module)."""

    name: str
    output: str                     # one of tasks.OUTPUTS: what the model gives per chip
    help: str
    default_tiling: Callable[[Optional[HeadMeta]], Tiling]
    resolve_source: Callable[[ModelSource], tuple[ModelSource, Optional[HeadMeta]]]
    load: Callable[["Request", RunSettings], torch.nn.Module]
    write: Optional[Callable[..., "Written"]] = None     # scene tasks: scene -> output files
    batch: Optional[BatchFiles] = None
    notes: Callable[[ModelSource], tuple[str, ...]] = lambda source: ()
    scene_notes: Callable[["Request", Any], list[str]] = lambda request, scene: resampling_notes(scene, request.tiling)
    default_overlap: Optional[Callable[[int], int]] = None   # for a tile given alone (None: the default's)

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"task {self.name}: unknown output {self.output!r} ({', '.join(OUTPUTS)})")

    @property
    def dense(self) -> bool:
        """Whether the task writes a raster on the scene's grid (which batches can split into bands)."""
        return self.output in ("continuous", "classes")


@dataclass(frozen=True)
class Request:
    """A task request resolved at the door: nothing in it is checked again downstream."""

    task: TaskSpec
    source: ModelSource
    head: Optional[HeadMeta]
    tiling: Tiling
    reading: ReadOptions
    settings: RunSettings
    notes: tuple[str, ...] = ()

    def __reduce__(self):
        """Pickled by the task's name (a Dask worker looks the task up in its own registry)."""
        return (_rebuild_request, (self.task.name, self.source, self.head, self.tiling, self.reading,
                                   self.settings, self.notes))

    def load_model(self, settings: Optional[RunSettings] = None) -> torch.nn.Module:
        """The task's model, loaded for ``settings`` (default: the request's)."""
        return self.task.load(self, settings or self.settings)

    def record(self) -> dict:
        """What decides the output's values, resolved, as JSON-ready data (a batch's resume recipe)."""
        return dict(task=self.task.name, tile=self.tiling.tile, overlap=self.tiling.overlap,
                    precision=self.settings.precision, **self.reading.record())


def _rebuild_request(task: str, *values) -> Request:
    return Request(get_task(task), *values)


@dataclass
class Job:
    """Per-run choices of a scene task's writer (``stop``: the caller's token, never pickled with
    the request)."""

    dtype: str = "float32"          # continuous outputs: float32, float16 or uint16
    vector: Optional[Path] = None   # polygons of a dense output
    min_height: float = 2.0         # canopy polygons: the threshold in metres
    pca: Optional[int] = None       # patch features: principal components kept
    overwrite: bool = False
    progress: Optional[bool] = None
    stop: Optional[StopToken] = None


@dataclass
class Written:
    """What a scene task's writer did."""

    stats: Any
    polygons: Optional[int] = None
    extra: dict = field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    """Add ``spec`` to the registry (its name must be new)."""
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name} is registered twice")
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; a UsageError naming ``task`` and listing the tasks otherwise."""
    _register_builtin_tasks()
    spec = TASKS.get(str(name))
    if spec is None:
        raise UsageError("task", f"unknown task '{name}' (available: {', '.join(TASKS)})")
    return spec


def task_names(batch_only: bool = False) -> list[str]:
    """The registered task names (only those a batch runs, with ``batch_only``)."""
    _register_builtin_tasks()
    return [n for n, s in TASKS.items() if s.batch is not None or not batch_only]


def resolve_request(task: str, source: ModelSource, settings: RunSettings, tiling: Optional[Tiling] = None,
                    reading: Optional[ReadOptions] = None, tile: Optional[int] = None,
                    overlap: Optional[int] = None) -> Request:
    """The request of ``task``: the model's source checked (paths exist, a head's metadata read
    and matching the task), the tiling (``tiling``, else ``tile``/``overlap`` with the task's
    default for what is missing: 512/64, a head's training chip), the reading options (the head's
    recorded bands and scaling where none are given). No weights are read here."""
    spec = get_task(task)
    source, head = spec.resolve_source(source)
    if tiling is None:
        tiling = Tiling.complete(tile, overlap, spec.default_tiling(head), spec.default_overlap)
    if spec.output == "patches":
        check_patch_overlap(tiling.overlap)
    reading = _head_reading(reading or ReadOptions(), head)
    return Request(spec, source, head, tiling, reading, settings, spec.notes(source))


def request_for(task: str, source: ModelSource, *, tile=None, overlap=None, tiling: Optional[Tiling] = None,
                bands=None, scale=None, nodata=None, gsd=None, max_upsample=MAX_UPSAMPLE,
                reading: Optional[ReadOptions] = None, device="auto", precision: str = "auto", batch_size: int = 8,
                compile: bool = False, readers: Optional[int] = None,
                settings: Optional[RunSettings] = None) -> Request:
    """The entry layer every public function goes through: its keyword shortcuts (or the option
    values ``tiling``, ``reading``, ``settings``) turned into values, checked, and resolved with the
    task into a :class:`Request`, before any weights are read or any chip computed."""
    run = opts.resolve_run(device, precision, batch_size, compile, readers, settings)
    read = opts.reading(reading, bands=bands, scale=scale, nodata=nodata, gsd=gsd, max_upsample=max_upsample)
    chips, tile, overlap = opts.tiling(tiling, tile, overlap)
    return resolve_request(task, source, run, chips, read, tile, overlap)


def _head_reading(reading: ReadOptions, head: Optional[HeadMeta]) -> ReadOptions:
    """The reading options with what a head recorded filled in where the caller gave nothing."""
    if head is None:
        return reading
    changes = {}
    if reading.bands is None and head.bands is not None:
        changes["bands"] = head.bands
    if reading.scale is None and head.scale is not None:
        changes["scale"] = head.scale
    return replace(reading, **changes) if changes else reading


# -- sources --------------------------------------------------------------------------------------

def absolute(path: Optional[PathLike]) -> Optional[str]:
    """A path made absolute (workers may run elsewhere in the folder tree); ``None`` as is."""
    return None if path is None else str(Path(path).expanduser().absolute())


def resolve_backbone_source(backbone: Any) -> Any:
    """A backbone as the model loaders take it: a loaded one, an in-memory name (``demo``, ``standin``),
    a path made absolute, or a registry name found locally; anything else fails here (a missing
    file, an unknown name, gated weights not downloaded), before any work."""
    if isinstance(backbone, Backbone) or builtin_backbone(backbone) is not None:
        return backbone
    name = DEFAULT_BACKBONE if backbone is None else backbone
    if Path(str(name)).expanduser().exists():
        return absolute(name)
    resolve_weights(name)            # raises WeightsError naming it when it cannot be found
    return str(name)


def load_backbone_for(request: "Request", settings: RunSettings):
    """The request's backbone, loaded (kept on the CPU in fp32: the engine places the task model)."""
    backbone = request.source.backbone
    if isinstance(backbone, Backbone):
        return backbone
    return load_backbone(backbone, verify=request.source.verify)


def _backbone_only(source: ModelSource) -> tuple[ModelSource, None]:
    if source.head is not None or source.weights is not None:
        raise UsageError("head" if source.head is not None else "weights",
                         "this task runs a backbone only: give `backbone`, no head or canopy weights")
    return replace(source, backbone=resolve_backbone_source(source.backbone)), None


def _head_source(task: str) -> Callable[[ModelSource], tuple[ModelSource, HeadMeta]]:
    def resolve(source: ModelSource) -> tuple[ModelSource, HeadMeta]:
        if source.head is None:
            raise UsageError("head", f"the {task} task needs a head file (from 'train {task}')")
        if source.weights is not None:
            raise UsageError("weights", "canopy weights do not go with a head; give the head's `backbone`")
        head = read_head_meta(source.head)
        if head.task != task:
            raise WeightsError(source.head, f"a {head.task} head: use it with {head.task}, not {task}")
        backbone = source.backbone if source.backbone is not None else head.backbone.name
        try:
            backbone = resolve_backbone_source(backbone)
        except WeightsNotFoundError:
            if source.backbone is not None:
                raise
            raise UsageError("backbone", f"{source.head} was trained on backbone '{head.backbone.name}', which is "
                                         "not found here; give its path with `backbone`") from None
        return replace(source, head=absolute(source.head), backbone=backbone), head
    return resolve


def _canopy_source(source: ModelSource) -> tuple[ModelSource, None]:
    """Canopy weights checked (``demo``, or an existing path, else the CHMv2 weights found in the
    search folders) and made absolute; a head or a backbone do not go with them."""
    if source.head is not None:
        raise UsageError("head", "the canopy task takes CHMv2 `weights`, not a head (a head runs as the segment task)")
    if source.backbone is not None:
        raise UsageError("backbone", "the canopy task takes `backbone_weights` for a Meta head .pth, not `backbone`")
    if is_demo(source.weights):
        if source.backbone_weights is not None:
            raise UsageError("backbone_weights", "the demo model is built in memory: no backbone weights go with it")
        return source, None
    weights = Path(source.weights).expanduser() if source.weights is not None else find_chmv2()
    if not weights.exists():
        raise WeightsNotFoundError(weights, f"not found: {get_chmv2_help(weights)}")
    backbone_weights = source.backbone_weights
    if backbone_weights is not None and not Path(backbone_weights).expanduser().exists():
        raise WeightsNotFoundError(backbone_weights, "no such file or folder")
    if backbone_weights is None and weights.is_file():
        backbone_weights = find_backbone_beside(weights)
    return replace(source, weights=absolute(weights), backbone_weights=absolute(backbone_weights)), None


def _demo_note(source: ModelSource) -> tuple[str, ...]:
    return (DEMO_NOTE,) if is_demo(source.weights) else ()


# -- what to tell about a scene before the work starts ----------------------------------------------

def resampling_notes(scene, tiling: Tiling) -> list[str]:
    """When ``gsd`` changes the grid a lot (2x or more per axis): the factor, the chips and the
    working grid's size."""
    factor = getattr(scene, "resampling_factor", 1.0)
    if not getattr(scene, "resampled", False) or 0.5 < factor < 2.0:
        return []
    chips = len(ChipPlan.build(scene.height, scene.width, tiling.tile, tiling.overlap))
    size_gb = scene.width * scene.height * 4 / 1e9
    return [f"{scene.path}: gsd resamples {factor:.2g}x per axis: {scene.input_profile['width']} x "
            f"{scene.input_profile['height']} px -> {scene.width} x {scene.height} px, {chips} chips of "
            f"{tiling.tile} px (~{size_gb:.2g} GB of temporary float32 results; the output stays on the input grid)"]


def canopy_notes(request: "Request", scene) -> list[str]:
    """CHMv2 was trained near 0.6 m per pixel: far from that, say so and point to ``gsd``; a
    geographic CRS's pixel size is an estimate; then the resampling note."""
    notes = []
    size = scene.pixel_size_m
    if size is not None:
        if scene.crs is not None and scene.crs.is_geographic:
            _, lat = scene.transform * (scene.width / 2, scene.height / 2)
            notes.append(f"{scene.path}: geographic CRS (degrees): pixel size taken as {abs(size[0]):.2f} x "
                         f"{abs(size[1]):.2f} m at latitude {lat:.2f}; the output stays in degrees")
        mean = math.sqrt(abs(size[0] * size[1]))
        if request.reading.gsd is None and (mean > 2.0 or mean < 0.2):
            notes.append(f"{scene.path}: pixel size is {mean:.2f} m, far from the ~{CHMV2_TRAINING_GSD} m the "
                         f"canopy model was trained on; heights may be unreliable (try `gsd` {CHMV2_TRAINING_GSD})")
    return notes + resampling_notes(scene, request.tiling)


# -- models ---------------------------------------------------------------------------------------

def _load_canopy(request: Request, settings: RunSettings) -> torch.nn.Module:
    source = request.source
    if is_demo(source.weights):
        return demo_canopy_model(settings.device, settings.dtype)
    if source.verify:
        for path in (source.weights, source.backbone_weights):
            if path is not None and Path(path).is_file():
                verify_official_hash(path)
    return load_canopy_model(source.weights, backbone_weights=source.backbone_weights, device=settings.device,
                             dtype=settings.dtype, verify=source.verify)


def _load_head_model(kind: str) -> Callable[[Request, RunSettings], torch.nn.Module]:
    def load(request: Request, settings: RunSettings) -> torch.nn.Module:
        head = load_head(request.source.head)
        cls = SegmentHeadModel if kind == "segment" else ChipClassifier
        return cls(load_backbone_for(request, settings), head)
    return load


def _load_tokens(kind: str) -> Callable[[Request, RunSettings], torch.nn.Module]:
    def load(request: Request, settings: RunSettings) -> torch.nn.Module:
        return (ChipTokens if kind == "tokens" else PatchTokens)(load_backbone_for(request, settings))
    return load


def _fixed_tiling(tile: int = 512, overlap: int = 64) -> Callable[[Optional[HeadMeta]], Tiling]:
    return lambda head: Tiling(tile, overlap)


def _head_tiling(head: Optional[HeadMeta]) -> Tiling:
    return Tiling(*head.default_tiling())


# -- writers --------------------------------------------------------------------------------------

def write_dense_task(request: Request, scene, model, output: Path, job: Job) -> Written:
    """A dense task's COG on the scene's grid and, with ``job.vector``, its polygons (canopy above
    ``job.min_height``; one polygon per region of equal class), replaced together or not at all."""
    info = describe(model)
    classes = request.task.output == "classes"
    spec = DenseOutput(request.task.output, "uint8" if classes else job.dtype, info.band_names, info.class_names,
                       info.colormap)
    plan = ChipPlan.build(scene.height, scene.width, request.tiling.tile, request.tiling.overlap)
    with outputs_together(output, job.vector, job.overwrite) as (raster_out, vector_out):
        stats, _ = write_dense(scene, model, raster_out, plan, request.settings, spec, info,
                               overwrite=job.overwrite or job.vector is not None, progress=job.progress,
                               stop=job.stop)
        polygons = None
        if vector_out is not None:
            layer = request.task.batch.layer
            if classes:
                polygons = polygonize_classes(raster_out, vector_out, info.class_names, layer=layer, overwrite=True)
            else:
                polygons = polygonize_threshold(raster_out, vector_out, job.min_height, layer=layer, overwrite=True)
    return Written(stats, polygons)


def _write_chip_classes(request: Request, scene, model, output: Path, job: Job) -> Written:
    stats, frame = write_chips(scene, model, output, _plan(request, scene), request.settings,
                               overwrite=job.overwrite, progress=job.progress, stop=job.stop)
    counts = {name: int((frame["class"] == name).sum()) for name in model.class_names}
    return Written(stats, extra={"chips": len(frame), "counts": counts})


def _write_chip_embeddings(request: Request, scene, model, output: Path, job: Job) -> Written:
    return Written(write_chip_embeddings(scene, model, output, _plan(request, scene), request.settings,
                                         overwrite=job.overwrite, progress=job.progress, stop=job.stop))


def _write_patch_features(request: Request, scene, model, output: Path, job: Job) -> Written:
    return Written(write_patch_features(scene, model, output, request.tiling, request.settings, pca=job.pca,
                                        overwrite=job.overwrite, progress=job.progress, stop=job.stop))


def _plan(request: Request, scene):
    return ChipPlan.build(scene.height, scene.width, request.tiling.tile, request.tiling.overlap)


_BUILTIN_DONE = False


def _register_builtin_tasks() -> None:
    """The built-in tasks, registered on first lookup (their loaders import the model code)."""
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    _BUILTIN_DONE = True
    backbone_task = dict(resolve_source=_backbone_only, default_tiling=_fixed_tiling())
    patch_task = dict(backbone_task, default_overlap=opts.cell_overlap)
    for spec in (
        TaskSpec("canopy", "continuous", "CHMv2 canopy height in metres (float COG; polygons above a height)",
                 _fixed_tiling(), _canopy_source, _load_canopy, write_dense_task,
                 BatchFiles("canopy", ".tif", "canopy", "mosaic"), _demo_note, canopy_notes,
                 default_overlap=opts.quarter_overlap),
        TaskSpec("segment", "classes", "a trained segmentation head's classes (uint8 COG; polygons per class)",
                 _head_tiling, _head_source("segment"), _load_head_model("segment"), write_dense_task,
                 BatchFiles("classes", ".tif", "classes", "mosaic"), default_overlap=opts.quarter_overlap),
        TaskSpec("classify", "vector", "a trained probe's class per chip (GeoPackage, one polygon per chip)",
                 _head_tiling, _head_source("classify"), _load_head_model("classify"), _write_chip_classes,
                 BatchFiles("chips", ".gpkg", "chips", "layer"), default_overlap=lambda tile: 0),
        TaskSpec("embed", "tokens", "chip embeddings: CLS and mean patch token per chip (GeoParquet)",
                 load=_load_tokens("tokens"), write=_write_chip_embeddings, batch=BatchFiles("embed", ".parquet"),
                 default_overlap=opts.quarter_overlap, **backbone_task),
        TaskSpec("features", "patches", "the patch-feature map at 16-px cells (Zarr or COG)",
                 load=_load_tokens("patches"), write=_write_patch_features, batch=BatchFiles("features", ".zarr"),
                 **patch_task),
        TaskSpec("similar", "patches", "cosine similarity of every cell to a point or polygons (float COG)",
                 load=_load_tokens("patches"), **patch_task),
        TaskSpec("cluster", "patches", "k-means land units of the cells (uint8 COG; polygons)",
                 load=_load_tokens("patches"), **patch_task),
        TaskSpec("change", "patches", "cosine distance between the cells of two dates (float COG)",
                 load=_load_tokens("patches"), **patch_task),
    ):
        register(spec)
