"""Streaming stitcher: exactness with analytic stand-in models, seams, nodata, bounded memory."""
import tempfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.windows import Window
from scipy import ndimage

from dinov3_geo.errors import UsageError
from dinov3_geo.io.cog import COGSink
from dinov3_geo.io.scene import open_scene
from dinov3_geo.io.stitch import StreamingStitcher
from dinov3_geo.io.tiling import ChipPlan, plan_chips
from dinov3_geo.testing.peer import load_tiled_inference
from helpers import MemorySink, stream, write_raster


def analytic(x: np.ndarray) -> np.ndarray:
    """A pointwise smooth 'model': ``sin(3 r) + g * b`` per pixel."""
    return (np.sin(3 * x[0]) + x[1] * x[2])[None].astype(np.float32)


def reference(scene, fn) -> np.ndarray:
    """``fn`` applied to the whole scene at once, NaN where the input is invalid."""
    chip, valid = scene.read(Window(0, 0, scene.width, scene.height))
    x = chip.astype(np.float32) / 255 if chip.dtype == np.uint8 else chip
    out = fn(x)
    out[:, ~valid] = np.nan
    return out


def synthetic_float(path, height, width):
    """Smooth float32 field with NaN holes and a -9999 nodata block (analytic tests only)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    data = np.stack([np.sin(yy / 17) * 300 + xx, np.cos(xx / 23) * 500 + yy, (yy * xx) % 997]).astype(np.float32)
    data[1, height // 3, :] = np.nan
    data[:, : height // 5, : width // 4] = -9999
    return write_raster(path, data, nodata=-9999)


def synthetic_uint16(path, height, width):
    yy, xx = np.mgrid[0:height, 0:width]
    data = np.stack([(yy * 37 + xx * 11) % 4000, (xx * 7) % 3000 + 100, (yy * 5) % 2000 + 50]).astype(np.uint16)
    data[:, -3:, :] = 0
    return write_raster(path, data, nodata=0)


def check_cog_equals(path, expected):
    with rasterio.open(path) as ds:
        got = ds.read()
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, atol=1e-5, equal_nan=True)


SAMPLE_CASES = [
    ("rasterio_RGB.byte.tif", 64, 16),
    ("rasterio_RGB.byte.tif", 128, 32),
    ("rasterio_RGB.byte.tif", 512, 64),
    ("landsat7_saltlake_truecolor_utm12n.tif", 512, 64),
    ("opengeos_naip_m_4709963_se_14_1_20200831.tif", 128, 32),
    ("stars_L7_ETMs.tif", 512, 64),  # smaller than a tile in both directions
]


@pytest.mark.parametrize("name,tile,overlap", SAMPLE_CASES)
def test_analytic_model_on_real_scenes_is_exact(sample, tmp_path, name, tile, overlap):
    out = tmp_path / "out.tif"
    with open_scene(sample(name)) as scene:
        with COGSink(out, scene) as sink:
            stream(scene, sink, analytic, 1, tile, overlap)
        check_cog_equals(out, reference(scene, analytic))


@pytest.mark.parametrize("make,height,width,tile,overlap", [
    (synthetic_float, 173, 301, 64, 16),
    (synthetic_float, 301, 173, 128, 32),
    (synthetic_float, 40, 100, 128, 32),   # smaller than the tile
    (synthetic_uint16, 90, 700, 128, 32),  # shorter than the tile, wider than several
    (synthetic_uint16, 520, 37, 512, 64),
])
def test_analytic_model_on_synthetic_non_square(tmp_path, make, height, width, tile, overlap):
    path = make(tmp_path / "in.tif", height, width)
    out = tmp_path / "out.tif"
    with open_scene(path) as scene:
        with COGSink(out, scene) as sink:
            stream(scene, sink, analytic, 1, tile, overlap)
        expected = reference(scene, analytic)
    assert np.isnan(expected).any() and np.isfinite(expected).any()
    check_cog_equals(out, expected)


def test_nodata_collar_positions_exact(sample, tmp_path):
    out = tmp_path / "out.tif"
    with open_scene(sample("rasterio_RGB.byte.tif")) as scene:
        with COGSink(out, scene) as sink:
            stream(scene, sink, analytic, 1, 128, 32)
    with rasterio.open(out) as ds, rasterio.open(sample("rasterio_RGB.byte.tif")) as src:
        invalid = src.dataset_mask() == 0
        np.testing.assert_array_equal(np.isnan(ds.read(1)), invalid)


# -- seams -------------------------------------------------------------------------------------

def box_blur(x: np.ndarray) -> np.ndarray:
    """Neighbourhood 'model' that zero-pads at chip borders, so it depends on chip position."""
    return ndimage.uniform_filter(x.mean(0), size=9, mode="constant")[None].astype(np.float32)


def hard_cut(scene, fn, tile, overlap):
    """Naive stitching: paste chips in order, later chips overwrite the overlap."""
    out = np.zeros((1, scene.height, scene.width), np.float32)
    for w in plan_chips(scene.height, scene.width, tile, overlap):
        chip, _ = scene.read(w)
        r, c = int(w.row_off), int(w.col_off)
        out[:, r:r + int(w.height), c:c + int(w.width)] = fn(chip.astype(np.float32) / 255)
    return out




def terratorch_blend(scene, fn, tile, overlap, padding):
    import torch

    chip, _ = scene.read(Window(0, 0, scene.width, scene.height))
    x = torch.from_numpy(chip.astype(np.float32) / 255)[None]

    def forward(batch):
        return torch.from_numpy(np.stack([fn(c) for c in batch.numpy()]))

    y = load_tiled_inference()(forward, x, crop=tile, stride=tile - overlap, batch_size=8,
                               padding=padding, device="cpu")
    return y[0].numpy()


def rmse(a, b):
    return float(np.sqrt(np.nanmean((a - b) ** 2)))


@pytest.mark.slow
@pytest.mark.parametrize("tile,overlap", [(128, 32), (256, 64)])
def test_blending_beats_hard_cut_and_terratorch(sample, tile, overlap):
    with open_scene(sample("opengeos_naip_m_4709963_se_14_1_20200831.tif")) as scene:
        truth = reference(scene, box_blur)
        sink = MemorySink(1, scene.height, scene.width)
        stream(scene, sink, box_blur, 1, tile, overlap)
        ours = rmse(sink.array, truth)
        cut = rmse(hard_cut(scene, box_blur, tile, overlap), truth)
        peer = min(rmse(terratorch_blend(scene, box_blur, tile, overlap, p), truth) for p in ("reflect", False))
    assert cut > 1e-3
    assert ours < 0.05 * cut
    assert ours <= peer


# -- property: every valid pixel once, right value; every invalid one NaN -----------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(16, 300), w=st.integers(16, 300), k=st.integers(1, 8), o=st.integers(0, 63),
       density=st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]), seed=st.integers(0, 2**16))
def test_property_identity_stitch(h, w, k, o, density, seed):
    tile = 16 * k
    overlap = o % (tile // 2)
    rng = np.random.default_rng(seed)
    data = rng.random((3, h, w)).astype(np.float32)
    invalid = rng.random((h, w)) < density
    if rng.random() < 0.5:  # blocky nodata too
        r, c = rng.integers(0, h), rng.integers(0, w)
        invalid[r:r + 40, c:c + 40] = True
    data[:, invalid] = np.nan
    with tempfile.TemporaryDirectory() as tmp:
        path = write_raster(Path(tmp) / "p.tif", data)
        with open_scene(path, scale=(0.0, 1.0)) as scene:
            sink = MemorySink(1, h, w)
            stream(scene, sink, lambda x: x[:1].copy(), 1, tile, overlap)
    assert np.all(sink.times == 1)
    got = sink.array[0]
    np.testing.assert_array_equal(np.isnan(got), invalid)
    np.testing.assert_allclose(got[~invalid], data[0][~invalid], rtol=0, atol=2e-6)


# -- streaming behaviour -----------------------------------------------------------------------

def test_memory_bounded_and_out_of_order(tmp_path):
    """A tall scene: rows held stay below tile + stride even with chips arriving out of order."""
    h, w, tile, overlap = 3000, 200, 64, 16
    windows = plan_chips(h, w, tile, overlap)
    rng = np.random.default_rng(1)
    order = np.arange(len(windows))
    for start in range(0, len(order), 3):  # shuffle within batches that straddle two chip rows
        rng.shuffle(order[start:start + 3])
    field = np.add.outer(np.arange(h), np.arange(w) * 0.5).astype(np.float32)[None]
    sink = MemorySink(1, h, w)
    st_ = StreamingStitcher(sink, ChipPlan.build(h, w, tile, overlap), 1)
    peak = 0
    for i in order:
        win = windows[i]
        r, c = int(win.row_off), int(win.col_off)
        st_.add(win, field[:, r:r + tile, c:c + tile], np.ones((tile, tile), bool))
        peak = max(peak, st_.open_rows)
    st_.close()
    assert peak <= tile + (tile - overlap)
    assert np.all(sink.times == 1)
    np.testing.assert_allclose(sink.array, field, rtol=1e-6)


@pytest.mark.parametrize("arrival", ["reversed", "random"])
def test_any_arrival_order_gives_the_same_rows_once(arrival):
    """Chips from the bottom up or in random order: the buffer grows past its plan-order size and
    every row still comes out once, equal to the field."""
    h, w, tile, overlap = 700, 150, 64, 16
    windows = plan_chips(h, w, tile, overlap)
    order = np.arange(len(windows))[::-1] if arrival == "reversed" else np.random.default_rng(2).permutation(len(windows))
    field = np.add.outer(np.arange(h) * 0.25, np.arange(w) * 0.5).astype(np.float32)[None]
    sink = MemorySink(1, h, w)
    st_ = StreamingStitcher(sink, ChipPlan.build(h, w, tile, overlap), 1)
    for i in order:
        win = windows[i]
        r, c = int(win.row_off), int(win.col_off)
        st_.add(win, field[:, r:r + tile, c:c + tile], np.ones((tile, tile), bool))
    st_.close()
    assert np.all(sink.times == 1)
    np.testing.assert_allclose(sink.array, field, rtol=1e-6)


def test_classes_argmax_and_nodata():
    h, w, tile, overlap = 70, 90, 32, 8
    labels = (np.add.outer(np.arange(h) // 20, np.arange(w) // 30) % 4)
    logits = np.eye(4, dtype=np.float32)[labels].transpose(2, 0, 1) * 5
    valid = np.ones((h, w), bool)
    valid[:5] = False
    sink = MemorySink(1, h, w, dtype="uint8", fill=0)
    st_ = StreamingStitcher(sink, ChipPlan.build(h, w, tile, overlap), 4, kind="classes")
    for win in plan_chips(h, w, tile, overlap):
        r, c, hh, ww = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
        st_.add(win, logits[:, r:r + hh, c:c + ww], valid[r:r + hh, c:c + ww])
    st_.close()
    assert sink.array.dtype == np.uint8
    assert np.all(sink.array[0, :5] == 255)
    np.testing.assert_array_equal(sink.array[0, 5:], labels[5:])


def test_skipped_chips_and_never_computed_rows_are_nodata():
    h, w = 100, 100
    sink = MemorySink(1, h, w, fill=0)
    st_ = StreamingStitcher(sink, ChipPlan.build(h, w, 64, 16), 1)
    wins = plan_chips(h, w, 64, 16)
    st_.skip(wins[0])
    st_.add(wins[1], np.ones((1, 64, 64), np.float32), np.ones((64, 64), bool))
    st_.close()
    assert np.isnan(sink.array[0, :, :36]).all() and (sink.array[0, :64, 36:] == 1).all()
    assert np.isnan(sink.array[0, 64:]).all() and np.all(sink.times == 1)


def test_stitcher_rejects_bad_chips():
    st_ = StreamingStitcher(MemorySink(1, 100, 100), ChipPlan.build(100, 100, 64, 16), 1)
    win = plan_chips(100, 100, 64, 16)[0]
    with pytest.raises(UsageError):
        st_.add(win, np.ones((2, 64, 64), np.float32), np.ones((64, 64), bool))
    st_.add(win, np.ones((1, 64, 64), np.float32), np.ones((64, 64), bool))
    with pytest.raises(UsageError):
        st_.add(win, np.ones((1, 64, 64), np.float32), np.ones((64, 64), bool))
    with pytest.raises(UsageError):
        st_.skip(Window(5, 5, 64, 64))
    with pytest.raises(UsageError):
        StreamingStitcher(MemorySink(1, 10, 10), ChipPlan.build(10, 10, 64, 16), 1, kind="labels")


@pytest.mark.parametrize("classes", [1, 2, 6, 40, 255])
def test_first_argmax_is_numpys_argmax(classes):
    """Ties (the first maximum wins), infinities and NaN (numpy's rule) as np.argmax over classes."""
    from dinov3_geo.io.stitch import first_argmax

    rng = np.random.default_rng(classes)
    ties = rng.integers(0, 3, (classes, 64, 70)).astype(np.float32)
    signed = rng.normal(size=(classes, 64, 70)).astype(np.float32)
    signed[:, 1, 1], signed[:, 2, 2], signed[0, 3, 3] = np.inf, -np.inf, -np.inf
    with_nan = signed.copy()
    with_nan[-1, 4, 4] = np.nan
    for scores in (ties, signed, with_nan):
        got = first_argmax(scores)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, np.argmax(scores, axis=0))
