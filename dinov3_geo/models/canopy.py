"""Canopy height in metres: the DINOv3 SAT ViT-L/16 backbone + Meta's CHMv2 DPT head.

``load_canopy_model`` takes a Hugging Face ``facebook/dinov3-vitl16-chmv2-dpt-head`` folder (the
backbone is inside) or Meta's ``dinov3_vitl16_chmv2_dpt_head-3703d643.pth`` together with the SAT
ViT-L backbone weights, and returns a :class:`CanopyModel` that maps CHMv2-normalised RGB to metres.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsError, WeightsNotFoundError
from . import registry
from .backbone import backbone_from_state_dict, normalise_rgb
from .demo import demo_backbone, seeded
from .heads.chmv2 import CHMv2Head, CHMv2Weights, build_chmv2_head, read_chmv2_weights
from .heads.dpt import DPTHeadConfig
from .load import load_backbone
from .registry import CHMV2_LAYERS, CHMV2_MEAN, CHMV2_STD, even_layers
from .locate import search_dirs

PathLike = Union[str, os.PathLike]


def center_pad_amounts(size: int, multiple: int) -> tuple[int, int]:
    """(before, after) zero padding that brings ``size`` to a multiple, as Meta's ``CenterPadding``."""
    pad = math.ceil(size / multiple) * multiple - size
    return pad // 2, pad - pad // 2


class CanopyModel(nn.Module):
    """Backbone + CHMv2 head: ``forward(x)`` maps normalised RGB ``[B,3,H,W]`` to metres ``[B,1,H,W]``.

    ``x`` must be normalised with :attr:`mean` / :attr:`std` (CHMv2's statistics). Sizes that are
    not multiples of the patch size are zero-padded centrally (as the references do) and the
    prediction is cropped back; the output is float32 whatever the model dtype. A task model
    (:mod:`dinov3_geo.task_model`): one band of blended values, ``canopy_height_m``.
    """

    output = "continuous"
    channels = 1
    band_names = ("canopy_height_m",)

    def __init__(self, backbone: nn.Module, head: CHMv2Head, layers: Sequence[int] = CHMV2_LAYERS,
                 mean: Sequence[float] = CHMV2_MEAN, std: Sequence[float] = CHMV2_STD):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.layers = [int(i) for i in layers]
        self.dense_layers = tuple(self.layers)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.patch_size = int(getattr(backbone, "patch_size", 16))

    def normalise(self, x01: torch.Tensor) -> torch.Tensor:
        """0..1 RGB -> the model's input (CHMv2 mean and std)."""
        return normalise_rgb(x01, self.mean, self.std)

    def use_fp8_matmuls(self) -> int:
        """Float8 products in the backbone's blocks; the CHMv2 head stays in bf16."""
        return self.backbone.use_fp8_matmuls()

    def compile_regions(self) -> list[nn.Module]:
        """What ``torch.compile`` compiles: the backbone's blocks (one shared graph) and the head."""
        return [*self.backbone.compile_regions(), self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Canopy height in metres, float32 ``[B,1,H,W]``, for normalised ``x`` ``[B,3,H,W]``."""
        h, w = x.shape[-2:]
        top, bottom = center_pad_amounts(h, self.patch_size)
        left, right = center_pad_amounts(w, self.patch_size)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        dtype = next(self.head.parameters()).dtype
        features = self.backbone.get_intermediate_layers(x.to(dtype), indices=self.layers, norm=True)
        metres = self.head(features, out_size=x.shape[-2:])
        return metres[..., top:top + h, left:left + w]


def get_chmv2_help(target: Optional[PathLike] = None) -> str:
    """Where to get the gated CHMv2 weights, where to put them (``target``, else the first search
    folder) and the ``demo`` alternative: the text of a missing-weights error."""
    target = target or search_dirs()[0] / registry.CHMV2_HF_REPO.split("/")[1]
    return (f"request the gated CHMv2 weights at https://huggingface.co/{registry.CHMV2_HF_REPO} (or Meta's "
            f"{registry.CHMV2_HEAD_FILENAME} with the SAT ViT-L backbone from {registry.GATED_WEIGHTS_URL}) "
            f"and put the downloaded folder at {target} (or in $DINOV3GEO_WEIGHTS); to try the tool without "
            "them, use `weights` demo (a random model: meaningless heights)")


def find_chmv2() -> Path:
    """The CHMv2 weights in the search folders: the HF folder, or Meta's head file; a
    WeightsNotFoundError saying where to get them otherwise."""
    names = (registry.CHMV2_HF_REPO.split("/")[1], registry.CHMV2_HEAD_FILENAME)
    for folder in search_dirs():
        for name in names:
            if (folder / name).exists():
                return folder / name
    raise WeightsNotFoundError("canopy weights", f"not found (`weights`): {get_chmv2_help()}")


def find_backbone_beside(head: Path) -> Optional[Path]:
    """Meta's head file needs the SAT ViT-L backbone: the official file if it lies beside it or in
    a search folder."""
    info = registry.BACKBONES["dinov3-vitl16-sat493m"]
    for folder in [Path(head).parent, *search_dirs()]:
        if (folder / info.filename).exists():
            return folder / info.filename
    return None


def load_canopy_model(weights: PathLike, backbone_weights: Optional[PathLike] = None,
                      device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                      verify: bool = True) -> CanopyModel:
    """A :class:`CanopyModel` in eval mode from a CHMv2 HF folder or Meta head ``.pth``.

    ``weights``: an HF ``CHMv2ForDepthEstimation`` folder (its backbone is used unless
    ``backbone_weights`` is given; layers from its ``out_indices``) or Meta's decoder ``.pth``
    (then ``backbone_weights``, the SAT ViT-L checkpoint in any layout ``load_backbone`` reads, is
    required; layers (5, 11, 17, 23), i.e. :func:`even_layers` of the backbone depth). Every
    mismatch is a :class:`WeightsError` naming the file. ``verify=False`` skips the SHA-256 check of an
    official backbone file name.
    """
    head_weights = read_chmv2_weights(weights)
    backbone = _load_backbone_for(head_weights, backbone_weights, device, dtype, verify)
    layers = head_weights.layers or even_layers(int(getattr(backbone, "depth", 24)))
    _check_compatible(head_weights, backbone, layers, backbone_weights or weights)
    head = build_chmv2_head(head_weights, device=device, dtype=dtype)
    return CanopyModel(backbone, head, layers).eval()


def _load_backbone_for(head_weights: CHMv2Weights, backbone_weights: Optional[PathLike],
                       device: Union[str, torch.device], dtype: torch.dtype, verify: bool = True) -> nn.Module:
    """The backbone given explicitly, else the one inside the HF folder."""
    if backbone_weights is not None:
        return load_backbone(backbone_weights, device=device, dtype=dtype, verify=verify).eval()
    if head_weights.backbone_state is None:
        raise WeightsError(head_weights.source, "head weights need the SAT ViT-L backbone weights: "
                                                "pass `backbone_weights`")
    state, head_weights.backbone_state = head_weights.backbone_state, None
    return backbone_from_state_dict(state, hf_config=head_weights.backbone_config, source=head_weights.source,
                                    dtype=dtype, device=device).eval()


def _check_compatible(head_weights: CHMv2Weights, backbone: nn.Module, layers: Sequence[int],
                      where: PathLike) -> None:
    """WeightsError if the backbone's width or depth does not fit the head."""
    width = int(backbone.embed_dim)
    if width != head_weights.head_config.in_channels:
        raise WeightsError(where, f"backbone width {width} does not match the head, which expects "
                                  f"{head_weights.head_config.in_channels} (CHMv2 needs the SAT ViT-L/16 backbone)")
    depth = getattr(backbone, "depth", None)
    if depth is not None and max(layers) >= int(depth):
        raise WeightsError(where, f"backbone has {depth} blocks, the head reads blocks {list(layers)}")


def demo_canopy_model(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                      seed: int = 0):
    """A :class:`~dinov3_geo.models.canopy.CanopyModel` with random weights (seeded, so repeatable):
    :func:`demo_backbone` and a CHMv2 head with 32 bins. Eval mode, on ``device``."""
    backbone = demo_backbone(device, dtype, seed)
    with seeded(seed + 1):
        head = CHMv2Head(DPTHeadConfig(in_channels=64, channels=32, post_process_channels=(16, 32, 64, 64),
                                       n_hidden_channels=16, n_output_channels=32))
    model = CanopyModel(backbone, head.to(device, dtype), backbone.dense_layers)
    return model.eval()
