"""DINOv3 ViT backbones on timm's Eva implementation, loaded offline and strictly.

``load_backbone`` takes Meta's ``.pth``, a Hugging Face directory or a timm checkpoint of any size
and returns a :class:`Backbone` whose ``forward_features`` gives the normed CLS, register and patch
tokens, and whose ``get_intermediate_layers`` feeds the dense heads. The model is built on the
meta device and takes the checkpoint's tensors as its parameters, so host memory peaks near one
copy of the weights (the ViT-7B included).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..errors import InputError, WeightsError
from . import registry
from .fp8 import linears_to_fp8
from .weights import Checkpoint, ViTArch, checkpoint_from_state, key_list

Features = dict[str, torch.Tensor]


class Backbone(nn.Module):
    """A DINOv3 ViT with its normalisation: ``forward_features`` and ``get_intermediate_layers``."""

    def __init__(self, vit: nn.Module, arch: ViTArch, mean: Sequence[float], std: Sequence[float],
                 periods: Optional[torch.Tensor] = None, name: str = "dinov3"):
        super().__init__()
        self.vit = vit
        self.arch = arch
        self.name = name
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._periods = None if periods is None else periods.detach().to(torch.float32).cpu().clone()
        self._restore_rope_periods()

    # timm rebuilds its (non-persistent) RoPE periods in fp32 whenever the module changes dtype,
    # which would replace the bf16-rounded periods of the official checkpoints: put them back.
    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self._restore_rope_periods()
        return module

    def _restore_rope_periods(self) -> None:
        rope = getattr(self.vit, "rope", None)
        if rope is None or self._periods is None:
            return
        device = rope.periods.device if rope.periods.device.type != "meta" else torch.device("cpu")
        rope.register_buffer("periods", self._periods.to(device), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.arch.embed_dim

    @property
    def patch_size(self) -> int:
        return self.arch.patch_size

    @property
    def depth(self) -> int:
        return self.arch.depth

    @property
    def num_register_tokens(self) -> int:
        return self.arch.num_reg_tokens

    @property
    def dense_layers(self) -> tuple[int, ...]:
        """The four blocks dense heads read: [4,11,17,23] for ViT-L, [9,19,29,39] for the 7B, else
        four evenly spaced ones (:func:`registry.dense_layers`)."""
        return registry.dense_layers(self.depth)

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError("input tensor", f"expected shape [B, 3, H, W], got {list(x.shape)}")
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p or h == 0 or w == 0:
            raise InputError("input tensor", f"size {h}x{w} is not a multiple of the patch size {p}")
        return h // p, w // p

    def forward_features(self, x: torch.Tensor) -> Features:
        """Normed tokens of normalised ``x`` [B,3,H,W]: ``cls`` [B,D], ``registers`` [B,R,D],
        ``patches`` [B,D,H/16,W/16]."""
        gh, gw = self._check_input(x)
        tokens = self.vit.forward_features(x)
        return self._split(tokens, gh, gw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normed CLS token, as the official ``model(x)``."""
        return self.forward_features(x)["cls"]

    def _split(self, tokens: torch.Tensor, gh: int, gw: int) -> Features:
        n_prefix = 1 + self.num_register_tokens
        b, _, d = tokens.shape
        patches = tokens[:, n_prefix:].transpose(1, 2).reshape(b, d, gh, gw)
        return {"cls": tokens[:, 0], "registers": tokens[:, 1:n_prefix], "patches": patches}

    def get_intermediate_layers(self, x: torch.Tensor, indices: Optional[Sequence[int]] = None,
                                norm: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per requested block (0-based; default ``dense_layers``): (patches [B,D,h,w], cls [B,D]),
        after the final norm when ``norm`` (as the official ``get_intermediate_layers``)."""
        self._check_input(x)
        indices = list(self.dense_layers if indices is None else indices)
        bad = [i for i in indices if not 0 <= i < self.depth]
        if bad:
            raise InputError("layers", f"block indices {bad} out of range 0..{self.depth - 1}")
        outs = self.vit.forward_intermediates(
            x, indices=indices, norm=norm, return_prefix_tokens=True, stop_early=True,
            output_fmt="NCHW", intermediates_only=True)
        return [(patches, prefix[:, 0]) for patches, prefix in outs]

    def normalise(self, x01: torch.Tensor) -> torch.Tensor:
        """Scale 0..1 RGB to the model's input with this backbone's mean and std."""
        return normalise_rgb(x01, self.mean, self.std)

    def use_fp8_matmuls(self) -> int:
        """Run the blocks' linear layers as float8 products (see :mod:`.fp8`), in place; returns
        how many layers were converted. The model must already be in bf16."""
        return linears_to_fp8(self.vit.blocks)

    def compile_regions(self) -> list[nn.Module]:
        """The modules ``torch.compile`` should compile one by one: the transformer blocks, which
        share one compiled graph (one block is traced, not 24 or 40)."""
        return list(self.vit.blocks)


def normalise_rgb(x01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x01 - mean) / std`` per channel of ``[B,3,H,W]``, on ``x01``'s device and dtype."""
    m = torch.tensor(mean, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    return (x01 - m).div_(s)       # one temporary: the same arithmetic, in place on it


def build_backbone(ckpt: Checkpoint, dtype: torch.dtype = torch.float32,
                   mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> Backbone:
    """Instantiate timm's Eva on the meta device and take the checkpoint tensors as parameters."""
    from timm.models.eva import Eva

    arch = ckpt.arch
    with torch.device("meta"):
        vit = Eva(**arch.timm_kwargs())
    k_biases = {k: ckpt.state.pop(k) for k in [k for k in ckpt.state if k.endswith(".attn.k_bias")]}
    if arch.qkv_bias:
        _zero_fill_qv_bias(ckpt.state, arch)
    expected = set(vit.state_dict().keys())
    got = set(ckpt.state)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise WeightsError(ckpt.source, _key_mismatch_message(missing, unexpected))
    _check_shapes(vit, ckpt)
    state = ckpt.state
    for key in list(state):          # convert one tensor at a time: the peak stays near one copy
        state[key] = state[key].to(dtype)
    vit.load_state_dict(state, strict=True, assign=True)
    ckpt.state = {}
    _materialise_buffers(vit, arch)
    for key, value in k_biases.items():
        vit.get_submodule(key.rsplit(".", 1)[0]).register_buffer("k_bias", value.to(dtype), persistent=False)
    if mean is None or std is None:
        mean, std = _normalisation(ckpt)
    periods = ckpt.periods if ckpt.periods is not None else vit.rope._compute_periods()
    return Backbone(vit.eval(), arch, mean, std, periods, name=os.path.basename(ckpt.source.rstrip("/")))


def _normalisation(ckpt: Checkpoint) -> tuple[Sequence[float], Sequence[float]]:
    meta = ckpt.metadata
    if "mean" in meta and "std" in meta:
        return [float(v) for v in meta["mean"].split(",")], [float(v) for v in meta["std"].split(",")]
    return registry.normalisation_for(ckpt.source)


def _key_mismatch_message(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing keys: {key_list(missing, 6)}")
    if unexpected:
        parts.append(f"unexpected keys: {key_list(unexpected, 6)}")
    return "checkpoint does not match a DINOv3 ViT: " + "; ".join(parts)


def _check_shapes(vit: nn.Module, ckpt: Checkpoint) -> None:
    model = vit.state_dict()
    wrong = [f"{k} {list(v.shape)} (model {list(model[k].shape)})"
             for k, v in ckpt.state.items() if tuple(v.shape) != tuple(model[k].shape)]
    if wrong:
        raise WeightsError(ckpt.source, "tensor shapes do not fit the architecture: " + "; ".join(wrong[:4]))


def _zero_fill_qv_bias(state: dict[str, torch.Tensor], arch: ViTArch) -> None:
    """A config with a K bias but no Q or V bias: timm has all three or none, so add zeros."""
    if any(k.endswith((".attn.q_bias", ".attn.v_bias")) for k in state):
        return      # the checkpoint has them: anything missing is reported as missing
    for i in range(arch.depth):
        for name in ("q_bias", "v_bias"):
            state.setdefault(f"blocks.{i}.attn.{name}", torch.zeros(arch.embed_dim))


def _materialise_buffers(vit: nn.Module, arch: ViTArch) -> None:
    """Non-persistent buffers (zero K bias, RoPE periods) that the meta-device build left empty."""
    for module in vit.modules():
        k_bias = getattr(module, "k_bias", None)
        if isinstance(k_bias, torch.Tensor) and k_bias.is_meta:
            ref = module.q_bias
            module.register_buffer("k_bias", torch.zeros_like(ref), persistent=False)
    rope = vit.rope
    rope.register_buffer("periods", rope._compute_periods(), persistent=False)
    leftover = [n for n, t in list(vit.named_parameters()) + list(vit.named_buffers()) if t.is_meta]
    if leftover:
        raise WeightsError(None, f"internal: tensors left uninitialised: {leftover[:5]}")


def backbone_from_state_dict(state: dict[str, torch.Tensor], hf_config: Optional[dict] = None,
                             source: str = "<state dict>", dtype: torch.dtype = torch.float32,
                             device: Union[str, torch.device] = "cpu") -> Backbone:
    """A :class:`Backbone` from an in-memory state dict in Meta, HF (with ``hf_config``) or timm layout."""
    ckpt = checkpoint_from_state(state, hf_config, source)
    return build_backbone(ckpt, dtype).to(device)


def save_backbone(backbone: Backbone, path: Union[str, os.PathLike]) -> None:
    """Write a backbone as our own safetensors file (timm layout, RoPE periods and normalisation kept)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in backbone.vit.state_dict().items()}
    for name, buf in backbone.vit.named_buffers():
        if name.endswith(".attn.k_bias") and bool(buf.any()):
            state[name] = buf.detach().contiguous().cpu()
    if backbone._periods is not None:
        state["rope.periods"] = backbone._periods
    meta = {"format": "dinov3-geo", "mean": ",".join(map(str, backbone.mean)), "std": ",".join(map(str, backbone.std))}
    save_file(state, str(path), metadata=meta)
