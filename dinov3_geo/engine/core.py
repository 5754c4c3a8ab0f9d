"""The engine: reader threads -> device batches -> model -> writer thread -> consumer.

Chips of a :class:`~dinov3_geo.io.tiling.ChipPlan` are read ahead in a thread pool (windowed reads
release the GIL inside GDAL), stacked into pinned host memory as uint8 (or float32 for non-byte
scenes), copied to the device without blocking, normalised there, run through the model, and copied
back; a writer thread hands each chip's result to the consumer (a stitcher that streams finished
row bands to a sink, or a collector of per-chip vectors). Nothing here knows about tasks or files.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
from rasterio.windows import Window

from ..errors import DeviceError
from ..io.tiling import ChipPlan, pad_to_tile
from .device import compiled, normaliser, not_sharing, to_device, unit_float, use_fp8
from .settings import RunSettings
from .stop import StopToken, check
from .writer import Writer

log = logging.getLogger("dinov3_geo")


@dataclass
class RunStats:
    """What a run did: chips planned, computed and skipped (no valid pixel), and timings."""

    chips_total: int = 0
    chips_computed: int = 0
    chips_skipped: int = 0
    seconds: float = 0.0            # reading, model and consumer, from the first chip to the last
    warmup_seconds: float = 0.0     # the warm-up batch before the chips (compile, kernels)
    finalize_seconds: float = 0.0   # after the last chip: finishing the output (COG conversion)
    batch_size: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def chips_per_second(self) -> float:
        return self.chips_computed / self.seconds if self.seconds > 0 else 0.0


class Consumer(Protocol):
    """Where the engine hands each chip's result (a stitcher, a per-chip collector)."""

    def add(self, window: Window, values: np.ndarray, valid: np.ndarray) -> None:
        """``values``: the chip's float32 model output (padded chips: not cropped); ``valid`` bool
        ``[h, w]`` of the unpadded chip."""

    def skip(self, window: Window) -> None:
        """A planned chip with no valid pixel (not computed)."""

    def close(self) -> None:
        """Every chip was added or skipped."""

    # optional: ``abort()``, called when a run fails, to stop the consumer's own threads


@dataclass
class _Chip:
    window: Window
    data: Optional[np.ndarray]      # [3, tile, tile] padded; None when the chip has no valid pixel
    valid: np.ndarray               # [h, w]


class Engine:
    """Runs a model (normalised ``[B,3,T,T]`` -> ``[B, ...]``) over the chips of a plan into a consumer.

    ``mean``/``std`` normalise the 0..1 chips when given; otherwise the model's own ``normalise``
    (a task model carries its statistics), otherwise the chips go in as 0..1.
    """

    def __init__(self, model: torch.nn.Module, settings: RunSettings,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        self.settings = settings
        self.device = settings.device
        self.precision = settings.precision
        self.dtype = settings.dtype
        self.model = model
        self.batch_size = settings.batch_size      # lowered on out-of-memory
        self.readers = settings.readers
        self.compile = settings.compile
        self.normalise = normaliser(model, mean, std)
        to_device(model, settings.device)
        if settings.precision == "fp8":
            use_fp8(model, settings.device)
        self._pending = None        # (batch, results) of the batch in flight on the device
        self._early_notes: list[str] = []   # from warm_up, before any run
        self._forward = compiled(model) if settings.compile else model
        self._pinned = settings.device.type == "cuda"
        self._buffers: dict[str, torch.Tensor] = {}     # CPU batch buffers reused between batches
        self._tile: Optional[int] = None
        self._warm_tiles: set[int] = set()
        # a model that runs asynchronously off CUDA (a simulated device) gives an event per batch
        self._record_event = getattr(model, "record_event", None) if not self._pinned else None
        self._turn = 0
        self.runs = 0               # scenes (or bands) run by this engine
        self.warmups = 0            # warm-up batches run (at most one per tile size)

    # -- public ---------------------------------------------------------------------------------
    def prepare(self, tile: int) -> float:
        """Warm up for chips of ``tile`` px when runs need it (compiling, or on a GPU: kernels,
        cuBLAS), once per tile size for the engine's life; returns the seconds it took (0 when
        nothing was left to do). An engine kept for many scenes compiles and warms up once."""
        if not (self.compile or self.device.type == "cuda") or int(tile) in self._warm_tiles:
            return 0.0
        t = time.perf_counter()
        self.warm_up(tile)
        self._warm_tiles.add(int(tile))
        return time.perf_counter() - t

    def run(self, scene, plan: ChipPlan, consumer: Consumer, progress: Optional[bool] = None,
            stop: Optional[StopToken] = None) -> RunStats:
        """Read and infer every chip of ``plan`` over ``scene`` and hand the results to ``consumer``
        (closed at the end). An engine runs any number of scenes, one at a time. ``stop``: a token
        whose request the run raises before its next chip (the consumer is aborted, not closed)."""
        self._tile = plan.tile
        self.runs += 1
        windows = plan.windows
        stats = RunStats(chips_total=len(windows), batch_size=self.batch_size, notes=list(self._early_notes))
        t0 = time.perf_counter()
        writer = Writer(consumer)
        bar = _progress_bar(len(windows), progress)
        chips = self._read_ahead(scene, windows)
        try:
            batch: list[_Chip] = []
            for chip in chips:
                check(stop)
                if chip.data is None:
                    writer.put(("skip", chip.window))
                    stats.chips_skipped += 1
                    bar.update(1)
                    continue
                batch.append(chip)
                if len(batch) == self.batch_size:
                    self._infer(batch, writer, stats)
                    bar.update(len(batch))
                    batch = []
            if batch:
                self._infer(batch, writer, stats)
                bar.update(len(batch))
            self._retire(writer)
            writer.finish()
        except BaseException:
            # stop the readers (their running reads finish) before the caller closes the scene
            # they read from: a traceback keeps the generator alive, and a read of a closed
            # dataset crashes GDAL
            chips.close()
            self._pending = None
            writer.abort()
            raise
        finally:
            bar.close()
        consumer.close()
        stats.seconds = time.perf_counter() - t0
        return stats

    def warm_up(self, tile: int) -> None:
        """One batch of zeros of ``tile`` px through the model before the run: compilation, CUDA
        kernel loading and cuBLAS/cuDNN set-up happen here, not in the first chips. Out of memory
        halves the batch size here as in the run (the note appears in the run's notes)."""
        self._tile = int(tile)
        self.warmups += 1
        while not self._warm_once():
            self._free_memory()
            self._lower_batch_size(self.batch_size // 2, self._early_notes)

    def forward_zeros(self, n: int, tile: int) -> torch.Tensor:
        """The model's float32 output for ``n`` chips of zeros of ``tile`` px (warm-up, probing)."""
        y = self._model_on_device(torch.zeros(n, 3, tile, tile, device=self.device)).float()
        self._sync()
        return y

    def _warm_once(self) -> bool:
        """One warm-up batch; False when it ran out of memory (retried after the ``except`` block,
        whose traceback holds the failed attempt's tensors)."""
        n = self.batch_size
        try:
            self.forward_zeros(n, self._tile)
            return True
        except torch.OutOfMemoryError as exc:
            if n == 1:
                raise self._out_of_memory_at_one() from exc
        return False

    def _out_of_memory_at_one(self) -> DeviceError:
        return DeviceError(str(self.device), f"out of GPU memory even at batch size 1 with {self._tile} px "
                                             "tiles; try a smaller `tile` or `precision` bf16")

    def _lower_batch_size(self, size: int, notes: list[str]) -> None:
        """Lower the batch size to ``size`` (never raise it) and say so in ``notes`` and the log."""
        if size < self.batch_size:
            self.batch_size = size
            note = f"out of GPU memory: batch size lowered to {size}"
            notes.append(note)
            log.warning(note)

    # -- reading --------------------------------------------------------------------------------
    def _read_ahead(self, scene, windows: Sequence[Window]) -> Iterator[_Chip]:
        """Chips in plan order, read by a thread pool that keeps a few batches in flight."""
        ahead = max(2 * self.batch_size, 2 * self.readers)
        pool = ThreadPoolExecutor(max_workers=self.readers, thread_name_prefix="dinov3geo-read")
        futures: deque[Future] = deque()
        it = iter(windows)
        try:
            for w in it:
                futures.append(pool.submit(self._read_one, scene, w))
                if len(futures) >= ahead:
                    break
            while futures:
                chip = futures.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    futures.append(pool.submit(self._read_one, scene, nxt))
                yield chip
        finally:
            for f in futures:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _read_one(self, scene, window: Window) -> _Chip:
        data, valid = scene.read(window)
        if not valid.any():
            return _Chip(window, None, valid)
        padded, _ = pad_to_tile(data, self._tile)
        return _Chip(window, np.ascontiguousarray(padded), valid)

    # -- model ----------------------------------------------------------------------------------
    def _infer(self, batch: list[_Chip], writer: Writer, stats: RunStats) -> None:
        """Run one batch, halving it on out-of-memory until it fits (a note says so).

        The retry happens after the ``except`` block: inside it, the exception's traceback still
        holds the failed attempt's tensors, and every smaller batch would run out of memory too.
        """
        out = None
        try:
            out = self._forward_batch(batch)
        except torch.OutOfMemoryError as exc:
            if len(batch) == 1:
                raise self._out_of_memory_at_one() from exc
        if out is None:
            self._free_memory()
            # never raised again by a later, larger remainder
            self._lower_batch_size(len(batch) // 2, stats.notes)
            stats.batch_size = self.batch_size
            start = 0
            while start < len(batch):               # the rest in batches of the (maybe lowered again) size
                size = self.batch_size
                self._infer(batch[start:start + size], writer, stats)
                start += size
            return
        stats.chips_computed += len(batch)
        # The device now has this batch queued: only now wait for the previous one, so the CPU
        # stacks and launches batch k+1 while the GPU computes batch k.
        self._retire(writer)
        self._pending = (batch, out)

    def _retire(self, writer: Writer) -> None:
        """Wait for the batch in flight (on CUDA its results were copied to pinned memory) and hand
        it on."""
        if self._pending is None:
            return
        batch, (out, done) = self._pending
        self._pending = None
        if done is not None:
            done.synchronize()
        writer.put(("add", batch, out.numpy() if isinstance(out, torch.Tensor) else out))

    def _forward_batch(self, batch: list[_Chip]):
        """Launch one batch: stack into (pinned) host memory, copy, normalise and run on the device.

        Returns ``(results, event)``: float32 numpy results on the CPU (event None, or the model's
        own for a model that runs asynchronously, see :meth:`_retire`), or on CUDA a pinned tensor
        whose copy completes asynchronously and the CUDA event that marks its end.
        """
        n = self.batch_size if self.compile else len(batch)     # a short last batch would recompile
        first = batch[0].data
        if not self._pinned:        # 0..1 float32 on the CPU: each chip scaled into its place
            host = self._host_batch((n, *first.shape), torch.float32)
            for chip, place in zip(batch, host.numpy()):
                unit_float(chip.data, place)
            host[len(batch):] = 0
            y = self._model_on_device(host)[:len(batch)].float()
            done = self._record_event() if self._record_event is not None else None
            return not_sharing(y, (host,)).numpy(), done
        host = self._host_batch((n, *first.shape), torch.uint8 if first.dtype == np.uint8 else torch.float32)
        np.stack([c.data for c in batch], out=host.numpy()[:len(batch)])
        host[len(batch):] = 0
        x = host.to(self.device, non_blocking=True)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        y = self._model_on_device(x)[:len(batch)].float()
        out = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(y, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return out, done

    def _host_batch(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The host tensor a batch is stacked into: new pinned memory per batch on CUDA (the copy to
        the device may still be reading the previous one), a reused buffer on the CPU (two in turn
        for a model that runs asynchronously: one may be read while the next batch is stacked)."""
        if self._pinned:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        if self._record_event is None:
            return self._cpu_buffer("host", shape, dtype)
        self._turn = 1 - self._turn
        return self._cpu_buffer(f"host{self._turn}", shape, dtype)

    def _cpu_buffer(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor for ``role`` kept between batches, and between the runs of a kept engine
        (replaced when the shape or type changes: fresh pages of tens of MB cost the kernel's
        zeroing again). Its contents are only valid until the next batch."""
        buf = self._buffers.get(role)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype)
            self._buffers[role] = buf
        return buf

    def _model_on_device(self, x01: torch.Tensor) -> torch.Tensor:
        """The model on 0..1 chips already on the device: normalise, cast, forward (autocast)."""
        with torch.inference_mode(), self._autocast():
            return self._forward(self.normalise(x01).to(self.dtype))

    def _autocast(self):
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _progress_bar(total: int, progress: Optional[bool]):
    """tqdm on a terminal (chips, chips/s, time left); silent when piped unless asked for."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="chip", desc="chips", disable=None if progress is None else not progress,
                dynamic_ncols=True, leave=False)

