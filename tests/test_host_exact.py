"""The host pipeline's results, bit for bit, against straightforward numpy over the whole scene.

Reading (validity, scaling), the engine's uint8 -> float32 /255 step and the stitcher's weighted
mean are checked for exact float32 equality (``view(uint32)``: signed zeros and NaN payloads too)
with a reference that reads the scene with rasterio and accumulates every chip's weighted values in
arrival order into whole-scene arrays. Faster code must keep these results unchanged.
"""
import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from dinov3_geo import predict
from dinov3_geo.io.scene import open_scene
from dinov3_geo.io.stitch import StreamingStitcher
from dinov3_geo.io.tiling import ChipPlan
from dinov3_geo.pipeline import RunSettings, run_chips
from helpers import MemorySink, arrival_order, bits, feed, reference_blend, window_of

SCENES = ["rasterio_RGB.byte.tif", "landsat7_saltlake_truecolor_utm12n.tif", "stars_L7_ETMs.tif"]


class FirstChannel(torch.nn.Module):
    """Returns a view of its input (``x[:, :1]``): the engine must not reuse memory it still owns."""

    def forward(self, x):
        return x[:, :1]


class Mix(torch.nn.Module):
    """A new tensor per batch from float32 products and sums (exact in numpy too)."""

    def forward(self, x):
        return torch.cat([x[:, 1:2] * x[:, 2:3] + x[:, :1], x[:, 2:3] - x[:, 0:1]], dim=1)


def mix_numpy(x: np.ndarray) -> np.ndarray:
    return np.stack([x[1] * x[2] + x[0], x[2] - x[0]])


def gdal_inputs(path) -> tuple[np.ndarray, np.ndarray]:
    """RGB (the first three bands) as float32 0..1 (uint8 / 255, invalid pixels 0) and GDAL's
    dataset mask (valid where any of the three bands is unmasked)."""
    with rasterio.open(path) as src:
        data = src.read([1, 2, 3])
        valid = np.any(src.read_masks([1, 2, 3]) > 0, axis=0)
    x = np.divide(data.astype(np.float32), np.float32(255))
    x[:, ~valid] = 0
    return x, valid


# -- the whole path: Scene.read -> engine (CPU) -> stitcher ------------------------------------

@pytest.mark.parametrize("name", SCENES)
@pytest.mark.parametrize("model, fn", [(FirstChannel(), lambda x: x[:1]), (Mix(), mix_numpy)],
                         ids=["view-of-input", "new-tensor"])
def test_run_chips_is_bit_identical_to_whole_scene_numpy(sample, name, model, fn):
    """Several batches (the last one short) go through the engine's reused CPU buffers; a model that
    returns a view of its input must still get every chip's own values."""
    path = sample(name)
    x, valid = gdal_inputs(path)
    expected_values = fn(x)
    with open_scene(path, bands=[1, 2, 3]) as scene:
        plan = ChipPlan.build(scene.height, scene.width, 128, 32)
        sink = MemorySink(expected_values.shape[0], scene.height, scene.width)
        stitcher = StreamingStitcher(sink, plan, expected_values.shape[0])
        run_chips(scene, model, stitcher, plan, RunSettings.resolve("cpu", "fp32", batch_size=3), progress=False)
    assert np.all(sink.times == 1)
    empty = {w for w in plan.windows if not window_of(valid[None], w).any()}
    expected = reference_blend(plan, plan.windows, lambda w: window_of(expected_values, w), valid, empty)
    np.testing.assert_array_equal(bits(sink.array), bits(expected))


def test_predict_cog_is_bit_identical_to_whole_scene_numpy(sample, tmp_path):
    path = sample("rasterio_RGB.byte.tif")
    x, valid = gdal_inputs(path)
    out = tmp_path / "first.tif"
    predict(path, FirstChannel(), out, tile=128, overlap=32, batch_size=4, device="cpu", progress=False)
    with rasterio.open(out) as ds:
        got = ds.read()
    plan = ChipPlan.build(*valid.shape, 128, 32)
    empty = {w for w in plan.windows if not window_of(valid[None], w).any()}
    expected = reference_blend(plan, plan.windows, lambda w: window_of(x[:1], w), valid, empty)
    np.testing.assert_array_equal(bits(got), bits(expected))


# -- the stitcher alone: any arrival order, skips, partial validity, awkward values ---------------

@pytest.mark.parametrize("seed", range(16))
def test_stitcher_is_bit_identical_to_whole_scene_accumulation(seed):
    """Random grids, chip orders (plan, reversed, shuffled), skipped chips, masks, and values that
    include -0.0, underflowing products, NaN and infinities: the rows equal the reference's bits."""
    rng = np.random.default_rng(seed)
    tile = int(rng.choice([16, 32, 48, 64]))
    overlap = int(rng.integers(0, tile // 2))
    height, width = int(rng.integers(5, 180)), int(rng.integers(5, 180))
    channels = int(rng.choice([1, 3]))
    kind = "classes" if seed % 4 == 3 else "continuous"
    plan = ChipPlan.build(height, width, tile, overlap)
    order = arrival_order(plan, seed, rng)
    special = np.array([-0.0, 0.0, -1e-45, 1e-45, -1e-38, np.nan, np.inf, -np.inf, -5.0], np.float32)
    values = rng.standard_normal((channels, height, width)).astype(np.float32)
    pick = rng.random(values.shape) < 0.05
    values[pick] = rng.choice(special, int(pick.sum()))
    valid = rng.random((height, width)) < rng.choice([0.3, 0.9, 1.0])
    valid[: height // 3, : width // 4] = False
    skipped = {w for w in order if rng.random() < 0.1}

    sink = MemorySink(1 if kind == "classes" else channels, height, width,
                      dtype="uint8" if kind == "classes" else "float32", fill=0)
    stitcher = StreamingStitcher(sink, plan, channels, kind=kind)
    for win in order:
        if win in skipped:
            stitcher.skip(win)
        else:
            chip = window_of(values, win)
            padded = np.pad(chip, [(0, 0), (0, tile - chip.shape[1]), (0, tile - chip.shape[2])]) \
                if min(chip.shape[1:]) < tile else chip                  # engine-style padded outputs
            with np.errstate(invalid="ignore", over="ignore"):
                stitcher.add(win, padded, window_of(valid[None], win)[0])
    stitcher.close()
    assert np.all(sink.times == 1)
    expected = reference_blend(plan, order, lambda w: window_of(values, w), valid, skipped, kind)
    np.testing.assert_array_equal(bits(sink.array), bits(expected))


@pytest.mark.parametrize("seed", range(24))
def test_class_stitching_is_the_argmax_of_whole_scene_blends(seed):
    """Class scores (1 to 13 classes, ties, -0.0, NaN, infinities) in plan, reversed or shuffled
    order, with skips and masks: the classes equal the argmax of whole-scene accumulated scores,
    both where one chip alone covers a pixel (its own argmax) and where chips overlap."""
    rng = np.random.default_rng(1000 + seed)
    tile = int(rng.choice([16, 32, 48, 64]))
    overlap = int(rng.integers(0, tile // 2))
    height, width = int(rng.integers(5, 200)), int(rng.integers(5, 200))
    classes = int(rng.choice([1, 2, 6, 13]))
    plan = ChipPlan.build(height, width, tile, overlap)
    order = arrival_order(plan, seed, rng)
    values = rng.integers(0, 4, (classes, height, width)).astype(np.float32)     # many ties
    special = np.array([-0.0, np.nan, np.inf, -np.inf], np.float32)
    pick = rng.random(values.shape) < (0.02 if seed % 2 else 0)
    values[pick] = rng.choice(special, int(pick.sum()))
    valid = rng.random((height, width)) < rng.choice([0.5, 0.95, 1.0])
    skipped = {w for w in order if rng.random() < 0.1}
    sink = MemorySink(1, height, width, dtype="uint8", fill=0)
    feed(StreamingStitcher(sink, plan, classes, kind="classes"), order, values, valid, skipped)
    expected = reference_blend(plan, order, lambda w: window_of(values, w), valid, skipped, "classes")
    np.testing.assert_array_equal(sink.array, expected)


# -- validity from nodata values ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32"])
@pytest.mark.parametrize("nodata", [0.0, -0.0, 1.0, 255.0, 256.0, -1.0, 0.5, -32768.0, 65535.0, 4294967295.0,
                                    -2147483648.0, 1e10, float("nan"), float("inf")])
def test_nodata_value_rule_equals_a_plain_comparison(raster, dtype, nodata):
    """``nodata=`` marks pixels where every band equals it or is not finite (NaN, infinity: the
    pixel contract's one rule): integers compared in float64 (a value the type cannot hold marks
    none), float32 with the value rounded to float32; invalid uint8 pixels read as 0."""
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype) if dtype != "float32" else None
    pool = np.array([0, 1, 255, -1, 65535, -32768] + ([info.min, info.max] if info else [np.nan, 0.5]), np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        data = rng.choice(pool, size=(3, 40, 48)).astype(dtype)
        data[:, 3:9, 5:20] = np.array(nodata).astype(dtype)     # blocks at the value, as the type holds it
    data[:2, 20:25, :] = data[0, 3, 5]                          # two bands out of three: still valid
    as_float, value = (data, np.float32(nodata)) if dtype == "float32" else (data.astype(np.float64), nodata)
    with np.errstate(over="ignore"):
        missing = np.isnan(as_float) if np.isnan(nodata) else as_float == value
    if dtype == "float32":
        missing |= ~np.isfinite(data)
    ref = ~missing.all(axis=0)
    scale = None if dtype == "uint8" else (0.0, 1.0)
    with open_scene(raster(data), nodata=nodata, scale=scale) as scene:
        chip, valid = scene.read(Window(0, 0, 48, 40))
        window_valid = scene.read(Window(5, 3, 16, 16))[1]
    np.testing.assert_array_equal(valid, ref)
    np.testing.assert_array_equal(window_valid, ref[3:19, 5:21])
    if dtype == "uint8":
        np.testing.assert_array_equal(chip, data * ref)
    else:
        assert not chip[:, ~ref].any()
