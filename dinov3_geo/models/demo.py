"""``weights="demo"``: a small CHMv2 canopy model with random weights, built in memory.

It has the real architecture (timm's Eva as the DINOv3 ViT, our CHMv2 DPT head and decoding) at
toy sizes, so the whole pipeline runs on a fresh machine with nothing downloaded. Its heights are
meaningless: it exists to try the tool and to test it, never to measure canopy.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

DEMO_WEIGHTS = "demo"
DEMO_NOTE = ("weights=demo: a small random canopy model built in memory; its heights are meaningless "
             "(for trying the tool; real CHMv2 weights: see the README's Weights section)")


def is_demo(weights: Optional[Union[str, os.PathLike]]) -> bool:
    """Whether ``weights`` is the reserved name ``demo`` (a file or folder so named must be given
    as a path, e.g. ``./demo``)."""
    return isinstance(weights, str) and weights == DEMO_WEIGHTS


def demo_canopy_model(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                      seed: int = 0):
    """A :class:`~dinov3_geo.models.canopy.CanopyModel` with random weights (seeded, so repeatable):
    ViT of width 64, 4 blocks, 4 registers, patch 16; CHMv2 head with 32 bins. Eval mode, on ``device``."""
    from timm.models.eva import Eva

    from . import registry
    from .backbone import Backbone
    from .canopy import CanopyModel, even_layers
    from .heads.chmv2 import CHMv2Head
    from .heads.dpt import DPTHeadConfig
    from .weights import ViTArch

    arch = ViTArch(embed_dim=64, depth=4, num_heads=4, mlp_hidden=256, gated_mlp=False, qkv_bias=False,
                   num_reg_tokens=4)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        backbone = Backbone(Eva(**arch.timm_kwargs()), arch, registry.CHMV2_MEAN, registry.CHMV2_STD, name="demo")
        head = CHMv2Head(DPTHeadConfig(in_channels=64, channels=32, post_process_channels=(16, 32, 64, 64),
                                       n_hidden_channels=16, n_output_channels=32))
    finally:
        torch.random.set_rng_state(generator_state)     # the caller's random stream is left as it was
    model = CanopyModel(backbone, head, even_layers(arch.depth))
    return model.to(device=device, dtype=dtype).eval()
