"""Interruptions and out-of-memory: a run stopped part way leaves nothing behind and can be rerun;
an out-of-memory batch is halved and retried with a note, and the result does not change."""
from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import pyogrio
import pytest
import rasterio
import torch

from helpers import UTM, child_env, leftovers, rgb_crop, write_raster


def tiled_scene(path: Path, crop: int = 128, reps: int = 3) -> Path:
    """A real crop tiled ``reps`` x ``reps`` into one GeoTIFF."""
    return write_raster(path, np.tile(rgb_crop(crop), (1, reps, reps)), **UTM)


def _default_sigint():
    # A child of a process that ignores SIGINT would inherit SIG_IGN; a terminal's Ctrl-C does not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def started(cmd: list[str], cwd: Path, err_file: Path) -> Iterator[subprocess.Popen]:
    """The command running with stderr into ``err_file`` and SIGINT as from a terminal; killed if
    still running when the block ends."""
    with open(err_file, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=cwd, env=child_env(DINOV3GEO_CACHE=str(cwd / "cache")),
                                preexec_fn=_default_sigint)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def partial_exists(folder: Path, name: str = "canopy.tif") -> bool:
    return any(p.name.startswith(f".{name}.partial") for p in folder.iterdir())


def wait_until(ready, proc: subprocess.Popen, err_file: Path, seconds: float = 120) -> None:
    """Poll until ``ready()`` (the state a test needs, not a proxy of it), failing if the process
    ends first or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while not ready():
        assert proc.poll() is None, f"finished before it could be interrupted:\n{err_file.read_text()}"
        assert time.monotonic() < deadline, f"not ready after {seconds} s:\n{err_file.read_text()}"
        time.sleep(0.02)


def _chips_done(text: str) -> int:
    counts = [int(m.group(1)) for m in re.finditer(r"(\d+)/\d+ \[", text)]
    return max(counts, default=0)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_part_way_then_rerun(random_chmv2, tmp_path, sig):
    # 576 px at 64 px chips, stride 48: 144 chips, so that the run is far from done when the
    # signal, sent after 6 chips, arrives on a loaded machine (36 chips could all finish first)
    scene = tiled_scene(tmp_path / "big.tif", crop=96, reps=6)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "canopy.tif"
    unrelated = out_dir / "earlier_result.tif"
    unrelated.write_bytes(b"an earlier output")
    cmd = [sys.executable, "-m", "dinov3_geo.cli", "segment", str(scene), "--weights", str(random_chmv2),
           "-o", str(target), "--tile", "64", "--overlap", "16", "--batch-size", "4", "--device", "cpu", "--progress"]
    if sig == signal.SIGTERM:      # an earlier result at the target, replaced only by a finished run
        target.write_bytes(b"previous canopy")
        cmd.append("--overwrite")
    err_file = tmp_path / "stderr.txt"
    with started(cmd, tmp_path, err_file) as proc:
        wait_until(lambda: partial_exists(out_dir) and _chips_done(err_file.read_text()) >= 6, proc, err_file)
        sent = time.monotonic()
        proc.send_signal(sig)
        rc = proc.wait(timeout=20)
        stopped = time.monotonic() - sent
    text = err_file.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # prompt, not a race with the machine's load: the chip count below shows the run stopped part way
    assert stopped < 15, f"took {stopped:.1f} s to stop"
    assert rc == (130 if sig == signal.SIGINT else 143), (rc, text)
    assert lines[-1] == "error: interrupted; no output was written", text
    assert sum(ln.startswith("error:") for ln in lines) == 1 and "Traceback" not in text, text
    assert _chips_done(text) < 144, "the run was not interrupted part way"
    if sig == signal.SIGTERM:
        assert target.read_bytes() == b"previous canopy"
    else:
        assert not target.exists()
    assert leftovers(out_dir) == []
    assert unrelated.read_bytes() == b"an earlier output"

    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                           env=child_env(DINOV3GEO_CACHE=str(tmp_path / "cache")))
    assert again.returncode == 0, again.stderr
    assert "error" not in again.stderr
    with rasterio.open(target) as ds:
        assert (ds.width, ds.height) == (576, 576)
        assert np.isfinite(ds.read(1)).all()
    assert leftovers(out_dir) == []
    assert unrelated.read_bytes() == b"an earlier output"


def test_ctrl_c_again_and_again_during_the_clean_up_leaves_nothing(random_chmv2, tmp_path):
    """An impatient user keeps pressing Ctrl-C (every 5 ms) once the run has started cleaning up:
    the clean-up still finishes, no temporary file is left, the earlier output is kept, and the
    message that nothing was written is true."""
    scene = tiled_scene(tmp_path / "big.tif", crop=96)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "canopy.tif"
    target.write_bytes(b"previous canopy")
    cmd = [sys.executable, "-m", "dinov3_geo.cli", "segment", str(scene), "--weights", str(random_chmv2),
           "-o", str(target), "--tile", "64", "--overlap", "16", "--batch-size", "4", "--device", "cpu", "--progress",
           "--overwrite"]
    err_file = tmp_path / "stderr.txt"
    with started(cmd, tmp_path, err_file) as proc:
        wait_until(lambda: partial_exists(out_dir) and _chips_done(err_file.read_text()) >= 4, proc, err_file)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.005)
        rc = proc.wait(timeout=5)
    text = err_file.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    assert rc == 130, (rc, text)
    assert lines[-1] == "error: interrupted; no output was written", text
    assert "Traceback" not in text and sum(ln.startswith("error:") for ln in lines) == 1, text
    assert leftovers(out_dir) == [], leftovers(out_dir)
    assert target.read_bytes() == b"previous canopy"


def test_interrupted_vector_step_removes_the_raster(random_chmv2, tmp_path, monkeypatch):
    """A run stopped while polygonising (Ctrl-C as GDAL writes the polygons) leaves neither output,
    so the same command can be rerun."""
    from dinov3_geo.api import segment

    scene = tiled_scene(tmp_path / "s.tif", crop=64, reps=1)
    out, vec = tmp_path / "c.tif", tmp_path / "c.gpkg"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    kw = dict(weights=random_chmv2, vector=vec, device="cpu", tile=64, overlap=16, readers=1)
    monkeypatch.setattr(pyogrio, "write_dataframe", interrupted)      # inside the vector step
    with pytest.raises(KeyboardInterrupt):
        segment(scene, output=out, **kw)
    assert not out.exists() and not vec.exists() and leftovers(tmp_path) == []
    monkeypatch.undo()
    result = segment(scene, output=out, **kw)
    assert out.exists() and vec.exists() and result.polygons is not None


# -------------------------------------------------------------------------------------------------
# Out of memory


class _PerChip(torch.nn.Module):
    """Deterministic per-chip model (batch size cannot change its values)."""

    channels = 1

    def normalise(self, x):
        return x * 2.0 - 1.0

    def forward(self, x):
        return (x.mean(1, keepdim=True) * 10.0 + x[:, :1] * x[:, 2:3]).float()


class _RunsOutOfMemory(_PerChip):
    """Raises ``torch.OutOfMemoryError`` for batches larger than ``limit``, and also while the
    activations of an earlier failed attempt are still alive (as a GPU would: a retry made while
    the exception's traceback holds them runs out of memory again)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.sizes: list[int] = []
        self._attempts: list[weakref.ref] = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        still_held = any(ref() is not None for ref in self._attempts)
        activations = x * 1.0                      # what this attempt holds on the device
        self._attempts.append(weakref.ref(activations))
        if still_held or x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated for a batch of {x.shape[0]})")
        return super().forward(activations)


def _run_segment(model, scene, out, batch_size=8):
    from dinov3_geo import predict

    return predict(scene, model, out, device="cpu", tile=64, overlap=16, batch_size=batch_size, readers=2)


def test_out_of_memory_halves_the_batch_and_finishes(tmp_path):
    scene = tiled_scene(tmp_path / "s.tif", crop=96, reps=2)             # 192 px: 16 chips of 64
    ok = _run_segment(_PerChip(), scene, tmp_path / "ok.tif")
    flaky = _RunsOutOfMemory(limit=3)
    res = _run_segment(flaky, scene, tmp_path / "oom.tif")
    assert res.stats.chips_computed == ok.stats.chips_computed == 16
    assert res.stats.batch_size == 2 and max(s for s in flaky.sizes if s <= 3) == 2
    assert flaky.sizes[:3] == [8, 4, 2]
    assert any("out of GPU memory" in n and "batch size lowered to 2" in n for n in res.stats.notes)
    assert "note: out of GPU memory" in res.summary()
    lowered = [int(n.rsplit(" ", 1)[1]) for n in res.stats.notes]
    assert lowered == sorted(set(lowered), reverse=True), res.stats.notes     # only ever lowered
    assert all(s <= 2 for s in flaky.sizes[3:]), flaky.sizes                  # no retry above the size that fits
    with rasterio.open(tmp_path / "ok.tif") as a, rasterio.open(tmp_path / "oom.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
    assert leftovers(tmp_path) == []


def test_out_of_memory_at_batch_one_is_one_clear_error(tmp_path):
    from dinov3_geo.errors import DinoGeoError

    scene = tiled_scene(tmp_path / "s.tif", crop=64, reps=1)
    with pytest.raises(DinoGeoError, match="out of GPU memory.*`tile`"):
        _run_segment(_RunsOutOfMemory(limit=0), scene, tmp_path / "oom.tif", batch_size=2)
    assert not (tmp_path / "oom.tif").exists() and leftovers(tmp_path) == []


def test_out_of_memory_in_the_warm_up_lowers_the_batch_for_the_run(tmp_path, memory_sink):
    """The warm-up batch (run before the chips on a GPU, and when compiling) backs off too; the run
    starts at the size that fits and reports the notes."""
    from dinov3_geo.engine import Engine
    from dinov3_geo.io.scene import open_scene
    from dinov3_geo.io.stitch import StreamingStitcher
    from dinov3_geo.pipeline import ChipPlan, RunSettings

    scene = tiled_scene(tmp_path / "s.tif", crop=96, reps=2)             # 16 chips of 64
    flaky = _RunsOutOfMemory(limit=3)
    engine = Engine(flaky, RunSettings.resolve("cpu", "fp32", batch_size=8, readers=2))
    engine.warm_up(64)
    assert engine.batch_size == 2 and flaky.sizes == [8, 4, 2]
    with open_scene(scene) as sc:
        sink = memory_sink(1, sc.height, sc.width)
        plan = ChipPlan.build(sc.height, sc.width, 64, 16)
        stats = engine.run(sc, plan, StreamingStitcher(sink, plan, 1), progress=False)
    assert stats.chips_computed == 16 and stats.batch_size == 2
    assert all(s <= 2 for s in flaky.sizes[3:]), flaky.sizes
    assert stats.notes == ["out of GPU memory: batch size lowered to 4", "out of GPU memory: batch size lowered to 2"]
    assert np.isfinite(sink.array).all()


def test_out_of_memory_in_the_warm_up_at_batch_one_is_one_clear_error():
    from dinov3_geo.engine import Engine
    from dinov3_geo.errors import DeviceError

    from dinov3_geo.pipeline import RunSettings

    engine = Engine(_RunsOutOfMemory(limit=0), RunSettings.resolve("cpu", "fp32", batch_size=2))
    with pytest.raises(DeviceError, match="out of GPU memory even at batch size 1"):
        engine.warm_up(64)


class _Cancelled(Exception):
    """What a user interface might stop a run with."""


class _StopsPartWay(torch.nn.Module):
    """The first channel of the chip; requests ``stop`` during its ``at``-th batch (a user pressing
    Stop while the run goes on)."""

    channels = 1

    def __init__(self, stop, at: int):
        super().__init__()
        self.stop, self.at, self.calls = stop, at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            self.stop.request(_Cancelled())
        return x[:, :1].clone()


def test_a_requested_stop_token_stops_each_route_with_nothing_written(tmp_path):
    from dinov3_geo import StopToken, embed, run_batch, segment

    scene = tiled_scene(tmp_path / "scene.tif")
    stop = StopToken()
    stop.request()
    out = tmp_path / "out"
    out.mkdir()
    fast = dict(tile=128, overlap=32, device="cpu", progress=False, stop=stop)
    with pytest.raises(KeyboardInterrupt):
        segment(scene, "canopy", out / "canopy.tif", weights="demo", **fast)
    with pytest.raises(KeyboardInterrupt):
        embed(scene, out / "chips.parquet", backbone="demo", **fast)
    assert list(out.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        run_batch([str(scene)], tmp_path / "batch", weights="demo", **fast)
    assert sorted(p.name for p in (tmp_path / "batch").iterdir()) == ["scene_canopy.tif.json"]
    assert json.loads((tmp_path / "batch" / "scene_canopy.tif.json").read_text())["state"] == "interrupted"


def test_a_stop_requested_part_way_is_taken_at_the_next_chip_and_keeps_the_target(tmp_path):
    from dinov3_geo import StopToken, predict

    scene = tiled_scene(tmp_path / "scene.tif")
    target = tmp_path / "out.tif"
    target.write_bytes(b"an earlier output")
    stop = StopToken()
    model = _StopsPartWay(stop, at=2)
    with pytest.raises(_Cancelled):
        predict(scene, model, target, tile=64, overlap=16, batch_size=2, device="cpu", overwrite=True,
                progress=False, stop=stop)
    assert model.calls == 2         # no batch after the one that asked to stop
    assert target.read_bytes() == b"an earlier output"
    assert leftovers(tmp_path) == []
