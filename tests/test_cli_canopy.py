"""``dinov3geo segment --task canopy`` end to end: files in, files out, numbers against transformers."""
from __future__ import annotations

import re

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window
from scipy import ndimage

import dinov3_geo
from helpers import (SAMPLES, cli_subprocess, oracle, processed, read_raster, small_chmv2, write_crop,
                     write_meta_pair)

SALTLAKE = SAMPLES / "landsat7_saltlake_truecolor_utm12n.tif"
BAHAMAS = SAMPLES / "rasterio_RGB.byte.tif"
NAIP = SAMPLES / "opengeos_naip_m_4709963_se_14_1_20200831.tif"


@pytest.fixture(scope="module")
def chmv2(tmp_path_factory):
    """A tiny random CHMv2 saved by transformers, and the same tensors as Meta's .pth pair."""
    folder = tmp_path_factory.mktemp("chmv2")
    model = small_chmv2(seed=7)
    model.save_pretrained(folder / "hf")
    head, backbone = write_meta_pair(folder / "hf", folder)
    plain_head = folder / "chmv2_head.pth"     # no official hash in the name: nothing to verify
    head.rename(plain_head)
    return model, folder / "hf", plain_head, backbone


@pytest.fixture(scope="module")
def crop512(tmp_path_factory):
    """A 512 x 512 georeferenced crop of the real Salt Lake scene (no nodata inside)."""
    out = tmp_path_factory.mktemp("crop") / "saltlake_512.tif"
    write_crop(SALTLAKE.name, Window(200, 300, 512, 512), out)
    data = read_raster(out)
    assert (data > 0).all(axis=0).mean() > 0.99
    return out, data


def reference_heights(model, rgb: np.ndarray) -> np.ndarray:
    return oracle(model, processed(torch.from_numpy(rgb[:3])))[0, 0].numpy()


def test_one_chip_matches_transformers(chmv2, crop512, tmp_path):
    model, hf_dir, _, _ = chmv2
    scene, data = crop512
    out = tmp_path / "canopy.tif"
    run = cli_subprocess("segment", scene, "--task", "canopy", "--weights", hf_dir, "-o", out, "--tile", 512,
                         "--overlap", 0, "--device", "cpu")
    assert run.returncode == 0, run.stderr
    with rasterio.open(out) as ds:
        ours = ds.read(1)
    ref = reference_heights(model, data)
    assert ours.shape == ref.shape == (512, 512)
    rel = np.abs(ours - ref) / np.abs(ref)
    assert rel.max() < 1e-3, rel.max()
    assert ref.std() > 0.01 * ref.mean()       # the model's output is not flat: the check means something


def test_official_pth_layout_gives_the_same_output(chmv2, crop512, tmp_path):
    _, hf_dir, head, backbone = chmv2
    scene, _ = crop512
    outs = []
    for name, weights in (("hf", ["--weights", hf_dir]), ("meta", ["--weights", head, "--backbone-weights", backbone])):
        out = tmp_path / f"{name}.tif"
        run = cli_subprocess("segment", scene, *weights, "-o", out, "--tile", 256, "--overlap", 32, "--device", "cpu")
        assert run.returncode == 0, run.stderr
        with rasterio.open(out) as ds:
            outs.append(ds.read(1))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_multi_chip_scene_with_nodata_collar(chmv2, tmp_path):
    """Georeferencing, dtype, NaN placement, COG layout and the GeoPackage on a real scene."""
    _, hf_dir, _, _ = chmv2
    out, gpkg = tmp_path / "bahamas.tif", tmp_path / "bahamas.gpkg"
    run = cli_subprocess("segment", BAHAMAS, "--weights", hf_dir, "-o", out, "--vector", gpkg, "--min-height", 3,
                         "--tile", 128, "--overlap", 32, "--batch-size", 4, "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert re.search(r"pixel size is 300\.\d\d m", run.stderr) and "--gsd" in run.stderr
    assert "km²" in run.stderr and str(out) in run.stderr
    assert "on cpu (fp32)" in run.stderr             # --precision auto: fp32 on the CPU
    with rasterio.open(BAHAMAS) as src, rasterio.open(out) as ds:
        assert (ds.crs, ds.transform, ds.width, ds.height) == (src.crs, src.transform, src.width, src.height)
        assert ds.dtypes == ("float32",) and np.isnan(ds.nodata)
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG" and ds.overviews(1)
        heights = ds.read(1)
        invalid = src.dataset_mask() == 0
        pixel_area = abs(src.transform.a * src.transform.e)
    assert invalid.any() and (~invalid).any()
    np.testing.assert_array_equal(np.isnan(heights), invalid)
    assert np.isfinite(heights[~invalid]).all() and heights[~invalid].min() > 0

    layer = gpd.read_file(gpkg, layer="canopy")
    assert layer.crs == rasterio.open(out).crs
    assert {"area_m2", "mean_height_m", "max_height_m"} <= set(layer.columns)
    assert (layer.max_height_m >= 3).all() and (layer.mean_height_m <= layer.max_height_m).all()
    # one polygon per connected patch of canopy: nothing split along the 128 px chip grid
    labels, count = ndimage.label(np.nan_to_num(heights, nan=-1) >= 3)
    assert len(layer) == count > 1
    # true (equal-area) m², within UTM's scale error of the nominal pixel area
    assert layer.area_m2.sum() == pytest.approx((labels > 0).sum() * pixel_area, rel=5e-3)


def test_python_api_on_a_four_band_scene(chmv2, tmp_path):
    """The notebook path: one call; NAIP's fourth band (NIR) is left out by default."""
    _, hf_dir, _, _ = chmv2
    with pytest.warns(dinov3_geo.DinoGeoWarning, match="pixel size"):
        result = dinov3_geo.segment(NAIP, task="canopy", output=tmp_path / "naip.tif", weights=hf_dir,
                                    tile=256, overlap=32, device="cpu", progress=False)
    assert result.stats.chips_computed == result.stats.chips_total > 1
    assert result.area_km2 == pytest.approx(934 * 723 * 25 / 1e6, rel=1e-6)
    with rasterio.open(result.output) as ds:
        assert ds.count == 1 and ds.width == 934 and ds.height == 723


def test_explicit_bands_change_the_input(chmv2, tmp_path):
    _, hf_dir, _, _ = chmv2
    outs = []
    for bands in ("1,2,3", "3,2,1"):
        out = tmp_path / f"b{bands.replace(',', '')}.tif"
        run = cli_subprocess("segment", NAIP, "--weights", hf_dir, "-o", out, "--bands", bands, "--tile", 256,
                             "--overlap", 32, "--device", "cpu")
        assert run.returncode == 0, run.stderr
        with rasterio.open(out) as ds:
            outs.append(ds.read(1))
    assert np.abs(outs[0] - outs[1]).max() > 1e-3


def test_existing_output_is_kept_without_overwrite(chmv2, crop512, tmp_path):
    _, hf_dir, _, _ = chmv2
    scene, _ = crop512
    out = tmp_path / "keep.tif"
    out.write_bytes(b"earlier result")
    run = cli_subprocess("segment", scene, "--weights", hf_dir, "-o", out, "--device", "cpu")
    assert run.returncode == 1
    assert run.stderr.strip().startswith("error: ") and len(run.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"earlier result"
    run = cli_subprocess("segment", scene, "--weights", hf_dir, "-o", out, "--device", "cpu", "--overwrite",
                         "--tile", 256, "--overlap", 32)
    assert run.returncode == 0, run.stderr
    with rasterio.open(out) as ds:
        assert ds.width == 512


def test_gsd_runs_on_another_grid_and_writes_back_on_the_input_grid(chmv2, tmp_path):
    _, hf_dir, _, _ = chmv2
    stars = SAMPLES / "stars_L7_ETMs.tif"         # 6 bands, 28.5 m: run at 57 m (half the pixels a side)
    out = tmp_path / "stars.tif"
    run = cli_subprocess("segment", stars, "--weights", hf_dir, "-o", out, "--bands", "3,2,1", "--gsd", 57,
                         "--tile", 64, "--overlap", 16, "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert "pixel size" not in run.stderr            # the user chose the grid: no warning
    with rasterio.open(stars) as src, rasterio.open(out) as ds:
        assert (ds.crs, ds.transform, ds.width, ds.height) == (src.crs, src.transform, src.width, src.height)
        heights = ds.read(1)
    assert np.isfinite(heights[2:-2, 2:-2]).all() and heights[2:-2, 2:-2].min() > 0


@pytest.mark.slow
def test_compiled_run_matches_eager(chmv2, tmp_path):
    """``compile=True`` (torch.compile by regions: the backbone blocks share one graph, the head
    another) gives the eager heights; 20 chips in batches of 3 end with a short, padded batch."""
    _, hf_dir, _, _ = chmv2
    outs = []
    for compiled in (False, True):
        result = dinov3_geo.segment(NAIP, task="canopy", output=tmp_path / f"c{int(compiled)}.tif", weights=hf_dir,
                                    tile=256, overlap=32, batch_size=3, device="cpu", compile=compiled,
                                    progress=False)
        assert result.stats.chips_computed == 20 and result.stats.batch_size == 3
        with rasterio.open(result.output) as ds:
            outs.append(ds.read(1))
    eager, compiled = outs
    np.testing.assert_array_equal(np.isnan(eager), np.isnan(compiled))
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)
