"""Embeddings of a scene: one row per chip (:func:`embed`), the patch-token map at 16-px cells
(``embed(patch=True)``), or any per-patch model's map (:func:`patch_map`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

from dinov3_geo import options as opts
from dinov3_geo.analysis.cells import check_enough_cells
from dinov3_geo.analysis.result import (
    AnalysisResult,
    PathLike,
    model_id,
    result,
    scene_path,
)
from dinov3_geo.engine import StopToken
from dinov3_geo.errors import UsageError
from dinov3_geo.io.atomic import check_output
from dinov3_geo.io.features import CHIP_FORMATS, PATCH
from dinov3_geo.io.patchmap import CellGrid, check_patch_overlap
from dinov3_geo.io.readers import scene_reader
from dinov3_geo.models.load import width_without_loading
from dinov3_geo.tasks.features import feature_store, patch_features
from dinov3_geo.tasks.registry import Job, ModelSource, Request, request_for


def embed(scene, output: PathLike, *, backbone=None, patch: bool = False, pca: Optional[int] = None,
          tile: Optional[int] = None, overlap: Optional[int] = None, tiling: Optional[opts.Tiling] = None,
          batch_size: int = 8, device: str = "auto", precision: str = "auto", settings=None,
          bands: Optional[Sequence[int]] = None, scale=None, nodata: Optional[float] = None,
          reading: Optional[opts.ReadOptions] = None, overwrite: bool = False, progress: Optional[bool] = None,
          verify: bool = True, stop: Optional[StopToken] = None) -> AnalysisResult:
    """Embeddings of ``scene`` with ``backbone`` (a Backbone, a path or a registry name; default
    ``dinov3-vitl16-sat493m``).

    ``patch=False``: GeoParquet ``output``, one row per chip with a valid pixel (footprint polygon
    in the scene's CRS, ``chip_row``/``chip_col``, ``cls`` and ``mean_patch`` as fixed-size lists
    of float32; ``attrs["dinov3_geo"]["backbone"]`` names the backbone). ``patch=True``: the
    patch-token map at 16-px cells, blended across chips, as a Zarr store (``.zarr``) or a float32
    COG (``.tif``) on the scene's CRS with the transform scaled by 16; ``pca=K`` keeps K principal
    components (fitted on the scene's cells). The store records the backbone id and ``pca``.
    ``stop``: a :class:`~dinov3_geo.engine.StopToken`; once requested, the run raises its
    exception before the next chip and leaves no file (as in every function here).
    """
    t0 = time.perf_counter()
    output = Path(output)
    _check_embed_output(output, patch, pca)
    request = request_for("features" if patch else "embed", ModelSource(backbone=backbone, verify=verify),
                          tile=tile, overlap=overlap, tiling=tiling, bands=bands, scale=scale, nodata=nodata,
                          reading=reading, device=device, precision=precision, batch_size=batch_size,
                          settings=settings)
    pca = opts.check_pca(pca, backbone_width(request))
    check_output(output, overwrite, inputs=[scene_path(scene)])
    with scene_reader(scene, request.reading) as reader:
        if pca is not None:
            check_enough_cells(reader, pca, "pca")
        model = request.load_model()
        job = Job(pca=pca, overwrite=overwrite, progress=progress, stop=stop)
        written = request.task.write(request, reader, model, output, job)
    return result(output, model_id(model), t0, [written.stats], scene_path(scene),
                  warnings=list(reader.warnings))


def patch_map(scene, output: PathLike, model, *, channels: int, tile: Optional[int] = None,
              overlap: Optional[int] = None, tiling: Optional[opts.Tiling] = None, batch_size: int = 8,
              device: str = "auto", precision: str = "auto", settings=None, bands: Optional[Sequence[int]] = None,
              scale=None, nodata: Optional[float] = None, reading: Optional[opts.ReadOptions] = None,
              overwrite: bool = False, progress: Optional[bool] = None,
              stop: Optional[StopToken] = None) -> AnalysisResult:
    """Any per-patch model (normalised ``[B,3,T,T]`` -> ``[B, channels, T/16, T/16]``) over
    ``scene``, stitched seam-free at 16-px cells into a Zarr store or COG (as ``embed(patch=True)``
    does with the backbone's patch tokens). Cell ``(i, j)`` covers pixels ``16i..16i+15`` by
    ``16j..16j+15``; the map has the scene's CRS and its transform scaled by 16."""
    t0 = time.perf_counter()
    output = Path(output)
    _check_embed_output(output, True, None)
    chips = opts.tiling_of(tiling, tile, overlap, default_overlap=opts.cell_overlap)
    check_patch_overlap(chips.overlap)
    read = opts.reading(reading, bands=bands, scale=scale, nodata=nodata)
    run = opts.resolve_run(device, precision, batch_size, settings=settings)
    channels = opts.check_whole(channels, "channels")
    check_output(output, overwrite, inputs=[scene_path(scene)])
    with scene_reader(scene, read) as reader:
        attrs = dict(backbone=f"model:{type(model).__name__}", tile=chips.tile, overlap=chips.overlap, patch_size=PATCH)
        with feature_store(output, CellGrid.of(reader), channels, attrs, overwrite, scene_path(reader)) as sink:
            stats = patch_features(reader, sink, model, chips, run, progress, channels, stop=stop)
    return result(output, "none", t0, [stats], scene_path(scene))


def _check_embed_output(output: Path, patch: bool, pca) -> None:
    if pca is not None and not patch:
        raise UsageError("pca", "pca reduces patch features: use it with `patch`")
    if not patch and output.suffix.lower() not in CHIP_FORMATS:
        raise UsageError("output", f"chip embeddings go to GeoParquet (.parquet), GeoPackage (.gpkg) or "
                                   f"FlatGeobuf (.fgb), not {output.name}")
    if patch and output.suffix.lower() not in (".zarr", ".tif", ".tiff"):
        raise UsageError("output", f"patch features go to a Zarr store (.zarr) or a GeoTIFF (.tif), not {output.name}")


def backbone_width(request: Request) -> Optional[int]:
    """The feature width of the request's backbone when it can be told without reading weights."""
    return width_without_loading(request.source.backbone)
