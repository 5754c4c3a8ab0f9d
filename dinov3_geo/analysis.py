"""Land analysis with frozen DINOv3 features: embeddings, similarity, clustering and change.

Every function resolves its request at the door (:func:`dinov3_geo.tasks.registry.request_for`:
the task, the backbone's source, tiling, reading and run settings, all checked before any weights
are read), then runs the shared tiled pipeline with an embedding task model
(:mod:`dinov3_geo.tasks.embed`) and writes its result atomically:

- :func:`embed` -- one GeoParquet row per non-empty chip (CLS and mean patch embeddings), or with
  ``patch=True`` the patch-token map at 16-px cells (Zarr, or a COG for ``.tif``), optionally
  reduced to ``pca`` components;
- :func:`similar` -- cosine similarity of every cell to a reference (a point or polygons);
- :func:`cluster` -- k-means land units (scikit-learn's MiniBatchKMeans) over the cells;
- :func:`change` -- cosine distance between the cells of two dates on the first one's grid.

The rasters of ``similar``, ``cluster`` and ``change`` lie on the scene's own grid (its CRS,
transform and size), one value per 16 x 16 pixel cell. Scenes are paths, rioxarray DataArrays (the
``da.dinov3`` accessor passes its array) or open scene readers. Cell features go through a hidden
temporary Zarr store beside the output, so memory stays flat in the scene size; ``features``
reuses a store from ``embed(patch=True)`` without building or loading the backbone.
"""
from __future__ import annotations

import colorsys
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from rasterio.transform import array_bounds
from rasterio.windows import Window

from dinov3_geo import options as opts
from dinov3_geo.engine import StopToken
from dinov3_geo.errors import DinoGeoWarning, InputError, UsageError, WeightsError
from dinov3_geo.io.features import CHIP_FORMATS, PATCH
from dinov3_geo.io.georef import vector_transform
from dinov3_geo.io.patchmap import ZARR_CHUNK_ROWS, CellGrid, check_patch_overlap
from dinov3_geo.io.readers import scene_reader
from dinov3_geo.io.sinks import COGSink, check_output
from dinov3_geo.io.stac import describe_output
from dinov3_geo.io.vector import polygonize_classes
from dinov3_geo.models import registry
from dinov3_geo.models.load import width_without_loading
from dinov3_geo.models.weights import resolve_weights
from dinov3_geo.tasks.features import (
    FIT_BATCH,
    feature_store,
    open_store,
    patch_features,
    read_block,
    row_blocks,
    scratch_features,
    valid_columns,
)
from dinov3_geo.tasks.registry import (
    DEFAULT_BACKBONE,
    Job,
    ModelSource,
    Request,
    request_for,
)

PathLike = Union[str, os.PathLike]
CLASS_NODATA = 255
__all__ = ["embed", "patch_map", "similar", "cluster", "change", "AnalysisResult", "DEFAULT_BACKBONE"]


@dataclass
class AnalysisResult:
    """What a land-analysis function wrote and how it went."""

    output: Path
    backbone: str
    seconds: float
    chips_computed: int = 0
    chips_skipped: int = 0
    vector: Optional[Path] = None
    extra: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The closing lines the command prints."""
        lines = [f"done in {self.seconds:.1f} s: {self.chips_computed} chips computed "
                 f"({self.chips_skipped} empty skipped), backbone {self.backbone}", f"wrote {self.output}"]
        if self.vector is not None:
            lines.append(f"wrote {self.vector}")
        lines += [f"{k}: {v}" for k, v in self.extra.items()]
        return "\n".join(lines)


def _scene_path(scene) -> Optional[str]:
    if isinstance(scene, (str, os.PathLike)):
        return str(scene)
    return getattr(scene, "path", None) or getattr(scene, "encoding", {}).get("source")


def _result(output: Path, backbone: str, t0: float, stats=(), source=None, **kw) -> AnalysisResult:
    """The result of a written ``output`` (made from ``source``), once its GIS sidecars are
    written: a raster's QGIS style, the STAC Items of it and of its polygons (``vector``)."""
    describe_output(output, source, vector=kw.get("vector"), properties={"backbone": backbone})
    computed = sum(s.chips_computed for s in stats)
    skipped = sum(s.chips_skipped for s in stats)
    return AnalysisResult(output, backbone, time.perf_counter() - t0, computed, skipped, **kw)


def _model_id(model) -> str:
    return model.backbone_id


# -- embeddings ---------------------------------------------------------------------------------
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
    check_output(output, overwrite, inputs=[_scene_path(scene)])
    with scene_reader(scene, request.reading) as reader:
        if pca is not None:
            _check_enough_cells(reader, pca, "pca")
        model = request.load_model()
        job = Job(pca=pca, overwrite=overwrite, progress=progress, stop=stop)
        written = request.task.write(request, reader, model, output, job)
    return _result(output, _model_id(model), t0, [written.stats], _scene_path(scene),
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
    check_output(output, overwrite, inputs=[_scene_path(scene)])
    with scene_reader(scene, read) as reader:
        attrs = dict(backbone=f"model:{type(model).__name__}", tile=chips.tile, overlap=chips.overlap, patch_size=PATCH)
        with feature_store(output, CellGrid.of(reader), channels, attrs, overwrite, _scene_path(reader)) as sink:
            stats = patch_features(reader, sink, model, chips, run, progress, channels, stop=stop)
    return _result(output, "none", t0, [stats], _scene_path(scene))


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


def _check_enough_cells(reader, needed: int, name: str) -> None:
    """UsageError naming ``name`` when the scene has fewer 16-px cells than ``needed`` (told from its
    size alone, before any chip is computed)."""
    grid = CellGrid.of(reader)
    total = grid.height * grid.width
    if needed > total:
        raise UsageError(name, f"{name}={needed} exceeds the {total} cells (16 x 16 px) of {reader.path} "
                               f"({reader.width} x {reader.height} px)")


# -- features from a run or a store -------------------------------------------------------------
@contextlib.contextmanager
def _cell_features(request: Optional[Request], store, reader, near: Path, progress,
                   stop: Optional[StopToken] = None) -> Iterator[tuple]:
    """``(features DataArray, backbone id, stats)`` of the scene: read from the opened ``store``
    (checked to lie on the scene's cell grid) or computed into a scratch store."""
    if store is not None:
        _check_store_grid(store, CellGrid.of(reader))
        yield store.feats, store.backbone, ()
        return
    model = request.load_model()
    with scratch_features(reader, model, request.tiling, request.settings, near, progress, stop) as (feats, stats):
        yield feats, _model_id(model), (stats,)


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


def _write_on_scene(output: Path, reader, blocks: Iterator[tuple[int, np.ndarray]], dtype: str, nodata,
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


def _unit(block: np.ndarray) -> np.ndarray:
    """Cells of ``[D, ...]`` scaled to unit length (NaN stays NaN, zero vectors stay zero)."""
    norm = np.sqrt(np.sum(block.astype(np.float64) ** 2, axis=0, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (block / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def _analysis_request(task: str, features, backbone, verify: bool, **options) -> tuple[Optional[Request], object]:
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


# -- similarity ---------------------------------------------------------------------------------
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
    request, store = _analysis_request("similar", features, backbone, verify, tile=tile, overlap=overlap,
                                       tiling=tiling, bands=bands, scale=scale, nodata=nodata, reading=reading,
                                       device=device, precision=precision, batch_size=batch_size, settings=settings)
    check_output(output, overwrite, inputs=[_scene_path(scene), like, features])
    with scene_reader(scene, request.reading) as reader:
        cellmask = _point_cells(reader, at) if at is not None else _polygon_cells(reader, like)
        with _cell_features(None if store else request, store, reader, output, progress,
                            stop) as (feats, made_by, stats):
            reference = _mean_feature(feats, cellmask, at if at is not None else like, store)
            ref = _unit(reference[:, None])[:, 0]
            blocks = ((r0, np.einsum("d,dhw->hw", ref, _unit(block)))
                      for r0, block in row_blocks(feats, where=features))
            _write_on_scene(output, reader, blocks, "float32", float("nan"), overwrite, "cosine_similarity")
    reduced = {"similarity over": f"{store.pca} PCA components"} if store is not None and store.pca else {}
    return _result(output, made_by, t0, stats, _scene_path(scene), warnings=list(reader.warnings), extra=reduced)


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


def _bounds(reader) -> tuple[float, float, float, float]:
    return array_bounds(reader.height, reader.width, reader.transform)


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


# -- clustering ---------------------------------------------------------------------------------
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
    request, store = _analysis_request("cluster", features, backbone, verify, tile=tile, overlap=overlap,
                                       tiling=tiling, bands=bands, scale=scale, nodata=nodata, reading=reading,
                                       device=device, precision=precision, batch_size=batch_size, settings=settings)
    check_output(output, overwrite, inputs=[_scene_path(scene), features])
    if vector is not None:
        if Path(vector).resolve() == output.resolve():
            raise UsageError("vector", "the vector output must differ from the raster output")
        check_output(vector, overwrite, inputs=[_scene_path(scene), output])
    units = [f"unit {i}" for i in range(k)]        # the class names in the COG and the polygons
    with scene_reader(scene, request.reading) as reader:
        _check_enough_cells(reader, k, "k")
        with _cell_features(None if store else request, store, reader, output, progress,
                            stop) as (feats, made_by, stats):
            kmeans = _fit_kmeans(feats, k, seed, features)
            blocks = ((r0, _predict_block(kmeans, block)) for r0, block in row_blocks(feats, where=features))
            _write_on_scene(output, reader, blocks, "uint8", CLASS_NODATA, overwrite, "cluster", colormap=_palette(k),
                            class_names=units)
    if vector is not None:
        try:
            polygonize_classes(output, vector, units, layer="clusters", overwrite=overwrite)
        except BaseException:        # no half job: the same command can be rerun
            output.unlink(missing_ok=True)
            raise
    return _result(output, made_by, t0, stats, _scene_path(scene),
                   vector=Path(vector) if vector is not None else None, warnings=list(reader.warnings))


def _fit_kmeans(feats, k: int, seed: int, where=None):
    """MiniBatchKMeans fitted block by block on unit cell features."""
    from sklearn.cluster import MiniBatchKMeans

    kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=FIT_BATCH, n_init=3)
    pending: list[np.ndarray] = []
    fitted, seen = False, 0
    for _, block in row_blocks(feats, where=where):
        cells = valid_columns(_unit(block))[0]
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
    cells, ok = valid_columns(_unit(block))
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


# -- change -------------------------------------------------------------------------------------
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
    check_output(output, overwrite, inputs=[_scene_path(before), _scene_path(after)])
    with scene_reader(before, request.reading) as first:
        _check_overlap(first, after)
        with scene_reader(after, request.reading, grid=first.input_profile) as second:
            model = request.load_model()
            with scratch_features(first, model, request.tiling, request.settings, output, progress, stop) as (f1, s1), \
                    scratch_features(second, model, request.tiling, request.settings, output, progress,
                                     stop) as (f2, s2):
                blocks = ((r0, 1.0 - np.sum(_unit(a) * _unit(b), axis=0))
                          for (r0, a), (_, b) in zip(row_blocks(f1), row_blocks(f2)))
                _write_on_scene(output, first, blocks, "float32", float("nan"), overwrite, "cosine_distance")
    return _result(output, _model_id(model), t0, [s1, s2], [_scene_path(before), _scene_path(after)],
                   warnings=list(first.warnings) + list(second.warnings))


def _check_overlap(first, after) -> None:
    """InputError unless ``after`` covers some of ``first``'s extent."""
    import warnings

    from rasterio.warp import transform_bounds


    with warnings.catch_warnings():      # the second date's warnings are said once, when it is read
        warnings.simplefilter("ignore", DinoGeoWarning)
        with scene_reader(after) as probe:
            crs, bounds = probe.crs, _bounds(probe)
    if crs is None or first.crs is None:
        raise InputError(_scene_path(after), "no georeference (no CRS): cannot be compared with another date")
    left, bottom, right, top = transform_bounds(crs, first.crs, *bounds)
    l1, b1, r1, t1 = _bounds(first)
    if min(right, r1) <= max(left, l1) or min(top, t1) <= max(bottom, b1):
        raise InputError(_scene_path(after), f"does not overlap {first.path}: the two dates cover different places")
