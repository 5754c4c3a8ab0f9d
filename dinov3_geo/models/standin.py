"""``backbone="standin"``: a signal-carrying stand-in for DINOv3, built in memory, for tests, examples
and notebooks on machines without the gated weights.

It is NOT DINOv3 and learned nothing: it is a real timm Eva (the DINOv3 ViT layout: CLS, four
registers, RoPE, patch 16, SAT normalisation) whose weights are set by hand, so that every code
path that takes a :class:`~dinov3_geo.models.backbone.Backbone` takes it, and whose tokens carry
plain, local image statistics:

- the patch embedding computes, per 16 px cell and channel, the mean, the gradients (the first
  DCT components across and down the cell) and ten more 2-D DCT texture components;
- block 0's MLP adds per channel the mean absolute response of those texture components (a proxy
  of the cell's standard deviation: smooth water low, fields and trees higher);
- block 1's attention attends uniformly, so every token (the CLS token included) also receives the
  chip's mean colour and texture, in dimensions of its own; blocks 2 and 3 keep the tokens as
  they are (their residual branches are off).

Every value is written once with its negative, and a constant pair dominates the token's spread,
so LayerNorm's centring and scaling keep the statistics (to about 1 %); the final norm drops the
mirror and constant dimensions. With it, similar cells (water and water, field and field) have
similar features and heads learn; with ``demo`` (random weights) they cannot.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Union

import numpy as np
import torch

from . import registry
from .backbone import Backbone
from .weights import ViTArch

STANDIN = "standin"
STANDIN_NOTE = ("`backbone` standin: a stand-in built in memory whose features are hand-set colour and texture "
                "statistics per 16 px cell, not DINOv3 (for trying the tools; real DINOv3 weights: see the "
                "README's Weights section)")

STANDIN_ARCH = dict(embed_dim=192, depth=4, num_heads=4, mlp_hidden=256, gated_mlp=False, qkv_bias=False,
                    num_reg_tokens=4)
#: 2-D DCT frequencies (down, across) of the texture components; (0, 1) and (1, 0) are the gradients.
DCT_FREQUENCIES = ((0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (2, 2), (0, 4), (4, 0), (4, 4), (0, 8), (8, 0), (8, 8))
#: Thresholds of the colour codes (per channel, in SAT-normalised units: 0..1 maps to -2.0..2.7)
#: and of the texture code (mean absolute texture response, same units).
COLOUR_STEPS = tuple(np.linspace(-1.6, 1.6, 12).round(3))
TEXTURE_STEPS = (0.03, 0.06, 0.12, 0.25, 0.5, 1.0)
PATCH = 16
CONSTANT = 30.0          # the constant pair: LayerNorm's scale varies by under 1 % across tokens
SHARPNESS = 20.0         # (gelu(s z) + gelu(-s z)) / s ~ |z| for |z| above 0.1
#: Weights of each group in the output tokens. The codes dominate: cosine similarity between two
#: cells is then about 1 - 2 x (share of thresholds between their colours and textures).
OUTPUT_WEIGHTS = {"colour_code": 1.0, "texture_code": 1.0, "mean": 0.25, "energy": 0.25, "texture": 0.1,
                  "context": 0.25}


def is_standin(name: Optional[Union[str, os.PathLike]]) -> bool:
    """Whether ``name`` is the reserved backbone name ``standin`` (a file so named: give ``./standin``)."""
    return isinstance(name, str) and name == STANDIN


class _Layout:
    """Which token dimension holds what (the first half; the second half holds the negatives)."""

    def __init__(self, dim: int):
        self.half = dim // 2
        taken = iter(range(self.half))
        take = (lambda n: [next(taken) for _ in range(n)])
        self.mean = take(3)
        self.texture = [take(len(DCT_FREQUENCIES)) for _ in range(3)]
        self.energy = take(3)
        self.context = take(6)                 # chip means of colour (3) and energy (3)
        self.colour_code = [take(len(COLOUR_STEPS)) for _ in range(3)]
        self.texture_code = take(len(TEXTURE_STEPS))
        self.constant = self.half - 1
        if self.texture_code[-1] >= self.constant:
            raise ValueError(f"embed_dim {dim} is too small for the stand-in's features")

    def mirror(self, i: int) -> int:
        return i + self.half


def _dct_basis(u: int, v: int) -> np.ndarray:
    """The orthonormal 16 x 16 DCT-II basis image of frequency (u down, v across)."""
    n = np.arange(PATCH)
    cu = np.cos(np.pi * (2 * n + 1) * u / (2 * PATCH)) * (math.sqrt(1 / PATCH) if u == 0 else math.sqrt(2 / PATCH))
    cv = np.cos(np.pi * (2 * n + 1) * v / (2 * PATCH)) * (math.sqrt(1 / PATCH) if v == 0 else math.sqrt(2 / PATCH))
    return np.outer(cu, cv)


def _write(weight: torch.Tensor, row: int, layout: _Layout, values) -> None:
    """``weight[row] = values`` and ``weight[mirror(row)] = -values``."""
    weight[row] = values
    weight[layout.mirror(row)] = -values


class _Hidden:
    """Hands out an MLP's hidden units one by one."""

    def __init__(self) -> None:
        self.next = 0

    def take(self) -> int:
        self.next += 1
        return self.next - 1


def _abs_unit(mlp, units: _Hidden, sources: list[int], target: int, lay: _Layout, sigma: float) -> None:
    """``target += mean(|x[s]| for s in sources)`` through GELU pairs (gelu(z) + gelu(-z) ~ |z|)."""
    for src in sources:
        for sign in (1.0, -1.0):
            h = units.take()
            mlp.fc1.weight[h, src] = sign * SHARPNESS * sigma
            mlp.fc2.weight[target, h] = 1.0 / (SHARPNESS * len(sources))
            mlp.fc2.weight[lay.mirror(target), h] = -1.0 / (SHARPNESS * len(sources))


def _ramp_unit(mlp, units: _Hidden, sources: list[int], threshold: float, width: float, target: int,
               lay: _Layout, sigma: float) -> None:
    """``target += clamp((mean(x[sources]) - threshold) / width, 0, 1) - 0.5`` through a GELU pair:
    one step of a thermometer code, centred so that every code has the same length."""
    scale = 4.0 / width
    a, b = units.take(), units.take()
    for src in sources:
        mlp.fc1.weight[a, src] = mlp.fc1.weight[b, src] = scale * sigma / len(sources)
    mlp.fc1.bias[a], mlp.fc1.bias[b] = -scale * threshold, -scale * threshold - 4.0
    for row, sign in ((target, 1.0), (lay.mirror(target), -1.0)):
        mlp.fc2.weight[row, a], mlp.fc2.weight[row, b] = sign / 4.0, -sign / 4.0
        mlp.fc2.bias[row] = -0.5 * sign


@torch.no_grad()
def _set_weights(vit, dim: int) -> None:
    """Every parameter of the Eva set by hand (nothing random)."""
    lay = _Layout(dim)
    for p in vit.parameters():
        p.zero_()
    sigma = CONSTANT * math.sqrt(2 / dim)       # a token's spread: LayerNorm divides by about this
    # patch embedding: per-channel means, and DCT texture components (orthonormal: each about the
    # cell's standard deviation in size)
    proj = vit.patch_embed.proj
    for c in range(3):
        kernel = torch.zeros(3, PATCH, PATCH)
        kernel[c] = 1.0 / PATCH ** 2
        _write(proj.weight, lay.mean[c], lay, kernel)
        for row, (u, v) in zip(lay.texture[c], DCT_FREQUENCIES):
            kernel = torch.zeros(3, PATCH, PATCH)
            kernel[c] = torch.from_numpy(_dct_basis(u, v)).float()
            _write(proj.weight, row, lay, kernel)
    for t in (proj.bias, vit.cls_token[0, 0], *vit.reg_token[0]):
        t[lay.constant], t[lay.mirror(lay.constant)] = CONSTANT, -CONSTANT
    for block in vit.blocks:
        for norm in (block.norm1, block.norm2):
            norm.weight.fill_(1.0)
    # block 0, MLP: texture energy per channel, and the thermometer code of each channel's mean
    mlp, units = vit.blocks[0].mlp, _Hidden()
    steps = np.diff(COLOUR_STEPS).mean()
    for c in range(3):
        _abs_unit(mlp, units, lay.texture[c], lay.energy[c], lay, sigma)
        for threshold, row in zip(COLOUR_STEPS, lay.colour_code[c]):
            _ramp_unit(mlp, units, [lay.mean[c]], threshold, steps, row, lay, sigma)
    vit.blocks[0].gamma_2.fill_(1.0)
    # block 1, attention: queries and keys zero (uniform attention), values carry colour and energy
    attn = vit.blocks[1].attn
    for j, src in enumerate(lay.mean + lay.energy):
        attn.qkv.weight[2 * dim + j, src] = sigma
        _write(attn.proj.weight, lay.context[j], lay, torch.nn.functional.one_hot(torch.tensor(j), dim).float())
    vit.blocks[1].gamma_1.fill_(1.0)
    # block 2, MLP: the thermometer code of the texture energy (log-spaced steps)
    mlp, units = vit.blocks[2].mlp, _Hidden()
    for threshold, row in zip(TEXTURE_STEPS, lay.texture_code):
        _ramp_unit(mlp, units, lay.energy, threshold, threshold, row, lay, sigma)
    vit.blocks[2].gamma_2.fill_(1.0)
    # final norm: the statistics, weighted by group; mirrors and the constant pair dropped
    groups = {"colour_code": sum(lay.colour_code, []), "texture_code": lay.texture_code, "mean": lay.mean,
              "energy": lay.energy, "texture": sum(lay.texture, []), "context": lay.context}
    for name, dims in groups.items():
        vit.norm.weight[dims] = OUTPUT_WEIGHTS[name] * sigma


def standin_backbone(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32):
    """The stand-in :class:`~dinov3_geo.models.backbone.Backbone` (timm Eva, width 192, 4 blocks,
    4 registers, patch 16, SAT normalisation); ``load_backbone("standin")``. Deterministic."""
    from timm.models.eva import Eva


    arch = ViTArch(**STANDIN_ARCH)
    vit = Eva(**arch.timm_kwargs())
    _set_weights(vit, arch.embed_dim)
    return Backbone(vit.eval(), arch, registry.SAT_MEAN, registry.SAT_STD, name=STANDIN).to(device, dtype).eval()
