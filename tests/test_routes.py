"""One contract for every route: the same request through the command, the Python function, the
``da.dinov3`` accessor (``masked=True`` and ``masked=False``, in memory and dask-backed), a batch
in this process and a batch on a local Dask cluster gives the same arrays.

Scenes cut from the real samples where the routes used to disagree: a Landsat crop with nodata 0 on
every band and pixels where only one band is 0 (per-band nodata), an RGB crop with a GDAL internal
mask, and a Landsat 7 crop whose colour interpretation says blue, green, red (bands 1, 2, 3) with a
fourth, undefined band.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import rioxarray
import torch
from rasterio.enums import ColorInterp
from rasterio.windows import Window

import dinov3_geo
import dinov3_geo.xarray  # noqa: F401  (registers da.dinov3)
from dinov3_geo.batch import run_batch
from dinov3_geo.cli import main
from dinov3_geo.io.patchmap import open_features
from dinov3_geo.models.demo import demo_backbone
from dinov3_geo.models.heads.io import save_head
from dinov3_geo.models.heads.linear import LinearSegHead
from dinov3_geo.models.identity import backbone_identity
from helpers import SAMPLES, read_raster

TILING = dict(tile=64, overlap=16)
FLAGS = ["--tile", "64", "--overlap", "16", "--device", "cpu"]


def _profile(src, window: Window, **changes) -> dict:
    profile = dict(driver="GTiff", width=int(window.width), height=int(window.height), count=src.count,
                   dtype=src.dtypes[0], crs=src.crs, transform=src.window_transform(window), nodata=src.nodata)
    profile.update(changes)
    return profile


def per_band_nodata(path: Path) -> Path:
    """uint16 Landsat crop, nodata 0: a corner where every band is 0, a strip where only band 1 is."""
    window = Window(200, 300, 150, 120)
    with rasterio.open(SAMPLES / "landsat7_saltlake_truecolor_utm12n.tif") as src:
        data = src.read(window=window).astype("uint16") * 37 + 11
        profile = _profile(src, window, dtype="uint16", nodata=0)
    data[:, :30, :40] = 0
    data[0, 60:70, 20:120] = 0
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def internal_mask(path: Path) -> Path:
    """RGB byte crop without nodata, with a GDAL internal mask over a block of it."""
    window = Window(300, 250, 140, 130)
    with rasterio.open(SAMPLES / "rasterio_RGB.byte.tif") as src:
        data = src.read(window=window)
        profile = _profile(src, window, nodata=None)
    mask = np.full(data.shape[1:], 255, np.uint8)
    mask[40:90, 10:70] = 0
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.write_mask(mask)
    return path


def blue_green_red(path: Path) -> Path:
    """Landsat 7 bands 1, 2, 3, 4 (blue, green, red, NIR) with that colour interpretation."""
    window = Window(60, 80, 130, 120)
    with rasterio.open(SAMPLES / "stars_L7_ETMs.tif") as src:
        data = src.read([1, 2, 3, 4], window=window)
        profile = _profile(src, window, count=4)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.colorinterp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined]
    return path


MAKERS = {"per_band_nodata": per_band_nodata, "internal_mask": internal_mask, "blue_green_red": blue_green_red}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("route_scenes")
    return {name: make(folder / f"{name}.tif") for name, make in MAKERS.items()}


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Path:
    """A segmentation head file (linear, three classes, random weights) on the demo backbone."""
    torch.manual_seed(3)
    module = LinearSegHead(64, 3).eval()
    with torch.no_grad():
        module.bn.running_mean.normal_()
    meta = {"task": "segment", "head": "linear", "class_names": ["a", "b", "c"],
            "colors": [[200, 0, 0], [0, 200, 0], [0, 0, 200]], "backbone": backbone_identity(demo_backbone()),
            "normalisation": {"mean": [0.4, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "source": "backbone"},
            "bands": None, "scale": None, "chip_size": 64, "layers": [3], "dropout": 0.1}
    return save_head(tmp_path_factory.mktemp("head") / "head.safetensors", module, meta)


def read(path: Path) -> np.ndarray:
    """The values of an output: a Zarr store's features or a raster's bands."""
    return open_features(path).values if path.suffix == ".zarr" else read_raster(path)


def same(a: np.ndarray, b: np.ndarray, route: str = "") -> None:
    """Identical arrays (NaN where the other has NaN)."""
    assert a.shape == b.shape, route
    np.testing.assert_array_equal(a, b, err_msg=route)


def accessor_arrays(path: Path):
    """The scene as the accessor's users open it: masked and not, in memory and dask-backed."""
    for masked in (False, True):
        for chunks in (None, {"band": -1, "y": 48, "x": 48}):
            yield f"masked={masked} chunks={chunks}", rioxarray.open_rasterio(path, masked=masked, chunks=chunks)


@pytest.mark.parametrize("name", list(MAKERS))
def test_canopy_every_route(scenes, name, tmp_path, capsys):
    scene = scenes[name]
    assert main(["segment", str(scene), "--weights", "demo", "-o", str(tmp_path / "cli.tif"), *FLAGS]) == 0
    ref = read(tmp_path / "cli.tif")
    assert np.isfinite(ref).any() and np.isnan(ref).any() == (name != "blue_green_red")
    dinov3_geo.segment(scene, "canopy", tmp_path / "py.tif", weights="demo", device="cpu", **TILING)
    same(read(tmp_path / "py.tif"), ref)
    for label, da in accessor_arrays(scene):
        got = da.dinov3.canopy(weights="demo", device="cpu", **TILING)
        same(got.values[None], ref, label)
    result = run_batch([str(scene)], tmp_path / "batch", task="canopy", weights="demo", device="cpu", **TILING)
    assert result.ok
    same(read(tmp_path / "batch" / f"{scene.stem}_canopy.tif"), ref)


@pytest.mark.parametrize("name", list(MAKERS))
def test_trained_head_every_route(scenes, head, name, tmp_path, capsys):
    scene = scenes[name]
    assert main(["segment", str(scene), "--head", str(head), "--backbone", "demo", "-o", str(tmp_path / "cli.tif"),
                 *FLAGS]) == 0
    ref = read(tmp_path / "cli.tif")
    assert set(np.unique(ref)) <= {0, 1, 2, 255} and (ref < 255).any()
    dinov3_geo.segment(scene, output=tmp_path / "py.tif", head=head, backbone="demo", device="cpu", **TILING)
    same(read(tmp_path / "py.tif"), ref)
    for label, da in accessor_arrays(scene):
        same(da.dinov3.segment(head, backbone="demo", device="cpu", **TILING).values[None], ref, label)
    assert run_batch([str(scene)], tmp_path / "batch", head=head, backbone="demo", device="cpu", **TILING).ok
    same(read(tmp_path / "batch" / f"{scene.stem}_classes.tif"), ref)


@pytest.mark.parametrize("name", list(MAKERS))
def test_patch_features_and_similar_every_route(scenes, name, tmp_path, capsys):
    scene = scenes[name]
    assert main(["embed", str(scene), "--patch", "-o", str(tmp_path / "cli.zarr"), "--backbone", "demo",
                 *FLAGS]) == 0
    ref = read(tmp_path / "cli.zarr")
    dinov3_geo.embed(scene, tmp_path / "py.zarr", patch=True, backbone="demo", device="cpu", **TILING)
    same(read(tmp_path / "py.zarr"), ref)
    for label, da in accessor_arrays(scene):
        same(da.dinov3.embed(patch=True, backbone="demo", device="cpu", **TILING).values, ref, label)
    assert run_batch([str(scene)], tmp_path / "batch", task="features", backbone="demo", device="cpu", **TILING).ok
    same(read(tmp_path / "batch" / f"{scene.stem}_features.zarr"), ref)

    with rasterio.open(scene) as src:          # a valid pixel: the scene's centre cell
        x, y = (float(v) for v in src.xy(src.height // 2 + 20, src.width // 2 + 20))
    at = f"{x!r},{y!r}"
    assert main(["similar", str(scene), f"--at={at}", "-o", str(tmp_path / "sim.tif"), "--backbone", "demo",
                 *FLAGS]) == 0
    sim = read(tmp_path / "sim.tif")
    assert np.nanmax(sim) == pytest.approx(1.0, abs=1e-5)
    assert main(["similar", str(scene), f"--at={at}", "-o", str(tmp_path / "sim_f.tif"),
                 "--features", str(tmp_path / "cli.zarr")]) == 0
    same(read(tmp_path / "sim_f.tif"), sim)
    dinov3_geo.similar(scene, tmp_path / "sim_py.tif", at=(x, y), backbone="demo", device="cpu", **TILING)
    same(read(tmp_path / "sim_py.tif"), sim)
    for label, da in accessor_arrays(scene):
        same(da.dinov3.similar(at=(x, y), backbone="demo", device="cpu", **TILING).values[None], sim, label)


@pytest.mark.slow
def test_batch_on_a_local_dask_cluster_equals_the_command(scenes, head, tmp_path, capsys):
    """Canopy, a trained head and patch features on two Dask workers: the same arrays as the command,
    to float rounding (each worker runs torch on its share of the cores, one thread here instead of
    this process's two, which changes the order of sums: at most 1e-6 relative; classes identical)."""
    paths = [str(p) for p in scenes.values()]
    runs = {"canopy": dict(task="canopy", weights="demo"), "classes": dict(head=head, backbone="demo"),
            "features": dict(task="features", backbone="demo")}
    for suffix, kw in runs.items():
        result = run_batch(paths, tmp_path / suffix, device="cpu", dask="local:2", **TILING, **kw)
        assert result.ok, result.summary_text()
        for scene in scenes.values():
            ext = ".zarr" if suffix == "features" else ".tif"
            got = read(tmp_path / suffix / f"{scene.stem}_{suffix}{ext}")
            if suffix == "canopy":
                dinov3_geo.segment(scene, "canopy", tmp_path / "ref.tif", weights="demo", device="cpu",
                                   overwrite=True, **TILING)
            elif suffix == "classes":
                dinov3_geo.segment(scene, output=tmp_path / "ref.tif", head=head, backbone="demo", device="cpu",
                                   overwrite=True, **TILING)
            else:
                dinov3_geo.embed(scene, tmp_path / "ref.zarr", patch=True, backbone="demo", device="cpu",
                                 overwrite=True, **TILING)
            ref = read(tmp_path / ("ref.zarr" if suffix == "features" else "ref.tif"))
            if suffix == "classes":
                same(got, ref, f"dask {scene.name}")
            else:
                np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6, err_msg=f"dask {suffix} {scene.name}")
                assert np.array_equal(np.isnan(got), np.isnan(ref))
