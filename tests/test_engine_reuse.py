"""One engine for many scenes: a batch worker builds its engine once (one move to the device, one
compile, one warm-up per tile size) and runs every scene with it, with the results of an engine
built for each scene."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from rasterio.windows import Window

from dinov3_geo.batch.work import BatchJob, Runtime
from dinov3_geo.engine import Engine
from dinov3_geo.errors import UsageError
from dinov3_geo.io.scene import open_scene
from dinov3_geo.pipeline import ChipPlan, DenseOutput, RunSettings, run_chips, write_dense
from dinov3_geo.tasks.registry import ModelSource, request_for
from helpers import read_raster, write_crop

SCENE = "landsat7_saltlake_truecolor_utm12n.tif"


class Doubled(torch.nn.Module):
    channels = 1

    def forward(self, x):
        return x[:, :1] * 2


@pytest.fixture(scope="module")
def three_scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    return [write_crop(SCENE, Window(100 * k, 200, 260, 230), folder / f"s{k}.tif") for k in range(3)]


def test_a_worker_runs_every_scene_with_one_engine(three_scenes, tmp_path):
    """The in-process batch's (and each Dask worker's) runtime: the task's writer runs three scenes
    with the engine the runtime keeps, each output equal to a runtime's that ran only that scene."""
    job = BatchJob(request_for("canopy", ModelSource(weights="demo"), tile=128, overlap=32, device="cpu"))
    runtime = Runtime(job)
    for k, scene in enumerate(three_scenes):
        assert runtime.scene(scene, tmp_path / f"out{k}.tif").ok
    assert runtime.engine.runs == 3 and runtime.engine.model is runtime.model
    alone = Runtime(job)
    assert alone.scene(three_scenes[2], tmp_path / "alone.tif").ok and alone.engine.runs == 1
    np.testing.assert_array_equal(read_raster(tmp_path / "out2.tif"), read_raster(tmp_path / "alone.tif"))


@pytest.mark.slow
def test_a_kept_engine_compiles_and_warms_up_once(three_scenes, tmp_path):
    """With ``compile``, the first scene pays the compilation and warm-up; the next ones none."""
    model = Doubled()
    settings = RunSettings.resolve("cpu", batch_size=2, compile=True)
    engine = Engine(model, settings)
    warmups = []
    for k, scene in enumerate(three_scenes):
        with open_scene(scene) as sc:
            plan = ChipPlan.build(sc.height, sc.width, 128, 32)
            stats, _ = write_dense(sc, model, tmp_path / f"c{k}.tif", plan, settings, DenseOutput(), engine=engine)
        warmups.append(stats.warmup_seconds)
    assert engine.warmups == 1 and engine.runs == 3
    assert warmups[0] > 0 and warmups[1:] == [0.0, 0.0]


def test_an_engine_runs_only_its_own_model(three_scenes):
    engine = Engine(Doubled(), RunSettings.resolve("cpu"))
    with open_scene(three_scenes[0]) as sc, pytest.raises(UsageError, match="another model"):
        run_chips(sc, Doubled(), None, ChipPlan.build(sc.height, sc.width, 128, 32), engine.settings,
                  engine=engine)
