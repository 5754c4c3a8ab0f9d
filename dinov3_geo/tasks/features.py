"""Patch-feature maps of a scene: computed through the pipeline, stored, reduced, read back.

The ``features`` task (``embed(patch=True)``) and the land analyses (similarity, clustering, change)
share these: the backbone's patch tokens of every chip stitched at 16-px cells
(:func:`patch_features`) into a Zarr store or a COG (:func:`feature_store`), optionally reduced by
PCA (scikit-learn), and read back block by block (:func:`row_blocks`). A store records how it was
made (the backbone id, the tiling, ``pca`` when reduced) in its attributes (Zarr) or tags (COG);
:func:`open_store` reads it back checked, and never needs the backbone.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from dinov3_geo.engine import StopToken
from dinov3_geo.errors import InputError, UsageError
from dinov3_geo.io.features import PATCH
from dinov3_geo.io.patchmap import (
    ZARR_CHUNK_ROWS,
    CellGrid,
    CellPaddedScene,
    PatchStitcher,
    ZarrFeatureSink,
    open_features,
)
from dinov3_geo.io.cog import COGSink
from dinov3_geo.io.tiling import ChipPlan
from dinov3_geo.pipeline import run_chips

#: Cells kept in memory at once while fitting PCA or k-means (rows of features, float32).
FIT_BATCH = 4096
#: Tags of a feature COG that say how it was made (a Zarr store keeps them as attributes).
STORE_KEYS = ("backbone", "tile", "overlap", "patch_size", "pca")


def store_attrs(model, tiling, **extra) -> dict:
    """What a feature store records of how it was made."""
    return dict(backbone=model.backbone_id, tile=tiling.tile, overlap=tiling.overlap, patch_size=PATCH, **extra)


def patch_features(scene, sink, model, tiling, settings, progress: Optional[bool] = None, channels=None,
                   stop: Optional[StopToken] = None):
    """Per-patch outputs ``[C, t, t]`` of ``model`` (a backbone's patch tokens) over ``scene``,
    stitched at cell resolution into ``sink`` (``stop``: see :func:`~dinov3_geo.engine.run_chips`);
    returns the run's stats."""
    padded = CellPaddedScene(scene)
    plan = ChipPlan.build(padded.height, padded.width, tiling.tile, tiling.overlap)
    stitcher = PatchStitcher(sink, plan, channels or model.embed_dim)
    return run_chips(padded, model, stitcher, plan, settings, progress=progress, stop=stop)


def feature_store(output: Path, grid: CellGrid, channels: int, attrs: dict, overwrite: bool, source=None,
                  band_names=None):
    """The sink of a cell feature map: a Zarr store (``.zarr``) or a float32 COG (``.tif``), both
    carrying ``attrs``."""
    if output.suffix.lower() == ".zarr":
        return ZarrFeatureSink(output, grid, channels, attrs, overwrite, band_names, inputs=[source])
    return COGSink(output, grid, count=channels, dtype="float32", overwrite=overwrite,
                   band_descriptions=band_names or [f"f{i}" for i in range(channels)],
                   tags={k: str(v) for k, v in attrs.items()})


def write_patch_features(scene, model, output: Path, tiling, settings, *, pca: Optional[int] = None,
                         overwrite: bool = False, progress: Optional[bool] = None,
                         stop: Optional[StopToken] = None):
    """The patch-feature map of ``scene`` into the store ``output`` (reduced to ``pca`` principal
    components, fitted on the scene's cells, when given); returns the run's stats."""
    grid = CellGrid.of(scene)
    if pca is None:
        with feature_store(output, grid, model.embed_dim, store_attrs(model, tiling), overwrite,
                           getattr(scene, "path", None)) as sink:
            return patch_features(scene, sink, model, tiling, settings, progress, stop=stop)
    with scratch_features(scene, model, tiling, settings, output, progress, stop) as (feats, stats):
        components = fit_pca(feats, int(pca))
        names = [f"pc{i + 1}" for i in range(components.n_components_)]
        attrs = store_attrs(model, tiling, pca=int(components.n_components_))
        with feature_store(output, grid, len(names), attrs, overwrite, getattr(scene, "path", None), names) as sink:
            for row, block in row_blocks(feats):
                sink.write(row, apply_pca(components, block))
    return stats


@contextlib.contextmanager
def scratch_features(scene, model, tiling, settings, near: Path, progress: Optional[bool] = None,
                     stop: Optional[StopToken] = None):
    """``(features, stats)``: the patch features of ``scene`` in a hidden temporary Zarr store
    beside ``near``, opened lazily, and the run's stats; removed on exit."""
    folder = Path(tempfile.mkdtemp(prefix=f".{near.name}.features-", dir=near.parent))
    try:
        store = folder / "features.zarr"
        with ZarrFeatureSink(store, CellGrid.of(scene), model.embed_dim, store_attrs(model, tiling)) as sink:
            stats = patch_features(scene, sink, model, tiling, settings, progress, stop=stop)
        yield open_features(store), stats
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def row_blocks(feats, rows: int = ZARR_CHUNK_ROWS, where=None) -> Iterator[tuple[int, np.ndarray]]:
    """``(first cell row, float32 [D, rows, width])`` blocks of a feature DataArray, top to bottom.
    A block that cannot be read (a damaged store) is an InputError naming ``where``."""
    height = feats.shape[1]
    for r0 in range(0, height, rows):
        yield r0, read_block(feats, r0, r0 + rows, where)


def read_block(feats, r0: int, r1: int, where=None) -> np.ndarray:
    """Rows ``r0..r1`` of a feature DataArray as float32; InputError naming ``where`` when its
    chunks cannot be read."""
    try:
        return np.asarray(feats[:, r0:r1, :].values, np.float32)
    except Exception as exc:  # zarr/numcodecs/rasterio raise many kinds for a damaged chunk
        raise InputError(where or "features", f"damaged feature store: cell rows {r0}..{r1} cannot be read "
                                              f"({type(exc).__name__}); recompute it") from None


def valid_columns(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells of ``[D, rows, width]`` as ``[n, D]`` rows (no NaN) and the boolean mask of them."""
    flat = block.reshape(block.shape[0], -1).T
    ok = np.isfinite(flat).all(axis=1)
    return flat[ok], ok


def fit_pca(feats, k: int, where=None):
    """scikit-learn's IncrementalPCA over the valid cells, block by block."""
    from sklearn.decomposition import IncrementalPCA

    d = feats.shape[0]
    if k > d:
        raise UsageError("pca", f"pca={k} exceeds the feature width {d}")
    pca = IncrementalPCA(n_components=k)
    pending: list[np.ndarray] = []
    seen = 0
    for _, block in row_blocks(feats, where=where):
        cells, _ = valid_columns(block)
        pending.append(cells)
        seen += len(cells)
        if sum(len(p) for p in pending) >= max(k, FIT_BATCH):
            pca.partial_fit(np.concatenate(pending))
            pending = []
    rest = np.concatenate(pending) if pending else np.zeros((0, d), np.float32)
    if len(rest) >= k:
        pca.partial_fit(rest)
    if not hasattr(pca, "components_"):
        raise UsageError("pca", f"pca={k} needs at least {k} valid cells; {where or 'the scene'} has {seen}")
    return pca


def apply_pca(pca, block: np.ndarray) -> np.ndarray:
    """Project ``[D, rows, width]`` onto the components, NaN kept."""
    cells, ok = valid_columns(block)
    out = np.full((ok.size, pca.n_components_), np.nan, np.float32)
    if len(cells):
        out[ok] = pca.transform(cells)
    return out.T.reshape(pca.n_components_, *block.shape[1:])


def open_store(path) -> "FeatureStore":
    """A feature store written by the ``features`` task, checked whole: its backbone id and whether
    it is PCA-reduced read from it, every Zarr chunk present (a missing or truncated chunk is an
    InputError naming the store, not a wrong result)."""
    feats = open_features(path)
    attrs = dict(feats.attrs)
    if "backbone" not in attrs:
        raise InputError(path, "not a feature store of dinov3-geo (no backbone recorded): make one with "
                               "embed(patch=True)")
    _check_chunks(Path(path), feats)
    return FeatureStore(Path(path), feats, str(attrs["backbone"]),
                        int(attrs["pca"]) if attrs.get("pca") not in (None, "", "None") else None)


class FeatureStore:
    """An opened feature store: the lazy DataArray, the backbone that made it, its PCA width."""

    def __init__(self, path: Path, feats, backbone: str, pca: Optional[int]):
        self.path, self.feats, self.backbone, self.pca = path, feats, backbone, pca

    @property
    def width(self) -> int:
        return int(self.feats.shape[0])

    def backbone_name(self) -> str:
        """The backbone's name as the store records it (``name:d<width>:l<depth>:<hash>``)."""
        return self.backbone.split(":")[0]


def _check_chunks(path: Path, feats) -> None:
    """Every chunk of a Zarr store's feature array is there (zarr reads a missing chunk as its fill
    value, which would pass NaN off as nodata)."""
    if not path.is_dir():
        return
    import json

    try:
        meta = json.loads((path / "features" / ".zarray").read_text())
        grid = [-(-int(s) // int(c)) for s, c in zip(meta["shape"], meta["chunks"])]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(path, "damaged feature store: features/.zarray is missing or unreadable") from None
    separator = meta.get("dimension_separator") or "."
    keys = [separator.join(str(i) for i in idx) for idx in np.ndindex(*grid)]
    missing = [key for key in keys if not (path / "features" / key).exists()]
    if missing:
        raise InputError(path, f"damaged feature store: chunk features/{missing[0]} is missing "
                               f"({len(missing)} of {len(keys)} chunks); recompute it")
