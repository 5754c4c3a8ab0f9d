"""Change between two dates: the cosine distance between their cells' features, on the first
date's grid (the second read onto it)."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from rasterio.warp import transform_bounds

from dinov3_geo import options as opts
from dinov3_geo.analysis.cells import scene_bounds, unit, write_on_scene
from dinov3_geo.analysis.result import (
    AnalysisResult,
    PathLike,
    model_id,
    result,
    scene_path,
)
from dinov3_geo.engine import StopToken
from dinov3_geo.errors import DinoGeoWarning, InputError
from dinov3_geo.io.atomic import check_output
from dinov3_geo.io.readers import scene_reader
from dinov3_geo.tasks.features import row_blocks, scratch_features
from dinov3_geo.tasks.registry import ModelSource, request_for


def change(before, after, output: PathLike, *, backbone=None, tile: Optional[int] = None,
           overlap: Optional[int] = None, tiling: Optional[opts.Tiling] = None, batch_size: int = 8,
           device: str = "auto", precision: str = "auto", settings=None, bands=None, scale=None,
           nodata: Optional[float] = None, reading: Optional[opts.ReadOptions] = None, overwrite: bool = False,
           progress: Optional[bool] = None, verify: bool = True, stop: Optional[StopToken] = None) -> AnalysisResult:
    """Per-cell cosine distance (0 same .. 2 opposite, float32 COG on ``before``'s grid, NaN
    nodata) between the patch features of two dates. ``after`` is read on ``before``'s grid
    (warped when its grid differs); cells either date does not cover are nodata; dates that do not
    overlap at all are an error.
    """
    t0 = time.perf_counter()
    output = Path(output)
    request = request_for("change", ModelSource(backbone=backbone, verify=verify), tile=tile, overlap=overlap,
                          tiling=tiling, bands=bands, scale=scale, nodata=nodata, reading=reading, device=device,
                          precision=precision, batch_size=batch_size, settings=settings)
    check_output(output, overwrite, inputs=[scene_path(before), scene_path(after)])
    with scene_reader(before, request.reading) as first:
        _check_overlap(first, after)
        with scene_reader(after, request.reading, grid=first.input_profile) as second:
            model = request.load_model()
            with scratch_features(first, model, request.tiling, request.settings, output, progress, stop) as (f1, s1), \
                    scratch_features(second, model, request.tiling, request.settings, output, progress,
                                     stop) as (f2, s2):
                blocks = ((r0, 1.0 - np.sum(unit(a) * unit(b), axis=0))
                          for (r0, a), (_, b) in zip(row_blocks(f1), row_blocks(f2)))
                write_on_scene(output, first, blocks, "float32", float("nan"), overwrite, "cosine_distance")
    return result(output, model_id(model), t0, [s1, s2], [scene_path(before), scene_path(after)],
                  warnings=list(first.warnings) + list(second.warnings))


def _check_overlap(first, after) -> None:
    """InputError unless ``after`` covers some of ``first``'s extent."""
    with warnings.catch_warnings():      # the second date's warnings are said once, when it is read
        warnings.simplefilter("ignore", DinoGeoWarning)
        with scene_reader(after) as probe:
            crs, bounds = probe.crs, scene_bounds(probe)
    if crs is None or first.crs is None:
        raise InputError(scene_path(after), "no georeference (no CRS): cannot be compared with another date")
    left, bottom, right, top = transform_bounds(crs, first.crs, *bounds)
    l1, b1, r1, t1 = scene_bounds(first)
    if min(right, r1) <= max(left, l1) or min(top, t1) <= max(bottom, b1):
        raise InputError(scene_path(after), f"does not overlap {first.path}: the two dates cover different places")
