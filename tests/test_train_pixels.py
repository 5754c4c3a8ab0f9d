"""Training reads pixels through the same contract as inference: bands chosen by the same rules with
the same warnings, non-byte chips scaled by statistics of the whole training set (never chip by
chip), recorded in the head file and applied unchanged when the head maps a scene.

Chips are cut from the real Landsat 7 scene (``stars_L7_ETMs.tif``, six bands, no colour
interpretation), written as 16-bit reflectance-like values.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from dinov3_geo.cli import main
from dinov3_geo.models.heads.meta import read_head_meta
from dinov3_geo.tasks.registry import ModelSource, request_for
from dinov3_geo.train.datasets import chips_from_folder, dataset_scaling
from helpers import SAMPLES

LANDSAT = SAMPLES / "stars_L7_ETMs.tif"


def write_chip(path: Path, window: Window, bands=(3, 2, 1), gain: float = 40.0, offset: float = 0.0) -> Path:
    """A uint16 chip of the Landsat scene: ``bands`` scaled by ``gain`` plus ``offset``."""
    with rasterio.open(LANDSAT) as src:
        data = src.read(list(bands), window=window).astype(np.float64) * gain + offset
        profile = dict(driver="GTiff", width=int(window.width), height=int(window.height), count=len(bands),
                       dtype="uint16", crs=src.crs, transform=src.window_transform(window))
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.clip(np.round(data), 0, 65535).astype(np.uint16))
    return path


def test_chips_are_scaled_by_the_whole_set_not_each_on_its_own(tmp_path):
    """The same chip at half brightness, or 3000 higher, no longer reads the same: one stretch for
    the whole set (the 2-98 % of all chips' values pooled), as inference stretches a whole scene."""
    window = Window(40, 40, 64, 64)
    write_chip(tmp_path / "chips" / "a" / "plain.tif", window)
    write_chip(tmp_path / "chips" / "a" / "plain2.tif", Window(120, 40, 64, 64))
    write_chip(tmp_path / "chips" / "b" / "half.tif", window, gain=20.0)
    write_chip(tmp_path / "chips" / "b" / "bright.tif", window, offset=3000.0)
    ds = chips_from_folder(tmp_path / "chips", chip=64)
    by_name = {Path(p).stem: i for i, p in enumerate(sorted(str(q) for q in (tmp_path / "chips").rglob("*.tif")))}
    plain, half, bright = (ds.images[by_name[n]] for n in ("plain", "half", "bright"))
    assert half.mean() < plain.mean() < bright.mean()
    assert not np.allclose(plain, half) and not np.allclose(plain, bright)
    scaling, _ = dataset_scaling(sorted((tmp_path / "chips").rglob("*.tif")))
    assert ds.scale == scaling and len(scaling) == 3 and all(hi > lo for lo, hi in scaling)


def test_band_choice_warns_as_inference_does_once_for_the_set(tmp_path):
    """Five-band chips with no colour interpretation: bands 1, 2, 3 are used, and training says so in
    one line naming the first chip and how many more are alike (inference warns the same way)."""
    for i in range(3):
        for label in ("a", "b"):
            write_chip(tmp_path / "chips" / label / f"{i}.tif", Window(30 * i, 60 * (label == "b"), 64, 64),
                       bands=(1, 2, 3, 4, 5))
    ds = chips_from_folder(tmp_path / "chips", chip=64)
    notes = [n for n in ds.notes if "5 bands with no colour interpretation" in n]
    assert len(notes) == 1 and "and 5 more images alike" in notes[0] and "`bands` 3,2,1" in notes[0]


def test_head_records_the_scaling_and_inference_applies_it(tmp_path, capsys):
    """A probe trained on 16-bit chips records the set's per-band stretch; mapping a scene with it
    reads the scene with exactly that stretch (not the scene's own), by every route's request."""
    for i in range(4):
        write_chip(tmp_path / "chips" / "dark" / f"{i}.tif", Window(20 + 40 * i, 20, 64, 64))
        write_chip(tmp_path / "chips" / "bright" / f"{i}.tif", Window(20 + 40 * i, 200, 64, 64), offset=2500.0)
    head = tmp_path / "probe.safetensors"
    assert main([str(a) for a in ["train", "classify", "--chips", tmp_path / "chips", "--chip", "64", "--backbone",
                                  "standin", "--c-grid", "1", "--device", "cpu", "--cache", tmp_path / "cache",
                                  "-o", head]]) == 0
    scaling, _ = dataset_scaling(sorted((tmp_path / "chips").rglob("*.tif")))
    recorded = read_head_meta(head).scale
    assert recorded == tuple(tuple(p) for p in scaling)
    request = request_for("classify", ModelSource(head=head, backbone="standin"), device="cpu")
    assert request.reading.scale == recorded
    scene = write_chip(tmp_path / "scene.tif", Window(0, 0, 300, 300))
    assert main(["classify", str(scene), "--head", str(head), "--backbone", "standin", "--device", "cpu",
                 "-o", str(tmp_path / "chips.gpkg")]) == 0
    with rasterio.open(scene) as src:        # the scene's own stretch, which the head does not use
        own = [tuple(np.percentile(src.read(b)[src.read_masks(b) > 0], (2, 98))) for b in (1, 2, 3)]
    assert not np.allclose(own, recorded, rtol=1e-3)
