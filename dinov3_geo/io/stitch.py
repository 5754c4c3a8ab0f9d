"""Streaming, weighted stitching of chip predictions into row bands.

The stitcher keeps only the rows that some unfinished chip row still touches (about
``(tile + stride) x width x channels`` float32 plus weights), normalises rows as soon as every chip
covering them has been added or skipped, hands them to ``sink.write(row_off, array)`` and forgets
them. Memory does not grow with scene height.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np
from rasterio.windows import Window

from dinov3_geo.errors import UsageError
from dinov3_geo.io.tiling import ChipPlan

CLASS_NODATA = 255
KINDS = ("continuous", "classes")


def _key(window: Window) -> tuple[int, int, int, int]:
    return int(window.row_off), int(window.col_off), int(window.height), int(window.width)


class _Coverage:
    """Which cells of the chip grid (the rectangles between consecutive chip edges, rows and columns)
    have received a chip. A chip *stores* its share into cells nobody reached yet and *adds* it
    where others did, so the accumulators need no zeroing and fresh cells are not read back: the
    stored values are the sums the additions to zeros would give (``0 + p == p + 0``, and ``+ 0``
    keeps a product of -0 at +0 as adding it to zeros does)."""

    def __init__(self, plan: ChipPlan):
        keys = [_key(w) for w in plan.windows]      # any plan-like object: windows, height, width
        self._rows = sorted({0, plan.height} | {r for r, _, _, _ in keys} | {r + h for r, _, h, _ in keys})
        self._cols = sorted({0, plan.width} | {c for _, c, _, _ in keys} | {c + w for _, c, _, w in keys})
        self._row_at = {v: i for i, v in enumerate(self._rows)}
        self._col_at = {v: i for i, v in enumerate(self._cols)}
        self._seen = np.zeros((len(self._rows) - 1, len(self._cols) - 1), bool)
        self._count = np.zeros(self._seen.shape, np.int32)     # planned chips covering each cell
        for r, c, h, w in keys:
            self._count[self._row_at[r]:self._row_at[r + h], self._col_at[c]:self._col_at[c + w]] += 1
        self._shared_cols: dict[int, np.ndarray | None] = {}

    def alone(self, r: int, c: int, h: int, w: int) -> tuple[slice, slice] | None:
        """The rectangle (rows, cols relative to the chip ``[r, r+h) x [c, c+w)``) of the cells that
        no other planned chip covers, or None when there is none (or they are not one rectangle)."""
        i0, j0 = self._row_at[r], self._col_at[c]
        block = self._count[i0:self._row_at[r + h], j0:self._col_at[c + w]] == 1
        rows, cols = np.flatnonzero(block.any(axis=1)), np.flatnonzero(block.any(axis=0))
        if rows.size == 0 or not block[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() or \
                block.sum() != (rows[-1] + 1 - rows[0]) * (cols[-1] + 1 - cols[0]):
            return None
        return (slice(self._rows[i0 + rows[0]] - r, self._rows[i0 + rows[-1] + 1] - r),
                slice(self._cols[j0 + cols[0]] - c, self._cols[j0 + cols[-1] + 1] - c))

    def row_cells(self, start: int, stop: int) -> list[tuple[int, int, np.ndarray | None]]:
        """The cell rows in scene rows ``[start, stop)`` (chip edges): (first row, last row + 1,
        the scene columns where several planned chips cover them, or None for every column)."""
        out = []
        for i in range(self._row_at[start], self._row_at[stop]):
            out.append((self._rows[i], self._rows[i + 1], self._shared_columns(i)))
        return out

    def _shared_columns(self, i: int) -> np.ndarray | None:
        """Scene columns of cell row ``i`` where several planned chips overlap (None: all)."""
        if i not in self._shared_cols:
            shared = self._count[i] > 1
            self._shared_cols[i] = None if shared.all() else np.concatenate(
                [np.arange(self._cols[j], self._cols[j + 1]) for j in np.flatnonzero(shared)] or
                [np.zeros(0, np.intp)])
        return self._shared_cols[i]

    def claim(self, r: int, c: int, h: int, w: int) -> list[tuple[slice, slice, bool]]:
        """Split the chip ``[r, r+h) x [c, c+w)`` into rectangles each seen before or new, as
        (rows, cols) slices relative to the chip and ``seen``; then mark the chip's cells seen."""
        parts = self.seen_parts(r, c, h, w)
        self._seen[self._row_at[r]:self._row_at[r + h], self._col_at[c]:self._col_at[c + w]] = True
        return parts

    def seen_parts(self, r: int, c: int, h: int, w: int) -> list[tuple[slice, slice, bool]]:
        """The rectangle ``[r, r+h) x [c, c+w)`` (on cell edges) split into rectangles each seen
        before or new, as (rows, cols) slices relative to it and ``seen``."""
        i0, i1 = self._row_at[r], self._row_at[r + h]
        j0, j1 = self._col_at[c], self._col_at[c + w]
        block = self._seen[i0:i1, j0:j1]
        if block.all() or not block.any():
            return [(slice(0, h), slice(0, w), bool(block[0, 0]))]
        return [(slice(self._rows[a] - r, self._rows[b] - r), slice(self._cols[x] - c, self._cols[y] - c), seen)
                for a, b, pattern in _runs(block.tolist(), i0)
                for x, y, seen in _runs(pattern, j0)]

    def unseen(self, start: int, stop: int) -> list[tuple[slice, slice]]:
        """Scene rows and columns (slices) of the cells in rows ``[start, stop)`` (chip edges) that
        no chip reached."""
        i0, i1 = self._row_at[start], self._row_at[stop]
        block = self._seen[i0:i1]
        if block.all():
            return []
        return [(slice(self._rows[a], self._rows[b]), slice(self._cols[x], self._cols[y]))
                for a, b, pattern in _runs(block.tolist(), i0)
                for x, y, seen in _runs(pattern, 0) if not seen]


def _runs(flags: list, offset: int) -> list[tuple[int, int, Any]]:
    """Maximal runs of equal items of ``flags`` (booleans, or rows of them): (start, stop, item),
    indexes + ``offset``."""
    edges = [0] + [k for k in range(1, len(flags)) if flags[k] != flags[k - 1]] + [len(flags)]
    return [(offset + a, offset + b, flags[a]) for a, b in zip(edges, edges[1:])]


class StreamingStitcher:
    """Blend chip outputs with the plan's weights (:meth:`ChipPlan.weights`) and stream finished rows.

    ``kind="continuous"``: the sink receives float32 ``[channels, rows, width]`` with NaN where the
    input was invalid or nothing was computed. ``kind="classes"``: ``channels`` are logits or
    probabilities, blended, then argmax; the sink receives uint8 ``[1, rows, width]`` with 255 where
    invalid (so at most 255 classes).

    Chips may arrive in any order; completion is tracked per chip row. ``add``/``skip`` take an
    internal lock, so they may be called from several threads, but the engine's single writer thread
    is the intended caller (``sink.write`` runs inside that call).
    """

    def __init__(self, sink, plan: ChipPlan, channels: int, kind: str = "continuous"):
        if kind not in KINDS:
            raise UsageError("kind", f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "classes" and channels > CLASS_NODATA:
            raise UsageError("kind", f"at most {CLASS_NODATA} classes fit uint8 with nodata 255")
        height, width, tile, overlap = plan.height, plan.width, plan.tile, plan.overlap
        self.sink, self.plan, self.height, self.width, self.channels = sink, plan, height, width, channels
        self.kind = kind
        windows = plan.windows
        self._pending_keys = {_key(w) for w in windows}
        rows = sorted({int(w.row_off) for w in windows})
        self._row_starts = rows
        self._row_index = {r: i for i, r in enumerate(rows)}
        self._row_left = [0] * len(rows)
        for w in windows:
            self._row_left[self._row_index[int(w.row_off)]] += 1
        self._first_open = 0          # index of the first chip row not complete
        self._base = 0                # scene row of accumulator row 0
        self._rows = 0                # accumulator rows in use (where no chip reached: stale, see _Coverage)
        capacity = min(height, tile + (tile - overlap))   # what plan-order arrival holds open
        self._acc = np.zeros((channels, capacity, width), np.float32)
        self._wsum = np.zeros((capacity, width), np.float32)
        self._valid = np.zeros((capacity, width), bool)
        # classes: the class of each pixel that one planned chip alone covers, taken from that chip
        self._direct = np.zeros((capacity, width), np.uint8) if kind == "classes" else None
        self._lock = threading.Lock()
        self._scratch = np.empty((channels, min(tile, height), min(tile, width)), np.float32)
        self._weight_scratch = np.empty(self._scratch.shape[1:], np.float32)
        self._coverage = _Coverage(plan)
        self.rows_written = 0

    # -- public ---------------------------------------------------------------------------------
    def add(self, window: Window, values: np.ndarray, valid: np.ndarray) -> None:
        """Blend ``values`` (float32 ``[C, h, w]``, or larger, e.g. padded to the tile: cropped to the
        window from the top-left) for ``window``; ``valid`` is bool ``[h, w]`` (or larger, cropped)."""
        r, c, h, w = _key(window)
        values = np.asarray(values)[:, :h, :w]
        valid = np.asarray(valid, bool)[:h, :w]
        if values.shape != (self.channels, h, w) or valid.shape != (h, w):
            raise UsageError("stitcher", f"chip {window} got values {values.shape} / valid "
                                         f"{valid.shape}, expected ({self.channels}, {h}, {w})")
        everywhere = valid.all()
        with self._lock:
            weights = self._chip_weights(window, valid, everywhere)
            self._take(window)
            self._ensure_rows(r + h)
            if self.kind == "classes":
                self._add_scores(r, c, h, w, values, weights, valid, everywhere)
            else:
                self._add_values(r, c, h, w, values, weights, valid, everywhere)
            self._done(r)

    def _add_values(self, r: int, c: int, h: int, w: int, values: np.ndarray, weights: np.ndarray,
                    valid: np.ndarray, everywhere: bool) -> None:
        """Blend a chip's values and weights into the accumulators (under the lock)."""
        lo = r - self._base
        acc = self._acc[:, lo:lo + h, c:c + w]
        scratch = self._scratch[:, :h, :w]  # one buffer for every chip: no per-chip temporaries
        np.multiply(values, weights, out=scratch, casting="same_kind")
        wsum = self._wsum[lo:lo + h, c:c + w]
        seen_valid = self._valid[lo:lo + h, c:c + w]
        for rows, cols, seen in self._coverage.claim(r, c, h, w):
            _blend(acc[:, rows, cols], scratch[:, rows, cols], wsum[rows, cols], weights[rows, cols],
                   seen_valid[rows, cols], True if everywhere else valid[rows, cols], seen)

    def _add_scores(self, r: int, c: int, h: int, w: int, scores: np.ndarray, weights: np.ndarray,
                    valid: np.ndarray, everywhere: bool) -> None:
        """A chip's class scores (under the lock): where no other planned chip covers a pixel its
        weight is 1, so the blend there would be the chip's own scores, and their argmax is kept
        at once (no accumulation); elsewhere the weighted scores are blended as values are (the
        classes need no weight sums: weights > 0 do not change an argmax)."""
        lo = r - self._base
        alone = self._coverage.alone(r, c, h, w)
        if alone is None:
            shared = [(slice(0, h), slice(0, w))]
        else:
            rows, cols = alone
            self._direct[lo + rows.start:lo + rows.stop, c + cols.start:c + cols.stop] = first_argmax(scores[:, rows, cols])
            self._valid[lo + rows.start:lo + rows.stop, c + cols.start:c + cols.stop] = \
                True if everywhere else valid[rows, cols]
            shared = _frame(h, w, rows, cols)
        for part_rows, part_cols in shared:
            top, left = part_rows.start, part_cols.start
            parts = self._coverage.seen_parts(r + top, c + left, part_rows.stop - top, part_cols.stop - left)
            for rows, cols, seen in parts:
                rows = slice(rows.start + top, rows.stop + top)
                cols = slice(cols.start + left, cols.stop + left)
                product = self._scratch[:, :rows.stop - rows.start, :cols.stop - cols.start]
                np.multiply(scores[:, rows, cols], weights[rows, cols], out=product, casting="same_kind")
                _blend(self._acc[:, lo + rows.start:lo + rows.stop, c + cols.start:c + cols.stop], product, None,
                       None, self._valid[lo + rows.start:lo + rows.stop, c + cols.start:c + cols.stop],
                       True if everywhere else valid[rows, cols], seen)
        self._coverage.claim(r, c, h, w)

    def skip(self, window: Window) -> None:
        """Count ``window`` as done without values (a chip with no valid pixel)."""
        with self._lock:
            self._take(window)
            self._done(int(window.row_off))

    def close(self) -> None:
        """Write every row not yet written (rows no chip reached come out as nodata)."""
        with self._lock:
            self._flush_to(self.height)

    @property
    def open_rows(self) -> int:
        """Rows currently held in memory."""
        return self._rows

    # -- bookkeeping ----------------------------------------------------------------------------
    def _chip_weights(self, window: Window, valid: np.ndarray, everywhere: bool) -> np.ndarray:
        """The plan's weights of ``window``, 0 where ``valid`` is false: the cached array itself when
        every pixel is valid, else a product with the mask in a reused buffer (held under the lock;
        the same values as ``np.where(valid, weights, 0)`` since every weight is > 0)."""
        weights = self.plan.weights(window)
        if everywhere:
            return weights
        out = self._weight_scratch[:weights.shape[0], :weights.shape[1]]
        np.multiply(weights, valid, out=out)
        return out

    def _take(self, window: Window) -> None:
        """Check ``window`` is a planned chip not yet seen, and mark it seen."""
        key = _key(window)
        if key not in self._pending_keys:
            raise UsageError("stitcher", f"chip {window} is not planned or was already added")
        self._pending_keys.remove(key)

    def _done(self, row_off: int) -> None:
        """One chip of the chip row at ``row_off`` is finished; flush rows no open chip row touches."""
        self._row_left[self._row_index[row_off]] -= 1
        while self._first_open < len(self._row_left) and self._row_left[self._first_open] == 0:
            self._first_open += 1
        limit = (self._row_starts[self._first_open] if self._first_open < len(self._row_starts)
                 else self.height)
        self._flush_to(limit)

    def _ensure_rows(self, stop: int) -> None:
        """Make the accumulator cover scene rows up to ``stop``. It is allocated once for the rows
        that plan-order arrival keeps open and only grows (doubling) when chips come out of order."""
        need = stop - self._base
        if need <= self._rows:
            return
        if need > self._wsum.shape[0]:
            capacity = max(need, 2 * self._wsum.shape[0])
            self._acc, self._wsum, self._valid = (_grown(b, capacity) for b in (self._acc, self._wsum, self._valid))
            if self._direct is not None:
                self._direct = _grown(self._direct, capacity)
        self._rows = need

    def _flush_to(self, limit: int) -> None:
        """Normalise and write scene rows ``[base, limit)``, then shift the open rows to the front."""
        n = limit - self._base
        if n <= 0:
            return
        self._ensure_rows(limit)
        self._clear_unseen(limit)
        # the sink may keep what it is given: hand it new arrays, never views of the accumulator
        self.sink.write(self._base, self._finish(n))
        self.rows_written += n
        self._base = limit
        keep = self._rows - n
        if keep:
            for buf in (self._acc, self._wsum, self._valid, self._direct):
                if buf is not None:
                    buf[..., :keep, :] = buf[..., n:n + keep, :]     # numpy copes with the overlap
        self._rows = keep

    def _classes(self, n: int) -> np.ndarray:
        """The class of the first ``n`` accumulator rows: the blended scores' argmax where several
        planned chips overlap, the class kept from the one chip that covers a pixel elsewhere
        (both the first maximum, numpy's own where a NaN is; weights > 0 do not change an argmax)."""
        out = np.empty((n, self.width), np.uint8)
        for top, bottom, shared in self._coverage.row_cells(self._base, self._base + n):
            rows = slice(top - self._base, bottom - self._base)
            if shared is None:
                out[rows] = first_argmax(self._acc[:, rows])
                continue
            out[rows] = self._direct[rows]
            if shared.size:
                out[rows][:, shared] = first_argmax(self._acc[:, rows][:, :, shared])
        return out

    def _clear_unseen(self, limit: int) -> None:
        """Zero the accumulators where no chip reached in scene rows ``[base, limit)`` (skipped or
        missing chips), which hold whatever earlier rows left there: such pixels are nodata."""
        for rows, cols in self._coverage.unseen(self._base, limit):
            rows = slice(rows.start - self._base, rows.stop - self._base)
            self._acc[:, rows, cols] = 0
            self._wsum[rows, cols] = 0
            self._valid[rows, cols] = False

    def _finish(self, n: int) -> np.ndarray:
        """Weighted mean (continuous, NaN nodata) or argmax (classes, 255 nodata) of the first ``n``
        rows, as new arrays. A pixel has a value where some chip was valid there (``valid``: such a
        chip added a weight > 0, so ``wsum > 0`` there and need not be tested)."""
        acc, wsum, valid = self._acc[:, :n], self._wsum[:n], self._valid[:n]
        if self.kind == "classes":
            out = self._classes(n)
            out[~valid] = CLASS_NODATA
            return out[None]
        out = np.empty(acc.shape, np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            np.divide(acc, wsum, out=out)
        if not valid.all():
            np.copyto(out, np.float32(np.nan), where=~valid)
        return out


def _frame(h: int, w: int, rows: slice, cols: slice) -> list[tuple[slice, slice]]:
    """The rectangles of an ``h`` x ``w`` chip around its inner rectangle ``rows`` x ``cols``: the
    rows above and below it (full width), then left and right of it (its rows); empty ones left out."""
    parts = [(slice(0, rows.start), slice(0, w)), (slice(rows.stop, h), slice(0, w)),
             (rows, slice(0, cols.start)), (rows, slice(cols.stop, w))]
    return [(r, c) for r, c in parts if r.stop > r.start and c.stop > c.start]


def first_argmax(scores: np.ndarray) -> np.ndarray:
    """``np.argmax(scores, axis=0)`` as uint8 for ``[classes, rows, width]`` (at most 255 classes):
    channel by channel, keeping the first of equal maxima as argmax does; 7x faster than numpy's
    reduction over a leading axis (6 classes, a 448 x 5440 row band: 13 against 97 ms). With a NaN
    anywhere, numpy's own (NaN counts as the maximum there)."""
    if np.isnan(scores).any():
        return np.argmax(scores, axis=0).astype(np.uint8)
    best = scores[0].copy()
    out = np.zeros(best.shape, np.uint8)
    higher = np.empty(best.shape, bool)
    for k in range(1, scores.shape[0]):
        np.greater(scores[k], best, out=higher)
        # where channel k beats every earlier one the argmax becomes k, the largest index so far
        np.maximum(out, higher.view(np.uint8) * np.uint8(k), out=out)
        np.maximum(best, scores[k], out=best)
    return out


def _grown(buf: np.ndarray, capacity: int) -> np.ndarray:
    """``buf`` with ``capacity`` rows (the second-last axis in every buffer): its rows first, zeros after."""
    out = np.zeros((*buf.shape[:-2], capacity, buf.shape[-1]), buf.dtype)
    out[..., :buf.shape[-2], :] = buf
    return out


def _blend(acc: np.ndarray, product: np.ndarray, wsum: np.ndarray | None, weights: np.ndarray | None,
           valid: np.ndarray, chip_valid, seen: bool) -> None:
    """Add one chip's weighted values ``product``, its ``weights`` (unless ``wsum`` is None) and
    validity into a rectangle of the accumulators; where no chip was before (``seen`` false) store
    them instead of adding to zeros, with the same result (``+ 0`` turns a -0 product into +0, as
    the sum with zero does)."""
    if seen:
        acc += product
        if wsum is not None:
            wsum += weights
        valid |= chip_valid
    else:
        np.add(product, np.float32(0), out=acc)
        if wsum is not None:
            wsum[...] = weights
        valid[...] = chip_valid
