"""Stitching spread over threads: the scene's columns cut into shards, each blended on its own thread.

One :class:`~dinov3_geo.io.stitch.StreamingStitcher` per shard sees the chips clipped to its
columns (a :class:`ColumnPlan`, with the whole plan's blend weights) in the order they arrive, so
every pixel is blended from the same products in the same order as by one stitcher over the whole
width: the same bits. A joiner puts the shards' finished rows back side by side, in row order, for
the sink. Class scores and many-channel outputs cost the blending thread several times a float
map's work per chip (memory-bound sums of K channels); shards spread it over the cores.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np
from rasterio.windows import Window

from dinov3_geo.hostmem import usable_cores
from dinov3_geo.io.stitch import StreamingStitcher, _key

#: Most shards (threads) one stitching is spread over.
MAX_SHARDS = 4
#: Chips a shard may have waiting before ``add`` waits for it (memory stays bounded).
SHARD_BACKLOG = 64


def shard_count(channels: int, chip_columns: int, cores: Optional[int] = None) -> int:
    """Shards worth having: one per two usable cores (at most ``MAX_SHARDS`` and one per chip
    column) when a chip carries several channels to blend; a single channel is blended on one
    thread. On 2 cores every thread of the pipeline already has work (6 classes at capacity: the
    same chips/s with 2 shards as with one, within the noise of a shared machine), so one."""
    cores = usable_cores() if cores is None else cores
    if channels < 2:
        return 1
    return max(1, min(cores // 2, MAX_SHARDS, chip_columns))


def make_stitcher(sink, plan, channels: int, kind: str = "continuous", shards: Optional[int] = None):
    """The stitcher of ``channels`` outputs over ``plan`` into ``sink``: a :class:`ShardedStitcher`
    when :func:`shard_count` (or ``shards``) is more than one, else a plain StreamingStitcher."""
    columns = len({int(w.col_off) for w in plan.windows})
    n = shard_count(channels, columns) if shards is None else max(1, min(int(shards), columns))
    if n < 2:
        return StreamingStitcher(sink, plan, channels, kind=kind)
    return ShardedStitcher(sink, plan, channels, kind=kind, shards=n)


class ColumnPlan:
    """Columns ``[start, stop)`` of a plan as a plan of their own (what a stitcher reads: height,
    width, tile, overlap, windows, weights): the chips that reach those columns, clipped to them,
    with the whole plan's weights over their part."""

    def __init__(self, plan, start: int, stop: int):
        self.height, self.width, self.tile, self.overlap = plan.height, stop - start, plan.tile, plan.overlap
        self.start, self._plan = start, plan
        self._full: dict[tuple, tuple[Window, slice]] = {}
        windows = []
        for w in plan.windows:
            local = self.clip(w)
            if local is not None:
                self._full[_key(local)] = (w, slice(int(local.col_off) + start - int(w.col_off),
                                                    int(local.col_off) + start - int(w.col_off) + int(local.width)))
                windows.append(local)
        self.windows = tuple(windows)
        self._cache: dict[tuple, np.ndarray] = {}

    def clip(self, window: Window) -> Optional[Window]:
        """``window`` (whole-plan columns) clipped to this shard, in its columns; None outside it."""
        c, w = int(window.col_off), int(window.width)
        lo, hi = max(c, self.start), min(c + w, self.start + self.width)
        if lo >= hi:
            return None
        return Window(lo - self.start, int(window.row_off), hi - lo, int(window.height))

    def weights(self, window: Window) -> np.ndarray:
        key = _key(window)
        weights = self._cache.get(key)
        if weights is None:
            full, cols = self._full[key]
            weights = np.ascontiguousarray(self._plan.weights(full)[:, cols])
            weights.setflags(write=False)
            self._cache[key] = weights
        return weights


class ShardedStitcher:
    """A :class:`~dinov3_geo.io.stitch.StreamingStitcher` (same interface and results) whose columns
    are blended by ``shards`` threads (see the module). ``add`` and ``skip`` hand each shard its
    part and return; a shard's error is raised by a later ``add``, ``skip`` or ``close``."""

    def __init__(self, sink, plan, channels: int, kind: str = "continuous", shards: int = 2):
        self.plan, self.channels, self.kind = plan, channels, kind
        self.height, self.width = plan.height, plan.width
        edges = [plan.width * k // shards for k in range(shards + 1)]
        self._plans = [ColumnPlan(plan, a, b) for a, b in zip(edges, edges[1:])]
        self._joiner = _RowJoiner(sink, len(self._plans))
        self._shards = [StreamingStitcher(_ShardRows(self._joiner, k), p, channels, kind=kind)
                        for k, p in enumerate(self._plans)]
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix=f"dinov3geo-stitch{k}") for k in range(shards)]
        self._backlog: list[deque[Future]] = [deque() for _ in range(shards)]

    @property
    def rows_written(self) -> int:
        return self._joiner.rows_written

    @property
    def open_rows(self) -> int:
        """Rows held in memory (the most any shard holds)."""
        return max(shard.open_rows for shard in self._shards)

    def add(self, window: Window, values: np.ndarray, valid: np.ndarray) -> None:
        r, c, h, w = _key(window)
        values = np.asarray(values)[:, :h, :w]
        valid = np.asarray(valid, bool)[:h, :w]
        for k, plan in enumerate(self._plans):
            local = plan.clip(window)
            if local is not None:
                cols = slice(int(local.col_off) + plan.start - c, int(local.col_off) + plan.start - c + int(local.width))
                self._submit(k, self._shards[k].add, local, values[:, :, cols], valid[:, cols])

    def skip(self, window: Window) -> None:
        for k, plan in enumerate(self._plans):
            local = plan.clip(window)
            if local is not None:
                self._submit(k, self._shards[k].skip, local)

    def close(self) -> None:
        """Close every shard (their last rows reach the sink), stop the threads, raise a shard's error."""
        try:
            for k, shard in enumerate(self._shards):
                self._submit(k, shard.close)
            for backlog in self._backlog:
                while backlog:
                    backlog.popleft().result()
        finally:
            for pool in self._threads:
                pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Drop what the shards have not started and wait for what they have (called before the
        sink is aborted, so that nothing reaches it afterwards)."""
        self._joiner.closed = True
        for pool in self._threads:
            pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, k: int, fn, *args) -> None:
        backlog = self._backlog[k]
        while backlog and (backlog[0].done() or len(backlog) >= SHARD_BACKLOG):
            backlog.popleft().result()      # raises a shard's error here
        backlog.append(self._threads[k].submit(fn, *args))

    def __del__(self):
        for pool in getattr(self, "_threads", ()):
            pool.shutdown(wait=False, cancel_futures=True)


class _ShardRows:
    """The sink of shard ``k``: its finished rows go to the joiner."""

    def __init__(self, joiner: "_RowJoiner", k: int):
        self.joiner, self.k = joiner, k

    def write(self, row_off: int, rows: np.ndarray) -> None:
        self.joiner.put(self.k, row_off, rows)


class _RowJoiner:
    """Rows of ``shards`` column shards in, whole rows out: as soon as every shard has given rows
    from the next row on, the rows all have are put side by side and written to ``sink``."""

    def __init__(self, sink, shards: int):
        self.sink = sink
        self._rows: list[deque[np.ndarray]] = [deque() for _ in range(shards)]
        self._lock = threading.Lock()
        self.rows_written = 0
        self.closed = False         # aborted: rows are dropped
        self.error: Optional[BaseException] = None     # the sink's: raised again to every shard

    def put(self, k: int, row_off: int, rows: np.ndarray) -> None:
        with self._lock:
            if self.closed:
                return
            if self.error is not None:
                raise self.error
            queued = sum(r.shape[-2] for r in self._rows[k])
            if row_off != self.rows_written + queued:
                raise RuntimeError(f"shard {k} gave rows from {row_off}, expected {self.rows_written + queued}")
            self._rows[k].append(rows)
            try:
                self._write_joined()
            except BaseException as exc:
                self.error = exc
                raise

    def _write_joined(self) -> None:
        """Write the rows every shard has given, side by side (under the lock)."""
        while all(self._rows):
            n = min(q[0].shape[-2] for q in self._rows)
            parts = []
            for q in self._rows:
                head = q.popleft()
                parts.append(head[..., :n, :])
                if head.shape[-2] > n:
                    q.appendleft(head[..., n:, :])
            self.sink.write(self.rows_written, np.concatenate(parts, axis=-1))
            self.rows_written += n
