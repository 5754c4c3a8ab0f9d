"""The simulated device (``SleepModel``, ``bench_pipeline.py --model sleep:R``): what it guarantees
(device time = chips / R, the engine launching the next batch before it waits for the last, the
same outputs as a synchronous model), and the busy share it reports for a host faster and slower
than the device. Bounds are those the simulation guarantees, so that load cannot break them: a
host that must sleep ``h`` per chip cannot finish N chips in less than ``N h``."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rasterio.windows import Window

from dinov3_geo import predict
from dinov3_geo.io.scene import open_scene
from dinov3_geo.io.stitch import StreamingStitcher
from dinov3_geo.io.tiling import ChipPlan
from dinov3_geo.pipeline import RunSettings, run_chips
from dinov3_geo.testing.sleep_device import SleepModel, class_scores
from helpers import MemorySink, read_raster, run_benchmark

SCENE = "landsat7_saltlake_truecolor_utm12n.tif"


class FirstChannel(torch.nn.Module):
    """The synchronous pass-through the simulated device's ``values`` stand for."""

    def forward(self, x):
        return x[:, :1]


class Scores(torch.nn.Module):
    """The simulated device's class scores, computed synchronously."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        first = x[:, :1].numpy()
        out = np.empty((x.shape[0], self.classes, *x.shape[2:]), np.float32)
        return torch.from_numpy(class_scores(first, out))


class LoggedSleepModel(SleepModel):
    """The simulated device, logging in order each batch's launch and the engine's wait for it
    (``("launch", k)``, ``("wait", k)``, batches counted from 1)."""

    def __init__(self, rate: float):
        super().__init__(rate)
        self.log: list[tuple[str, int]] = []

    def forward(self, x):
        out = super().forward(x)
        self.log.append(("launch", self.timeline.batches))
        return out

    def record_event(self):
        return LoggedEvent(super().record_event(), self.timeline.batches, self.log)


class LoggedEvent:
    """A device event whose ``synchronize`` is logged as the wait for batch ``k``."""

    def __init__(self, event, k: int, log: list):
        self.event, self.k, self.log = event, k, log

    def synchronize(self) -> None:
        self.log.append(("wait", self.k))
        self.event.synchronize()

    def query(self) -> bool:
        return self.event.query()


class SlowScene:
    """A scene whose every chip read takes at least ``seconds`` (a host slower than the device)."""

    def __init__(self, scene, seconds: float):
        self.scene, self.seconds = scene, seconds

    def __getattr__(self, name):
        return getattr(self.scene, name)

    def read(self, window: Window):
        time.sleep(self.seconds)
        return self.scene.read(window)


@pytest.mark.parametrize("kind", ["continuous", "classes"])
def test_simulated_device_gives_the_synchronous_models_results(sample, tmp_path, kind):
    """Asynchronous batches (the output filled on the device's thread, the next batch stacked into
    the other buffer meanwhile) give the same file, bit for bit, as the model it stands for."""
    path = sample(SCENE)
    fast = SleepModel(math.inf, "classes" if kind == "classes" else "continuous", channels=5)
    plain = Scores(5) if kind == "classes" else FirstChannel()
    kw = dict(kind=kind, tile=256, overlap=32, batch_size=3, device="cpu", progress=False)
    predict(path, fast, tmp_path / "sim.tif", **kw)
    predict(path, plain, tmp_path / "sync.tif", **kw)
    got, expected = read_raster(tmp_path / "sim.tif"), read_raster(tmp_path / "sync.tif")
    assert got.dtype == (np.uint8 if kind == "classes" else np.float32)
    np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))
    assert fast.timeline.chips > 0 and fast.timeline.busy_s == 0.0


def test_device_time_is_chips_over_rate_and_a_fast_host_keeps_it_busy(sample):
    """A device of 20 chips/s (200 ms a batch of 4) and a host that needs a few ms a batch: the
    device is busy exactly chips / R seconds, and it is never left without work by the engine's
    order: each next batch is queued before the last one is waited for (an order, not a timing,
    so a loaded machine cannot break it). End to end, opening the run and its last rows (tens of
    ms, more on a loaded machine) come on top."""
    model = LoggedSleepModel(20.0)
    with open_scene(sample(SCENE), bands=[1, 2, 3]) as scene:
        plan = ChipPlan.build(scene.height, scene.width, 256, 32)
        stitcher = StreamingStitcher(MemorySink(1, scene.height, scene.width), plan, 1)
        t0 = time.perf_counter()
        stats = run_chips(scene, model, stitcher, plan, RunSettings.resolve("cpu", batch_size=4), progress=False)
        wall = time.perf_counter() - t0
    tl = model.timeline
    assert tl.chips == stats.chips_computed > 0
    assert tl.busy_s == pytest.approx(stats.chips_computed / 20.0)
    batches = range(1, tl.batches + 1)
    assert [k for what, k in model.log if what == "wait"] == list(batches)     # each batch waited for once
    for k in batches[:-1]:                         # the queue never runs dry: k + 1 queued before k is waited for
        assert model.log.index(("launch", k + 1)) < model.log.index(("wait", k)), model.log
    assert 0.5 < tl.busy_s / wall <= 1


def test_a_host_slower_than_the_device_keeps_it_busy_host_over_r(sample):
    """One reader that needs 50 ms a chip (20 chips/s) feeding a device of 80 chips/s: the device
    can be busy no more than 20/80 of the time (the reads alone take chips x 50 ms) and is close
    to that (opening the run and its last rows come on top, more of them on a loaded machine)."""
    host_rate, device_rate = 20.0, 80.0
    model = SleepModel(device_rate)
    with open_scene(sample(SCENE), bands=[1, 2, 3]) as scene:
        plan = ChipPlan.build(scene.height, scene.width, 256, 32)
        stitcher = StreamingStitcher(MemorySink(1, scene.height, scene.width), plan, 1)
        settings = RunSettings.resolve("cpu", batch_size=4, readers=1)
        t0 = time.perf_counter()
        run_chips(SlowScene(scene, 1 / host_rate), model, stitcher, plan, settings, progress=False)
        wall = time.perf_counter() - t0
    share = model.timeline.busy_s / wall
    assert share <= host_rate / device_rate
    assert share > 0.6 * host_rate / device_rate


def _bench(tmp_path: Path, *args: str) -> dict:
    proc, res = run_benchmark("bench_pipeline.py", "--work", tmp_path, "--tile", "128", "--overlap", "16", "--batch", "4",
                              *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return res


@pytest.mark.parametrize("output", ["continuous", "classes", "patches"])
def test_bench_pipeline_sleep_reports_the_busy_share(tmp_path, output):
    """``bench_pipeline.py --model sleep:R`` for floats, 6 classes (+ GeoPackage) and patch features:
    the device time is chips / R, the busy share of the wall time lies in (0, 1], and the host's CPU
    per chip is there; two runs, the median's figures."""
    extra = ["--vector"] if output == "classes" else []
    res = _bench(tmp_path, "--model", "sleep:200", "--output", output, "--grid", "3x4", "--repeats", "2", *extra)
    assert "error" not in res and res["output"] == output and res["runs"] == 2
    assert res["chips"] == 12 and res["device_busy_s"] == pytest.approx(12 / 200, abs=1e-3)
    assert 0 < res["busy_fraction"] <= 1 and 0 < res["busy_fraction_span"] <= 1
    assert res["host_cpu_ms_per_chip"] > 0 and res["end_to_end_s"] > 0
    assert len(res["busy_fraction_runs"]) == 2 and res["busy_fraction"] in res["busy_fraction_runs"]
    assert res["channels"] == {"continuous": 1, "classes": 6, "patches": 384}[output]
    if output == "classes":
        assert res["vector_s"] > 0 and res["busy_fraction_with_vector"] <= res["busy_fraction"]


def test_bench_pipeline_rejects_a_bad_sleep_rate(tmp_path):
    proc, _ = run_benchmark("bench_pipeline.py", "--model", "sleep:fast", timeout=60)
    assert proc.returncode == 2 and "sleep:R" in proc.stderr
