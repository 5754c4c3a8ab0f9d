"""Land units: k-means (scikit-learn's MiniBatchKMeans) over the unit features of every 16-px
cell, as classes on the scene's grid and, when asked, their polygons."""
from __future__ import annotations

import colorsys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from dinov3_geo import options as opts
from dinov3_geo.analysis.cells import (
    CLASS_NODATA,
    analysis_request,
    cell_features,
    check_enough_cells,
    unit,
    write_on_scene,
)
from dinov3_geo.analysis.result import AnalysisResult, PathLike, result, scene_path
from dinov3_geo.engine import StopToken
from dinov3_geo.errors import UsageError
from dinov3_geo.io.atomic import check_output
from dinov3_geo.io.readers import scene_reader
from dinov3_geo.io.vector import polygonize_classes
from dinov3_geo.tasks.features import FIT_BATCH, row_blocks, valid_columns


def cluster(scene, output: PathLike, *, k: int = 8, vector: Optional[PathLike] = None,
            features: Optional[PathLike] = None, backbone=None, tile: Optional[int] = None,
            overlap: Optional[int] = None, tiling: Optional[opts.Tiling] = None, batch_size: int = 8,
            device: str = "auto", precision: str = "auto", settings=None, bands=None, scale=None,
            nodata: Optional[float] = None, reading: Optional[opts.ReadOptions] = None, seed: int = 0,
            overwrite: bool = False, progress: Optional[bool] = None, verify: bool = True,
            stop: Optional[StopToken] = None) -> AnalysisResult:
    """k-means land units: scikit-learn's MiniBatchKMeans (``k`` clusters, ``seed``) over the unit
    patch features of every 16-px cell, as a uint8 COG on the scene's grid (0..k-1, 255 nodata, a
    colour table); with ``vector``, the units as polygons (layer ``clusters``: ``class``,
    ``class_name``, ``area_m2``) in a GeoPackage.
    """
    t0 = time.perf_counter()
    output = Path(output)
    k = opts.check_k(k)
    request, store = analysis_request("cluster", features, backbone, verify, tile=tile, overlap=overlap,
                                      tiling=tiling, bands=bands, scale=scale, nodata=nodata, reading=reading,
                                      device=device, precision=precision, batch_size=batch_size, settings=settings)
    check_output(output, overwrite, inputs=[scene_path(scene), features])
    if vector is not None:
        if Path(vector).resolve() == output.resolve():
            raise UsageError("vector", "the vector output must differ from the raster output")
        check_output(vector, overwrite, inputs=[scene_path(scene), output])
    units = [f"unit {i}" for i in range(k)]        # the class names in the COG and the polygons
    with scene_reader(scene, request.reading) as reader:
        check_enough_cells(reader, k, "k")
        with cell_features(None if store else request, store, reader, output, progress,
                           stop) as (feats, made_by, stats):
            kmeans = _fit_kmeans(feats, k, seed, features)
            blocks = ((r0, _predict_block(kmeans, block)) for r0, block in row_blocks(feats, where=features))
            write_on_scene(output, reader, blocks, "uint8", CLASS_NODATA, overwrite, "cluster", colormap=_palette(k),
                           class_names=units)
    if vector is not None:
        try:
            polygonize_classes(output, vector, units, layer="clusters", overwrite=overwrite)
        except BaseException:        # no half job: the same command can be rerun
            output.unlink(missing_ok=True)
            raise
    return result(output, made_by, t0, stats, scene_path(scene),
                  vector=Path(vector) if vector is not None else None, warnings=list(reader.warnings))


def _fit_kmeans(feats, k: int, seed: int, where=None):
    """MiniBatchKMeans fitted block by block on unit cell features."""
    from sklearn.cluster import MiniBatchKMeans

    kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=FIT_BATCH, n_init=3)
    pending: list[np.ndarray] = []
    fitted, seen = False, 0
    for _, block in row_blocks(feats, where=where):
        cells = valid_columns(unit(block))[0]
        pending.append(cells)
        seen += len(cells)
        if sum(len(p) for p in pending) >= FIT_BATCH:
            kmeans.partial_fit(np.concatenate(pending))
            pending, fitted = [], True
    rest = np.concatenate(pending) if pending else np.zeros((0, feats.shape[0]), np.float32)
    if len(rest) >= k or (fitted and len(rest)):
        kmeans.partial_fit(rest)
        fitted = True
    if not fitted:
        raise UsageError("k", f"k={k} exceeds the {seen} valid cells of the scene")
    return kmeans


def _predict_block(kmeans, block: np.ndarray) -> np.ndarray:
    """Cluster of each cell of ``[D, rows, width]`` (255 where nodata)."""
    cells, ok = valid_columns(unit(block))
    out = np.full(ok.size, CLASS_NODATA, np.uint8)
    if len(cells):
        out[ok] = kmeans.predict(cells).astype(np.uint8)
    return out.reshape(block.shape[1:])


def _palette(k: int) -> dict[int, tuple[int, int, int, int]]:
    """``k`` distinct colours (evenly spaced hues, two lightness levels) for a colour table."""
    colours = {}
    for i in range(k):
        r, g, b = colorsys.hls_to_rgb(i / k, 0.45 if i % 2 else 0.6, 0.65)
        colours[i] = (int(r * 255), int(g * 255), int(b * 255), 255)
    colours[CLASS_NODATA] = (0, 0, 0, 0)
    return colours
