"""Job-wide progress of a batch on stderr: scenes and chips done, chips per second, time left."""
from __future__ import annotations

import math
import sys
import threading
import time
from typing import Optional

from dinov3_geo.batch.plan import Band, SceneJob
from dinov3_geo.batch.work import SceneOutcome, UnitResult, unit_name


class JobProgress:
    """Job-wide progress on stderr: scenes and chips done, chips per second, time left. Chip counts
    arrive per unit (scene or band) while it runs and when it ends; a line at least every
    ``every`` seconds and whenever a scene ends."""

    def __init__(self, jobs: list[SceneJob], outcomes: list[SceneOutcome], enabled: Optional[bool],
                 every: float = 10.0):
        self.enabled, self.every = enabled is not False, every
        self.scenes_total = len(jobs)
        self.chips_total = sum(j.chips for j in jobs)
        self.scenes_done = 0
        self.units: dict[str, int] = {}
        self._lock = threading.Lock()
        self.t0 = self._last = time.perf_counter()
        skipped = sum(o.status == "skipped" for o in outcomes)
        failed = sum(o.status == "failed" for o in outcomes)
        self.say(f"{len(jobs)} scene{'s' * (len(jobs) != 1)} to run ({self.chips_total} chips), "
                 f"{skipped} complete already, {failed} unreadable")

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def chips(self, unit: str, chips: int) -> None:
        """``chips`` of ``unit`` are done (a running count: the largest one seen counts)."""
        with self._lock:
            self.units[unit] = max(self.units.get(unit, 0), int(chips))
            due = time.perf_counter() - self._last >= self.every
        if due:
            self.say(self._status())

    def band_finished(self, job: SceneJob, band: Band, res: UnitResult) -> None:
        self.chips(unit_name(job.output, band), res.chips_total)
        self.say(f"{self._status()} {job.output.name}: band {band.index + 1}/{band.count} "
                 f"{'done' if res.ok else 'failed'}")

    def scene_finished(self, job: SceneJob, outcome: SceneOutcome) -> None:
        self.scenes_done += 1
        if job.bands is None:
            self.chips(unit_name(job.output), outcome.chips)
        state = f"done in {outcome.seconds:.1f} s" if outcome.status == "done" else f"failed: {outcome.reason}"
        self.say(f"{self._status()} {job.output.name}: {state}")

    def _status(self) -> str:
        with self._lock:
            self._last = time.perf_counter()
            done = sum(self.units.values())
        elapsed = self._last - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.chips_total - done) / rate if rate > 0 else math.inf
        eta = "?" if math.isinf(left) else f"{int(left // 60)}m{int(left % 60):02d}s"
        return (f"[scenes {self.scenes_done}/{self.scenes_total}, chips {done}/{self.chips_total}, "
                f"{rate:.2f} chips/s, {eta} left]")
