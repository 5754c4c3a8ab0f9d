"""``weights="demo"``: a small CHMv2 canopy model with random weights, built in memory.

It has the real architecture (timm's Eva as the DINOv3 ViT, our CHMv2 DPT head and decoding) at
toy sizes, so the whole pipeline runs on a fresh machine with nothing downloaded. Its heights are
meaningless: it exists to try the tool and to test it, never to measure canopy.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch

from . import registry
from .backbone import Backbone
from .weights import ViTArch

DEMO_WEIGHTS = "demo"
DEMO_NOTE = ("`weights` demo: a small random canopy model built in memory; its heights are meaningless "
             "(for trying the tool; real CHMv2 weights: see the README's Weights section)")


DEMO_BACKBONE_NOTE = ("`backbone` demo: a small random backbone built in memory; its features are meaningless "
                      "(for trying the tools; real DINOv3 weights: see the README's Weights section)")


def is_demo(weights: Optional[Union[str, os.PathLike]]) -> bool:
    """Whether ``weights`` is the reserved name ``demo`` (a file or folder so named must be given
    as a path, e.g. ``./demo``)."""
    return isinstance(weights, str) and weights == DEMO_WEIGHTS


DEMO_ARCH = dict(embed_dim=64, depth=4, num_heads=4, mlp_hidden=256, gated_mlp=False, qkv_bias=False,
                 num_reg_tokens=4)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's global random stream seeded inside the block and put back as it was after it."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def demo_backbone(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random DINOv3-shaped :class:`~dinov3_geo.models.backbone.Backbone` (timm Eva, width 64,
    4 blocks, 4 registers, patch 16, CHMv2 normalisation), seeded; ``load_backbone("demo")``."""
    from timm.models.eva import Eva


    arch = ViTArch(**DEMO_ARCH)
    with seeded(seed):
        vit = Eva(**arch.timm_kwargs())
    return Backbone(vit, arch, registry.CHMV2_MEAN, registry.CHMV2_STD, name=DEMO_WEIGHTS).to(device, dtype).eval()
