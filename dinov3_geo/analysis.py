"""Land analysis with frozen DINOv3 features: embeddings, similarity, clustering and change.

Every function runs the shared tiled pipeline (:func:`dinov3_geo.pipeline.run_chips`) with an
embedding task model (:mod:`dinov3_geo.tasks.embed`) and writes its result atomically:

- :func:`embed` -- one GeoParquet row per non-empty chip (CLS and mean patch embeddings), or with
  ``patch=True`` the patch-token map at 16-px cells (Zarr, or a COG for ``.tif``), optionally
  reduced to ``pca`` components;
- :func:`similar` -- cosine similarity of every cell to a reference (a point or polygons);
- :func:`cluster` -- k-means land units (scikit-learn's MiniBatchKMeans) over the cells;
- :func:`change` -- cosine distance between the cells of two dates on the first one's grid.

The rasters of ``similar``, ``cluster`` and ``change`` lie on the scene's own grid (its CRS,
transform and size), one value per 16 x 16 pixel cell. Scenes are paths or scene-like readers (the
xarray accessor passes a DataArray reader). Cell features go through a hidden temporary Zarr store
beside the output, so memory stays flat in the scene size.
"""
from __future__ import annotations

import colorsys
import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from rasterio.windows import Window

from dinov3_geo.errors import InputError, UsageError
from dinov3_geo.io.features import CHIP_FORMATS, PATCH, ChipEmbeddingWriter
from dinov3_geo.io.patchmap import (ZARR_CHUNK_ROWS, CellGrid, CellPaddedScene, PatchStitcher, ZarrFeatureSink,
                                    check_patch_overlap, open_features)
from dinov3_geo.io.scene import scene_reader
from dinov3_geo.io.sinks import COGSink, check_output

PathLike = Union[str, os.PathLike]
DEFAULT_BACKBONE = "dinov3-vitl16-sat493m"
CLASS_NODATA = 255
#: Cells kept in memory at once while fitting k-means (rows of features, float32).
KMEANS_BATCH = 4096


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

    def summary(self) -> str:
        """The closing lines the command prints."""
        lines = [f"done in {self.seconds:.1f} s: {self.chips_computed} chips computed "
                 f"({self.chips_skipped} empty skipped), backbone {self.backbone}", f"wrote {self.output}"]
        if self.vector is not None:
            lines.append(f"wrote {self.vector}")
        lines += [f"{k}: {v}" for k, v in self.extra.items()]
        return "\n".join(lines)


@dataclass
class _Run:
    """Everything one pipeline run needs besides the scene: backbone, plan parameters, settings.
    Built first: it checks every option, then loads the backbone (a Backbone, path or name)."""

    backbone: object
    tile: int = 512
    overlap: int = 64
    batch_size: int = 8
    device: str = "auto"
    precision: str = "auto"
    progress: Optional[bool] = None
    patch: bool = True
    with_backbone: bool = True          # False: a caller's model only (patch_map)
    chips_computed: int = 0
    chips_skipped: int = 0

    def __post_init__(self) -> None:
        from dinov3_geo.io.tiling import validate_tiling
        from dinov3_geo.pipeline import RunSettings

        validate_tiling(self.tile, self.overlap)
        if self.patch:
            check_patch_overlap(self.overlap)
        self.settings = RunSettings.resolve(device=self.device, precision=self.precision, batch_size=self.batch_size)
        self.backbone = _load_backbone(self.backbone) if self.with_backbone else None

    def run(self, reader, model, consumer, plan) -> None:
        """One pipeline run; counts chips."""
        from dinov3_geo.pipeline import run_chips

        stats = run_chips(reader, model, consumer, plan, self.settings, progress=self.progress)
        self.chips_computed += stats.chips_computed
        self.chips_skipped += stats.chips_skipped

    def patch_features(self, reader, sink, model=None, channels: Optional[int] = None) -> None:
        """Per-patch outputs ``[C, t, t]`` of ``model`` (default: the backbone's patch tokens) over
        ``reader``, stitched at cell resolution into ``sink``."""
        from dinov3_geo.pipeline import ChipPlan
        from dinov3_geo.tasks.embed import PatchTokens

        padded = CellPaddedScene(reader)
        plan = ChipPlan.build(padded.height, padded.width, tile=self.tile, overlap=self.overlap)
        model = model if model is not None else PatchTokens(self.backbone)
        stitcher = PatchStitcher(sink, plan, channels or model.embed_dim)
        self.run(padded, model, stitcher, plan)


def _load_backbone(backbone):
    """A :class:`~dinov3_geo.models.backbone.Backbone` as given, or loaded from a path or name."""
    from dinov3_geo.models.backbone import Backbone, load_backbone

    if isinstance(backbone, Backbone):
        return backbone
    return load_backbone(backbone if backbone is not None else DEFAULT_BACKBONE)


def _scene_path(scene) -> Optional[str]:
    return getattr(scene, "path", None) if not isinstance(scene, (str, os.PathLike)) else str(scene)


# -- embeddings ---------------------------------------------------------------------------------
def embed(scene, output: PathLike, *, backbone=None, patch: bool = False, pca: Optional[int] = None,
          tile: int = 512, overlap: int = 64, batch_size: int = 8, device: str = "auto", precision: str = "auto",
          bands: Optional[Sequence[int]] = None, scale=None, overwrite: bool = False,
          progress: Optional[bool] = None) -> AnalysisResult:
    """Embeddings of ``scene`` with ``backbone`` (a Backbone, a path or a registry name).

    ``patch=False``: GeoParquet ``output``, one row per chip with a valid pixel (footprint polygon
    in the scene's CRS, ``chip_row``/``chip_col``, ``cls`` and ``mean_patch`` as fixed-size lists
    of float32; ``attrs["dinov3_geo"]["backbone"]`` names the backbone). ``patch=True``: the
    patch-token map at 16-px cells, blended across chips, as a Zarr store (``.zarr``) or a float32
    COG (``.tif``) on the scene's CRS with the transform scaled by 16; ``pca=K`` keeps K principal
    components (fitted on the scene's cells).
    """
    t0 = time.perf_counter()
    output = Path(output)
    _check_embed_options(output, patch, pca)
    check_output(output, overwrite, inputs=[_scene_path(scene)])
    run = _Run(backbone, tile, overlap, batch_size, device, precision, progress, patch=patch)
    with scene_reader(scene, bands=bands, scale=scale) as reader:
        if patch:
            _embed_patches(run, reader, output, pca, overwrite)
        else:
            _embed_chips(run, reader, output, overwrite)
    return _result(output, run, t0, _scene_path(scene))


def patch_map(scene, output: PathLike, model, *, channels: int, tile: int = 512, overlap: int = 64,
              batch_size: int = 8, device: str = "auto", precision: str = "auto", bands: Optional[Sequence[int]] = None,
              scale=None, overwrite: bool = False, progress: Optional[bool] = None) -> AnalysisResult:
    """Any per-patch model (normalised ``[B,3,T,T]`` -> ``[B, channels, T/16, T/16]``) over
    ``scene``, stitched seam-free at 16-px cells into a Zarr store or COG (as ``embed(patch=True)``
    does with the backbone's patch tokens). Cell ``(i, j)`` covers pixels ``16i..16i+15`` by
    ``16j..16j+15``; the map has the scene's CRS and its transform scaled by 16."""
    t0 = time.perf_counter()
    output = Path(output)
    _check_embed_options(output, True, None)
    check_output(output, overwrite, inputs=[_scene_path(scene)])
    run = _Run(None, tile, overlap, batch_size, device, precision, progress, with_backbone=False)
    with scene_reader(scene, bands=bands, scale=scale) as reader:
        attrs = dict(tile=tile, overlap=overlap, patch_size=PATCH)
        with _feature_sink(output, CellGrid.of(reader), channels, attrs, overwrite, reader) as sink:
            run.patch_features(reader, sink, model, channels)
    return _result(output, run, t0, _scene_path(scene))


def _check_embed_options(output: Path, patch: bool, pca: Optional[int]) -> None:
    if pca is not None and (not patch or int(pca) < 1):
        raise UsageError("pca", "pca needs patch features and a number of components >= 1")
    if not patch and output.suffix.lower() not in CHIP_FORMATS:
        raise UsageError("output", f"chip embeddings go to GeoParquet (.parquet), GeoPackage (.gpkg) or "
                                   f"FlatGeobuf (.fgb), not {output.name}")
    if patch and output.suffix.lower() not in (".zarr", ".tif", ".tiff"):
        raise UsageError("output", f"patch features go to a Zarr store (.zarr) or a GeoTIFF (.tif), not {output.name}")


def _result(output: Path, run: _Run, t0: float, source=None, **kw) -> AnalysisResult:
    from dinov3_geo.io.stac import describe_output
    from dinov3_geo.tasks.embed import backbone_id

    describe_output(output, source, run.backbone, kw.get("vector"))     # QGIS style, STAC Items
    name = backbone_id(run.backbone) if run.backbone is not None else "none"
    return AnalysisResult(output, name, time.perf_counter() - t0, run.chips_computed,
                          run.chips_skipped, **kw)


def _embed_chips(run: _Run, reader, output: Path, overwrite: bool) -> None:
    from dinov3_geo.pipeline import ChipPlan
    from dinov3_geo.tasks.embed import ChipTokens

    model = ChipTokens(run.backbone)
    plan = ChipPlan.build(reader.height, reader.width, tile=run.tile, overlap=run.overlap)
    run.run(reader, model, chip_embedding_writer(output, reader, plan, model, overwrite), plan)


def chip_embedding_writer(output: Path, reader, plan, model, overwrite: bool = False) -> ChipEmbeddingWriter:
    """The consumer writing ``model``'s (:class:`~dinov3_geo.tasks.embed.ChipTokens`) chips of
    ``plan`` over ``reader`` as the GeoParquet ``output``, stamped with the backbone and tiling."""
    attrs = dict(backbone=model.backbone_id, tile=plan.tile, overlap=plan.overlap)
    return ChipEmbeddingWriter(output, reader, plan.windows, model.embed_dim, attrs, overwrite)


def _feature_attrs(run: _Run, **extra) -> dict:
    from dinov3_geo.tasks.embed import backbone_id

    return dict(backbone=backbone_id(run.backbone), tile=run.tile, overlap=run.overlap, patch_size=PATCH, **extra)


def _embed_patches(run: _Run, reader, output: Path, pca: Optional[int], overwrite: bool) -> None:
    grid = CellGrid.of(reader)
    if pca is None:
        with _feature_sink(output, grid, run.backbone.embed_dim, _feature_attrs(run), overwrite, reader) as sink:
            run.patch_features(reader, sink)
        return
    with _scratch_features(run, reader, output) as feats:
        components = _fit_pca(feats, int(pca))
        names = [f"pc{i + 1}" for i in range(components.n_components_)]
        attrs = _feature_attrs(run, pca=int(components.n_components_))
        with _feature_sink(output, grid, len(names), attrs, overwrite, reader, names) as sink:
            for row, block in _row_blocks(feats):
                sink.write(row, _apply_pca(components, block))


def _feature_sink(output: Path, grid: CellGrid, channels: int, attrs: dict, overwrite: bool, reader,
                  band_names=None):
    """Zarr store or COG for a cell feature map."""
    if output.suffix.lower() == ".zarr":
        return ZarrFeatureSink(output, grid, channels, attrs, overwrite, band_names, inputs=[_scene_path(reader)])
    return COGSink(output, grid, count=channels, dtype="float32", overwrite=overwrite,
                   band_descriptions=band_names or [f"f{i}" for i in range(channels)])


@contextlib.contextmanager
def _scratch_features(run: _Run, reader, near: Path):
    """The patch features of ``reader`` in a hidden temporary Zarr store beside ``near``, opened
    lazily; removed on exit."""
    folder = Path(tempfile.mkdtemp(prefix=f".{near.name}.features-", dir=near.parent))
    try:
        store = folder / "features.zarr"
        with ZarrFeatureSink(store, CellGrid.of(reader), run.backbone.embed_dim, _feature_attrs(run)) as sink:
            run.patch_features(reader, sink)
        yield open_features(store)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _row_blocks(feats, rows: int = ZARR_CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """``(first cell row, float32 [D, rows, width])`` blocks of a feature DataArray, top to bottom."""
    height = feats.shape[1]
    for r0 in range(0, height, rows):
        yield r0, np.asarray(feats[:, r0:r0 + rows, :].values, np.float32)


def _valid_columns(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells of ``[D, rows, width]`` as ``[n, D]`` rows (no NaN) and the boolean mask of them."""
    flat = block.reshape(block.shape[0], -1).T
    ok = np.isfinite(flat).all(axis=1)
    return flat[ok], ok


def _fit_pca(feats, k: int):
    """scikit-learn's IncrementalPCA over the valid cells, block by block."""
    from sklearn.decomposition import IncrementalPCA

    d = feats.shape[0]
    if k > d:
        raise UsageError("pca", f"pca={k} exceeds the feature width {d}")
    pca = IncrementalPCA(n_components=k)
    pending: list[np.ndarray] = []
    for _, block in _row_blocks(feats):
        cells, _ = _valid_columns(block)
        pending.append(cells)
        if sum(len(p) for p in pending) >= max(k, KMEANS_BATCH):
            pca.partial_fit(np.concatenate(pending))
            pending = []
    rest = np.concatenate(pending) if pending else np.zeros((0, d), np.float32)
    if len(rest) >= k:
        pca.partial_fit(rest)
    if not hasattr(pca, "components_"):
        raise InputError(None, f"too few valid cells for pca={k}")
    return pca


def _apply_pca(pca, block: np.ndarray) -> np.ndarray:
    """Project ``[D, rows, width]`` onto the components, NaN kept."""
    cells, ok = _valid_columns(block)
    out = np.full((ok.size, pca.n_components_), np.nan, np.float32)
    if len(cells):
        out[ok] = pca.transform(cells)
    return out.T.reshape(pca.n_components_, *block.shape[1:])


# -- features from a run or a file -------------------------------------------------------------
@contextlib.contextmanager
def _cell_features(run: _Run, reader, near: Path, features: Optional[PathLike]):
    """The scene's cell features: computed into a scratch store, or read from ``features`` (which
    must come from the same backbone and lie on the scene's cell grid)."""
    if features is None:
        with _scratch_features(run, reader, near) as feats:
            yield feats
        return
    feats = open_features(features)
    _check_features_file(feats, features, run, CellGrid.of(reader))
    yield feats


def _check_features_file(feats, path, run: _Run, grid: CellGrid) -> None:
    from dinov3_geo.tasks.embed import backbone_id

    made_by, ours = feats.attrs.get("backbone"), backbone_id(run.backbone)
    if made_by != ours:
        raise InputError(path, f"features made with backbone {made_by}, not {ours}: recompute them with this backbone")
    if "pca" in feats.attrs:
        raise InputError(path, "features reduced by PCA: use full patch features")
    if feats.shape[1:] != (grid.height, grid.width) or not feats.rio.transform().almost_equals(grid.transform):
        raise InputError(path, "features are not on this scene's grid of 16-px cells")


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


# -- similarity ---------------------------------------------------------------------------------
def similar(scene, output: PathLike, *, at: Optional[tuple[float, float]] = None, like: Optional[PathLike] = None,
            features: Optional[PathLike] = None, backbone=None, tile: int = 512, overlap: int = 64,
            batch_size: int = 8, device: str = "auto", precision: str = "auto", bands=None, scale=None,
            overwrite: bool = False, progress: Optional[bool] = None) -> AnalysisResult:
    """Cosine similarity (-1..1, float32 COG, NaN nodata) of every 16-px cell of ``scene`` to the
    mean feature of a reference: the cell under the point ``at=(x, y)`` (scene CRS), or the cells
    covered by the polygons of the vector file ``like`` (reprojected to the scene's CRS). Written on
    the scene's grid. ``features``: a Zarr store from ``embed(patch=True)`` of this scene and
    backbone, used instead of running the model.
    """
    t0 = time.perf_counter()
    output = Path(output)
    if (at is None) == (like is None):
        raise UsageError("at", "give exactly one reference: a point (at) or polygons (like)")
    check_output(output, overwrite, inputs=[_scene_path(scene), like, features])
    run = _Run(backbone, tile, overlap, batch_size, device, precision, progress)
    with scene_reader(scene, bands=bands, scale=scale) as reader:
        cellmask = _point_cells(reader, at) if at is not None else _polygon_cells(reader, like)
        with _cell_features(run, reader, output, features) as feats:
            reference = _mean_feature(feats, cellmask, at if at is not None else like)
            ref = _unit(reference[:, None])[:, 0]
            blocks = ((r0, np.einsum("d,dhw->hw", ref, _unit(block))) for r0, block in _row_blocks(feats))
            _write_on_scene(output, reader, blocks, "float32", float("nan"), overwrite, "cosine_similarity")
    return _result(output, run, t0, _scene_path(scene))


def _point_cells(reader, at: tuple[float, float]) -> np.ndarray:
    """Boolean cell mask of the cell under ``at`` (x, y in the scene's CRS); outside is an error."""
    x, y = (float(v) for v in at)
    col, row = ~reader.transform @ (x, y)
    if not (0 <= row < reader.height and 0 <= col < reader.width):
        left, bottom, right, top = _bounds(reader)
        raise UsageError("at", f"point {x:g},{y:g} is outside the scene (x {left:g}..{right:g}, "
                               f"y {bottom:g}..{top:g} in {reader.crs})")
    grid = CellGrid.of(reader)
    mask = np.zeros((grid.height, grid.width), bool)
    mask[int(row) // PATCH, int(col) // PATCH] = True
    return mask


def _bounds(reader) -> tuple[float, float, float, float]:
    from rasterio.transform import array_bounds

    return array_bounds(reader.height, reader.width, reader.transform)


def _polygon_cells(reader, like: PathLike) -> np.ndarray:
    """Boolean cell mask of the cells the polygons of ``like`` touch, in the scene's CRS."""
    import geopandas as gpd
    from rasterio.features import geometry_mask

    try:
        shapes = gpd.read_file(like)
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
        raise UsageError("like", f"the polygons of {like} lie outside the scene")
    return mask


def _mean_feature(feats, cellmask: np.ndarray, where) -> np.ndarray:
    """Mean feature ``[D]`` of the valid cells under ``cellmask``, read only where it is set."""
    rows = np.flatnonzero(cellmask.any(axis=1))
    total = np.zeros(feats.shape[0], np.float64)
    count = 0
    for r0 in range(int(rows[0]), int(rows[-1]) + 1, ZARR_CHUNK_ROWS):
        r1 = min(r0 + ZARR_CHUNK_ROWS, int(rows[-1]) + 1)
        block = np.asarray(feats[:, r0:r1, :].values, np.float32)
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
            features: Optional[PathLike] = None, backbone=None, tile: int = 512, overlap: int = 64,
            batch_size: int = 8, device: str = "auto", precision: str = "auto", bands=None, scale=None,
            seed: int = 0, overwrite: bool = False, progress: Optional[bool] = None) -> AnalysisResult:
    """k-means land units: scikit-learn's MiniBatchKMeans (``k`` clusters, ``seed``) over the unit
    patch features of every 16-px cell, as a uint8 COG on the scene's grid (0..k-1, 255 nodata, a
    colour table); with ``vector``, the units as polygons (layer ``clusters``: ``class``,
    ``class_name``, ``area_m2``) in a GeoPackage.
    """
    t0 = time.perf_counter()
    output = Path(output)
    if not isinstance(k, (int, np.integer)) or not 2 <= k < CLASS_NODATA:
        raise UsageError("k", f"k must be a whole number from 2 to {CLASS_NODATA - 1}, got {k!r}")
    check_output(output, overwrite, inputs=[_scene_path(scene), features])
    if vector is not None:
        if Path(vector).resolve() == output.resolve():
            raise UsageError("vector", "the vector output must differ from the raster output")
        check_output(vector, overwrite, inputs=[_scene_path(scene), output])
    run = _Run(backbone, tile, overlap, batch_size, device, precision, progress)
    units = [f"unit {i}" for i in range(int(k))]        # the class names in the COG and the polygons
    with scene_reader(scene, bands=bands, scale=scale) as reader:
        with _cell_features(run, reader, output, features) as feats:
            kmeans = _fit_kmeans(feats, int(k), seed)
            blocks = ((r0, _predict_block(kmeans, block)) for r0, block in _row_blocks(feats))
            _write_on_scene(output, reader, blocks, "uint8", CLASS_NODATA, overwrite, "cluster",
                            colormap=_palette(int(k)), class_names=units)
    if vector is not None:
        from dinov3_geo.io.vector import polygonize_classes

        try:
            polygonize_classes(output, vector, units, layer="clusters", overwrite=overwrite)
        except BaseException:        # no half job: the same command can be rerun
            output.unlink(missing_ok=True)
            raise
    return _result(output, run, t0, _scene_path(scene), vector=Path(vector) if vector is not None else None)


def _fit_kmeans(feats, k: int, seed: int):
    """MiniBatchKMeans fitted block by block on unit cell features."""
    from sklearn.cluster import MiniBatchKMeans

    kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=KMEANS_BATCH, n_init=3)
    pending: list[np.ndarray] = []
    fitted = False
    for _, block in _row_blocks(feats):
        pending.append(_valid_columns(_unit(block))[0])
        if sum(len(p) for p in pending) >= KMEANS_BATCH:
            kmeans.partial_fit(np.concatenate(pending))
            pending, fitted = [], True
    rest = np.concatenate(pending) if pending else np.zeros((0, feats.shape[0]), np.float32)
    if len(rest) >= k or (fitted and len(rest)):
        kmeans.partial_fit(rest)
        fitted = True
    if not fitted:
        raise UsageError("k", f"k={k} exceeds the {len(rest)} valid cells of the scene")
    return kmeans


def _predict_block(kmeans, block: np.ndarray) -> np.ndarray:
    """Cluster of each cell of ``[D, rows, width]`` (255 where nodata)."""
    cells, ok = _valid_columns(_unit(block))
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
def change(before, after, output: PathLike, *, backbone=None, tile: int = 512, overlap: int = 64,
           batch_size: int = 8, device: str = "auto", precision: str = "auto", bands=None, scale=None,
           overwrite: bool = False, progress: Optional[bool] = None) -> AnalysisResult:
    """Per-cell cosine distance (0 same .. 2 opposite, float32 COG on ``before``'s grid, NaN
    nodata) between the patch features of two dates. ``after`` is read on ``before``'s grid
    (warped when its grid differs); cells either date does not cover are nodata; dates that do not
    overlap at all are an error.
    """
    t0 = time.perf_counter()
    output = Path(output)
    check_output(output, overwrite, inputs=[_scene_path(before), _scene_path(after)])
    run = _Run(backbone, tile, overlap, batch_size, device, precision, progress)
    with scene_reader(before, bands=bands, scale=scale) as first:
        _check_overlap(first, after)
        with scene_reader(after, bands=bands, scale=scale, grid=first.input_profile) as second, \
                _scratch_features(run, first, output) as f1, _scratch_features(run, second, output) as f2:
            blocks = ((r0, 1.0 - np.sum(_unit(a) * _unit(b), axis=0))
                      for (r0, a), (_, b) in zip(_row_blocks(f1), _row_blocks(f2)))
            _write_on_scene(output, first, blocks, "float32", float("nan"), overwrite, "cosine_distance")
    return _result(output, run, t0, [_scene_path(before), _scene_path(after)])


def _check_overlap(first, after) -> None:
    """InputError unless ``after`` covers some of ``first``'s extent."""
    from rasterio.warp import transform_bounds

    with scene_reader(after) as probe:
        crs, bounds = probe.crs, _bounds(probe)
    if crs is None or first.crs is None:
        raise InputError(after, "no georeference (no CRS): cannot be compared with another date")
    left, bottom, right, top = transform_bounds(crs, first.crs, *bounds)
    l1, b1, r1, t1 = _bounds(first)
    if min(right, r1) <= max(left, l1) or min(top, t1) <= max(bottom, b1):
        raise InputError(after, f"does not overlap {first.path}: the two dates cover different places")
