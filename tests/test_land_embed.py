"""Embeddings: one GeoParquet row per non-empty chip, and the seam-free patch-feature map.

Oracles: the backbone itself on a chip read with rasterio (CLS, mean patch), and for the stitched
map a per-patch model (a 16 x 16 stride-16 convolution) applied to the whole scene at once.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds

import geopandas as gpd
from dinov3_geo import load_backbone
from dinov3_geo.analysis import embed, patch_map
from dinov3_geo.io.patchmap import open_features
from dinov3_geo.io.tiling import ChipPlan
from dinov3_geo.tasks.embed import backbone_id

TILE, OVERLAP = 128, 32


def non_empty_windows(path, tile, overlap):
    """Chip windows with at least one valid pixel, from rasterio's dataset mask (the oracle)."""
    with rasterio.open(path) as ds:
        mask = ds.dataset_mask() > 0
        plan = ChipPlan.build(ds.height, ds.width, tile, overlap)
    return [w for w in plan.windows
            if mask[int(w.row_off):int(w.row_off + w.height), int(w.col_off):int(w.col_off + w.width)].any()]


def test_chip_embeddings_geoparquet(sample, tmp_path, backbone_dir):
    scene = sample("rasterio_RGB.byte.tif")          # a third of it is a nodata collar
    out = tmp_path / "emb.parquet"
    result = embed(scene, out, backbone=backbone_dir, tile=TILE, overlap=OVERLAP, device="cpu")
    frame = gpd.read_parquet(out)
    expected = non_empty_windows(scene, TILE, OVERLAP)
    backbone = load_backbone(backbone_dir)
    with rasterio.open(scene) as ds:
        crs, transform, total = ds.crs, ds.transform, len(ChipPlan.build(ds.height, ds.width, TILE, OVERLAP))
    assert len(expected) < total                      # some chips are empty and have no row
    assert len(frame) == len(expected) == result.chips_computed
    assert frame.crs == crs
    assert frame.attrs["dinov3_geo"]["backbone"] == backbone_id(backbone) == result.backbone
    schema = pq.read_schema(out)
    for name in ("cls", "mean_patch"):
        assert schema.field(name).type == pa.list_(pa.float32(), backbone.embed_dim)
        assert np.stack(frame[name]).shape == (len(frame), backbone.embed_dim)
    got = {(int(r), int(c)) for r, c in zip(frame.row_off, frame.col_off)}
    assert got == {(int(w.row_off), int(w.col_off)) for w in expected}
    first = frame.iloc[0]
    window = Window(int(first.col_off), int(first.row_off), int(first.width), int(first.height))
    np.testing.assert_allclose(first.geometry.bounds, window_bounds(window, transform), rtol=0, atol=1e-6)


def test_chip_embedding_values_match_the_backbone(sample, tmp_path, backbone_dir):
    scene = sample("stars_L7_ETMs.tif")               # no nodata: every cell counts in the mean
    out = tmp_path / "emb.parquet"
    embed(scene, out, backbone=backbone_dir, tile=TILE, overlap=OVERLAP, device="cpu")
    row = gpd.read_parquet(out).iloc[0]
    backbone = load_backbone(backbone_dir)
    with rasterio.open(scene) as ds:
        chip = ds.read([1, 2, 3], window=Window(int(row.col_off), int(row.row_off), TILE, TILE))
    x = backbone.normalise(torch.from_numpy(chip[None].astype(np.float32) / 255))
    with torch.no_grad():
        feats = backbone.forward_features(x)
    np.testing.assert_allclose(row.cls, feats["cls"][0].numpy(), atol=1e-4)
    np.testing.assert_allclose(row.mean_patch, feats["patches"][0].mean((1, 2)).numpy(), atol=1e-4)


class PerPatch(torch.nn.Module):
    """A model whose output at each 16-px cell depends only on that cell's pixels."""

    def __init__(self, channels: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, channels, 16, stride=16)

    def forward(self, x):
        return self.conv(x)


def whole_scene(path, model) -> np.ndarray:
    """The per-patch model on the whole scene at once: invalid pixels zeroed, padded by reflection
    to whole cells; NaN on cells without a valid pixel."""
    with rasterio.open(path) as ds:
        data = ds.read([1, 2, 3]).astype(np.float32) / 255
        valid = ds.dataset_mask() > 0
    data *= valid
    h, w = valid.shape
    ph, pw = -h % 16, -w % 16
    data = np.pad(data, [(0, 0), (0, ph), (0, pw)], mode="reflect")
    cell_ok = np.pad(valid, [(0, ph), (0, pw)]).reshape((h + ph) // 16, 16, (w + pw) // 16, 16).any(axis=(1, 3))
    with torch.no_grad():
        out = model(torch.from_numpy(data[None]))[0].numpy()
    out[:, ~cell_ok] = np.nan
    return out


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
def test_patch_map_is_seam_free_and_georeferenced(sample, tmp_path, suffix):
    scene = sample("rasterio_RGB.byte.tif")           # 791 x 718: neither side a multiple of 16
    model = PerPatch()
    out = tmp_path / f"feats{suffix}"
    patch_map(scene, out, model, channels=6, tile=TILE, overlap=OVERLAP, device="cpu")
    feats = open_features(out).load()
    expected = whole_scene(scene, model)
    assert feats.shape == expected.shape == (6, 45, 50)
    np.testing.assert_allclose(feats.values, expected, rtol=1e-5, atol=1e-5)
    with rasterio.open(scene) as ds:
        assert feats.rio.crs == ds.crs
        assert feats.rio.transform().almost_equals(ds.transform @ Affine.scale(16))
        i, j = 7, 11                                   # cell (i, j) covers pixels 16i..16i+15, 16j..16j+15
        x, y = ds.transform @ (16 * j + 8, 16 * i + 8)
    assert float(feats.x[j]) == pytest.approx(x) and float(feats.y[i]) == pytest.approx(y)


def test_patch_embeddings_and_pca(sample, tmp_path, backbone_dir):
    scene = sample("stars_L7_ETMs.tif")
    full, reduced = tmp_path / "f.zarr", tmp_path / "pca.zarr"
    embed(scene, full, backbone=backbone_dir, patch=True, tile=TILE, overlap=OVERLAP, device="cpu")
    embed(scene, reduced, backbone=backbone_dir, patch=True, pca=3, tile=TILE, overlap=OVERLAP, device="cpu")
    feats, pcs = open_features(full).load(), open_features(reduced).load()
    backbone = load_backbone(backbone_dir)
    d = backbone.embed_dim
    assert feats.shape == (d, 22, 22) and pcs.shape == (3, 22, 22)
    assert feats.attrs["backbone"] == backbone_id(backbone)
    flat = feats.values.reshape(d, -1).T
    centred = flat - flat.mean(axis=0)
    top = np.linalg.svd(centred, full_matrices=False)[0][:, :3] * np.linalg.svd(centred, compute_uv=False)[:3]
    got = pcs.values.reshape(3, -1).T
    for k in range(3):                                 # components agree up to sign
        assert abs(np.corrcoef(got[:, k], top[:, k])[0, 1]) > 0.999


class RowsSink:
    """Counts the cell rows written and the most rows the stitcher held at any write."""

    def __init__(self, stitcher_ref):
        self.rows, self.most_open, self.stitcher_ref = 0, 0, stitcher_ref

    def write(self, row_off, array):
        assert row_off == self.rows
        self.rows += array.shape[1]
        self.most_open = max(self.most_open, self.stitcher_ref[0].blender.open_rows)


@pytest.mark.parametrize("height", [2000, 8000])
def test_patch_stitcher_memory_does_not_grow_with_the_scene(height):
    from dinov3_geo.io.patchmap import PatchStitcher

    plan = ChipPlan.build(height, 256, tile=128, overlap=32)
    ref: list = []
    sink = RowsSink(ref)
    ref.append(PatchStitcher(sink, plan, channels=4))
    tokens, valid = np.ones((4, 8, 8), np.float32), np.ones((128, 128), bool)
    for window in plan.windows:
        ref[0].add(window, tokens, valid)
    ref[0].close()
    assert sink.rows == height // 16
    assert sink.most_open <= (128 + 96) // 16          # one chip row and a stride, whatever the height
