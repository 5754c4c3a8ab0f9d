"""A batch keeps the contract of a single scene: each scene's warnings (said once, kept in the
summary and the scene's sidecar), the recipe as resolved (the precision the device runs at, the
tiling a task takes by default), and a sidecar that says how a failed scene ended."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import rasterio
import rasterio.shutil

from dinov3_geo.batch import run_batch
from dinov3_geo.cli import main
from helpers import SAMPLES, leftovers

FAST = dict(tile=128, overlap=32, device="cpu", progress=False)


def scenes(folder: Path) -> Path:
    """A Landsat 7 file (six bands: the band-order warning), a chip without georeference, and a
    file whose pixels are damaged (a readable header, a truncated body)."""
    folder.mkdir()
    shutil.copy(SAMPLES / "stars_L7_ETMs.tif", folder / "landsat7.tif")
    shutil.copy(SAMPLES / "chesapeake" / "id_000367_image.tif", folder / "chip.tif")
    rasterio.shutil.copy(SAMPLES / "rasterio_RGB.byte.tif", folder / "whole.cog", driver="COG")
    whole = (folder / "whole.cog").read_bytes()            # a COG: its header first, then the pixels
    (folder / "truncated.tif").write_bytes(whole[:len(whole) * 2 // 3])
    (folder / "whole.cog").unlink()
    return folder


def test_each_scenes_warnings_are_said_once_and_kept(tmp_path, capsys):
    folder = scenes(tmp_path / "in")
    out = tmp_path / "out"
    code = main(["segment", str(folder / "*.tif"), "--weights", "demo", "-o", f"{out}/", "--tile", "128",
                 "--overlap", "32", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1                       # the truncated file failed; the others are done
    band_order = [line for line in err.splitlines() if "6 bands with no colour interpretation" in line]
    assert len(band_order) == 1 and "landsat7.tif" in band_order[0] and "--bands 3,2,1" in band_order[0]
    assert sum("no georeference" in line and "chip.tif" in line for line in err.splitlines()) == 1
    summary = json.loads((out / "summary_canopy.json").read_text())
    notes = {Path(d["scene"]).name: d["notes"] for d in summary["done"]}
    assert any("6 bands" in n for n in notes["landsat7.tif"]) and any("pixel size" in n for n in notes["landsat7.tif"])
    assert any("no georeference" in n for n in notes["chip.tif"])
    assert any(n.startswith("landsat7.tif: ") and "6 bands" in n for n in summary["notes"])
    sidecar = json.loads((out / "landsat7_canopy.tif.json").read_text())
    assert sidecar["state"] == "complete" and any("6 bands" in n for n in sidecar["notes"])


def test_a_failed_scene_s_sidecar_says_so_and_the_recipe_is_resolved(tmp_path):
    folder = scenes(tmp_path / "in")
    result = run_batch([str(folder / "*.tif")], tmp_path / "out", weights="demo", **FAST)
    failed = {Path(o.scene).name: o for o in result.of("failed")}
    assert list(failed) == ["truncated.tif"]
    sidecar = json.loads((tmp_path / "out" / "truncated_canopy.tif.json").read_text())
    assert sidecar["state"] == "failed" and "truncated.tif" in sidecar["reason"]
    recipe = json.loads((tmp_path / "out" / "chip_canopy.tif.json").read_text())["recipe"]
    assert recipe["precision"] == "fp32" and (recipe["tile"], recipe["overlap"]) == (128, 32)
    again = run_batch([str(folder / "*.tif")], tmp_path / "out", weights="demo", **FAST)
    assert sorted(Path(o.scene).name for o in again.of("skipped")) == ["chip.tif", "landsat7.tif"]
    assert [Path(o.scene).name for o in again.of("failed")] == ["truncated.tif"]     # redone, fails again
    assert leftovers(tmp_path / "out") == []
