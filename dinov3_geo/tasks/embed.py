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

from typing import Optional

import torch
from torch import nn

from dinov3_geo.engine import StopToken
from dinov3_geo.io.features import ChipEmbeddingWriter
from dinov3_geo.models.backbone import Backbone
from dinov3_geo.models.identity import backbone_id
from dinov3_geo.pipeline import run_chips


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


def write_chip_embeddings(scene, model: ChipTokens, output, plan, settings, *, overwrite: bool = False,
                          progress=None, stop: Optional[StopToken] = None):
    """One GeoParquet row per non-empty chip of ``plan`` over ``scene`` (CLS and mean patch
    embedding, the footprint), stamped with the backbone and tiling; returns the run's stats."""
    attrs = dict(backbone=model.backbone_id, tile=plan.tile, overlap=plan.overlap)
    writer = ChipEmbeddingWriter(output, scene, plan.windows, model.embed_dim, attrs, overwrite)
    return run_chips(scene, model, writer, plan, settings, progress=progress, stop=stop)
