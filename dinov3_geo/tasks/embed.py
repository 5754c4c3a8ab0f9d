"""Embedding task models: a DINOv3 backbone's frozen tokens per chip, for the pipeline.

Two shapes of output, both float32 per chip (the pipeline adds the batch axis):

- :class:`ChipTokens` gives the token sequence ``[D, 1 + t*t]`` (CLS first, then the patch tokens
  row-major, ``t = tile / 16``) so that a consumer can average the patch tokens over the chip's
  *valid* cells only (one GeoParquet row per chip: CLS and mean patch embedding);
- :class:`PatchTokens` gives the patch-token map ``[D, t, t]`` (stitched into a feature map at
  16-pixel cells).

Both normalise with the backbone's own mean and std, so the pipeline needs nothing else.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from dinov3_geo.models.backbone import Backbone


def backbone_id(backbone: Backbone) -> str:
    """A short identity of a backbone's weights (name, width, depth and a hash of the patch
    embedding): features made by different backbones are not comparable, and files carry this."""
    weight = backbone.vit.patch_embed.proj.weight.detach().to(torch.float32).cpu().contiguous()
    digest = hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:12]
    return f"{backbone.name}:d{backbone.embed_dim}:l{backbone.depth}:{digest}"


class _BackboneTask(nn.Module):
    """A task model over a :class:`Backbone`: its normalisation, fp8 and compile regions."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.mean, self.std = backbone.mean, backbone.std
        self.patch_size = backbone.patch_size
        self.embed_dim = self.channels = backbone.embed_dim
        self.backbone_id = backbone_id(backbone)

    def normalise(self, x01: torch.Tensor) -> torch.Tensor:
        """0..1 RGB to the backbone's input (its own mean and std)."""
        return self.backbone.normalise(x01)

    def use_fp8_matmuls(self) -> int:
        """float8 products in the backbone's linear layers (``precision="fp8"``)."""
        return self.backbone.use_fp8_matmuls()

    def compile_regions(self) -> list[nn.Module]:
        """The backbone blocks, compiled one by one (they share a graph)."""
        return self.backbone.compile_regions()


class ChipTokens(_BackboneTask):
    """Normalised chips ``[B,3,T,T]`` -> tokens ``[B, D, 1 + (T/16)²]``: CLS, then patches row-major
    (for :class:`~dinov3_geo.io.features.ChipEmbeddingWriter`)."""

    output = "tokens"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_features(x)
        return torch.cat([feats["cls"][:, :, None], feats["patches"].flatten(2)], dim=2)


class PatchTokens(_BackboneTask):
    """Normalised chips ``[B,3,T,T]`` -> patch tokens ``[B, D, T/16, T/16]`` (after the final norm)."""

    output = "patches"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)["patches"]
