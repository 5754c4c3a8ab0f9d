"""Defects found by running the canopy command as a new user would (issue #13): each test builds
its own input (a nodata collar with ``gsd``, a GCP-georeferenced file, a full disk, an interrupted
vector step...) and checks what the user sees through public functions and the command line."""
from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.windows import Window

import dinov3_geo
from dinov3_geo.errors import OutputError, UsageError
from dinov3_geo.io.scene import open_scene
from helpers import ROOT, SAMPLES, leftovers

BAHAMAS = SAMPLES / "rasterio_RGB.byte.tif"       # 300 m, rotated nodata collar
STARS = SAMPLES / "stars_L7_ETMs.tif"             # Landsat 7 bands 1,2,3,4,5,7: blue, green, red, ...
FAST = dict(weights="demo", device="cpu", tile=64, overlap=16, progress=False)


def _quiet(fn, *args, **kwargs):
    """Call ``fn`` with warnings (pixel size, demo model) silenced; they are tested elsewhere."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def collar_scene(path: Path, geographic: bool = False) -> Path:
    """A real 192 x 192 px corner of the Bahamas scene: about 70 % nodata collar (value 0). With
    ``geographic``, the same pixels on a WGS84 grid of about 300 m pixels (a geographic-CRS copy)."""
    with rasterio.open(BAHAMAS) as src:
        data = src.read(window=Window(0, 0, 192, 192))
        crs, transform = src.crs, src.transform
    if geographic:
        deg = 300 / 111_320
        crs, transform = "EPSG:4326", Affine(deg, 0, -77.5, 0, -deg, 25.5)
    with rasterio.open(path, "w", driver="GTiff", width=192, height=192, count=3, dtype="uint8", crs=crs,
                       transform=transform, nodata=0) as ds:
        ds.write(data)
    return path


# -------------------------------------------------------------------------------------------------
# 1. gsd keeps the nodata mask


@pytest.mark.parametrize("grid,gsd", [("projected", 600.0), ("projected", 430.0), ("projected", 150.0),
                                      ("geographic", 520.0)])
def test_gsd_keeps_heights_exactly_on_the_valid_input_pixels(tmp_path, grid, gsd):
    scene = collar_scene(tmp_path / "collar.tif", geographic=grid == "geographic")
    result = _quiet(dinov3_geo.segment, scene, output=tmp_path / "h.tif", gsd=gsd, **FAST)
    with rasterio.open(scene) as src, rasterio.open(result.output) as out:
        valid = src.dataset_mask() > 0
        heights = out.read(1)
        assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, src.shape)
    assert 0.2 < valid.mean() < 0.4
    assert not np.isfinite(heights[~valid]).any(), f"{np.isfinite(heights[~valid]).sum()} nodata pixels got heights"
    assert np.isfinite(heights[valid]).all(), f"{(~np.isfinite(heights[valid])).sum()} valid pixels are NaN"


# -------------------------------------------------------------------------------------------------
# 2. a failed or interrupted vector step keeps the earlier outputs


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError], ids=["interrupt", "error"])
def test_vector_step_stopped_under_overwrite_keeps_the_earlier_outputs(tmp_path, monkeypatch, failure):
    scene = collar_scene(tmp_path / "s.tif")
    out, vec = tmp_path / "c.tif", tmp_path / "c.gpkg"
    out.write_bytes(b"last week's canopy raster")
    vec.write_bytes(b"last week's canopy polygons")

    def stopped(*args, **kwargs):
        raise failure(errno.EIO, "stopped while writing polygons") if failure is OSError else failure()

    monkeypatch.setattr(pyogrio, "write_dataframe", stopped)      # inside the vector step
    with pytest.raises((KeyboardInterrupt, OutputError)):
        _quiet(dinov3_geo.segment, scene, output=out, vector=vec, overwrite=True, **FAST)
    assert out.read_bytes() == b"last week's canopy raster"
    assert vec.read_bytes() == b"last week's canopy polygons"
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    result = _quiet(dinov3_geo.segment, scene, output=out, vector=vec, overwrite=True, **FAST)
    assert result.polygons is not None and leftovers(tmp_path) == []
    with rasterio.open(out) as ds:
        assert ds.shape == (192, 192)


# -------------------------------------------------------------------------------------------------
# 4. ground control points


def gcp_scene(path: Path) -> Path:
    """A real 96 x 96 px crop georeferenced by four GCPs only (no geotransform), UTM 18N."""
    with rasterio.open(BAHAMAS) as src:
        data = src.read(window=Window(350, 300, 96, 96))
    x0, y0, px = 210000.0, 2700000.0, 30.0
    gcps = [GroundControlPoint(row, col, x0 + col * px + row * 2.0, y0 - row * px + col * 1.0)
            for row, col in [(0, 0), (0, 96), (96, 0), (96, 96), (48, 40)]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", width=96, height=96, count=3, dtype="uint8",
                           gcps=gcps, crs="EPSG:32618") as ds:
            ds.write(data)
    return path


def test_gcp_georeferenced_scene_keeps_its_ground_control_points(tmp_path):
    scene = gcp_scene(tmp_path / "gcp.tif")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = dinov3_geo.segment(scene, output=tmp_path / "h.tif", vector=tmp_path / "h.gpkg", min_height=0.5,
                                    **FAST)
    ours = [str(w.message) for w in seen if issubclass(w.category, dinov3_geo.DinoGeoWarning)]
    assert not [text for text in ours if "no georeference" in text], ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(scene) as src, rasterio.open(result.output) as out:
            (gcps_in, crs_in), (gcps_out, crs_out) = src.gcps, out.gcps
            assert crs_out == crs_in and len(gcps_out) == len(gcps_in) == 5
            for a, b in zip(gcps_in, gcps_out):
                assert (a.row, a.col, a.x, a.y) == pytest.approx((b.row, b.col, b.x, b.y))
            assert out.shape == src.shape and np.isfinite(out.read(1)).all()
    polygons = pyogrio.read_dataframe(result.vector, layer="canopy")
    assert polygons.crs == crs_in
    x0, y0, x1, y1 = polygons.total_bounds                 # on the map, not in pixel coordinates
    assert 209000 < x0 < x1 < 213500 and 2697000 < y0 < y1 < 2700500
    assert polygons.area_m2.sum() == pytest.approx(96 * 96 * 30 * 30, rel=0.05)


def test_gcp_scene_with_gsd_is_refused_with_the_reason(tmp_path):
    with pytest.raises(UsageError, match="ground control points") as info:
        open_scene(gcp_scene(tmp_path / "gcp.tif"), gsd=60)
    assert info.value.where == "gsd"


# -------------------------------------------------------------------------------------------------
# 5. a full disk


def _tiny_filesystem_works(folder: Path) -> bool:
    """Whether this machine lets an unprivileged user namespace mount a 64 kB tmpfs."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            'mount -t tmpfs -o size=64k tmpfs "$0" && echo mounted', str(folder)],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "mounted"


def test_full_disk_is_one_line_that_says_so(tmp_path, monkeypatch):
    """On a 96 kB file system (a tmpfs in a user namespace where the machine allows one, else a
    folder that reports 40 kB free) the command says the disk is full, where, and leaves nothing."""
    full = tmp_path / "full"
    full.mkdir()
    args = ["segment", str(BAHAMAS), "--weights", "demo", "-o", str(full / "c.tif"), "--tile", "256", "--overlap",
            "32", "--device", "cpu"]
    if _tiny_filesystem_works(full):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        run = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                              'mount -t tmpfs -o size=96k tmpfs "$0" && shift && exec "$@" && true', str(full),
                              "--", sys.executable, "-m", "dinov3_geo.cli", *args],
                             capture_output=True, text=True, env=env, timeout=300)
        rc, stderr = run.returncode, run.stderr
        assert not any(full.iterdir())   # the tmpfs lived in the namespace only; nothing leaked here
    else:
        from dinov3_geo import cli

        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=40_000 if Path(p) == full else
                                                                             real(p).free))
        capture = tmp_path / "stderr.txt"
        with open(capture, "w") as err:
            monkeypatch.setattr(sys, "stderr", err)
            rc = cli.main(args)
        monkeypatch.undo()
        stderr = capture.read_text()
        assert leftovers(full) == [] and not (full / "c.tif").exists()
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert rc == 1, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "no space left" in lines[0] and str(full) in lines[0], lines[0]
    assert "internal error" not in stderr and "CPLE" not in stderr and "_tiff" not in stderr, stderr


# -------------------------------------------------------------------------------------------------
# 6. min_height


@pytest.mark.parametrize("value", [float("nan"), -5.0, float("inf"), 0.0])
def test_min_height_must_be_a_finite_height_above_zero(tmp_path, value):
    with pytest.raises(UsageError, match="height") as info:
        _quiet(dinov3_geo.segment, collar_scene(tmp_path / "s.tif"), output=tmp_path / "h.tif",
               vector=tmp_path / "h.gpkg", min_height=value, **FAST)
    assert info.value.where == "min_height"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]


# -------------------------------------------------------------------------------------------------
# 7. permissions


def test_outputs_get_the_permissions_of_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        result = _quiet(dinov3_geo.segment, collar_scene(tmp_path / "s.tif"), output=tmp_path / "h.tif",
                        vector=tmp_path / "h.gpkg", **FAST)
        plain = result.output.with_name("plain.tif")
        _quiet(dinov3_geo.segment, tmp_path / "s.tif", output=plain, **FAST)
    finally:
        os.umask(old)
    for path in (result.output, result.vector, plain):
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, (path.name, oct(path.stat().st_mode))


# -------------------------------------------------------------------------------------------------
# 8. band choice


def bands_scene(path: Path, descriptions=None, count: int = 4) -> Path:
    """``count`` real bands of the Landsat sample with the given band descriptions, no colour
    interpretation."""
    with rasterio.open(STARS) as src:
        data = src.read(list(range(1, count + 1)), window=Window(0, 0, 64, 64))
        profile = dict(driver="GTiff", width=64, height=64, count=count, dtype="uint8", crs=src.crs,
                       transform=src.transform, photometric="MINISBLACK")
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        for i, text in enumerate(descriptions or [], 1):
            ds.set_band_description(i, text)
    return path


@pytest.mark.parametrize("descriptions,expected", [
    (["NIR", "Blue", "Green", "Red"], [4, 3, 2]),
    (["blue", "green", "red", "nir"], [3, 2, 1]),
    (["B2", "B3", "B4", "B8"], [3, 2, 1]),                       # Sentinel-2 band names
    (["Red Edge 1", "Blue", "Green", "Red"], [4, 3, 2]),         # red edge is not red
])
def test_bands_chosen_by_description(tmp_path, descriptions, expected):
    with open_scene(bands_scene(tmp_path / "d.tif", descriptions)) as scene:
        assert scene.bands == expected and scene.warnings == []


def test_landsat_bands_without_names_are_not_silently_taken_as_rgb():
    """6 bands (Landsat 7: blue, green, red, ...) and no colour information: bands 1,2,3 are used
    and one warning names the file, the bands used, and how to choose (``--bands 3,2,1``)."""
    with open_scene(STARS) as scene:
        assert scene.bands == [1, 2, 3]
        assert len(scene.warnings) == 1
        text = scene.warnings[0]
    assert str(STARS) in text and "1,2,3" in text and "`bands` 3,2,1" in text and "blue" in text
    from dinov3_geo.cli import build_parser, parameters
    from dinov3_geo.cli.messages import text_in_flags

    assert "choose them with --bands 3,2,1" in text_in_flags(text, parameters(build_parser()))   # as printed
    with open_scene(STARS, bands=[3, 2, 1]) as scene:
        assert scene.bands == [3, 2, 1] and scene.warnings == []


def test_three_unnamed_bands_are_rgb_without_a_warning(tmp_path):
    with open_scene(bands_scene(tmp_path / "three.tif", count=3)) as scene:
        assert scene.bands == [1, 2, 3] and scene.warnings == []


def test_single_band_warning_names_the_file(tmp_path):
    with open_scene(bands_scene(tmp_path / "pan.tif", count=1)) as scene:
        assert scene.bands == [1]
        assert len(scene.warnings) == 1 and str(tmp_path / "pan.tif") in scene.warnings[0]


# -------------------------------------------------------------------------------------------------
# 9. gsd far from the native pixel size


def test_gsd_upsampling_beyond_the_limit_is_refused_unless_allowed():
    with pytest.raises(UsageError, match=r"47\.5x per axis") as info:
        open_scene(STARS, bands=[3, 2, 1], gsd=0.6)                 # 28.5 m -> 0.6 m
    assert info.value.where == "gsd" and "max_upsample" in str(info.value)
    with open_scene(STARS, bands=[3, 2, 1], gsd=0.6, max_upsample=None) as scene:
        assert abs(scene.width - 349 * 28.5 / 0.6) <= 1
    with open_scene(STARS, bands=[3, 2, 1], gsd=4.0) as scene:     # 7.1x: within the limit
        assert scene.resampled


def test_large_resampling_is_announced_before_the_run(tmp_path):
    scene = collar_scene(tmp_path / "s.tif")
    with pytest.warns(dinov3_geo.DinoGeoWarning) as seen:
        result = dinov3_geo.segment(scene, output=tmp_path / "h.tif", gsd=100.0, **FAST)    # 300 m -> 100 m
    notes = [str(w.message) for w in seen if "resamples" in str(w.message)]
    assert len(notes) == 1, [str(w.message) for w in seen]
    assert "3x per axis" in notes[0] and "576 x 576 px" in notes[0]
    assert f"{result.stats.chips_total} chips of 64 px" in notes[0]


# -------------------------------------------------------------------------------------------------
# 10. smaller defects


def vrt_without_its_source(folder: Path) -> Path:
    source = collar_scene(folder / "source.tif")
    rasterio.shutil.copy(source, folder / "mosaic.vrt", driver="VRT")
    source.unlink()
    return folder / "mosaic.vrt"


def test_vrt_whose_source_is_missing_names_the_source(tmp_path):
    from dinov3_geo.errors import InputError

    with pytest.raises(InputError, match=r"source file .*source\.tif is missing") as info:
        open_scene(vrt_without_its_source(tmp_path))
    assert info.value.where.endswith("mosaic.vrt") and "truncated" not in str(info.value)


def test_cli_restores_warning_hooks_after_main():
    from dinov3_geo import cli

    show, filters = warnings.showwarning, list(warnings.filters)
    assert cli.main(["segment"]) == 2
    assert cli.main(["segment", str(BAHAMAS), "--tile", "60"]) == 2
    assert warnings.showwarning is show and warnings.filters == filters


def test_fp8_help_says_it_runs_emulated_on_the_cpu(capsys):
    from dinov3_geo.cli import main

    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    options = text[text.index("options:"):]
    precision = options[options.index("--precision PRECISION"):options.index("--tile")]
    assert "emulated on the CPU" in precision
