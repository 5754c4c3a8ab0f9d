"""Float8 matrix products for the backbone's linear layers (``--precision fp8``).

DINOv3 was trained with fp8 matmuls; on Hopper-class GPUs (compute capability 8.9+) an fp8 product
has about twice the bf16 throughput. Each ``nn.Linear`` inside the transformer blocks becomes a
:class:`Float8Linear`: its weight is stored once as float8 e4m3 with one scale per output channel,
each input row is scaled to the e4m3 range on the fly, ``torch._scaled_mm`` multiplies with float32
accumulation and returns bf16. Everything else (patch embedding, norms, attention scores, RoPE, the
heads) stays in bf16. The accuracy cost against bf16 is measured by ``benchmarks/bench_model.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeviceError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)      # 448
_ALIGN = 16                                  # _scaled_mm wants every dimension a multiple of 16


def fp8_supported(device: torch.device) -> bool:
    """Whether ``device`` multiplies in fp8: CUDA with compute capability 8.9 or more (Ada, Hopper,
    Blackwell), or the CPU (emulated, slow: for checking results, not for speed)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return False


def check_fp8_device(device: torch.device) -> None:
    """DeviceError when ``device`` cannot run fp8 products."""
    if not fp8_supported(device):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        raise DeviceError(str(device), f"`precision` fp8 needs a GPU of compute capability 8.9 or more "
                                       f"(Ada, Hopper); {name} has not: use `precision` bf16")


def _rowwise_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] as float8 e4m3 and the float32 scale [M, 1] of each row (x ~ q * scale)."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Float8Linear(nn.Module):
    """``y = x W^T + b`` with ``x`` and ``W`` in float8 e4m3 (a scale per input row and per output
    channel), accumulated in float32, returned in bf16. Built from a trained ``nn.Linear``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.in_features % _ALIGN or linear.out_features % _ALIGN:
            raise ValueError(f"fp8 needs in and out features divisible by {_ALIGN}, got "
                             f"{linear.in_features} x {linear.out_features}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = _rowwise_e4m3(linear.weight.detach())
        self.register_buffer("weight_fp8", weight)                   # [N, K], row-major
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, N] float32
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        m = rows.shape[0]
        pad = -m % _ALIGN
        if pad:
            rows = F.pad(rows, (0, 0, 0, pad))
        q, scale = _rowwise_e4m3(rows)
        y = torch._scaled_mm(q, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                             out_dtype=torch.bfloat16)
        if pad:
            y = y[:m]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 rowwise"


def linears_to_fp8(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` by a :class:`Float8Linear`, in place; returns how
    many. timm's attention adds a separate q/k/v bias through ``F.linear`` with the raw weight, so
    such attention modules are switched to calling their (now fp8) ``qkv`` and adding the bias."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Float8Linear(child))
                count += 1
        if getattr(parent, "q_bias", None) is not None and hasattr(parent, "qkv_bias_separate"):
            parent.qkv_bias_separate = True
    return count
