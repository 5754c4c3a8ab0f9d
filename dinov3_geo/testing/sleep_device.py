"""A simulated accelerator: a model that holds each batch on a device of a given speed.

:class:`SleepModel` stands in for a network on a GPU, to measure whether the host pipeline keeps a
device of ``rate`` chips/s busy without having one. Like a CUDA model it runs asynchronously: a
call queues the batch on a device timeline (it starts when the batch before it ends, or now) and
returns at once; the engine waits for a batch with ``record_event().synchronize()``, which sleeps
until the batch's end with the GIL released, as a CUDA synchronise does. Each batch of ``n`` chips
holds the device ``n / rate`` seconds (``rate=inf``: no time at all, the host's own ceiling).
The output is made meanwhile on the device's own thread (its stream), not on the caller's.

Outputs, made from the input so that what follows (stitching, encoding) sees real data:

- ``continuous``: the first channel of the normalised chip (a canopy-like float map);
- ``classes``: ``channels`` class scores whose argmax is the first channel quantised into
  ``channels`` levels (a land-cover-like class map);
- ``patches``: ``channels`` features per 16 px cell (``embed --patch``), the cell means of the
  first channel scaled per feature.

Making the output costs host CPU here that a GPU would spend itself; the model counts it
(:attr:`DeviceTimeline.output_cpu_s`) so that benchmarks can report the host's share without it.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

OUTPUTS = ("continuous", "classes", "patches")
PATCH = 16


@dataclass
class DeviceTimeline:
    """The simulated device's schedule: batches run one after the other, each for its hold time.

    ``busy_s`` is the device time of every batch launched; ``first_start`` and ``last_end`` are
    ``time.perf_counter()`` instants (None before the first batch)."""

    busy_s: float = 0.0
    batches: int = 0
    chips: int = 0
    first_start: float | None = None
    last_end: float | None = None
    output_cpu_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def launch(self, chips: int, hold_s: float) -> float:
        """Queue a batch of ``chips`` holding the device ``hold_s`` seconds; returns its end instant."""
        with self._lock:
            now = time.perf_counter()
            start = now if self.last_end is None else max(now, self.last_end)
            self.first_start = start if self.first_start is None else self.first_start
            self.last_end = start + hold_s
            self.busy_s += hold_s
            self.batches += 1
            self.chips += chips
            return self.last_end

    def reset(self) -> None:
        """Forget every batch (before a measured run)."""
        with self._lock:
            self.busy_s, self.batches, self.chips, self.output_cpu_s = 0.0, 0, 0, 0.0
            self.first_start = self.last_end = None

    def span_s(self) -> float:
        """Seconds from the first batch's start to the last one's end."""
        if self.first_start is None:
            return 0.0
        return self.last_end - self.first_start


class DeviceEvent:
    """The end of the batches queued so far: ``synchronize()`` waits until then (sleeping, with the
    GIL released) and until the device thread has made their outputs."""

    def __init__(self, end: float, made: Future | None = None):
        self.end, self.made = end, made

    def synchronize(self) -> None:
        if self.made is not None:
            self.made.result()
        wait = self.end - time.perf_counter()
        if wait > 0:
            time.sleep(wait)

    def query(self) -> bool:
        return time.perf_counter() >= self.end and (self.made is None or self.made.done())


class SleepModel(torch.nn.Module):
    """A model on a simulated device of ``rate`` chips/s (see the module): ``output`` ``continuous``
    (1 channel), ``classes`` (``channels`` scores) or ``patches`` (``channels`` features per
    16 px cell). ``timeline`` records what the device did.

    As on a GPU, a call returns at once: its output tensor is filled by the device's own thread
    while the batch holds the device, and is valid once the batch's event has synchronised; the
    input must stay unchanged until then (the engine gives an asynchronous model a new batch
    buffer while the last one is in flight)."""

    def __init__(self, rate: float, output: str = "continuous", channels: int | None = None):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        rate = float(rate)
        if not rate > 0:
            raise ValueError(f"rate must be a positive number of chips per second, got {rate!r}")
        self.rate = rate
        self.output = output
        self.channels = 1 if output == "continuous" else int(channels or (6 if output == "classes" else 384))
        self.timeline = DeviceTimeline()
        self._last: DeviceEvent = DeviceEvent(0.0)
        self._stream: ThreadPoolExecutor | None = None

    @classmethod
    def parse(cls, spec: str, output: str = "continuous", channels: int | None = None) -> "SleepModel":
        """``sleep:R`` (R chips/s, or ``inf``) as a model."""
        name, _, rate = spec.partition(":")
        try:
            value = float(rate)
        except ValueError:
            value = None
        if name != "sleep" or value is None:
            raise ValueError(f"expected sleep:R (R chips/s or inf), got {spec!r}")
        return cls(value, output, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        shape = (n, self.channels, h, w) if self.output != "patches" else (n, self.channels, h // PATCH, w // PATCH)
        out = torch.empty(shape, dtype=torch.float32)
        if self._stream is None:        # the device's stream: one thread, batches in order
            self._stream = ThreadPoolExecutor(1, thread_name_prefix="sleep-device")
        made = self._stream.submit(self._make_into, x.detach(), out)
        self._last = DeviceEvent(self.timeline.launch(int(n), n / self.rate), made)
        return out

    def record_event(self) -> DeviceEvent:
        """An event at the end of the batches queued so far (as ``torch.cuda.Event.record``)."""
        return self._last

    def _make_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """The output of ``x`` into ``out``, by numpy on the device thread (its CPU time counted)."""
        t = time.thread_time()
        first, dest = x[:, :1].numpy(), out.numpy()
        if self.output == "continuous":
            np.copyto(dest, first)
        elif self.output == "classes":
            class_scores(first, dest)
        else:
            patch_features(first, dest)
        self.timeline.output_cpu_s += time.thread_time() - t

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_stream"] = None
        return state


def class_scores(first: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Class scores into ``out`` ``[B,K,H,W]`` for ``first`` ``[B,1,H,W]``: ``x * l_k - l_k**2 / 2``
    for K evenly spaced levels ``l_k`` over ``[0, 1]``, so the argmax is the level nearest to x."""
    k = out.shape[1]
    levels = np.linspace(0, 1, k, dtype=np.float32).reshape(1, k, 1, 1)
    np.multiply(first, levels, out=out)
    return np.subtract(out, levels * levels / 2, out=out)


def patch_features(first: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Features into ``out`` ``[B,D,H/16,W/16]`` for ``first`` ``[B,1,H,W]`` (sides multiples of 16):
    the 16 px cell means scaled by ``1 + k / D`` for feature k."""
    b, _, h, w = first.shape
    d = out.shape[1]
    cells = first.reshape(b, 1, h // PATCH, PATCH, w // PATCH, PATCH).mean(axis=(3, 5), dtype=np.float32)
    return np.multiply(cells, (1 + np.arange(d, dtype=np.float32) / d).reshape(1, d, 1, 1), out=out)
