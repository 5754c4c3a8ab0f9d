"""The similarity layer: a patch feature map made small enough for the page, and where its cells lie.

The page computes the cosine similarity of every cell to a clicked cell itself (JavaScript). It
gets the feature map (``embed --patch``: one vector per 16-px cell) reduced by scikit-learn's PCA
to ``components`` values per cell (fitted on up to ``FIT_CELLS`` valid cells drawn at random,
seed 0), stored as half floats. The same numbers can be written as a feature store
(:meth:`PageFeatures.write_store`) and given to :func:`dinov3_geo.similar`, which then computes
exactly what the page draws (to float32 rounding). A map whose cells do not fit ``max_bytes`` gets
fewer components (down to ``MIN_COMPONENTS``), then cells averaged over 2 x 2, 3 x 3, ... (PCA
is linear: the mean of reduced cells is the reduction of their mean).

Cells lie on the scene's grid (cell ``(i, j)``: pixels ``16i..16i+15`` by ``16j..16j+15``). When
the page shows the scene on its own north-up grid, the page finds the cell under a click by the
same rule as ``similar --at`` (the pixel under the point, then its cell); otherwise (a basemap,
a rotated scene, ground control points) it gets a lookup from its pixels to cells, made here by
warping a raster of cell numbers (nearest) onto a north-up grid of about the cells' resolution.
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from affine import Affine
from rasterio.enums import Resampling
from rasterio.warp import reproject

from dinov3_geo.errors import InputError, UsageError
from dinov3_geo.explorer import render
from dinov3_geo.explorer.grid import STAND_IN, DisplayGrid, Placement
from dinov3_geo.io.features import PATCH
from dinov3_geo.io.patchmap import (
    ZARR_CHUNK_ROWS,
    CellGrid,
    ZarrFeatureSink,
    open_features,
)

#: Valid cells drawn at random to fit the PCA.
FIT_CELLS = 20_000
MIN_COMPONENTS = 3
#: Bytes of half floats the page may hold (base64 in the page adds a third).
FEATURE_BYTES = 8 * 2**20
#: Half floats hold up to 65504: reduced values above this are scaled down by a power of two.
HALF_LIMIT = 2.0**15
#: The colour map of the similarity the page draws (-1..1).
CMAP = "magma"
#: The attributes of a feature store that travel to the reduced one.
KEPT_ATTRS = ("backbone", "tile", "overlap", "patch_size", "pca")


@dataclass
class PageFeatures:
    """The reduced feature map the page holds: ``values`` half floats ``[K, H, W]`` (NaN where the
    map has none) on the grid ``transform``/``crs`` of ``pool`` x ``pool`` cells of the source
    store, with the store's attributes and a record of the reduction."""

    values: np.ndarray
    transform: Affine
    crs: object
    pool: int
    attrs: dict
    reduction: dict = field(default_factory=dict)

    @property
    def components(self) -> int:
        return int(self.values.shape[0])

    def describe(self) -> str:
        """One line for the page and the summary: what the page's similarity is computed over."""
        r = self.reduction
        what = (f"PCA of the {r['width']} features to {r['components']} components (scikit-learn, fitted on "
                f"{r['fitted_cells']} cells, {r['explained']:.1%} of the variance)" if r.get("method") == "pca"
                else f"the map's own {r['components']} features")
        parts = [f"similarity over {what}, as half floats"]
        if r.get("scaled"):
            parts.append(f"scaled by 2^-{r['scaled']} to fit them")
        if self.pool > 1:
            parts.append(f"cells averaged over {self.pool} x {self.pool} ({PATCH * self.pool} px) to fit the "
                         "page's size cap: values are not those of `similar`")
        return "; ".join(parts)

    def write_store(self, path, overwrite: bool = False) -> Path:
        """The page's features as a Zarr store (float32 holding the half floats), for
        :func:`dinov3_geo.similar` (``features=``) to compute what the page computes."""
        k, h, w = self.values.shape
        grid = CellGrid(self.crs, self.transform, h, w)
        attrs = dict(self.attrs, pca=k) if self.reduction.get("method") == "pca" else dict(self.attrs)
        with ZarrFeatureSink(path, grid, k, attrs, overwrite, [f"pc{i + 1}" for i in range(k)]) as sink:
            for r0 in range(0, h, ZARR_CHUNK_ROWS):
                sink.write(r0, self.values[:, r0:r0 + ZARR_CHUNK_ROWS].astype(np.float32))
        return Path(path)


def check_components(components: int) -> int:
    if not isinstance(components, (int, np.integer)) or components < 1:
        raise UsageError("components", f"components must be a whole number >= 1, got {components!r}")
    return int(components)


def open_on_scene(path: Path, scene) -> object:
    """The feature map at ``path`` as a lazy DataArray, checked to lie on ``scene``'s 16-px cells."""
    feats = open_features(path)
    grid = CellGrid.of(scene)
    if feats.ndim != 3 or feats.shape[1:] != (grid.height, grid.width) or feats.rio.crs != grid.crs \
            or not feats.rio.transform().almost_equals(grid.transform):
        raise InputError(path, "a feature map not on this scene's grid of 16-px cells (the patch features of "
                               "another scene?)")
    return feats


def reduce_features(feats, components: int, max_bytes: int = FEATURE_BYTES, seed: int = 0) -> PageFeatures:
    """``feats`` (``[D, H, W]``, lazy) reduced for the page: PCA to ``components`` when wider,
    then fewer components or pooled cells until the half floats fit ``max_bytes``."""
    width, height, cols = (int(v) for v in feats.shape)
    k = min(check_components(components), width)
    k, pool = _fit_budget(k, height, cols, max_bytes)
    pca = _fit_pca(feats, k, seed) if width > k else None
    values = np.concatenate(list(_reduced_rows(feats, pca, pool)), axis=1)
    reduction = {"method": "pca" if pca is not None else "none", "width": width, "components": k}
    if pca is not None:
        reduction.update(fitted_cells=int(pca.n_samples_), explained=float(pca.explained_variance_ratio_.sum()))
    peak = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0
    if peak >= HALF_LIMIT:
        shift = int(math.ceil(math.log2(peak / HALF_LIMIT))) + 1
        values = values * np.float32(2.0**-shift)
        reduction["scaled"] = shift
    transform = feats.rio.transform() @ Affine.scale(pool)
    attrs = {k_: feats.attrs[k_] for k_ in KEPT_ATTRS if k_ in feats.attrs}
    return PageFeatures(values.astype(np.float16), transform, feats.rio.crs, pool, attrs, reduction)


def _fit_budget(k: int, height: int, width: int, max_bytes: int) -> tuple[int, int]:
    """(components, pool) so that ``ceil(H/pool) * ceil(W/pool) * components`` half floats fit."""
    cells = height * width
    if cells * k * 2 > max_bytes:
        k = max(min(k, MIN_COMPONENTS), int(max_bytes // (cells * 2)))
    pool = 1
    while math.ceil(height / pool) * math.ceil(width / pool) * k * 2 > max_bytes:
        pool += 1
    return k, pool


def _row_blocks(feats, rows: int) -> Iterator[np.ndarray]:
    for r0 in range(0, feats.shape[1], rows):
        yield np.asarray(feats[:, r0:r0 + rows, :].values, np.float32)


def _valid_cells(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells of ``[D, rows, width]`` as ``[n, D]`` rows without NaN, and their mask."""
    flat = block.reshape(block.shape[0], -1).T
    ok = np.isfinite(flat).all(axis=1)
    return flat[ok], ok


def _fit_pca(feats, k: int, seed: int):
    """scikit-learn's PCA on up to ``FIT_CELLS`` valid cells drawn at random (row block by block)."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    keep = min(1.0, FIT_CELLS / max(1, feats.shape[1] * feats.shape[2]))
    picked = []
    for block in _row_blocks(feats, ZARR_CHUNK_ROWS):
        cells, _ = _valid_cells(block)
        picked.append(cells[rng.random(len(cells)) < keep])
    sample = np.concatenate(picked) if picked else np.zeros((0, feats.shape[0]), np.float32)
    if len(sample) <= k:
        raise InputError(None, f"the feature map has {len(sample)} valid cells: too few for {k} components")
    return PCA(n_components=k, random_state=seed).fit(sample)


def _reduced_rows(feats, pca, pool: int) -> Iterator[np.ndarray]:
    """``[K, rows, width]`` blocks of reduced (and pooled) cells, top to bottom."""
    for block in _row_blocks(feats, ZARR_CHUNK_ROWS * pool):
        if pca is not None:
            cells, ok = _valid_cells(block)
            out = np.full((ok.size, pca.n_components_), np.nan, np.float32)
            if len(cells):
                out[ok] = pca.transform(cells)
            block = out.T.reshape(pca.n_components_, *block.shape[1:])
        yield _pooled(block, pool) if pool > 1 else block


def _pooled(block: np.ndarray, pool: int) -> np.ndarray:
    """Mean of the valid cells of each ``pool`` x ``pool`` group (NaN where none is valid)."""
    k, h, w = block.shape
    hp, wp = math.ceil(h / pool), math.ceil(w / pool)
    padded = np.full((k, hp * pool, wp * pool), np.nan, np.float32)
    padded[:, :h, :w] = block
    groups = padded.reshape(k, hp, pool, wp, pool)
    valid = np.isfinite(groups).all(axis=0, keepdims=True)
    total = np.where(valid, groups, 0).sum(axis=(2, 4), dtype=np.float64)
    count = valid.sum(axis=(2, 4))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def similarity_page(features: PageFeatures, scene: Placement, grid: DisplayGrid, name: str) -> dict:
    """What the page's similarity layer gets: the half floats (cell-major), where the cells lie,
    the colours and the legend."""
    k, h, w = features.values.shape
    cell_px = PATCH * features.pool
    cells = scene.coarser(cell_px, w, h)
    page = {"name": name, "type": "similarity", "components": k, "width": w, "height": h, "cell_px": cell_px,
            "values": _b64(np.moveaxis(features.values, 0, -1).astype("<f2")),
            "colours": render.ramp_colours(CMAP).tolist(),
            "legend": render.ramp_legend("cosine similarity to the clicked cell", "", CMAP, -1.0, 1.0),
            "reduction": features.describe(), "lookup": None, "scene_size": [scene.width, scene.height]}
    if not grid.basemap and cells.north_up and cells.crs == grid.crs:
        left, top = cells.transform.c, cells.transform.f
        page["pixel_transform"] = list(scene.transform)[:6]
        page["bounds"] = grid.leaflet_bounds((left, top + cells.transform.e * h, left + cells.transform.a * w, top))
    else:
        page["lookup"] = _lookup(cells, grid)
        page["bounds"] = page["lookup"].pop("bounds")
    return page


def _lookup(cells: Placement, grid: DisplayGrid) -> dict:
    """A north-up grid of about the cells' resolution on the page's CRS, each pixel holding the
    number (row * width + column) of the cell under its centre, -1 outside."""
    target = grid.grid_for(cells, max_pixels=max(cells.width, cells.height))
    index = np.arange(cells.width * cells.height, dtype=np.int32).reshape(cells.height, cells.width)
    out = np.full((target.height, target.width), -1, np.int32)
    kw = dict(gcps=list(cells.gcps)) if cells.gcps is not None else dict(src_transform=cells.transform)
    reproject(index, out, src_crs=cells.crs or STAND_IN, dst_crs=target.crs or STAND_IN,
              dst_transform=target.transform, src_nodata=-1, dst_nodata=-1, resampling=Resampling.nearest, **kw)
    t = target.transform
    return {"width": target.width, "height": target.height, "origin": [t.c, t.f], "pixel": [t.a, -t.e],
            "index": _b64(out.astype("<i4")), "bounds": target.leaflet_bounds()}


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")
