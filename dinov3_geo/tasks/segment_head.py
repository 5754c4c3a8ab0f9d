"""Dense classes from a trained head: backbone + linear or DPT head -> per-class scores per pixel.

The ``segment`` task (:mod:`dinov3_geo.tasks.registry`) loads a :class:`SegmentHeadModel` and
writes its blended scores' argmax as a uint8 class COG (colour table, class names, 255 = nodata)
and, on request, one polygon per region of equal class; :func:`dinov3_geo.segment` with ``head``
is its Python entry.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.backbone import Backbone, normalise_rgb
from ..models.heads.io import HeadFile, check_backbone
from ..models.heads.linear import DPTSegHead
from ..models.identity import backbone_identity


class HeadTaskModel(nn.Module):
    """What every head-based task model shares: the backbone (checked against the head file), the
    normalisation the head was trained with, its classes and chip size."""

    task = ""

    def __init__(self, backbone: Backbone, head: HeadFile):
        super().__init__()
        check_backbone(head, backbone_identity(backbone), self.task)
        info = head.info
        self.backbone = backbone
        self.head = head.module()
        self.mean, self.std = info.mean, info.std
        self.class_names = info.class_names
        self.channels = len(self.class_names)
        self.chip_size = info.chip_size
        self.layers = info.layers
        self.colormap = info.colormap()         # classes' colours: class rasters, styles of chip layers

    def normalise(self, x01: torch.Tensor) -> torch.Tensor:
        """0..1 chips normalised as the head was trained."""
        return normalise_rgb(x01, self.mean, self.std)


class SegmentHeadModel(HeadTaskModel):
    """A task model: normalised chips ``[B,3,T,T]`` -> class probabilities ``[B,K,T,T]``."""

    output = "classes"
    task = "segment"

    def __init__(self, backbone: Backbone, head: HeadFile):
        super().__init__(backbone, head)
        self.dense_layers = self.layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax class scores at the chip's size (blended across overlaps, then argmax)."""
        size = tuple(x.shape[-2:])
        if isinstance(self.head, DPTSegHead):
            logits = self.head(self.backbone.get_intermediate_layers(x, indices=self.layers), size)
        else:
            logits = self.head(self.backbone.forward_features(x)["patches"], size)
        return logits.float().softmax(dim=1)
