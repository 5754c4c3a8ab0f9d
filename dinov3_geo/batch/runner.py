"""Run one task over many scenes: in this process or on a Dask cluster, resumable.

:func:`run_batch` expands the inputs, skips the scenes whose output is complete (see
:mod:`~dinov3_geo.batch.resume`), runs the rest (whole, or as row bands assembled into one COG for
scenes above ``split_above`` pixels), then writes a VRT mosaic of every output, the combined
GeoPackage when asked, and a JSON summary of what was done, skipped and failed. A failing scene
is reported and the others go on; the result says whether all succeeded.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from dinov3_geo.engine import STOP
from dinov3_geo.batch import cluster, mosaic, resume
from dinov3_geo.batch.plan import (TASKS, Band, band_count, check_distinct_outputs, expand_inputs, output_for,
                                   plan_bands, read_grid)
from dinov3_geo.batch.progress import JobProgress
from dinov3_geo.batch.work import (JobOptions, Runtime, UnitResult, assemble, guarded, remove_band_files,
                                   remove_temporaries, vector_path)
from dinov3_geo.errors import DinoGeoError, OutputError, UsageError, WeightsNotFoundError
from dinov3_geo.io.scene import MAX_UPSAMPLE
from dinov3_geo.io.tiling import ChipPlan, validate_tiling


@dataclass
class SceneJob:
    """One scene to run: where its output goes and, when split, its bands."""

    scene: Path
    output: Path
    chips: int
    bands: Optional[list[Band]] = None


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


@dataclass
class BatchResult:
    """What a batch job did, scene by scene, and the files it wrote."""

    outcomes: list[SceneOutcome]
    summary: Path
    mosaics: list[Path] = field(default_factory=list)
    vector: Optional[Path] = None
    catalogue: Optional[Path] = None        # the STAC Collection
    dashboard: Optional[str] = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def of(self, status: str) -> list[SceneOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def ok(self) -> bool:
        """True when no scene failed."""
        return not self.of("failed")

    def summary_text(self) -> str:
        """The closing lines the command prints."""
        lines = [f"{len(self.of('done'))} done, {len(self.of('skipped'))} skipped (complete), "
                 f"{len(self.of('failed'))} failed in {self.seconds:.1f} s"]
        lines += [f"failed: {o.reason}" for o in self.of("failed")]
        lines += [f"wrote {p}" for p in (*self.mosaics, self.vector, self.catalogue, self.summary) if p is not None]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def run_batch(inputs: Sequence[str], out_dir, *, task: str = "canopy", weights=None, backbone_weights=None,
              head=None, backbone=None, vector=None, min_height: float = 2.0, device: str = "auto",
              batch_size: int = 8, precision: str = "auto", tile: Optional[int] = None,
              overlap: Optional[int] = None, bands: Optional[Sequence[int]] = None,
              gsd: Optional[float] = None, scale: Optional[tuple[float, float]] = None, overwrite: bool = False,
              compile: bool = False, verify: bool = True, readers: Optional[int] = None, dtype: str = "float32",
              max_upsample: Optional[float] = MAX_UPSAMPLE, dask: Optional[str] = None, split_above: Optional[int] = None,
              progress: Optional[bool] = None) -> BatchResult:
    """Run ``task`` over every scene of ``inputs`` (globs, paths, ``@list.txt``) into ``out_dir``.

    ``task``: ``canopy`` (CHMv2 ``weights``), ``segment`` (the segmentation ``head`` file on its
    ``backbone``, as ``segment_with_head``), ``classify`` (the probe ``head``, as
    ``classify_scene``) or ``embed`` (the chip embeddings of ``backbone``, as ``analysis.embed``).
    ``tile`` and ``overlap`` default as the single-scene commands do (512/64; a head's training chip
    size). Each dense scene's COG is ``out_dir/<name>_<suffix>.tif`` on the scene's grid (suffix
    ``canopy`` or ``classes``; with ``vector``, also its polygons in ``<name>_<suffix>.gpkg``, and
    all of them in the GeoPackage ``vector``, layer ``canopy`` or ``classes``, with a ``scene``
    column); ``classify`` writes ``<name>_chips.gpkg`` per scene and every scene's chips in
    ``mosaic_classify.gpkg`` (layer ``chips``, with a ``scene`` column); ``embed`` writes
    ``<name>_embed.parquet`` per scene. ``dask``: None (in this process, or
    ``$DASK_SCHEDULER_ADDRESS``), ``"local[:N]"`` or a scheduler address. Scenes above
    ``split_above`` pixels run as row bands on several workers, assembled into one COG equal to the
    unsplit run (bit for bit at ``batch_size=1``; other batch sizes group chips differently, which
    changes values by float rounding only).
    Rerunning skips complete outputs and redoes partial or stale ones.
    """
    t0 = time.perf_counter()
    if task not in TASKS:
        raise UsageError("task", f"unknown task '{task}' (available: {', '.join(TASKS)})")
    if not TASKS[task].dense and (vector is not None or split_above is not None):
        raise UsageError("vector" if vector is not None else "split_above", f"the {task} task writes one "
                         f"{TASKS[task].ext} file per scene: no polygons or row bands to ask for")
    head, backbone, tile, overlap, bands, scale = _resolve_head(task, head, backbone, tile, overlap, bands, scale)
    _validate(task, tile, overlap, batch_size, split_above, dtype)
    target = cluster.dask_target(dask)
    scenes, outputs_given = _not_outputs(expand_inputs(inputs))
    out_dir = _output_folder(out_dir)
    check_distinct_outputs(scenes, out_dir, task)
    vector = _check_vector(vector, out_dir / f"summary_{task}.json", overwrite)
    weights, backbone_weights = _resolve_weights(task, weights, backbone_weights)
    options = JobOptions(task, weights, backbone_weights, head, backbone, device=device, precision=precision,
                         batch_size=int(batch_size), tile=tile, overlap=overlap,
                         bands=tuple(bands) if bands else None, scale=tuple(scale) if scale else None, gsd=gsd,
                         min_height=min_height, dtype=dtype, vector=vector is not None, compile=compile,
                         verify=verify, readers=readers, max_upsample=max_upsample)
    recipe = _recipe(options)
    ours = _our_files(scenes, out_dir, task, vector)
    remove_temporaries(out_dir, ours)          # left by an earlier run that was killed
    outcomes, jobs = _triage(scenes, out_dir, options, recipe, overwrite, split_above)
    report = JobProgress(jobs, outcomes, progress)
    dashboard = None
    try:
        if target is None or not jobs:
            _run_in_process(jobs, options, report, lambda job, res: _record(job, res, recipe, outcomes, report))
        else:
            with cluster.open_client(target) as client:
                dashboard = cluster.dashboard_link(client)
                report.say(f"Dask cluster {client.scheduler.address}"
                           + (f", dashboard {dashboard}" if dashboard else " (no dashboard)"))
                _run_on_cluster(client, jobs, options, report,
                                lambda job, res: _record(job, res, recipe, outcomes, report))
    finally:                       # interrupted or not: no temporary file stays behind
        remove_temporaries(out_dir, ours)
    result = BatchResult(_in_input_order(outcomes, scenes), out_dir / f"summary_{task}.json", dashboard=dashboard)
    if options.weights == "demo":
        from dinov3_geo.models.demo import DEMO_NOTE

        result.notes.append(DEMO_NOTE)
    if outputs_given:
        result.notes.append(f"{outputs_given} input(s) left out: outputs of a dinov3geo job (a glob over the output folder?)")
    _combined_products(result, out_dir, task, vector, overwrite)
    result.seconds = time.perf_counter() - t0
    _write_summary(result, task)
    return result


def _not_outputs(scenes: list[Path]) -> tuple[list[Path], int]:
    """The scenes that are not outputs of a job (a glob over the output folder would find those),
    and how many were left out. UsageError when none is left."""
    kept = [s for s in scenes if not resume.is_ours(s) and not mosaic.is_sidecar(s)]
    if not kept:
        raise UsageError("scene", "every input is an output of a dinov3geo job")
    return kept, len(scenes) - len(kept)


def _our_files(scenes: list[Path], out_dir: Path, task: str, vector: Optional[Path]) -> set[str]:
    """Names of every file the job writes in ``out_dir`` (outputs, sidecars, per-scene vectors,
    mosaics, summary, the combined GeoPackage when it lies there)."""
    names = {f"summary_{task}.json"}
    for scene in scenes:
        output = output_for(scene, out_dir, task)
        names |= {output.name, resume.sidecar_path(output).name, vector_path(output).name}
    names |= {p.name for p in out_dir.glob(f"mosaic_{task}*.vrt")} | {f"mosaic_{task}.vrt", f"mosaic_{task}.gpkg"}
    if vector is not None and vector.parent == out_dir:
        names.add(vector.name)
    return names | mosaic.sidecar_names(names, task)


def _validate(task: str, tile: int, overlap: int, batch_size: int, split_above: Optional[int], dtype: str) -> None:
    from dinov3_geo.engine import validate_batch_size
    from dinov3_geo.pipeline import DenseOutput

    if TASKS[task].dense:
        DenseOutput(TASKS[task].output, dtype)        # checks the dtype
    validate_tiling(tile, overlap)
    validate_batch_size(batch_size)
    if split_above is not None and int(split_above) < 1:
        raise UsageError("split_above", f"must be a positive number of pixels, got {split_above}")


def _output_folder(out_dir) -> Path:
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(out_dir, "is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(out_dir, f"cannot create the output folder ({exc.strerror})") from None
    return out_dir


def _check_vector(vector, summary: Path, overwrite: bool) -> Optional[Path]:
    """The combined GeoPackage's path; an existing file is replaced only with ``overwrite`` or when
    the last run of this job (its summary) wrote it."""
    if vector is None:
        return None
    vector = Path(vector).absolute()
    if vector.exists() and not overwrite:
        try:
            ours = json.loads(summary.read_text()).get("vector") == str(vector)
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise OutputError(vector, "exists (use `overwrite` to replace it)")
    return vector


def _resolve_head(task: str, head, backbone, tile: Optional[int], overlap: Optional[int], bands, scale) -> tuple:
    """For a head task: the head file checked here, once (its task, readable), absolute paths of it
    and the backbone, and the tiling and band reading the single-scene command takes from the head
    when not given. For canopy and embed: 512 px chips with 64 px overlap unless given (embed: the
    default backbone unless given)."""
    if task in ("canopy", "embed"):
        if head is not None:
            raise UsageError("head", f"the {task} task takes no head; a head runs as the segment or classify task")
        if task == "embed":
            from dinov3_geo.analysis import DEFAULT_BACKBONE

            backbone = _absolute_if_file(backbone or DEFAULT_BACKBONE)
        return None, backbone, tile or 512, 64 if overlap is None else overlap, bands, scale
    from dinov3_geo.tasks.classify import load_classify_head
    from dinov3_geo.tasks.segment_head import head_reading, head_tiling, load_segment_head

    if head is None:
        raise UsageError("head", f"the {task} task needs a head file")
    hf = load_segment_head(head) if task == "segment" else load_classify_head(head)
    if task == "segment":
        tile, overlap = head_tiling(hf, tile, overlap)
    else:       # one chip each, no overlap, as classify_scene
        tile, overlap = tile or int(hf.meta["chip_size"]), 0
    bands, scale = head_reading(hf, bands, scale)
    return str(Path(head).absolute()), _absolute_if_file(backbone), tile, overlap, bands, scale


def _absolute_if_file(backbone):
    """A backbone path made absolute (workers may run elsewhere in the folder tree); a registry
    name or None as given."""
    return str(Path(backbone).absolute()) if backbone is not None and Path(backbone).exists() else backbone


def _resolve_weights(task: str, weights, backbone_weights) -> tuple[Optional[str], Optional[str]]:
    """Absolute paths (workers may run elsewhere in the folder tree), or ``demo``; missing files fail
    here, once. Head tasks take no canopy weights."""
    from dinov3_geo.api import _find_chmv2
    from dinov3_geo.models.demo import is_demo

    if task != "canopy":
        return None, None
    if is_demo(weights):
        return weights, None
    weights = Path(weights) if weights is not None else _find_chmv2()
    for path in (weights, backbone_weights):
        if path is not None and not Path(path).exists():
            raise WeightsNotFoundError(path, "no such file or folder")
    return str(Path(weights).absolute()), str(Path(backbone_weights).absolute()) if backbone_weights else None


def _recipe(options: JobOptions) -> dict:
    """What decides an output's values: the weights' hashes and the options (resume compares it)."""
    recipe = {k: getattr(options, k) for k in ("task", "precision", "tile", "overlap", "bands", "scale", "gsd",
                                               "dtype")}     # max_upsample allows runs, changes no value
    recipe["weights_sha256"] = resume.weights_hash(options.weights) if options.weights != "demo" else "demo"
    recipe["backbone_weights_sha256"] = resume.weights_hash(options.backbone_weights)
    if options.head is not None:
        recipe["head_sha256"] = resume.weights_hash(options.head)
    if options.task != "canopy":       # a backbone named by the head file or the registry: by name
        recipe["backbone"] = resume.weights_hash(options.backbone) if options.backbone and \
            Path(options.backbone).exists() else options.backbone
    if options.vector:
        recipe["min_height"] = options.min_height
    return json.loads(json.dumps(recipe, default=str))


def _triage(scenes: list[Path], out_dir: Path, options: JobOptions, recipe: dict, overwrite: bool,
            split_above: Optional[int]) -> tuple[list[SceneOutcome], list[SceneJob]]:
    """Skip the complete scenes, fail the unreadable ones, and make a job of every other one."""
    outcomes, jobs = [], []
    for scene in scenes:
        output = output_for(scene, out_dir, options.task)
        try:
            grid = read_grid(scene)
        except DinoGeoError as exc:
            outcomes.append(SceneOutcome(str(scene), str(output), "failed", str(exc)))
            continue
        extra = (vector_path(output),) if options.vector else ()
        dense = TASKS[options.task].dense
        why = resume.why_not_complete(output, scene, recipe, grid, extra)
        if why is None and not overwrite:
            outcomes.append(SceneOutcome(str(scene), str(output), "skipped", "complete"))
            continue
        if output.exists() and not resume.is_ours(output) and not overwrite:
            outcomes.append(SceneOutcome(str(scene), str(output), "failed",
                                         f"{output}: exists and was not written by a dinov3geo job "
                                         "(use `overwrite` to replace it)"))
            continue
        resume.write_sidecar(output, "running", scene, recipe)
        n = band_count(grid.height, grid.width, options.tile, options.overlap, split_above) if dense else 1
        split = plan_bands(grid.height, grid.width, options.tile, options.overlap, n) if n > 1 else None
        chips = sum(len(ChipPlan.build(b.read_stop - b.read_start, grid.width, options.tile, options.overlap))
                    for b in split or [Band(0, 1, 0, grid.height, 0, grid.height)])
        jobs.append(SceneJob(scene, output, chips, split))
    return outcomes, jobs


def _record(job: SceneJob, res: UnitResult, recipe: dict, outcomes: list[SceneOutcome], report: JobProgress) -> None:
    """Note a finished scene; a complete one gets its sidecar."""
    if res.ok:
        resume.write_sidecar(job.output, "complete", job.scene, recipe,
                             {"chips": res.chips_total, "seconds": round(res.seconds, 3)})
    outcome = SceneOutcome(str(job.scene), str(job.output), "done" if res.ok else "failed", res.reason,
                           res.chips_total, round(res.seconds, 3), len(job.bands or [None]))
    outcomes.append(outcome)
    report.scene_finished(job, outcome)


# -- executors ---------------------------------------------------------------------------------

def _run_in_process(jobs: list[SceneJob], options: JobOptions, report: JobProgress, done: Callable) -> None:
    """Scenes one after the other with one model loaded here (only if some scene needs it)."""
    try:
        runtime = Runtime(options) if jobs else None
    except DinoGeoError as exc:           # no model, no scene: each one says why
        for job in jobs:
            done(job, UnitResult(False, str(exc)))
        return
    for job in jobs:
        STOP.raise_if_requested()         # a stop asked for during the last scene's tail
        if job.bands is None:
            done(job, guarded(runtime.scene, job.scene, job.output, report.chips))
            continue
        parts = []
        for band in job.bands:
            parts.append(guarded(runtime.band, job.scene, job.output, band, report.chips))
            report.band_finished(job, band, parts[-1])
        done(job, _assembled(job.scene, job.output, job.bands, options, parts))


def _assembled(scene: Path, output: Path, bands: list[Band], options: JobOptions,
               parts: list[UnitResult]) -> UnitResult:
    """The scene's result from its bands' results: assembled into the COG when all succeeded."""
    failed = [p for p in parts if not p.ok]
    if failed:
        remove_band_files(output)
        return UnitResult(False, failed[0].reason, seconds=sum(p.seconds for p in parts))
    res = guarded(assemble, scene, output, bands, options, parts[0].spec, parts[0].channels)
    res.chips_total = sum(p.chips_total for p in parts)
    res.chips_computed = sum(p.chips_computed for p in parts)
    res.seconds += sum(p.seconds for p in parts)
    return res


def _scene_task(plugin: str, scene: Path, output: Path) -> UnitResult:
    with cluster.library_warnings_hidden():
        try:
            runtime = cluster.worker_runtime(plugin)
        except DinoGeoError as exc:
            return UnitResult(False, str(exc))
        return guarded(runtime.scene, scene, output, cluster.chip_events(plugin))


def _band_task(plugin: str, scene: Path, output: Path, band: Band) -> UnitResult:
    with cluster.library_warnings_hidden():
        try:
            runtime = cluster.worker_runtime(plugin)
        except DinoGeoError as exc:
            return UnitResult(False, str(exc))
        return guarded(runtime.band, scene, output, band, cluster.chip_events(plugin))


def _assemble_task(scene: Path, output: Path, bands: list[Band], options: JobOptions,
                   parts: list[UnitResult]) -> UnitResult:
    with cluster.library_warnings_hidden():
        return _assembled(scene, output, bands, options, parts)


def _run_on_cluster(client, jobs: list[SceneJob], options: JobOptions, report: JobProgress, done: Callable) -> None:
    """Every scene (or band) as a task; the model is loaded once per worker by a plugin."""
    from distributed import as_completed

    name = f"{cluster.PLUGIN_PREFIX}-{uuid.uuid4().hex[:8]}"
    client.register_plugin(cluster.ModelPlugin(options, name, cluster.workers_per_host(client)), name=name)
    client.subscribe_topic(name, lambda event: report.chips(*event[1]))
    resources = {"GPU": 1} if cluster.uses_gpus(client) else None
    owners, futures = {}, []
    try:
        for job in jobs:
            if job.bands is None:
                fut = client.submit(_scene_task, name, job.scene, job.output, resources=resources, pure=False)
            else:
                parts = [client.submit(_band_task, name, job.scene, job.output, b, resources=resources, pure=False)
                         for b in job.bands]
                futures += parts
                for p, b in zip(parts, job.bands):
                    owners[p.key] = (job, b)
                fut = client.submit(_assemble_task, job.scene, job.output, job.bands, options, parts, pure=False)
            owners[fut.key] = (job, None)
            futures.append(fut)
        for fut in as_completed(futures):
            job, band = owners[fut.key]
            try:
                res = fut.result()
            except Exception as exc:  # the worker died (KilledWorker) or the task could not run
                res = UnitResult(False, f"{job.scene}: task failed on the cluster ({type(exc).__name__}: {exc})")
            if band is not None:
                report.band_finished(job, band, res)
            else:
                done(job, res)
    finally:
        client.unsubscribe_topic(name)
        client.cancel(futures)
        try:
            client.unregister_worker_plugin(name)
        except Exception:  # noqa: BLE001 - workers that are gone have nothing to free
            pass


# -- products ----------------------------------------------------------------------------------

def _in_input_order(outcomes: list[SceneOutcome], scenes: list[Path]) -> list[SceneOutcome]:
    order = {str(s): i for i, s in enumerate(scenes)}
    return sorted(outcomes, key=lambda o: order.get(o.scene, len(order)))


def _combined_products(result: BatchResult, out_dir: Path, task: str, vector: Optional[Path], overwrite: bool) -> None:
    """The VRT mosaic of every complete output and, when asked, the combined GeoPackage (per-chip
    tasks: every scene's chips in one layer), by one CRS rule (:mod:`~dinov3_geo.batch.mosaic`);
    the STAC Collection of them all."""
    complete = [o for o in result.outcomes if o.status in ("done", "skipped")]
    if not complete:
        return
    spec = TASKS[task]
    if spec.layer is not None and not spec.dense:       # chips: one layer (per CRS) of every scene's
        result.vector = out_dir / f"mosaic_{task}.gpkg"
        result.notes += mosaic.merge_vectors([(Path(o.scene).name, Path(o.output)) for o in complete],
                                             result.vector, layer=spec.layer, overwrite=True)[2]
    elif spec.dense:
        result.mosaics, notes = mosaic.write_vrts([Path(o.output) for o in complete], out_dir / f"mosaic_{task}.vrt")
        result.notes += notes
        if vector is not None:
            parts = [(Path(o.scene).name, vector_path(Path(o.output))) for o in complete]
            # (an existing file was checked by _check_vector)
            result.notes += mosaic.merge_vectors(parts, vector, layer=spec.layer, overwrite=True)[2]
            result.vector = vector
    result.catalogue = mosaic.write_catalogue(out_dir, task, [(Path(o.scene), Path(o.output)) for o in complete],
                                              [*result.mosaics, result.vector])      # STAC Items, QGIS styles


def _write_summary(result: BatchResult, task: str) -> None:
    record = {"task": task, "seconds": round(result.seconds, 3), "dashboard": result.dashboard,
              "mosaics": [str(p) for p in result.mosaics],
              "vector": str(result.vector) if result.vector else None, "notes": result.notes,
              "catalogue": str(result.catalogue) if result.catalogue else None}
    for status in ("done", "skipped", "failed"):
        record[status] = [asdict(o) for o in result.of(status)]
    tmp = result.summary.with_name(f".{result.summary.name}.partial")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(result.summary)
