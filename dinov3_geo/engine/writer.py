"""The writer thread: model outputs handed to the run's consumer off the main thread, so that
stitching and writing overlap the device."""
from __future__ import annotations

import queue
import threading
from typing import Optional


class Writer:
    """A thread that hands model outputs to the consumer, so stitching and writing overlap the GPU.

    Items: ``("skip", window)``, or ``("add", chips, outputs)`` with chips carrying ``window`` and
    ``valid``. An error in the consumer is raised on the main thread at its next :meth:`put` or at
    :meth:`finish`."""

    def __init__(self, consumer, depth: int = 4):
        self.consumer = consumer
        self.queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._loop, name="dinov3geo-write", daemon=True)
        self.thread.start()

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                self._handle(item)
            except BaseException as exc:  # reported to the main thread at its next put/finish
                self.error = exc

    def _handle(self, item) -> None:
        if item[0] == "skip":
            self.consumer.skip(item[1])
            return
        _, batch, out = item
        for chip, values in zip(batch, out):
            self.consumer.add(chip.window, values, chip.valid)

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop the thread, dropping what is queued, and the consumer's own threads if it has
        any (``abort()``), before the sink removes its temporary file."""
        self.error = self.error or RuntimeError("aborted")
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.queue.put(None)
        self.thread.join(timeout=30)
        stop = getattr(self.consumer, "abort", None)
        if stop is not None:
            stop()
