"""The model's side of a run: the model moved to the run's device, switched to float8 products or
compiled, the chips scaled and normalised into its input, and its results kept apart from the
buffers a batch reuses."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UsageError
from ..models.backbone import normalise_rgb
from ..models.fp8 import check_fp8_device


def to_device(model: torch.nn.Module, device: torch.device) -> None:
    """Move ``model`` (in place, as ``Module.to`` does) to the run's device if its weights are
    elsewhere: a model loaded on the CPU runs on the GPU the settings chose."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    if tensor is not None and tensor.device.type != device.type:
        model.to(device)


def use_fp8(model: torch.nn.Module, device: torch.device) -> None:
    """Switch the model's backbone linear layers to float8 products (``--precision fp8``)."""
    check_fp8_device(device)
    convert = getattr(model, "use_fp8_matmuls", None)
    if convert is None:
        raise UsageError("precision", "fp8 needs a model with a DINOv3 backbone (use_fp8_matmuls)")
    convert()


def compiled(model: torch.nn.Module):
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


def normaliser(model: torch.nn.Module, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
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


def unit_float(chip: np.ndarray, out: np.ndarray) -> np.ndarray:
    """A chip as float32 0..1 into ``out``: uint8 divided by 255 by numpy in one pass on the calling
    thread (torch's OpenMP workers would spin beside the other threads), the same float32 values
    as ``torch.from_numpy(chip).float().div_(255)`` (exact conversion, then IEEE division); float32
    chips (already scaled by the scene) copied."""
    if chip.dtype != np.uint8:
        np.copyto(out, chip)
        return out
    return np.divide(chip, np.float32(255.0), out=out, dtype=np.float32)


def not_sharing(y: torch.Tensor, buffers: Sequence[torch.Tensor]) -> torch.Tensor:
    """``y``, or a copy of it when its memory overlaps one of ``buffers`` (a model may return a view
    of its input, e.g. ``x[:, :1]``): results outlive the batch, reused buffers do not."""
    start = y.untyped_storage().data_ptr()
    stop = start + y.untyped_storage().nbytes()
    for buf in buffers:
        b_start = buf.untyped_storage().data_ptr()
        if start < b_start + buf.untyped_storage().nbytes() and b_start < stop:
            return y.clone()
    return y
