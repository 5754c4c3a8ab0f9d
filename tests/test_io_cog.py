"""COG sink: layout, georeference, dtypes, resampling back, atomicity, early checks, overviews."""
import contextlib
import os
import resource
import signal

import numpy as np
import pytest
import rasterio
from helpers import stream

from dinov3_geo.errors import OutputError
from dinov3_geo.io.cog import (
    STREAM_MAX_BANDS,
    TEMP_RAW_MAX_BYTES,
    COGSink,
    average_down,
    overview_count,
    temp_creation_options,
)
from dinov3_geo.io.scene import open_scene

RGB = "rasterio_RGB.byte.tif"
SALT = "landsat7_saltlake_truecolor_utm12n.tif"
COLOURS = {0: (0, 0, 0, 255), 1: (0, 128, 0, 255), 2: (0, 0, 255, 255)}


def mean_model(x):
    return x.mean(0, keepdims=True)


def three_classes(x):
    """Logits of 3 classes from brightness: dark, middle, bright."""
    m = x.mean(0)
    return np.stack([0.3 - m, -abs(m - 0.45) + 0.1, m - 0.6]).astype(np.float32)


def assert_cog(path, ref_path, dtype, nodata_nan=None, nodata=None):
    with rasterio.open(path) as ds, rasterio.open(ref_path) as ref:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.profile["tiled"] and ds.block_shapes[0] == (512, 512)
        assert ds.compression is not None and ds.overviews(1)
        assert ds.crs == ref.crs and ds.transform == ref.transform
        assert (ds.width, ds.height) == (ref.width, ref.height)
        assert ds.dtypes[0] == dtype
        if nodata_nan:
            assert np.isnan(ds.nodata)
        else:
            assert ds.nodata == nodata


def leftovers(folder, keep):
    return sorted(p for p in os.listdir(folder) if p not in keep)


@pytest.mark.parametrize("name", [RGB, SALT])
def test_float_cog_layout_and_georeference(sample, tmp_path, name):
    out = tmp_path / "heights.tif"
    with open_scene(sample(name)) as scene:
        with COGSink(out, scene, band_descriptions=["mean"]) as sink:
            stream(scene, sink, mean_model, 1, 512, 64)
    assert_cog(out, sample(name), "float32", nodata_nan=True)
    with rasterio.open(out) as ds:
        assert ds.descriptions == ("mean",)
    assert leftovers(tmp_path, {"heights.tif"}) == []


def test_class_cog_colormap_and_255_nodata(sample, tmp_path):
    out = tmp_path / "classes.tif"
    with open_scene(sample(RGB)) as scene:
        with COGSink(out, scene, dtype="uint8", colormap=COLOURS) as sink:  # nodata 255 by default
            stream(scene, sink, three_classes, 3, 256, 32, kind="classes")
    assert_cog(out, sample(RGB), "uint8", nodata=255)
    with rasterio.open(out) as ds, rasterio.open(sample(RGB)) as src:
        assert ds.colormap(1)[1] == (0, 128, 0, 255)
        labels = ds.read(1)
        invalid = src.dataset_mask() == 0
        np.testing.assert_array_equal(labels == 255, invalid)
        assert set(np.unique(labels[~invalid])) <= {0, 1, 2} and len(np.unique(labels[~invalid])) == 3


@pytest.mark.parametrize("kind", ["continuous", "classes"])
def test_resampled_scene_written_back_on_input_grid(sample, tmp_path, kind):
    out = tmp_path / "out.tif"
    classes = kind == "classes"
    with open_scene(sample(RGB), gsd=450) as scene:
        assert scene.resampled and scene.width != 791
        opts = dict(dtype="uint8", nodata=255, colormap=COLOURS) if classes else {}
        with COGSink(out, scene, **opts) as sink:
            stream(scene, sink, three_classes if classes else mean_model, 3 if classes else 1, 128, 32, kind=kind)
    with rasterio.open(out) as ds, rasterio.open(sample(RGB)) as src:
        assert ds.crs == src.crs and ds.transform == src.transform and ds.shape == src.shape
        values = ds.read(1)
        invalid = src.dataset_mask() == 0
        missing = values == 255 if classes else np.isnan(values)
        assert (missing == invalid).mean() > 0.98  # borders move by up to a coarse pixel
        if not classes:
            truth = src.read().astype(np.float32).mean(0) / 255
            inner = ~missing & ~invalid
            assert np.median(np.abs(values[inner] - truth[inner])) < 0.05


def test_exception_mid_stream_leaves_nothing(sample, tmp_path):
    out = tmp_path / "out.tif"
    with open_scene(sample(RGB)) as scene:
        with pytest.raises(RuntimeError):
            with COGSink(out, scene) as sink:
                sink.write(0, np.zeros((1, 600, scene.width), np.float32))
                assert leftovers(tmp_path, set())  # the hidden partial file exists meanwhile
                raise RuntimeError("model crashed")
    assert leftovers(tmp_path, set()) == []


def test_keyboard_interrupt_keeps_existing_target(sample, tmp_path):
    out = tmp_path / "out.tif"
    out.write_bytes(b"previous result")
    with open_scene(sample(RGB)) as scene:
        with pytest.raises(KeyboardInterrupt):
            with COGSink(out, scene, overwrite=True) as sink:
                sink.write(0, np.zeros((1, 10, scene.width), np.float32))
                raise KeyboardInterrupt
    assert out.read_bytes() == b"previous result" and leftovers(tmp_path, {"out.tif"}) == []


def test_incomplete_rows_fail_finalise(sample, tmp_path):
    out = tmp_path / "out.tif"
    with open_scene(sample(RGB)) as scene:
        with pytest.raises(OutputError, match="rows"):
            with COGSink(out, scene) as sink:
                sink.write(0, np.zeros((1, 10, scene.width), np.float32))
    assert leftovers(tmp_path, set()) == []


def test_checks_before_any_work(sample, tmp_path):
    with open_scene(sample(RGB)) as scene:
        existing = tmp_path / "exists.tif"
        existing.write_bytes(b"x")
        with pytest.raises(OutputError, match="exists"):
            COGSink(existing, scene)
        with pytest.raises(OutputError, match="does not exist"):
            COGSink(tmp_path / "no" / "out.tif", scene)
        with pytest.raises(OutputError, match="input"):
            COGSink(sample(RGB), scene, overwrite=True)
        with pytest.raises(OutputError, match="folder"):
            COGSink(tmp_path, scene, overwrite=True)
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            if not os.access(locked, os.W_OK):  # root can write anyway
                with pytest.raises(OutputError, match="not writable"):
                    COGSink(locked / "out.tif", scene)
        finally:
            locked.chmod(0o700)
    assert existing.read_bytes() == b"x"


def test_overwrite_replaces(sample, tmp_path):
    out = tmp_path / "out.tif"
    out.write_bytes(b"old")
    with open_scene(sample(RGB)) as scene:
        with COGSink(out, scene, overwrite=True) as sink:
            stream(scene, sink, mean_model, 1, 512, 64)
    with rasterio.open(out) as ds:
        assert ds.count == 1
    assert leftovers(tmp_path, {"out.tif"}) == []


def test_one_write_path_chosen_with_its_reason(sample, tmp_path):
    """What the streamed encoder writes it writes; everything else goes through GDAL's COG copy,
    and the sink says which and why."""
    with open_scene(sample(RGB)) as scene, open_scene(sample(RGB), gsd=450) as coarse:
        cases = [(scene, {}, "streamed", "float32"),
                 (scene, dict(count=STREAM_MAX_BANDS + 1), "gdal_copy", "bands"),
                 (scene, dict(dtype="int16", nodata=-1), "gdal_copy", "int16"),
                 (scene, dict(stream_blocks=False), "gdal_copy", "stream_blocks"),
                 (coarse, {}, "gdal_copy", "resampled")]
        for grid, options, name, why in cases:
            sink = COGSink(tmp_path / "out.tif", grid, **options)
            sink.open()
            try:
                assert (sink.write_path.name, sink.streams_blocks) == (name, name == "streamed")
                assert why in sink.write_path.reason, sink.write_path
            finally:
                sink.abort()
    assert leftovers(tmp_path, set()) == []


def test_streamed_overviews_match_gdal_average_and_values_exact(sample, tmp_path, memory_sink):
    """Float overviews built while streaming: same levels as GDAL's COG AUTO, NaN placement exact,
    values equal to GDAL's AVERAGE up to float rounding; full-resolution values exact; no temp files."""
    import rasterio.shutil
    from rasterio.windows import Window

    crop = tmp_path / "in" / "salt_crop.tif"  # 1024 x 1152: sides divide by 2**2 (two levels)
    crop.parent.mkdir()
    with rasterio.open(sample(SALT)) as src:
        profile = src.profile.copy()
        profile.update(width=1152, height=1024)
        profile.pop("blockxsize", None), profile.pop("blockysize", None), profile.pop("tiled", None)
        with rasterio.open(crop, "w", **profile) as dst:
            dst.write(src.read(window=Window(0, 200, 1152, 1024)))
    out = tmp_path / "out.tif"
    with open_scene(crop) as scene:
        mem = memory_sink(1, scene.height, scene.width)
        stream(scene, mem, mean_model, 1, 256, 32)
        with COGSink(out, scene) as sink:
            assert sink.progressive_overviews
            stream(scene, sink, mean_model, 1, 256, 32)
    assert leftovers(tmp_path, {"out.tif", "in"}) == []
    ref = tmp_path / "ref.tif"
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        base = ds.read(1)
        np.testing.assert_array_equal(base, mem.array[0])  # NaN in the same places, values exact
        profile = dict(driver="GTiff", width=ds.width, height=ds.height, count=1, dtype="float32",
                       crs=ds.crs, transform=ds.transform, nodata=ds.nodata)
        with rasterio.open(tmp_path / "base.tif", "w", **profile) as b:
            b.write(base[None])
        rasterio.shutil.copy(tmp_path / "base.tif", ref, driver="COG", overview_resampling="AVERAGE")
        with rasterio.open(ref) as r:
            assert ds.overviews(1) == r.overviews(1) and len(ds.overviews(1)) == 2
        for level in range(len(ds.overviews(1))):
            with rasterio.open(out, overview_level=level) as o, rasterio.open(ref, overview_level=level) as g:
                mine, gdal = o.read(1), g.read(1)
                np.testing.assert_array_equal(np.isnan(mine), np.isnan(gdal))
                np.testing.assert_allclose(mine, gdal, rtol=1e-6, atol=1e-7)


def test_average_down_nan_aware_odd_edges():
    x = np.array([[1, 3, 5], [np.nan, 2, np.nan], [4, np.nan, np.nan]], np.float32)
    got = average_down(x[None])[0]
    np.testing.assert_allclose(got, [[2.0, 5.0], [4.0, np.nan]])
    assert got.dtype == np.float32
    assert overview_count(10816, 10816) == 5 and overview_count(512, 512) == 0 and overview_count(513, 10) == 1
    assert overview_count(1025, 1025) == 1  # GDAL: floor(size / 2**k), 1025 -> 512


def test_temp_past_its_raw_limit_is_compressed_and_the_cog_the_same(sample, tmp_path):
    """Past ``temp_raw_max_bytes`` GDAL's COG copy compresses its temporary GeoTIFF (ZSTD or
    DEFLATE, level 1); the result is the same COG, byte for byte."""
    with open_scene(sample(RGB)) as scene:
        size = (tmp_path, scene.height, scene.width, 1, "float32")
        assert temp_creation_options(*size) == {}
        assert temp_creation_options(*size, raw_max_bytes=0)["compress"] in ("ZSTD", "DEFLATE")
        for name, limit in (("raw.tif", TEMP_RAW_MAX_BYTES), ("compressed.tif", 0)):
            with COGSink(tmp_path / name, scene, zstd_level=9, stream_blocks=False,
                         temp_raw_max_bytes=limit) as sink:
                stream(scene, sink, mean_model, 1, 512, 64)
    assert_cog(tmp_path / "compressed.tif", sample(RGB), "float32", nodata_nan=True)
    assert (tmp_path / "compressed.tif").read_bytes() == (tmp_path / "raw.tif").read_bytes()
    assert leftovers(tmp_path, {"raw.tif", "compressed.tif"}) == []


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` in any file fail (EFBIG) while inside, as on a full disk; the
    process's limit and SIGXFSZ handler are restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("limit_mb", [1, 4], ids=["first-strip", "second-strip"])
def test_failed_write_fails_the_run_and_cleans_up(sample, tmp_path, limit_mb):
    """A write of full-resolution rows that fails (here: past a file-size limit, like a full disk)
    on the strip thread surfaces in the caller, by the next strip or by finalize, and leaves
    nothing behind. The temporary file holds 2.4 MB per 512-row strip of this scene."""
    out = tmp_path / "out.tif"
    with open_scene(sample(SALT)) as scene:
        with pytest.raises(Exception) as failure:
            with file_size_limit(limit_mb << 20):
                with COGSink(out, scene) as sink:
                    stream(scene, sink, mean_model, 1, 256, 32)
    assert "too large" in str(failure.value).lower() or "write" in str(failure.value).lower(), failure.value
    assert leftovers(tmp_path, set()) == []


@pytest.mark.parametrize("nan_share", [0.0, 0.001, 0.3, 0.95])
@pytest.mark.parametrize("shape", [(1, 512, 1030), (3, 9, 7), (2, 511, 1001)])
@pytest.mark.parametrize("nodata_area", [False, True], ids=["scattered", "with-nodata-area"])
def test_average_down_same_bits_at_any_nan_share(nan_share, shape, nodata_area):
    """Few NaN cells (redone alone), cells all NaN (a nodata area: kept as summed), or many mixed
    cells (every cell masked): the bits of the masked definition."""
    rng = np.random.default_rng(len(shape) + shape[-1])
    x = (rng.normal(size=shape) * 100).astype(np.float32)
    x[rng.random(shape) < nan_share] = np.nan
    x[..., :4, :6] = np.nan
    if nodata_area:     # a collar and an odd-edged hole, as around a scene's footprint
        x[..., :, : shape[-1] // 3] = np.nan
        x[..., shape[-2] // 2:, shape[-1] // 2 + 1:] = np.nan
    np.testing.assert_array_equal(average_down(x), masked_means(x))


def masked_means(x: np.ndarray) -> np.ndarray:
    """2x2 means ignoring NaN by definition: NaN as 0 in the sums (rows first), over the valid count."""
    padded = np.pad(x, [(0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2)], constant_values=np.nan)
    z = np.where(np.isnan(padded), np.float32(0), padded)
    sums = z[:, 0::2] + z[:, 1::2]
    sums = sums[:, :, 0::2] + sums[:, :, 1::2]
    valid = (~np.isnan(padded)).astype(np.uint8)
    counts = valid[:, 0::2] + valid[:, 1::2]
    counts = counts[:, :, 0::2] + counts[:, :, 1::2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts).astype(np.float32)
