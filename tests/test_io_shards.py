"""Stitching spread over column shards (threads) gives the one-thread stitcher's results bit for
bit: class scores, many-channel values and patch features, in any arrival order, with skips,
masks and awkward values; a failing run stops the shards before the sink is removed."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from dinov3_geo.io.shards import ShardedStitcher, make_stitcher, shard_count
from dinov3_geo.io.stitch import StreamingStitcher
from dinov3_geo.io.tiling import ChipPlan
from helpers import MemorySink, arrival_order, bits, feed, reference_blend, window_of


@pytest.mark.parametrize("seed", range(20))
def test_shards_give_the_whole_scene_blend(seed):
    rng = np.random.default_rng(500 + seed)
    tile = int(rng.choice([16, 32, 48]))
    overlap = int(rng.integers(0, tile // 2))
    height, width = int(rng.integers(5, 160)), int(rng.integers(tile, 260))
    kind = "classes" if seed % 2 else "continuous"
    channels = int(rng.choice([2, 6])) if kind == "classes" else int(rng.choice([1, 3]))
    plan = ChipPlan.build(height, width, tile, overlap)
    order = arrival_order(plan, seed, rng)
    values = rng.integers(-3, 4, (channels, height, width)).astype(np.float32)
    pick = rng.random(values.shape) < 0.02
    values[pick] = rng.choice(np.array([-0.0, np.nan, np.inf, -np.inf], np.float32), int(pick.sum()))
    valid = rng.random((height, width)) < rng.choice([0.6, 1.0])
    skipped = {w for w in order if rng.random() < 0.1}
    columns = len(plan.col_starts)
    shards = int(rng.integers(2, 5))
    sink = MemorySink(1 if kind == "classes" else channels, height, width,
                      dtype="uint8" if kind == "classes" else "float32", fill=0)
    stitcher = make_stitcher(sink, plan, channels, kind=kind, shards=shards)
    assert isinstance(stitcher, ShardedStitcher) == (min(shards, columns) > 1)
    feed(stitcher, order, values, valid, skipped)
    assert np.all(sink.times == 1)
    expected = reference_blend(plan, order, lambda w: window_of(values, w), valid, skipped, kind)
    np.testing.assert_array_equal(bits(sink.array), bits(expected))


def test_patch_features_over_shards_equal_one_thread(tmp_path):
    """embed --patch's stitcher (384 features per 16 px cell) over shards, against one thread."""
    from dinov3_geo.io.patchmap import PatchStitcher

    rng = np.random.default_rng(3)
    plan = ChipPlan.build(208, 416, 64, 16)
    tokens = rng.standard_normal((384, 4, 4)).astype(np.float32)
    valid = rng.random((208, 416)) < 0.9
    sinks = []
    for shards in (3, 1):
        sink = MemorySink(384, 13, 26)
        stitcher = PatchStitcher(sink, plan, 384)
        stitcher.blender = make_stitcher(sink, stitcher.plan, 384, shards=shards)
        assert isinstance(stitcher.blender, ShardedStitcher if shards > 1 else StreamingStitcher)
        for k, w in enumerate(plan.windows):
            r, c = int(w.row_off), int(w.col_off)
            stitcher.add(w, tokens * (k + 1), valid[r:r + 64, c:c + 64])
        stitcher.close()
        sinks.append(sink.array)
    np.testing.assert_array_equal(bits(sinks[0]), bits(sinks[1]))


def test_shard_count_follows_the_channels_and_cores():
    assert shard_count(1, 10, cores=16) == 1            # a float map: one thread is enough
    assert shard_count(6, 10, cores=16) == 4
    assert shard_count(6, 10, cores=6) == 3
    assert shard_count(6, 10, cores=2) == 1             # 2 cores: the other threads have the rest
    assert shard_count(6, 1, cores=8) == 1              # one chip column: nothing to share
    assert shard_count(384, 3, cores=1) == 1


class Failing:
    def __init__(self):
        self.rows = 0

    def write(self, row_off, rows):
        self.rows += rows.shape[1]
        raise OSError("disk full")


def test_a_shard_error_reaches_the_caller_and_abort_stops_the_rest():
    """The sink's error is raised to the caller; ``abort`` returns once no shard thread is left, so
    nothing can reach the sink after it (whatever the shards still had queued is dropped)."""
    plan = ChipPlan.build(300, 300, 64, 16)
    sink = Failing()
    before = set(threading.enumerate())
    stitcher = ShardedStitcher(sink, plan, 2, kind="classes", shards=3)
    scores = np.ones((2, 64, 64), np.float32)
    with pytest.raises(OSError, match="disk full"):
        for w in plan.windows:
            stitcher.add(w, scores, np.ones((64, 64), bool))
        stitcher.close()
    stitcher.abort()
    written = sink.rows
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]    # every shard thread ended
    assert sink.rows == written > 0
