"""Chip grid, blending weights and padding."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from dinov3_geo.errors import UsageError
from dinov3_geo.io.tiling import WEIGHT_FLOOR, chip_weights, pad_to_tile, plan_chips, validate_tiling


@pytest.mark.parametrize("tile,overlap", [(0, 0), (100, 10), (-16, 0), (64, 32), (64, -1), (64, 40)])
def test_validate_tiling_rejects(tile, overlap):
    with pytest.raises(UsageError):
        validate_tiling(tile, overlap)


def test_plan_regular_grid_row_major_and_shifted_edges():
    wins = plan_chips(1000, 700, tile=512, overlap=64)
    starts = [(int(w.row_off), int(w.col_off)) for w in wins]
    assert starts == [(0, 0), (0, 188), (448, 0), (448, 188), (488, 0), (488, 188)]
    assert all(w.width == 512 and w.height == 512 for w in wins)


def test_plan_small_scene_is_one_whole_chip():
    assert plan_chips(40, 300, tile=128, overlap=32)[0] == Window(0, 0, 128, 40)
    assert plan_chips(40, 100, tile=128, overlap=32) == [Window(0, 0, 100, 40)]


def test_weights_flat_on_scene_border_and_positive():
    """Chip sides on the scene edge keep full weight to the edge; sides inside the scene ramp down."""
    h, w = 300, 260
    for win in plan_chips(h, w, 64, 16):
        wt = chip_weights(win, h, w, 64, 16)
        assert wt.dtype == np.float32 and wt.shape == (64, 64)
        assert wt.min() >= WEIGHT_FLOOR * 0.99
        top, left = win.row_off == 0, win.col_off == 0
        bottom, right = win.row_off + 64 == h, win.col_off + 64 == w
        for edge, on_scene_edge, full in ((wt[0], top, wt.max(0)), (wt[-1], bottom, wt.max(0)),
                                          (wt[:, 0], left, wt.max(1)), (wt[:, -1], right, wt.max(1))):
            assert np.array_equal(edge, full) if on_scene_edge else edge.max() < 1e-3
    interior = chip_weights(Window(48, 48, 64, 64), h, w, 64, 16)
    assert interior[32, 32] == 1 and interior[0, 32] < 1e-3


def test_weights_reject_off_grid_window():
    with pytest.raises(UsageError):
        chip_weights(Window(3, 0, 64, 64), 300, 300, 64, 16)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(16, 400), w=st.integers(16, 400), k=st.integers(1, 8), o=st.integers(0, 63))
def test_weights_cover_every_pixel(h, w, k, o):
    tile = 16 * k
    overlap = o % (tile // 2)
    total = np.zeros((h, w))
    for win in plan_chips(h, w, tile, overlap):
        r, c = int(win.row_off), int(win.col_off)
        total[r:r + int(win.height), c:c + int(win.width)] += chip_weights(win, h, w, tile, overlap)
    assert total.min() > 0


def test_weights_are_smooth_across_a_seam():
    """Blending two different constant predictions gives a monotone, gradual transition."""
    h, w, tile, overlap = 64, 400, 128, 48
    num, den = np.zeros(w), np.zeros(w)
    for i, win in enumerate(plan_chips(h, w, tile, overlap)):
        c = int(win.col_off)
        prof = chip_weights(win, h, w, tile, overlap)[10]
        num[c:c + tile] += prof * i
        den[c:c + tile] += prof
    blended = num / den
    steps = np.diff(blended)
    assert steps.min() >= -1e-9 and steps.max() < 0.1


def test_pad_to_tile_reflects_and_undoes():
    chip = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    padded, (h, w) = pad_to_tile(chip, 16)
    assert padded.shape == (2, 16, 16) and (h, w) == (5, 7)
    np.testing.assert_array_equal(padded[:, :h, :w], chip)
    np.testing.assert_array_equal(padded[:, 5, :7], chip[:, 3])  # reflection, not edge repeat
    one_row, _ = pad_to_tile(chip[:, :1], 16)
    np.testing.assert_array_equal(one_row[:, 7, :7], chip[:, 0])
    same, _ = pad_to_tile(np.zeros((3, 16, 16)), 16)
    assert same.shape == (3, 16, 16)
