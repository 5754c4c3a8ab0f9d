"""Run one task over many scenes: in this process or on a Dask cluster, resumable.

:func:`run_batch` expands the inputs, skips the scenes whose output is complete (see
:mod:`~dinov3_geo.batch.resume`), runs the rest (whole, or as row bands assembled into one COG for
scenes above ``split_above`` pixels), then writes a VRT mosaic of every output, the combined
GeoPackage when asked, and a JSON summary of what was done, skipped and failed. A failing scene
is reported and the others go on; the result says whether all succeeded.
"""
from __future__ import annotations

import contextlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from dinov3_geo.batch import cluster, mosaic, resume
from dinov3_geo.batch.plan import (
    Band,
    SceneJob,
    band_count,
    check_distinct_outputs,
    check_output_folder,
    expand_inputs,
    output_for,
    plan_bands,
    read_grid,
)
from dinov3_geo.batch.progress import JobProgress
from dinov3_geo.batch.work import (
    BatchJob,
    Runtime,
    SceneOutcome,
    UnitResult,
    assemble,
    guarded,
    remove_band_files,
    remove_temporaries,
    vector_path,
)
from dinov3_geo.engine.stop import StopToken, check
from dinov3_geo.errors import DinoGeoError, OutputError, UsageError
from dinov3_geo.io.scene import MAX_UPSAMPLE
from dinov3_geo.io.tiling import ChipPlan
from dinov3_geo.models.demo import is_demo
from dinov3_geo.options import ReadOptions, RunSettings, Tiling
from dinov3_geo.pipeline import DENSE_DTYPES
from dinov3_geo.tasks.registry import ModelSource, get_task, request_for, task_names


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
              head=None, backbone=None, vector=None, min_height: float = 2.0, dtype: str = "float32",
              tile: Optional[int] = None, overlap: Optional[int] = None, tiling: Optional[Tiling] = None,
              bands: Optional[Sequence[int]] = None, scale=None, nodata: Optional[float] = None,
              gsd: Optional[float] = None, max_upsample: Optional[float] = MAX_UPSAMPLE,
              reading: Optional[ReadOptions] = None, device: str = "auto", batch_size: int = 8,
              precision: str = "auto", compile: bool = False, readers: Optional[int] = None,
              settings: Optional[RunSettings] = None, overwrite: bool = False, verify: bool = True,
              dask: Optional[str] = None, split_above: Optional[int] = None,
              progress: Optional[bool] = None, stop: Optional[StopToken] = None) -> BatchResult:
    """Run ``task`` over every scene of ``inputs`` (globs, paths, ``@list.txt``) into ``out_dir``.

    ``task``: ``canopy`` (CHMv2 ``weights``), ``segment`` (the segmentation ``head`` file on its
    ``backbone``; a ``head`` alone means this task), ``classify`` (the probe ``head``), ``embed``
    (the chip embeddings of ``backbone``) or ``features`` (its patch-feature map, one Zarr store a
    scene): every task the registry gives batch files. The request is resolved once, here, as the
    single-scene functions resolve it (tiling and reading defaults, a head's recorded bands and
    scaling) and every scene runs through the same task writer, so each output equals the
    single-scene function's. Each dense scene's COG is ``out_dir/<name>_<suffix>.tif`` on the
    scene's grid (suffix ``canopy`` or ``classes``; with ``vector``, also its polygons in
    ``<name>_<suffix>.gpkg``, and all of them in the GeoPackage ``vector`` with a ``scene`` column);
    ``classify`` writes ``<name>_chips.gpkg`` per scene and every scene's chips in
    ``mosaic_classify.gpkg``; ``embed`` writes ``<name>_embed.parquet``; ``features``
    ``<name>_features.zarr``. ``dask``: None (in this process, or ``$DASK_SCHEDULER_ADDRESS``),
    ``"local[:N]"`` or a scheduler address. Scenes above ``split_above`` pixels run as row bands on
    several workers, assembled into one COG equal to the unsplit run (bit for bit at
    ``batch_size=1``; other batch sizes group chips differently, which changes values by float
    rounding only). Each scene's warnings are printed once and kept in the summary. Rerunning skips
    complete outputs and redoes partial, failed or stale ones. ``stop``: a
    :class:`~dinov3_geo.engine.StopToken` (a signal handler requests it): a batch in this process
    raises its exception at the next chip or scene, keeps the finished scenes, marks the others
    interrupted and leaves no partial file.
    """
    t0 = time.perf_counter()
    if head is not None and task == "canopy":
        task = "segment"
    spec = get_task(task)
    if spec.batch is None:
        raise UsageError("task", f"the {task} task does not run in a batch (batch tasks: "
                                 f"{', '.join(task_names(batch_only=True))})")
    if not spec.dense and (vector is not None or split_above is not None):
        raise UsageError("vector" if vector is not None else "split_above", f"the {task} task writes one "
                         f"{spec.batch.ext} file per scene: no polygons or row bands to ask for")
    if dtype not in DENSE_DTYPES:
        raise UsageError("dtype", f"unsupported output dtype {dtype!r} ({', '.join(DENSE_DTYPES)})")
    if split_above is not None and (isinstance(split_above, bool) or not isinstance(split_above, int)
                                    or split_above < 1):
        raise UsageError("split_above", f"must be a positive number of pixels, got {split_above}")
    target = cluster.dask_target(dask)
    check_output_folder(out_dir)
    request = request_for(task, ModelSource(weights=weights, backbone_weights=backbone_weights, head=head,
                                            backbone=backbone, verify=verify),
                          tile=tile, overlap=overlap, tiling=tiling, bands=bands, scale=scale, nodata=nodata,
                          gsd=gsd, max_upsample=max_upsample, reading=reading, device=device, precision=precision,
                          batch_size=batch_size, compile=compile, readers=readers, settings=settings)
    scenes, outputs_given = _not_outputs(expand_inputs(inputs))
    out_dir = _output_folder(out_dir)
    check_distinct_outputs(scenes, out_dir, task)
    vector = _check_vector(vector, out_dir / f"summary_{task}.json", overwrite)
    job = BatchJob(request, dtype=dtype, vector=vector is not None, min_height=float(min_height))
    ours = _our_files(scenes, out_dir, task, vector)
    remove_temporaries(out_dir, ours)          # left by an earlier run that was killed
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(cluster.open_client(target)) if target is not None else None
        if client is not None:       # the device and precision as the workers resolve them
            job = replace(job, request=replace(request, settings=cluster.worker_settings(client, request.settings)))
        recipe = _recipe(job)
        outcomes, jobs = _triage(scenes, out_dir, job, recipe, overwrite, split_above)
        report = JobProgress(jobs, outcomes, progress)
        for note in request.notes:
            report.say(f"note: {note}")
        dashboard = None
        finished: set[Path] = set()

        def done(scene_job: SceneJob, res: UnitResult) -> None:
            finished.add(scene_job.output)
            _record(scene_job, res, recipe, outcomes, report)

        try:
            if client is None or not jobs:
                _run_in_process(jobs, job, report, done, stop)
            else:
                dashboard = cluster.dashboard_link(client)
                report.say(f"Dask cluster {client.scheduler.address}"
                           + (f", dashboard {dashboard}" if dashboard else " (no dashboard)"))
                _run_on_cluster(client, jobs, job, report, done)
        finally:                       # interrupted or not: no temporary file stays behind
            for unfinished in (j for j in jobs if j.output not in finished):
                resume.write_sidecar(unfinished.output, "interrupted", unfinished.scene, recipe)
            remove_temporaries(out_dir, ours)
    result = BatchResult(_in_input_order(outcomes, scenes), out_dir / f"summary_{task}.json", dashboard=dashboard)
    result.notes.extend(request.notes)
    if outputs_given:
        result.notes.append(f"{outputs_given} input(s) left out: outputs of a dinov3geo job (a glob over the output folder?)")
    result.notes.extend(f"{Path(o.scene).name}: {n}" for o in result.outcomes for n in o.notes)
    _combined_products(result, out_dir, spec, vector, overwrite)
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


def _recipe(job: BatchJob) -> dict:
    """What decides an output's values, as resolved for this job (the device's precision, the
    tiling and reading the task takes by default or from a head), with the weights' hashes: resume
    compares it with each output's sidecar."""
    request = job.request
    recipe = request.record()
    recipe["dtype"] = job.dtype
    source = request.source
    recipe["weights_sha256"] = "demo" if is_demo(source.weights) else resume.weights_hash(source.weights)
    recipe["backbone_weights_sha256"] = resume.weights_hash(source.backbone_weights)
    if source.head is not None:
        recipe["head_sha256"] = resume.weights_hash(source.head)
    if request.task.name != "canopy":       # a backbone by its file's hash, a registry or in-memory one by name
        backbone = source.backbone
        recipe["backbone"] = resume.weights_hash(backbone) if isinstance(backbone, str) and \
            Path(backbone).exists() else source.record()["backbone"]
    if job.vector:
        recipe["min_height"] = job.min_height
    return json.loads(json.dumps(recipe, default=str))


def _triage(scenes: list[Path], out_dir: Path, job: BatchJob, recipe: dict, overwrite: bool,
            split_above: Optional[int]) -> tuple[list[SceneOutcome], list[SceneJob]]:
    """Skip the complete scenes, fail the unreadable ones, and make a job of every other one."""
    outcomes, jobs = [], []
    task, tiling = job.request.task, job.request.tiling
    for scene in scenes:
        output = output_for(scene, out_dir, task.name)
        try:
            grid = read_grid(scene)
        except DinoGeoError as exc:
            outcomes.append(SceneOutcome(str(scene), str(output), "failed", str(exc)))
            continue
        extra = (vector_path(output),) if job.vector else ()
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
        n = band_count(grid.height, grid.width, tiling.tile, tiling.overlap, split_above) if task.dense else 1
        split = plan_bands(grid.height, grid.width, tiling.tile, tiling.overlap, n) if n > 1 else None
        chips = sum(len(ChipPlan.build(b.read_stop - b.read_start, grid.width, tiling.tile, tiling.overlap))
                    for b in split or [Band(0, 1, 0, grid.height, 0, grid.height)])
        jobs.append(SceneJob(scene, output, chips, split))
    return outcomes, jobs


def _record(job: SceneJob, res: UnitResult, recipe: dict, outcomes: list[SceneOutcome], report: JobProgress) -> None:
    """Note a finished scene: its sidecar says complete (with its notes) or failed (with the
    reason); its warnings are said once."""
    if res.ok:
        resume.write_sidecar(job.output, "complete", job.scene, recipe,
                             {"chips": res.chips_total, "seconds": round(res.seconds, 3), "notes": res.notes})
    else:
        resume.write_sidecar(job.output, "failed", job.scene, recipe, {"reason": res.reason})
    for note in res.notes:
        report.say(f"warning: {note}")
    outcome = SceneOutcome(str(job.scene), str(job.output), "done" if res.ok else "failed", res.reason,
                           res.chips_total, round(res.seconds, 3), len(job.bands or [None]), list(res.notes))
    outcomes.append(outcome)
    report.scene_finished(job, outcome)


# -- executors ---------------------------------------------------------------------------------

def _run_in_process(jobs: list[SceneJob], job: BatchJob, report: JobProgress, done: Callable,
                    stop: Optional[StopToken] = None) -> None:
    """Scenes one after the other with one model loaded here (only if some scene needs it),
    stopped at the next chip or scene once ``stop`` is requested."""
    try:
        runtime = Runtime(job, stop=stop) if jobs else None
    except DinoGeoError as exc:           # no model, no scene: each one says why
        for scene_job in jobs:
            done(scene_job, UnitResult(False, str(exc)))
        return
    for scene_job in jobs:
        check(stop)       # a stop asked for during the last scene's tail
        if scene_job.bands is None:
            done(scene_job, guarded(runtime.scene, scene_job.scene, scene_job.output, report.chips))
            continue
        parts = []
        for band in scene_job.bands:
            parts.append(guarded(runtime.band, scene_job.scene, scene_job.output, band, report.chips))
            report.band_finished(scene_job, band, parts[-1])
        done(scene_job, _assembled(scene_job.scene, scene_job.output, scene_job.bands, job, parts))


def _assembled(scene: Path, output: Path, bands: list[Band], job: BatchJob, parts: list[UnitResult]) -> UnitResult:
    """The scene's result from its bands' results: assembled into the COG when all succeeded."""
    failed = [p for p in parts if not p.ok]
    if failed:
        remove_band_files(output)
        return UnitResult(False, failed[0].reason, seconds=sum(p.seconds for p in parts))
    res = guarded(assemble, scene, output, bands, job, parts[0].spec, parts[0].channels)
    res.chips_total = sum(p.chips_total for p in parts)
    res.chips_computed = sum(p.chips_computed for p in parts)
    res.seconds += sum(p.seconds for p in parts)
    res.notes = list(dict.fromkeys(n for p in parts for n in p.notes))
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


def _assemble_task(scene: Path, output: Path, bands: list[Band], job: BatchJob,
                   parts: list[UnitResult]) -> UnitResult:
    with cluster.library_warnings_hidden():
        return _assembled(scene, output, bands, job, parts)


def _run_on_cluster(client, jobs: list[SceneJob], options: BatchJob, report: JobProgress, done: Callable) -> None:
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


def _combined_products(result: BatchResult, out_dir: Path, spec, vector: Optional[Path], overwrite: bool) -> None:
    """What the task's batch files combine into, by one CRS rule (:mod:`~dinov3_geo.batch.mosaic`):
    the VRT mosaic of every complete COG and, when asked, the combined GeoPackage (``mosaic``), or
    every scene's rows in one layer (``layer``); and the STAC Collection of every output."""
    complete = [o for o in result.outcomes if o.status in ("done", "skipped")]
    if not complete:
        return
    files = spec.batch
    if files.combine == "layer":
        result.vector = out_dir / f"mosaic_{spec.name}.gpkg"
        result.notes += mosaic.merge_vectors([(Path(o.scene).name, Path(o.output)) for o in complete],
                                             result.vector, layer=files.layer, overwrite=True)[2]
    elif files.combine is not None:
        result.mosaics, notes = mosaic.write_vrts([Path(o.output) for o in complete],
                                                  out_dir / f"mosaic_{spec.name}.vrt")
        result.notes += notes
        if vector is not None:
            parts = [(Path(o.scene).name, vector_path(Path(o.output))) for o in complete]
            # (an existing file was checked by _check_vector)
            result.notes += mosaic.merge_vectors(parts, vector, layer=files.layer, overwrite=True)[2]
            result.vector = vector
    result.catalogue = mosaic.write_catalogue(out_dir, spec.name, [(Path(o.scene), Path(o.output)) for o in complete],
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
