"""Rows gathered into strips, and the one thread that takes a write path's strips in order."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np


def first_rows(parts: list[np.ndarray], take: int) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The first ``take`` rows of consecutive row blocks ``parts`` (``[bands, rows, width]``) as
    views, and the rows after them in the last block (None when none are left)."""
    pieces, rest, left = [], None, take
    for part in parts:
        n = part.shape[1]
        if left == 0:
            raise ValueError(f"{take} rows asked of row blocks of {sum(p.shape[1] for p in parts)}")
        if n > left:
            pieces.append(part[:, :left])
            rest = part[:, left:]
            break
        pieces.append(part)
        left -= n
    return pieces, rest


def joined(pieces: list[np.ndarray]) -> np.ndarray:
    """Row blocks as one array (the block itself when there is one)."""
    return np.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]


class StripWorker:
    """One thread that runs jobs in order (writes to one GDAL dataset, which must not be shared
    between threads), with at most ``depth`` jobs waiting so that memory stays flat. A job's error
    is raised by the next ``submit`` or by ``join``."""

    def __init__(self, name: str, depth: int = 2):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._jobs: list[Future] = []
        self._depth = depth

    def submit(self, fn, *args, **kwargs) -> None:
        while len(self._jobs) >= self._depth:   # back-pressure; raises a failed job's error
            self._jobs.pop(0).result()
        self._jobs.append(self._pool.submit(fn, *args, **kwargs))

    def join(self) -> None:
        """Wait for every job; raise the first error."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.result()

    def shutdown(self) -> None:
        """Drop waiting jobs and wait for the running one (used when aborting)."""
        self._jobs = []
        self._pool.shutdown(wait=True, cancel_futures=True)
