"""The inference engine: reader threads -> device batches -> model -> writer thread -> consumer.

Chips of a :class:`~dinov3_geo.io.tiling.ChipPlan` are read ahead in a thread pool (windowed reads
release the GIL inside GDAL), stacked into pinned host memory as uint8 (or float32 for non-byte
scenes), copied to the device without blocking, normalised there, run through the model, and copied
back; a writer thread hands each chip's result to the consumer (a stitcher that streams finished
row bands to a sink, or a collector of per-chip vectors). Nothing here knows about tasks or files.
The run settings (device, precision, batch size, compile, readers) are resolved once, in
:meth:`RunSettings.resolve`, and handed on as a value.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
from rasterio.windows import Window

from .errors import DeviceError, UsageError
from .hostmem import keep_freed_memory
from .io.tiling import ChipPlan, pad_to_tile
from .models.backbone import normalise_rgb

log = logging.getLogger("dinov3_geo")

PRECISIONS = ("auto", "fp32", "bf16", "fp8")


class StopRequest:
    """A stop asked for from outside a run (a signal handler that must not raise wherever the
    signal lands, e.g. inside the set-up of a GDAL dataset): :meth:`request` records the exception,
    and runs raise it at their next chip or scene (:meth:`raise_if_requested`)."""

    def __init__(self) -> None:
        self._exc: Optional[BaseException] = None

    def request(self, exc: BaseException) -> None:
        self._exc = self._exc or exc

    def clear(self) -> None:
        self._exc = None

    def raise_if_requested(self) -> None:
        if self._exc is not None:
            raise self._exc


#: The process's stop request, checked by every run between chips.
STOP = StopRequest()


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


@dataclass
class _Chip:
    window: Window
    data: Optional[np.ndarray]      # [3, tile, tile] padded; None when the chip has no valid pixel
    valid: np.ndarray               # [h, w]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a UsageError (exit 2)."""
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("device", f"'{device}' was requested but no CUDA GPU is available (use `device` "
                                       "cpu or auto)")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise UsageError("device", f"unknown device '{device}' (auto, cpu or cuda)")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on a GPU (fp32 there is several times slower and DINOv3 runs in bf16) and
    fp32 on the CPU; other names are checked and returned. DINOv3 does not support fp16."""
    if precision not in PRECISIONS:
        raise UsageError("precision", f"unknown precision '{precision}' (auto, fp32, bf16 or fp8; DINOv3 does "
                                      "not support fp16)")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def dtype_for(precision: str) -> torch.dtype:
    """Model dtype for a resolved precision name (fp8: bf16, with float8 products in the backbone's
    linear layers)."""
    if precision not in PRECISIONS or precision == "auto":
        raise UsageError("precision", f"unknown precision '{precision}' (fp32, bf16 or fp8)")
    return torch.float32 if precision == "fp32" else torch.bfloat16


def _use_fp8(model: torch.nn.Module, device: torch.device) -> None:
    """Switch the model's backbone linear layers to float8 products (``--precision fp8``)."""
    from .models.fp8 import check_fp8_device

    check_fp8_device(device)
    convert = getattr(model, "use_fp8_matmuls", None)
    if convert is None:
        raise UsageError("precision", "fp8 needs a model with a DINOv3 backbone (use_fp8_matmuls)")
    convert()


def default_readers() -> int:
    """Reader threads: half the cores, 2 to 8. More readers than that fight the model's own Python
    thread for the GIL (measured on 2 cores: 2 readers gave a ratio of 0.89, 4 gave 0.85)."""
    return min(8, max(2, (os.cpu_count() or 2) // 2))


def validate_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UsageError("batch_size", f"batch size must be a whole number of at least 1, got {batch_size!r}")


@dataclass(frozen=True)
class RunSettings:
    """How a run computes, resolved once (:meth:`resolve`) and handed on as a value."""

    device: torch.device
    precision: str                  # resolved: fp32, bf16 or fp8
    dtype: torch.dtype              # the model's dtype for that precision
    batch_size: int = 8
    compile: bool = False
    readers: int = 2
    requested: tuple[str, str] = ("auto", "auto")   # the device and precision as asked (another machine re-resolves them)

    @classmethod
    def resolve(cls, device: str | torch.device = "auto", precision: str = "auto", batch_size: int = 8,
                compile: bool = False, readers: Optional[int] = None) -> "RunSettings":
        """Check and resolve every setting: ``auto`` device and precision, reader threads (default
        :func:`default_readers`). Errors name the parameter."""
        validate_batch_size(batch_size)
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        resolved = resolve_precision(precision, dev)
        if readers is not None and (isinstance(readers, bool) or not isinstance(readers, (int, np.integer))
                                    or readers < 1):
            raise UsageError("readers", f"reader threads must be a whole number of at least 1, got {readers!r}")
        return cls(dev, resolved, dtype_for(resolved), int(batch_size), bool(compile),
                   default_readers() if readers is None else int(readers), (str(device), str(precision)))

    def on_this_machine(self) -> "RunSettings":
        """These settings resolved again from what was asked, on the machine this runs on (a Dask
        worker's device: ``auto`` may be a GPU there)."""
        return RunSettings.resolve(self.requested[0], self.requested[1], self.batch_size, self.compile, self.readers)


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
        self.normalise = _normaliser(model, mean, std)
        _to_device(model, settings.device)
        if settings.precision == "fp8":
            _use_fp8(model, settings.device)
        self._pending = None        # (batch, results) of the batch in flight on the device
        self._early_notes: list[str] = []   # from warm_up, before any run
        self._forward = self._compiled(model) if settings.compile else model
        self._pinned = settings.device.type == "cuda"
        self._buffers: dict[str, torch.Tensor] = {}     # CPU batch buffers reused between batches
        self._tile: Optional[int] = None

    @staticmethod
    def _compiled(model: torch.nn.Module):
        """``torch.compile`` by regions when the model names them (``compile_regions()``: compiled
        in place, one by one), else the whole model. The blocks of a ViT share one compiled graph,
        so the warm-up traces one block instead of all: on a 24-block model (2-core CPU) 30 s
        instead of 58 s with an empty inductor cache, 3.5 s instead of 8.4 s with a warm one."""
        regions = getattr(model, "compile_regions", None)
        if regions is None:
            return torch.compile(model, dynamic=False)
        for module in regions():
            module.compile(dynamic=False)
        return model

    # -- public ---------------------------------------------------------------------------------
    def run(self, scene, plan: ChipPlan, consumer: Consumer, progress: Optional[bool] = None) -> RunStats:
        """Read and infer every chip of ``plan`` over ``scene`` and hand the results to ``consumer``
        (closed at the end)."""
        self._tile = plan.tile
        keep_freed_memory()     # freed arrays reused, not fresh pages zeroed by the kernel
        windows = plan.windows
        stats = RunStats(chips_total=len(windows), batch_size=self.batch_size, notes=list(self._early_notes))
        t0 = time.perf_counter()
        writer = _Writer(consumer)
        bar = _progress_bar(len(windows), progress)
        chips = self._read_ahead(scene, windows)
        try:
            batch: list[_Chip] = []
            for chip in chips:
                STOP.raise_if_requested()
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
            self._buffers.clear()
        consumer.close()
        stats.seconds = time.perf_counter() - t0
        return stats

    def warm_up(self, tile: int) -> None:
        """One batch of zeros of ``tile`` px through the model before the run: compilation, CUDA
        kernel loading and cuBLAS/cuDNN set-up happen here, not in the first chips. Out of memory
        halves the batch size here as in the run (the note appears in the run's notes)."""
        self._tile = int(tile)
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
    def _infer(self, batch: list[_Chip], writer: "_Writer", stats: RunStats) -> None:
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

    def _retire(self, writer: "_Writer") -> None:
        """Wait for the batch in flight (its results were copied to pinned memory) and hand it on."""
        if self._pending is None:
            return
        batch, out = self._pending
        self._pending = None
        if isinstance(out, tuple):
            host, done = out
            done.synchronize()
            out = host.numpy()
        writer.put(("add", batch, out))

    def _forward_batch(self, batch: list[_Chip]):
        """Launch one batch: stack into (pinned) host memory, copy, normalise and run on the device.

        Returns float32 numpy results on the CPU, or on CUDA ``(pinned tensor, event)`` whose copy
        completes asynchronously (see :meth:`_retire`).
        """
        n = self.batch_size if self.compile else len(batch)     # a short last batch would recompile
        first = batch[0].data
        dtype = torch.uint8 if first.dtype == np.uint8 else torch.float32
        host = self._host_batch((n, *first.shape), dtype)
        np.stack([c.data for c in batch], out=host.numpy()[:len(batch)])
        if n > len(batch):
            host[len(batch):] = 0
        if not self._pinned:
            x = self._unit_float_on_cpu(host)
            y = self._model_on_device(x)[:len(batch)].float()
            return _not_sharing(y, (host, x)).numpy()
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
        the device may still be reading the previous one), one reused buffer on the CPU."""
        if self._pinned:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        return self._cpu_buffer("host", shape, dtype)

    def _unit_float_on_cpu(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` as float32 0..1 on the CPU: uint8 divided by 255 into a reused float buffer
        (no new 25 MB tensor and its page faults per batch) by numpy, in one pass on this thread:
        torch's OpenMP workers would spin beside the reader and writer threads. The same float32
        values as ``host.float().div_(255)`` (exact conversion, then IEEE division); float32 as is."""
        if host.dtype != torch.uint8:
            return host
        buf = self._cpu_buffer("unit", host.shape, torch.float32)
        np.divide(host.numpy(), np.float32(255.0), out=buf.numpy(), dtype=np.float32)
        return buf

    def _cpu_buffer(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor for ``role`` kept between batches (replaced when the shape or type changes,
        dropped at the end of a run). Its contents are only valid until the next batch."""
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


def _to_device(model: torch.nn.Module, device: torch.device) -> None:
    """Move ``model`` (in place, as ``Module.to`` does) to the run's device if its weights are
    elsewhere: a model loaded on the CPU runs on the GPU the settings chose."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    if tensor is not None and tensor.device.type != device.type:
        model.to(device)


def _not_sharing(y: torch.Tensor, buffers: Sequence[torch.Tensor]) -> torch.Tensor:
    """``y``, or a copy of it when its memory overlaps one of ``buffers`` (a model may return a view
    of its input, e.g. ``x[:, :1]``): results outlive the batch, reused buffers do not."""
    start = y.untyped_storage().data_ptr()
    stop = start + y.untyped_storage().nbytes()
    for buf in buffers:
        b_start = buf.untyped_storage().data_ptr()
        if start < b_start + buf.untyped_storage().nbytes() and b_start < stop:
            return y.clone()
    return y


def _normaliser(model: torch.nn.Module, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
    """0..1 chips -> the model's input: the given mean/std, else the model's own ``normalise``, else
    unchanged. Giving only one of ``mean`` and ``std`` is a UsageError."""
    if (mean is None) != (std is None):
        raise UsageError("mean" if mean is None else "std", "give both mean and std, or neither")
    if mean is not None:
        mean, std = _three(mean, "mean"), _three(std, "std")
        if min(std) <= 0:
            raise UsageError("std", f"std must be positive, got {std}")
        return lambda x01: normalise_rgb(x01, mean, std)
    own = getattr(model, "normalise", None)
    return own if callable(own) else (lambda x01: x01)


def _three(values: Sequence[float], name: str) -> tuple[float, float, float]:
    """Three finite floats (one per input channel), or a UsageError naming ``name``."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise UsageError(name, f"expected three numbers, got {values!r}") from None
    if len(out) != 3 or not all(np.isfinite(out)):
        raise UsageError(name, f"expected three finite numbers (R, G, B), got {values!r}")
    return out


class _Writer:
    """A thread that hands model outputs to the consumer, so stitching and writing overlap the GPU."""

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
        """Stop the thread, dropping what is queued (the sink removes its temporary file)."""
        self.error = self.error or RuntimeError("aborted")
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.queue.put(None)
        self.thread.join(timeout=30)


def _progress_bar(total: int, progress: Optional[bool]):
    """tqdm on a terminal (chips, chips/s, time left); silent when piped unless asked for."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="chip", desc="chips", disable=None if progress is None else not progress,
                dynamic_ncols=True, leave=False)


def run_chips(scene, model: torch.nn.Module, consumer: Consumer, plan: ChipPlan, settings: RunSettings,
              progress: Optional[bool] = None, mean: Optional[Sequence[float]] = None,
              std: Optional[Sequence[float]] = None) -> RunStats:
    """Run ``model`` over every chip of ``plan`` on ``scene`` (a :class:`~dinov3_geo.io.scene.Scene`)
    and hand each chip's float32 output to ``consumer`` (``add``/``skip``, then ``close``).

    Chips without a valid pixel are skipped; others are padded to the tile by reflection, scaled to
    0..1, normalised (``mean``/``std``, else the model's ``normalise``) and run in batches of
    ``settings.batch_size`` (halved on out-of-GPU-memory, with a note). A warm-up batch runs first
    on a GPU or when compiling. Returns the run's :class:`RunStats`.
    """
    if (scene.height, scene.width) != (plan.height, plan.width):
        raise UsageError("plan", f"plan is for a {plan.width} x {plan.height} grid, the scene is "
                                 f"{scene.width} x {scene.height}")
    engine = Engine(model, settings, mean=mean, std=std)
    t = time.perf_counter()
    if settings.compile or settings.device.type == "cuda":  # compile, kernels, cuBLAS: before the chips
        engine.warm_up(plan.tile)
    warm = time.perf_counter() - t
    stats = engine.run(scene, plan, consumer, progress=progress)
    stats.warmup_seconds = warm
    return stats
