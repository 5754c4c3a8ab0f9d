"""What the analyses over 16-px cells share: the request at the door (or a given feature store,
checked against the backbone and the scene's grid), the cells' features from a run or the store,
unit vectors, and cell values written on the scene's own grid."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from rasterio.transform import array_bounds
from rasterio.windows import Window

from dinov3_geo import options as opts
from dinov3_geo.analysis.result import PathLike, model_id
from dinov3_geo.engine import StopToken
from dinov3_geo.errors import InputError, UsageError, WeightsError
from dinov3_geo.io.cog import COGSink
from dinov3_geo.io.features import PATCH
from dinov3_geo.io.patchmap import CellGrid
from dinov3_geo.models import registry
from dinov3_geo.models.locate import resolve_weights
from dinov3_geo.tasks.features import open_store, scratch_features
from dinov3_geo.tasks.registry import ModelSource, Request, request_for

#: Nodata of the class rasters (k-means units).
CLASS_NODATA = 255


def analysis_request(task: str, features, backbone, verify: bool, **options) -> tuple[Optional[Request], object]:
    """The request of an analysis over patch features: with ``features`` given, only the reading
    options are resolved (the store is opened; no backbone is resolved, built or loaded)."""
    if features is None:
        return request_for(task, ModelSource(backbone=backbone, verify=verify), **options), None
    store = _open_given_store(features, backbone)
    read = opts.reading(options.get("reading"), bands=options.get("bands"), scale=options.get("scale"),
                        nodata=options.get("nodata"))
    opts.tiling(options.get("tiling"), options.get("tile"), options.get("overlap"))
    opts.resolve_run(options.get("device", "auto"), options.get("precision", "auto"),
                     options.get("batch_size", 8), settings=options.get("settings"))
    return _ReadingOnly(read), store


@dataclass(frozen=True)
class _ReadingOnly:
    """What an analysis over a given feature store needs of a request: how to read the scene."""

    reading: opts.ReadOptions


def check_enough_cells(reader, needed: int, name: str) -> None:
    """UsageError naming ``name`` when the scene has fewer 16-px cells than ``needed`` (told from its
    size alone, before any chip is computed)."""
    grid = CellGrid.of(reader)
    total = grid.height * grid.width
    if needed > total:
        raise UsageError(name, f"{name}={needed} exceeds the {total} cells (16 x 16 px) of {reader.path} "
                               f"({reader.width} x {reader.height} px)")


@contextlib.contextmanager
def cell_features(request: Optional[Request], store, reader, near: Path, progress,
                  stop: Optional[StopToken] = None) -> Iterator[tuple]:
    """``(features DataArray, backbone id, stats)`` of the scene: read from the opened ``store``
    (checked to lie on the scene's cell grid) or computed into a scratch store."""
    if store is not None:
        _check_store_grid(store, CellGrid.of(reader))
        yield store.feats, store.backbone, ()
        return
    model = request.load_model()
    with scratch_features(reader, model, request.tiling, request.settings, near, progress, stop) as (feats, stats):
        yield feats, model_id(model), (stats,)


def _open_given_store(features: PathLike, backbone) -> "object":
    """The store ``features`` (never the backbone): one made by another backbone than one explicitly
    given is an InputError naming the store (a PCA-reduced store is taken: the results are then over
    its components)."""
    store = open_store(features)
    if backbone is not None and store.backbone_name() not in _names_of(backbone):
        raise InputError(features, f"features made with backbone {store.backbone}, not {_label(backbone)}: "
                                   "recompute them with this backbone, or leave `backbone` out")
    return store


def _names_of(backbone) -> set[str]:
    """The names a loaded ``backbone`` could carry (a file's or folder's name; a registry entry's
    file and folder names), told without loading it."""
    if not isinstance(backbone, (str, os.PathLike)):
        return {str(getattr(backbone, "name", ""))}
    names = {Path(str(backbone)).name}
    info = registry.find_by_name(str(backbone))
    if info is not None:
        names |= {info.name, info.filename, info.hf_repo.split("/")[1]}
    try:
        names.add(Path(str(resolve_weights(backbone))).name)
    except WeightsError:
        pass
    return names


def _label(backbone) -> str:
    return str(backbone) if isinstance(backbone, (str, os.PathLike)) else str(getattr(backbone, "name", backbone))


def _check_store_grid(store, grid: CellGrid) -> None:
    feats = store.feats
    if feats.shape[1:] != (grid.height, grid.width) or not feats.rio.transform().almost_equals(grid.transform):
        raise InputError(store.path, "features are not on this scene's grid of 16-px cells")


def write_on_scene(output: Path, reader, blocks: Iterator[tuple[int, np.ndarray]], dtype: str, nodata,
                   overwrite: bool, description: str, colormap=None, class_names=None) -> None:
    """Write cell values ``(cell row, [rows, width])`` on the scene's own grid: each cell fills its
    16 x 16 pixels, and pixels the scene has no valid data for are ``nodata`` (as in every output)."""
    tags = {f"CLASS_{i}": name for i, name in enumerate(class_names or [])}
    with COGSink(output, reader, count=1, dtype=dtype, nodata=nodata, overwrite=overwrite, colormap=colormap,
                 band_descriptions=[description], tags=tags) as sink:
        for r0, values in blocks:
            pixels = np.repeat(np.repeat(values, PATCH, axis=0), PATCH, axis=1)
            rows = min(pixels.shape[0], reader.height - r0 * PATCH)
            pixels = pixels[:rows, :reader.width].astype(dtype)
            _, valid = reader.read(Window(0, r0 * PATCH, reader.width, rows))
            pixels[~valid] = nodata
            sink.write(r0 * PATCH, pixels[None])


def unit(block: np.ndarray) -> np.ndarray:
    """Cells of ``[D, ...]`` scaled to unit length (NaN stays NaN, zero vectors stay zero)."""
    norm = np.sqrt(np.sum(block.astype(np.float64) ** 2, axis=0, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (block / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def scene_bounds(reader) -> tuple[float, float, float, float]:
    """``(left, bottom, right, top)`` of an open scene in its CRS."""
    return array_bounds(reader.height, reader.width, reader.transform)
