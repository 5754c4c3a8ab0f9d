"""Opening scenes: band choice, scaling, masks, resampling, errors, threads."""
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from dinov3_geo.errors import InputError, UsageError
from dinov3_geo.io.scene import open_scene
from dinov3_geo.io.tiling import plan_chips

RGB = "rasterio_RGB.byte.tif"
NAIP = "opengeos_naip_m_4709963_se_14_1_20200831.tif"
STARS = "stars_L7_ETMs.tif"


def whole(scene):
    return scene.read(Window(0, 0, scene.width, scene.height))


def test_uint8_rgb_scene_attributes(sample):
    with open_scene(sample(RGB)) as s, rasterio.open(sample(RGB)) as src:
        assert (s.height, s.width, s.bands, s.dtype) == (718, 791, [1, 2, 3], "uint8")
        assert s.crs == src.crs and s.transform == src.transform and not s.resampled
        assert s.input_profile == {"crs": src.crs, "transform": src.transform, "width": 791, "height": 718}
        assert s.scaling is None and s.warnings == []
        assert s.pixel_size_m == pytest.approx((300.04, 300.04), abs=0.01)
        chip, valid = s.read(Window(100, 50, 64, 32))
        assert chip.dtype == np.uint8 and chip.shape == (3, 32, 64) and valid.shape == (32, 64)
        np.testing.assert_array_equal(chip, src.read(window=Window(100, 50, 64, 32)) * valid)


def test_valid_mask_follows_the_dataset_mask(sample):
    """Nodata only where every band is nodata (GDAL's dataset mask), not where one band is 0."""
    with open_scene(sample(RGB)) as s, rasterio.open(sample(RGB)) as src:
        chip, valid = whole(s)
        np.testing.assert_array_equal(valid, src.dataset_mask() > 0)
        assert (valid & ~np.all(src.read_masks() > 0, axis=0)).any()   # dark pixels with a 0 band stay data
        assert 0.5 < valid.mean() < 0.8 and np.all(chip[:, ~valid] == 0)


def test_default_bands_follow_colour_interpretation(raster):
    data = np.stack([np.full((20, 20), v, np.uint8) for v in (10, 20, 30, 40)])
    path = raster(data)
    with rasterio.open(path, "r+") as ds:
        ds.colorinterp = [ColorInterp.undefined, ColorInterp.blue, ColorInterp.green, ColorInterp.red]
    with open_scene(path) as s:
        assert s.bands == [4, 3, 2]
        assert whole(s)[0][:, 0, 0].tolist() == [40, 30, 20]


def test_first_three_bands_without_rgb_interpretation(sample):
    with open_scene(sample(STARS)) as s:
        assert s.bands == [1, 2, 3] and whole(s)[1].all()


def test_explicit_bands_and_out_of_range(sample):
    with open_scene(sample(STARS), bands=[4, 3, 2]) as s:
        assert s.bands == [4, 3, 2]
    with pytest.raises(UsageError, match="band 7 .* 6 band"):
        open_scene(sample(STARS), bands=[7, 3, 2])


def test_single_band_repeated_with_warning(sample):
    with open_scene(sample(NAIP), bands=[4]) as s:
        chip, _ = s.read(Window(0, 0, 32, 32))
        assert chip.shape == (3, 32, 32) and np.array_equal(chip[0], chip[2])
        assert any("repeated" in w for w in s.warnings)


def test_two_band_scene_refused(raster):
    with pytest.raises(InputError, match="2 bands"):
        open_scene(raster(np.ones((2, 20, 20), np.uint8)))


def test_uint16_global_stretch_not_per_chip(sample, raster):
    """uint16 built from a real scene: one scene-wide 2-98 % stretch, identical across chips."""
    with rasterio.open(sample(NAIP)) as src:
        data = src.read([1, 2, 3]).astype(np.uint16) * 100 + 500
    path = raster(data)
    with open_scene(path) as s:
        assert s.dtype == "uint16" and len(s.scaling) == 3
        for (lo, hi), band in zip(s.scaling, data):
            assert lo == pytest.approx(np.percentile(band, 2), rel=0.05)
            assert hi == pytest.approx(np.percentile(band, 98), rel=0.05)
        full, _ = whole(s)
        assert full.dtype == np.float32 and full.min() >= 0 and full.max() <= 1
        chip, _ = s.read(Window(200, 100, 64, 64))
        np.testing.assert_array_equal(chip, full[:, 100:164, 200:264])


def test_explicit_scale(raster):
    data = np.linspace(0, 2000, 3 * 32 * 32, dtype=np.float32).reshape(3, 32, 32)
    with open_scene(raster(data), scale=(0, 1000)) as s:
        chip, _ = whole(s)
        np.testing.assert_allclose(chip, np.clip(data / 1000, 0, 1), atol=1e-6)
    with pytest.raises(UsageError):
        open_scene(raster(data, name="b.tif"), scale=(5, 5))


def test_float_nan_and_nodata_value_are_invalid_where_every_band_is(raster):
    """One rule for nodata values and NaN, as GDAL's dataset mask: a pixel is invalid where every
    selected band is nodata or NaN; a NaN in one band of a valid pixel reads as 0."""
    rng = np.random.default_rng(0)
    data = rng.random((3, 40, 50)).astype(np.float32)
    data[0, 5, 7] = np.nan                      # one band NaN: still valid
    data[:, 6, 8] = np.nan                      # every band NaN: invalid
    data[:2, 20, 3] = -9999                     # two bands nodata, one valid: valid
    data[2, 21, 4] = np.nan
    data[:2, 21, 4] = -9999                     # two bands nodata, one NaN: invalid
    data[:, 10:12, :] = -9999
    with open_scene(raster(data, nodata=-9999)) as s:
        chip, valid = whole(s)
        assert valid[5, 7] and valid[20, 3] and not valid[6, 8] and not valid[21, 4]
        assert not valid[10:12].any() and valid.sum() == 40 * 50 - 50 * 2 - 2
        assert np.isfinite(chip).all() and chip[:, ~valid].max() == 0 and chip[0, 5, 7] == 0


def test_alpha_band_and_internal_mask(raster, tmp_path):
    rgb = np.full((3, 32, 32), 100, np.uint8)
    alpha = np.full((1, 32, 32), 255, np.uint8)
    alpha[0, :8] = 0
    path = raster(np.concatenate([rgb, alpha]), photometric="RGB", alpha="YES")
    with open_scene(path) as s:
        assert s.bands == [1, 2, 3]
        _, valid = whole(s)
        assert not valid[:8].any() and valid[8:].all()
    masked = raster(rgb, name="m.tif")
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(masked, "r+") as ds:
        mask = np.full((32, 32), 255, np.uint8)
        mask[:, :5] = 0
        ds.write_mask(mask)
    with open_scene(masked) as s:
        _, valid = whole(s)
        assert not valid[:, :5].any() and valid[:, 5:].all()


@pytest.mark.parametrize("dtype", ["int8", "int16", "uint32", "int32", "float64"])
def test_other_dtypes_read_as_float(raster, dtype):
    data = (np.arange(3 * 24 * 24) % 100).reshape(3, 24, 24).astype(dtype)
    with open_scene(raster(data)) as s:
        chip, valid = whole(s)
        assert chip.dtype == np.float32 and valid.all() and 0 <= chip.min() and chip.max() <= 1


def test_complex_refused(raster):
    with pytest.raises(InputError, match="complex"):
        open_scene(raster(np.ones((3, 20, 20), np.complex64)))


def test_tiny_scene_refused(raster):
    with pytest.raises(InputError, match="too small"):
        open_scene(raster(np.ones((3, 15, 40), np.uint8)))


def test_missing_not_raster_and_truncated(tmp_path, sample):
    with pytest.raises(InputError, match="not found"):
        open_scene(tmp_path / "nope.tif")
    text = tmp_path / "notes.tif"
    text.write_text("hello")
    with pytest.raises(InputError) as info:
        open_scene(text)
    assert len(str(info.value)) < 400 and "\n" not in str(info.value)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(sample(RGB).read_bytes()[:600_000])
    with pytest.raises(InputError, match="truncated|unreadable|readable"):
        open_scene(cut)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_no_georeference_warns(sample, tmp_path, raster):
    path = raster(np.ones((3, 20, 20), np.uint8), crs=None, transform=Affine.identity())
    with open_scene(path) as s:
        assert s.crs is None and s.pixel_size_m is None
        assert any("georeference" in w for w in s.warnings)
    with pytest.raises(UsageError):
        open_scene(path, gsd=10)


def test_geographic_pixel_size_in_metres(raster):
    transform = Affine(0.0001, 0, 10.0, 0, -0.0001, 60.0)  # 0.0001 deg at 60 N
    with open_scene(raster(np.ones((3, 20, 20), np.uint8), crs="EPSG:4326", transform=transform)) as s:
        px, py = s.pixel_size_m
        assert px == pytest.approx(5.58, abs=0.05) and py == pytest.approx(11.14, abs=0.05)


def test_gsd_resamples_working_grid(sample):
    with open_scene(sample(RGB), gsd=600) as s, rasterio.open(sample(RGB)) as src:
        assert s.resampled and (s.width, s.height) == (396, 359)
        assert s.pixel_size_m == pytest.approx((600, 600), rel=0.005)
        assert s.input_profile["width"] == 791 and s.input_profile["transform"] == src.transform
        chip, valid = whole(s)
        coarse = src.read_masks(1, out_shape=(359, 396)) > 0
        assert abs(valid.mean() - coarse.mean()) < 0.01
        assert chip[:, valid].min() > 0


def test_reads_from_threads_match_serial(sample):
    before = opened(sample(NAIP))                       # held elsewhere in this process (other tests' objects)
    with open_scene(sample(NAIP)) as s:
        wins = plan_chips(s.height, s.width, 128, 32)
        serial = [s.read(w) for w in wins]
        together = threading.Barrier(4, timeout=60)     # the first four reads wait for each other: four
                                                        # threads read at once, however fast a read is

        def read(i: int):
            if i < 4:
                together.wait()
            return s.read(wins[i])

        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(read, range(len(wins))))
        assert opened(sample(NAIP)) >= before + 5       # this thread's handle and one per pool thread
        for (a, va), (b, vb) in zip(serial, parallel):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(va, vb)
    assert opened(sample(NAIP)) == before               # every thread's handle closed with the scene
    with pytest.raises(InputError):
        s.read(wins[0])


def opened(path) -> int:
    """How many times this process has ``path`` open (each GDAL handle opens the file)."""
    import psutil

    return sum(Path(f.path) == Path(path).resolve() for f in psutil.Process().open_files())


@pytest.mark.parametrize("name", ["rasterio_RGB.byte.tif", "landsat7_saltlake_truecolor_utm12n.tif",
                                  "stars_L7_ETMs.tif", "opengeos_naip_m_4709963_se_14_1_20200831.tif"])
def test_validity_equals_gdals_dataset_mask(sample, name, tmp_path):
    """Validity told from the values read (nodata values, or no mask at all) equals GDAL's
    dataset mask, also for a float copy of the scene."""
    path = sample(name)
    with rasterio.open(path) as src:
        data = src.read()
        profile = src.profile
    variants = {"as is": path}
    as_float = tmp_path / "float.tif"
    with rasterio.open(as_float, "w", **{**profile, "dtype": "float32"}) as dst:
        dst.write(data.astype(np.float32))
    variants["float32"] = as_float
    for what, p in variants.items():
        with open_scene(p) as s, rasterio.open(p) as src:
            bands = s.bands
            wins = plan_chips(s.height, s.width, 128, 32)
            for w in wins[:: max(1, len(wins) // 12)]:
                _, valid = s.read(w)
                ref = np.any(src.read_masks(sorted(set(bands)), window=w) > 0, axis=0)
                np.testing.assert_array_equal(valid, ref, err_msg=f"{name}, {what}, {w}")
