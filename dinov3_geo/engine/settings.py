"""How a run computes: device, precision, batch size, compiling and reader threads, each checked
and resolved once (:meth:`RunSettings.resolve`) and handed on as a value."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import UsageError
from ..hostmem import usable_cores

PRECISIONS = ("auto", "fp32", "bf16", "fp8")


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


def default_readers() -> int:
    """Reader threads: half the cores this process may use, 2 to 8. More readers than that fight
    the model's own Python thread for the GIL (measured on 2 cores: 2 readers gave a ratio of 0.89,
    4 gave 0.85)."""
    return min(8, max(2, usable_cores() // 2))


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
