"""The inference engine, one job per module: run settings resolved once (:mod:`.settings`), the
stop token a caller passes to a run (:mod:`.stop`), the model's side of the device
(:mod:`.device`), the chip loop (:mod:`.core`: readers -> device batches -> model -> writer
thread, :mod:`.writer`) and running a model over a plan with a new or kept engine (:mod:`.run`).
Nothing here knows about tasks or files, and nothing changes the process: the allocator is the
command's choice (:func:`dinov3_geo.hostmem.keep_freed_memory`)."""
from .core import Consumer, Engine, RunStats
from .device import unit_float
from .run import engine_for, keep_engine, run_chips
from .settings import (
    PRECISIONS,
    RunSettings,
    default_readers,
    dtype_for,
    resolve_device,
    resolve_precision,
    validate_batch_size,
)
from .stop import StopToken

__all__ = ["Consumer", "Engine", "RunStats", "RunSettings", "StopToken", "PRECISIONS", "default_readers",
           "dtype_for", "engine_for", "keep_engine", "resolve_device", "resolve_precision", "run_chips",
           "unit_float", "validate_batch_size"]
