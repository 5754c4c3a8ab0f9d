"""The one public pipeline: ``predict`` with bring-your-own models over real scenes, against the
model applied to the whole scene at once; the plan and settings resolved once; task models."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

import dinov3_geo
from dinov3_geo import ChipPlan, RunSettings, predict
from dinov3_geo.errors import UsageError
from helpers import ROOT, SAMPLES

BAHAMAS = SAMPLES / "rasterio_RGB.byte.tif"          # uint8, rotated nodata collar
SALTLAKE = SAMPLES / "landsat7_saltlake_truecolor_utm12n.tif"


def per_pixel_model(out_channels: int = 2, seed: int = 0) -> torch.nn.Conv2d:
    """A fixed 1x1 convolution: what it gives a pixel depends on that pixel only."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, out_channels, 1)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    return conv.eval()


def whole_scene(path: Path, model: torch.nn.Module, mean=None, std=None) -> tuple[np.ndarray, np.ndarray]:
    """``model`` on the whole scene at once (0..1, optionally normalised), and GDAL's validity."""
    with rasterio.open(path) as ds:
        x = torch.from_numpy(ds.read([1, 2, 3]).astype(np.float32) / 255)[None]
        valid = ds.dataset_mask() > 0
    if mean is not None:
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x)[0].numpy(), valid


@pytest.mark.parametrize("tile, overlap", [(256, 32), (128, 16), (512, 64)])
def test_per_pixel_model_equals_the_whole_scene_at_once(tmp_path, tile, overlap):
    model = per_pixel_model()
    out = tmp_path / "values.tif"
    res = predict(BAHAMAS, model, out, tile=tile, overlap=overlap, batch_size=4, device="cpu",
                  band_names=["a", "b"])
    ref, valid = whole_scene(BAHAMAS, model)
    with rasterio.open(out) as ds, rasterio.open(BAHAMAS) as src:
        got = ds.read()
        assert (ds.crs, ds.transform, ds.width, ds.height) == (src.crs, src.transform, src.width, src.height)
        assert ds.dtypes == ("float32", "float32") and ds.descriptions == ("a", "b")
    assert res.channels == 2 and res.stats.chips_computed + res.stats.chips_skipped == res.stats.chips_total
    np.testing.assert_array_equal(np.isnan(got).any(0), ~valid)
    np.testing.assert_array_equal(np.isnan(got).all(0), ~valid)
    assert np.abs(got[:, valid] - ref[:, valid]).max() <= 1e-5


def test_given_mean_and_std_win_over_the_models_own(tmp_path):
    class Normalising(torch.nn.Module):
        mean, std = (0.1, 0.2, 0.3), (0.5, 0.5, 0.5)

        def __init__(self):
            super().__init__()
            self.conv = per_pixel_model(1, seed=3)

        def normalise(self, x01):
            return (x01 - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)

        def forward(self, x):
            return self.conv(x)

    model = Normalising().eval()
    own, given = tmp_path / "own.tif", tmp_path / "given.tif"
    predict(SALTLAKE, model, own, tile=256, overlap=32, device="cpu")
    mean, std = (0.4, 0.4, 0.3), (0.2, 0.15, 0.14)
    predict(SALTLAKE, model, given, tile=256, overlap=32, device="cpu", mean=mean, std=std)
    for path, m, s in ((own, Normalising.mean, Normalising.std), (given, mean, std)):
        ref, valid = whole_scene(SALTLAKE, model.conv, m, s)
        with rasterio.open(path) as ds:
            got = ds.read(1)
        assert np.abs(got[valid] - ref[0][valid]).max() <= 1e-4


def test_classes_are_the_whole_scene_argmax(tmp_path):
    model = per_pixel_model(4, seed=1)
    out = tmp_path / "classes.tif"
    colours = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255), 3: (255, 255, 0)}
    predict(BAHAMAS, model, out, kind="classes", tile=256, overlap=32, device="cpu",
            class_names=["w", "x", "y", "z"], colormap=colours)
    scores, valid = whole_scene(BAHAMAS, model)
    ref = scores.argmax(0)
    with rasterio.open(out) as ds:
        got = ds.read(1)
        assert ds.dtypes == ("uint8",) and ds.nodata == 255
        assert ds.colormap(1)[2][:3] == (0, 0, 255)
        assert ds.tags()["CLASS_3"] == "z"
    assert np.all(got[~valid] == 255)
    top2 = np.sort(scores, axis=0)[-2:]
    clear = valid & (top2[1] - top2[0] > 1e-4)        # ties within float noise may go either way
    np.testing.assert_array_equal(got[clear], ref[clear])
    assert clear.sum() > 0.99 * valid.sum()


def test_nodata_value_for_a_file_without_one(tmp_path, raster):
    """``nodata`` marks invalid input where the file says nothing (pixels where every band has it)."""
    with rasterio.open(SALTLAKE) as ds:
        data = ds.read(window=rasterio.windows.Window(0, 0, 300, 200))
    data[:, :50, :] = 7
    plain = raster(data, "plain.tif")
    out = tmp_path / "out.tif"
    predict(plain, per_pixel_model(1), out, tile=128, overlap=16, device="cpu", nodata=7)
    with rasterio.open(out) as ds:
        got = ds.read(1)
    assert np.isnan(got[:50]).all() and np.isfinite(got[50:][(data[:, 50:] != 7).any(0)]).all()


def test_plan_is_built_once_and_immutable():
    plan = ChipPlan.build(1000, 700, 512, 64)
    assert len(plan) == len(plan.windows) == 6 and plan.chip_shape == (512, 512)
    with pytest.raises(Exception):
        plan.tile = 256
    w = plan.weights(plan.windows[0])
    assert w.dtype == np.float32 and not w.flags.writeable and (w > 0).all()
    assert plan.weights(plan.windows[0]) is w


@pytest.mark.parametrize("kwargs, param", [
    (dict(tile=100), "tile"), (dict(overlap=300), "overlap"), (dict(batch_size=0), "batch_size"),
    (dict(precision="fp16"), "precision"), (dict(device="tpu"), "device"), (dict(kind="labels"), "kind"),
    (dict(dtype="int32"), "dtype"), (dict(mean=(0.5, 0.5, 0.5)), "std"), (dict(std=(0, 1, 1), mean=(0, 0, 0)), "std"),
])
def test_bad_settings_name_the_parameter_and_write_nothing(tmp_path, kwargs, param):
    out = tmp_path / "out.tif"
    with pytest.raises(UsageError) as err:
        predict(BAHAMAS, per_pixel_model(1), out, **{"device": "cpu", **kwargs})
    assert err.value.where == param and "--" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_is_not_dense_is_refused(tmp_path):
    class Vector(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    with pytest.raises(UsageError, match=r"\[B,K,"):
        predict(BAHAMAS, Vector(), tmp_path / "out.tif", device="cpu", tile=128, overlap=16)
    assert list(tmp_path.iterdir()) == []


def test_run_settings_resolved_once():
    s = RunSettings.resolve("cpu", "auto", batch_size=3)
    assert (s.device.type, s.precision, s.dtype, s.batch_size) == ("cpu", "fp32", torch.float32, 3)
    assert s.readers >= 1 and RunSettings.resolve("cpu", "bf16").dtype == torch.bfloat16


def test_canopy_model_is_a_task_model():
    from dinov3_geo.models.canopy import CanopyModel
    from dinov3_geo.tasks import describe

    info = describe(CanopyModel.__new__(CanopyModel))
    assert (info.output, info.channels, info.band_names) == ("continuous", 1, ("canopy_height_m",))
    assert dinov3_geo.TaskModel is not None


def test_library_errors_name_parameters_not_flags():
    """Below the command line, no string the code builds (errors, warnings) names a ``--flag``;
    only the cli package speaks in flags (docstrings may mention the command line)."""
    offenders = []
    for path in (ROOT / "dinov3_geo").rglob("*.py"):
        if "cli" in path.parts or "testing" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and re.search(r"(^|[\s(])--[a-z]", node.value)):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value[:60]}")
    assert offenders == []


def _private_uses_of_the_package(tree: ast.AST) -> list[int]:
    """Lines that import a private name of ``dinov3_geo`` or read ``x._name`` off a name imported
    from it (a module, class or object of the package)."""
    ours, lines = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dinov3_geo"):
            for alias in node.names:
                ours.add(alias.asname or alias.name)
                if alias.name.startswith("_"):
                    lines.append(node.lineno)
        elif isinstance(node, ast.Import):
            ours.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("dinov3_geo"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in ours):
            lines.append(node.lineno)
    return sorted(lines)


def test_no_private_names_touched_in_tests_or_benchmarks():
    pattern = re.compile(r"""(monkeypatch\.setattr|patched)\([^)]*["']_[A-Za-z]""")
    hits = []
    for path in [p for folder in ("tests", "benchmarks") for p in (ROOT / folder).glob("*.py")]:
        if path.name == "test_pipeline.py":
            continue
        text = path.read_text()
        hits += [f"{path.name}:{n}" for n, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
        hits += [f"{path.name}:{n}" for n in _private_uses_of_the_package(ast.parse(text))]
    assert hits == []


def test_readme_predict_example_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n# predict-example\n(.*?)```", text, re.S).group(1)
    for name in ("data_samples",):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    with rasterio.open(tmp_path / "values.tif") as ds, rasterio.open(tmp_path / "classes.tif") as cl:
        assert ds.count == 2 and np.isnan(ds.read(1)).any() and cl.dtypes == ("uint8",)


@pytest.mark.parametrize("dtype, tol", [("float16", 0.0625), ("uint16", 0.05)])
def test_output_encodings_within_their_quantisation(tmp_path, dtype, tol):
    """float16 (16-bit floats in a float32 GeoTIFF, NBITS=16) and uint16 (decimetres with scale 0.1)
    give the float32 values within 0.0625 and 0.05 over a 0..96 range, nodata where float32 has
    NaN; GIS readers see the scale."""
    class Heights(torch.nn.Module):
        channels = 1

        def forward(self, x):
            return x.mean(1, keepdim=True) * 96.0

    ref_path, out = tmp_path / "f32.tif", tmp_path / f"{dtype}.tif"
    predict(BAHAMAS, Heights(), ref_path, tile=256, overlap=32, device="cpu")
    predict(BAHAMAS, Heights(), out, tile=256, overlap=32, device="cpu", dtype=dtype)
    with rasterio.open(ref_path) as r, rasterio.open(out) as o:
        ref = r.read(1)
        raw = o.read(1, masked=True)
        assert o.dtypes == (dtype if dtype == "uint16" else "float32",)
        if dtype == "float16":
            assert o.tags(1, "IMAGE_STRUCTURE")["NBITS"] == "16"
        got = raw.astype(np.float32).filled(np.nan) * o.scales[0] + o.offsets[0]
        if dtype == "uint16":
            assert o.nodata == 65535 and o.scales == (0.1,)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    ok = ~np.isnan(ref)
    assert np.abs(got[ok] - ref[ok]).max() <= tol

