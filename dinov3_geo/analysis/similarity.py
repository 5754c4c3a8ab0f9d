"""Similarity: cosine similarity of every 16-px cell to the mean feature of a reference (a point,
or the cells under polygons), on the scene's grid."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
from rasterio.transform import array_bounds
from rasterio.windows import Window

from dinov3_geo import options as opts
from dinov3_geo.analysis.cells import (
    analysis_request,
    cell_features,
    unit,
    write_on_scene,
)
from dinov3_geo.analysis.result import AnalysisResult, PathLike, result, scene_path
from dinov3_geo.engine import StopToken
from dinov3_geo.errors import InputError, UsageError
from dinov3_geo.io.atomic import check_output
from dinov3_geo.io.features import PATCH
from dinov3_geo.io.georef import vector_transform
from dinov3_geo.io.patchmap import ZARR_CHUNK_ROWS, CellGrid
from dinov3_geo.io.readers import scene_reader
from dinov3_geo.tasks.features import read_block, row_blocks


def similar(scene, output: PathLike, *, at: Optional[tuple[float, float]] = None, like: Optional[PathLike] = None,
            features: Optional[PathLike] = None, backbone=None, tile: Optional[int] = None,
            overlap: Optional[int] = None, tiling: Optional[opts.Tiling] = None, batch_size: int = 8,
            device: str = "auto", precision: str = "auto", settings=None, bands=None, scale=None,
            nodata: Optional[float] = None, reading: Optional[opts.ReadOptions] = None, overwrite: bool = False,
            progress: Optional[bool] = None, verify: bool = True, stop: Optional[StopToken] = None) -> AnalysisResult:
    """Cosine similarity (-1..1, float32 COG, NaN nodata) of every 16-px cell of ``scene`` to the
    mean feature of a reference: the cell under the point ``at=(x, y)`` (scene CRS), or the cells
    covered by the polygons of the vector file ``like`` (reprojected to the scene's CRS). Written on
    the scene's grid. ``features``: a store from ``embed(patch=True)`` of this scene, used instead
    of running the model (the backbone is then neither built nor loaded); one reduced by PCA
    (``pca=K``, or an explorer page's ``write_features``) gives the similarity over its K components.
    """
    t0 = time.perf_counter()
    output = Path(output)
    if (at is None) == (like is None):
        raise UsageError("at", "give exactly one reference: a point (at) or polygons (like)")
    at = opts.check_point(at) if at is not None else None
    request, store = analysis_request("similar", features, backbone, verify, tile=tile, overlap=overlap,
                                      tiling=tiling, bands=bands, scale=scale, nodata=nodata, reading=reading,
                                      device=device, precision=precision, batch_size=batch_size, settings=settings)
    check_output(output, overwrite, inputs=[scene_path(scene), like, features])
    with scene_reader(scene, request.reading) as reader:
        cellmask = _point_cells(reader, at) if at is not None else _polygon_cells(reader, like)
        with cell_features(None if store else request, store, reader, output, progress,
                           stop) as (feats, made_by, stats):
            reference = _mean_feature(feats, cellmask, at if at is not None else like, store)
            ref = unit(reference[:, None])[:, 0]
            blocks = ((r0, np.einsum("d,dhw->hw", ref, unit(block)))
                      for r0, block in row_blocks(feats, where=features))
            write_on_scene(output, reader, blocks, "float32", float("nan"), overwrite, "cosine_similarity")
    reduced = {"similarity over": f"{store.pca} PCA components"} if store is not None and store.pca else {}
    return result(output, made_by, t0, stats, scene_path(scene), warnings=list(reader.warnings), extra=reduced)


def _point_cells(reader, at: tuple[float, float]) -> np.ndarray:
    """Boolean cell mask of the cell under ``at`` (x, y in the scene's CRS; for a scene without
    georeference, where GIS tools draw it: x = column, y = -row); a point outside the scene or on
    its nodata is an error naming ``at`` (told from one cell's pixels)."""
    x, y = at
    placement = vector_transform(reader.crs, reader.transform)
    col, row = ~placement @ (x, y)
    if not (0 <= row < reader.height and 0 <= col < reader.width):
        left, bottom, right, top = array_bounds(reader.height, reader.width, placement)
        where = f"in {reader.crs}" if reader.crs is not None else "in pixels: x = column, y = -row"
        raise UsageError("at", f"point {_coord(x)},{_coord(y)} is outside {reader.path} (x {_coord(left)} to "
                               f"{_coord(right)}, y {_coord(bottom)} to {_coord(top)} {where})")
    r, c = int(row) // PATCH, int(col) // PATCH
    window = Window(c * PATCH, r * PATCH, min(PATCH, reader.width - c * PATCH), min(PATCH, reader.height - r * PATCH))
    _, valid = reader.read(window)
    if not valid.any():
        raise UsageError("at", f"point {_coord(x)},{_coord(y)} falls on nodata of {reader.path} "
                               "(no valid pixel in its 16-px cell)")
    grid = CellGrid.of(reader)
    mask = np.zeros((grid.height, grid.width), bool)
    mask[r, c] = True
    return mask


def _coord(value: float) -> str:
    """A map coordinate in full (no exponent), to the centimetre or 1e-7 degree."""
    text = f"{value:.7f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


def _polygon_cells(reader, like: PathLike) -> np.ndarray:
    """Boolean cell mask of the cells the polygons of ``like`` touch, in the scene's CRS."""
    from rasterio.features import geometry_mask

    try:
        shapes = _spatial_layers(like)
    except Exception as exc:  # pyogrio's DataSourceError and friends
        raise InputError(like, f"not a readable vector file ({exc})") from None
    shapes = shapes[shapes.geometry.notna() & ~shapes.geometry.is_empty]
    if shapes.empty:
        raise InputError(like, "no geometry")
    if shapes.crs is None or reader.crs is None:
        raise InputError(like, "polygons or scene without a CRS: cannot place them on the scene")
    if shapes.crs != reader.crs:
        shapes = shapes.to_crs(reader.crs)
    grid = CellGrid.of(reader)
    mask = geometry_mask(list(shapes.geometry), out_shape=(grid.height, grid.width), transform=grid.transform,
                         invert=True, all_touched=True)
    if not mask.any():
        raise UsageError("like", f"the polygons of {like} lie outside {reader.path}")
    return mask


def _spatial_layers(path):
    """Every layer with geometries of a vector file, in one frame in the first one's CRS (a
    GeoPackage's ``layer_styles`` table and other plain tables left out)."""
    import geopandas as gpd
    import pandas as pd
    import pyogrio

    names = [name for name, kind in pyogrio.list_layers(path) if kind is not None]
    frames = [gpd.read_file(path, layer=name) for name in names] or [gpd.read_file(path)]
    crs = frames[0].crs
    frames = [f.to_crs(crs) if f.crs is not None and crs is not None and f.crs != crs else f for f in frames]
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=crs)


def _mean_feature(feats, cellmask: np.ndarray, where, store=None) -> np.ndarray:
    """Mean feature ``[D]`` of the valid cells under ``cellmask``, read only where it is set."""
    rows = np.flatnonzero(cellmask.any(axis=1))
    total = np.zeros(feats.shape[0], np.float64)
    count = 0
    for r0 in range(int(rows[0]), int(rows[-1]) + 1, ZARR_CHUNK_ROWS):
        r1 = min(r0 + ZARR_CHUNK_ROWS, int(rows[-1]) + 1)
        block = read_block(feats, r0, r1, store.path if store is not None else None)
        cells = block[:, cellmask[r0:r1]]
        cells = cells[:, np.isfinite(cells).all(axis=0)]
        total += cells.sum(axis=1)
        count += cells.shape[1]
    if count == 0:
        name = "at" if isinstance(where, tuple) else "like"
        raise UsageError(name, "the reference falls on nodata (no valid pixel there)")
    return (total / count).astype(np.float32)
