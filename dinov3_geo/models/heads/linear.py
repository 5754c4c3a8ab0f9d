"""Light heads on frozen DINOv3 features, as in the DINOv3 evaluations.

- :class:`LinearProbe`: a linear classifier on one vector per chip (CLS, or CLS + mean patch): the
  logistic-regression probe fitted by scikit-learn, stored as a ``Linear`` layer.
- :class:`LinearSegHead`: the linear segmentation probe of ``dinov3/eval`` (BatchNorm + dropout +
  1x1 conv on the last block's patch tokens), upsampled bilinearly to the chip.
- :class:`DPTSegHead`: the DPT decoder of :mod:`.dpt` on four blocks, with dropout before its
  class logits, resized to the chip.
Every segmentation head maps backbone features to logits ``[B,K,H,W]`` at the requested size.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dpt import DPTHead, DPTHeadConfig

SEG_HEADS = ("linear", "dpt")


class LinearProbe(nn.Module):
    """Class logits of per-chip vectors: ``cls`` ([CLS]) or ``cls+mean`` ([CLS; mean patch])."""

    def __init__(self, in_features: int, num_classes: int, pooling: str = "cls"):
        super().__init__()
        if pooling not in ("cls", "cls+mean"):
            raise ValueError(f"pooling must be 'cls' or 'cls+mean', not {pooling!r}")
        self.pooling = pooling
        self.linear = nn.Linear(in_features, num_classes)

    def pool(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """The chip vector from the last block's CLS [B,D] and patches [B,D,h,w]."""
        return cls if self.pooling == "cls" else torch.cat([cls, patches.mean(dim=(2, 3))], dim=1)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """Logits [B,K]."""
        return self.linear(vectors)


class LinearSegHead(nn.Module):
    """BatchNorm -> dropout -> 1x1 conv on patch tokens [B,D,h,w]; logits upsampled to ``size``."""

    def __init__(self, embed_dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm2d(embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.conv = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, patches: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Logits [B,K,*size]."""
        logits = self.conv(self.dropout(self.bn(patches)))
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def dpt_config(embed_dim: int, num_classes: int, channels: Optional[int] = None) -> DPTHeadConfig:
    """A DPT head sized for a backbone of width ``embed_dim``: CHMv2's layout with ``num_classes``
    outputs (channels scaled with the width, capped at CHMv2's: ViT-L and 7B get CHMv2's sizes)."""
    channels = channels or min(256, max(32, embed_dim // 4))
    post = tuple(min(c, max(16, embed_dim * c // 1024)) for c in (128, 256, 512, 1024))
    return DPTHeadConfig(in_channels=embed_dim, channels=channels, post_process_channels=post,
                         n_hidden_channels=max(16, channels // 2), n_output_channels=num_classes)


class DPTSegHead(nn.Module):
    """The DPT decoder on four blocks' (patches, CLS), with dropout on its last hidden map."""

    def __init__(self, cfg: DPTHeadConfig, dropout: float = 0.1):
        super().__init__()
        self.dpt = DPTHead(cfg)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], size: Sequence[int]) -> torch.Tensor:
        """Logits [B,K,*size]."""
        head = self.dpt.conv_depth.head
        x = head[3](head[2](head[1](head[0](self.dpt.forward_features(layers)))))
        logits = head[4](self.dropout(x))
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
