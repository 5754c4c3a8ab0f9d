"""A generic DPT head (Ranftl et al.) with the module names of Meta's dinov3 depth decoder.

The module tree mirrors ``dinov3/eval/depth/models/dpt_head.py`` so that Meta's official decoder
state dicts (e.g. ``dinov3_vitl16_chmv2_dpt_head-3703d643.pth``) load with ``strict=True`` and no
renaming::

    reassemble_blocks.readout_projects.{i}.0.{weight,bias}   Linear(2D -> D) + GELU on [patch; CLS]
    reassemble_blocks.projects.{i}.conv.{weight,bias}        1x1 conv D -> post_process_channels[i]
    reassemble_blocks.resize_layers.{0,1,3}.{weight,bias}    ConvT 4/4, ConvT 2/2, (Identity), Conv 3x3 s2
    convs.{i}.conv.weight                                    3x3 conv -> channels, no bias
    fusion_blocks.{i}.project.conv.{weight,bias}             1x1 conv after the x2 upsampling
    fusion_blocks.{1..3}.res_conv_unit1.conv{1,2}.conv.*     skip-path residual unit (none in block 0)
    fusion_blocks.{i}.res_conv_unit2.conv{1,2}.conv.*        main-path residual unit
    conv_depth.head.{0,2,4}.{weight,bias}                    conv3x3, x2 upsample, conv3x3, ReLU, conv1x1

Only the configuration CHMv2 uses is built (no batch norm, no projection after fusion); the 7B
SYNTHMIX depther's extra modules are deliberately absent, so its file fails a strict load.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Features = Sequence[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DPTHeadConfig:
    """Sizes of a DPT head; the defaults are CHMv2's (``dinov3/hub/depthers.py`` ``_get_chmv2_config``)."""

    in_channels: int = 1024
    channels: int = 256
    post_process_channels: tuple[int, int, int, int] = (128, 256, 512, 1024)
    n_hidden_channels: int = 128
    n_output_channels: int = 256
    readout: str = "project"            # "project" (uses the CLS token) or "ignore"
    use_bias: bool = True               # bias of the residual-unit convs

    def __post_init__(self) -> None:
        if self.readout not in ("project", "ignore"):
            raise ValueError(f"readout must be 'project' or 'ignore', not {self.readout!r}")
        if len(self.post_process_channels) != 4:
            raise ValueError("a DPT head has exactly 4 levels (post_process_channels of length 4)")


class ConvModule(nn.Module):
    """A conv under the attribute ``conv``, optionally preceded by ReLU (Meta's ConvModule subset)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, bias: bool = True, pre_relu: bool = False):
        super().__init__()
        self.pre_relu = pre_relu
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(ReLU ->) conv."""
        return self.conv(F.relu(x) if self.pre_relu else x)


class PreActResidualConvUnit(nn.Module):
    """``x + conv2(relu(conv1(relu(x))))`` with 3x3 convs."""

    def __init__(self, channels: int, bias: bool):
        super().__init__()
        self.conv1 = ConvModule(channels, channels, 3, bias=bias, pre_relu=True)
        self.conv2 = ConvModule(channels, channels, 3, bias=bias, pre_relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activated residual unit."""
        return self.conv2(self.conv1(x)) + x


class FeatureFusionBlock(nn.Module):
    """Adds the (resized) skip through ``res_conv_unit1``, refines, upsamples x2, projects 1x1."""

    def __init__(self, channels: int, bias: bool, has_skip: bool):
        super().__init__()
        self.project = ConvModule(channels, channels, 1, bias=True)
        self.res_conv_unit1 = PreActResidualConvUnit(channels, bias) if has_skip else None
        self.res_conv_unit2 = PreActResidualConvUnit(channels, bias)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One fusion step; the output has twice the spatial size of ``x``."""
        if skip is not None and self.res_conv_unit1 is not None:
            if skip.shape[-2:] != x.shape[-2:]:
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.res_conv_unit1(skip)
        x = self.res_conv_unit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.project(x)


class Interpolate(nn.Module):
    """Bilinear x``scale_factor`` upsampling as a module (a parameter-free slot in ``conv_depth.head``)."""

    def __init__(self, scale_factor: float = 2.0, align_corners: bool = True):
        super().__init__()
        self.scale_factor = scale_factor
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample."""
        return F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=self.align_corners)


class UpConvHead(nn.Module):
    """conv3x3 (C -> C/2), x2 bilinear, conv3x3 (-> hidden), ReLU, conv1x1 (-> outputs)."""

    def __init__(self, channels: int, n_output_channels: int, n_hidden_channels: int):
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1),
            Interpolate(2.0, align_corners=True),
            nn.Conv2d(channels // 2, n_hidden_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hidden_channels, n_output_channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at twice the input size."""
        return self.head(x)


def _resize_layers(ch: Sequence[int]) -> nn.ModuleList:
    """Strides 4, 8, 16, 32 from the stride-16 patch grid."""
    return nn.ModuleList([
        nn.ConvTranspose2d(ch[0], ch[0], kernel_size=4, stride=4),
        nn.ConvTranspose2d(ch[1], ch[1], kernel_size=2, stride=2),
        nn.Identity(),
        nn.Conv2d(ch[3], ch[3], kernel_size=3, stride=2, padding=1),
    ])


class ReassembleBlocks(nn.Module):
    """Readout of the CLS token, 1x1 projection and resizing of the four backbone levels."""

    def __init__(self, cfg: DPTHeadConfig):
        super().__init__()
        d = cfg.in_channels
        self.readout = cfg.readout
        self.projects = nn.ModuleList([ConvModule(d, c, 1, bias=True) for c in cfg.post_process_channels])
        self.resize_layers = _resize_layers(cfg.post_process_channels)
        if cfg.readout == "project":
            self.readout_projects = nn.ModuleList([nn.Sequential(nn.Linear(2 * d, d), nn.GELU()) for _ in range(4)])

    def _read_out(self, i: int, patches: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """``GELU(Linear([patch; CLS]))`` per patch (readout 'project'); patches unchanged for 'ignore'."""
        if self.readout != "project":
            return patches
        b, d, h, w = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)
        joined = torch.cat((tokens, cls[:, None, :].expand(b, h * w, d)), dim=-1)
        return self.readout_projects[i](joined).transpose(1, 2).reshape(b, d, h, w)

    def forward(self, features: Features) -> list[torch.Tensor]:
        """Four maps at strides 4, 8, 16 and 32."""
        out = []
        for i, (patches, cls) in enumerate(features):
            x = self._read_out(i, patches, cls)
            out.append(self.resize_layers[i](self.projects[i](x)))
        return out


class DPTHead(nn.Module):
    """DPT decoder: reassemble -> 3x3 convs -> 4 fusion blocks (deepest first) -> up-conv head.

    ``forward(features)`` takes four ``(patches [B,D,h,w], cls [B,D])`` tuples (normed backbone
    outputs, shallow to deep) and returns ``n_output_channels`` logits at about ``16*h x 16*w``
    (16 pixels more per odd ``h``/``w``: the stride-32 level is ceil-divided; resize afterwards).
    """

    def __init__(self, cfg: DPTHeadConfig = DPTHeadConfig()):
        super().__init__()
        self.cfg = cfg
        self.reassemble_blocks = ReassembleBlocks(cfg)
        self.convs = nn.ModuleList([ConvModule(c, cfg.channels, 3, bias=False) for c in cfg.post_process_channels])
        self.fusion_blocks = nn.ModuleList(
            [FeatureFusionBlock(cfg.channels, cfg.use_bias, has_skip=i > 0) for i in range(4)])
        self.conv_depth = UpConvHead(cfg.channels, cfg.n_output_channels, cfg.n_hidden_channels)

    def forward_features(self, features: Features) -> torch.Tensor:
        """Fused map at stride 2 (``channels`` channels)."""
        if len(features) != 4:
            raise ValueError(f"the DPT head takes 4 feature levels, got {len(features)}")
        maps = [conv(x) for conv, x in zip(self.convs, self.reassemble_blocks(features))]
        out = self.fusion_blocks[0](maps[3])
        for i in range(1, 4):
            out = self.fusion_blocks[i](out, maps[3 - i])
        return out

    def forward(self, features: Features) -> torch.Tensor:
        """Logits ``[B, n_output_channels, ~H, ~W]``."""
        return self.conv_depth(self.forward_features(features))


def config_from_state_dict(state: dict[str, torch.Tensor]) -> DPTHeadConfig:
    """Head sizes read from the tensor shapes of a decoder state dict in Meta's key names.

    Raises ``KeyError`` when a key needed to size the head is absent.
    """
    readout = "project" if "reassemble_blocks.readout_projects.0.0.weight" in state else "ignore"
    return DPTHeadConfig(
        in_channels=int(state["reassemble_blocks.projects.0.conv.weight"].shape[1]),
        channels=int(state["convs.0.conv.weight"].shape[0]),
        post_process_channels=tuple(int(state[f"reassemble_blocks.projects.{i}.conv.weight"].shape[0])
                                    for i in range(4)),
        n_hidden_channels=int(state["conv_depth.head.2.weight"].shape[0]),
        n_output_channels=int(state["conv_depth.head.4.weight"].shape[0]),
        readout=readout,
        use_bias="fusion_blocks.0.res_conv_unit2.conv1.conv.bias" in state,
    )


# transformers' CHMv2Head names (model prefix ``head.`` removed) -> Meta's decoder names.
_HF_TO_META: tuple[tuple[str, str], ...] = (
    (r"^reassemble_stage\.layers\.(\d)\.projection\.", r"reassemble_blocks.projects.\1.conv."),
    (r"^reassemble_stage\.layers\.(\d)\.resize\.", r"reassemble_blocks.resize_layers.\1."),
    (r"^reassemble_stage\.readout_projects\.(\d)\.0\.", r"reassemble_blocks.readout_projects.\1.0."),
    (r"^convs\.(\d)\.weight$", r"convs.\1.conv.weight"),
    (r"^fusion_layers\.(\d)\.projection\.", r"fusion_blocks.\1.project.conv."),
    (r"^fusion_layers\.(\d)\.residual_layer([12])\.convolution([12])\.",
     r"fusion_blocks.\1.res_conv_unit\2.conv\3.conv."),
    (r"^conv_depth\.head\.([024])\.", r"conv_depth.head.\1."),
)


def hf_to_meta_head_key(key: str) -> Optional[str]:
    """Meta's name for a transformers ``CHMv2Head`` parameter name (without ``head.``); None if unknown."""
    for pattern, repl in _HF_TO_META:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def hf_to_meta_head_state(hf_head: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a transformers head state dict (``head.`` stripped) to Meta's names.

    Returns ``(state, unknown_keys)``; keys with no Meta counterpart are reported, not dropped silently.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in hf_head.items():
        new = hf_to_meta_head_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    return out, unknown
