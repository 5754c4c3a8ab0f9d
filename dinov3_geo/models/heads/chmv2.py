"""Meta's CHMv2 canopy-height head: the DPT decoder, its "chmv2_mixlog" decoding to metres, and
strict offline loading from Meta's ``.pth`` or a Hugging Face ``CHMv2ForDepthEstimation`` folder.

Decoding follows ``dinov3/eval/depth/utils.py`` (and transformers' ``CHMv2FeaturesToDepth``)::

    bins = t * logspace(min, max/8) + (1 - t) * linspace(min, max/8),   t = linspace(1, 0, n_bins)
    y    = relu(logits) + shift          (shift = clamp(-min(y), 0, 1e-4) + 1e-8 = 1e-8 since y >= 0)
    h    = 8 * clamp(sum(y * clamp(bins, 1e-12)) / clamp(nan_to_num(sum(y)), 1e-12), 1e-12)

computed in float32 band by band of rows straight from the last hidden map (the final 1x1 conv
runs per band), so the ``n_bins`` logits of the whole chip are never held.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ...errors import WeightsError
from ..registry import CHMV2_MAX_DEPTH, CHMV2_MIN_DEPTH
from ..weights import key_list, read_hf_directory, read_tensors
from .dpt import (
    DPTHead,
    DPTHeadConfig,
    Features,
    config_from_state_dict,
    hf_to_meta_head_state,
)

StateDict = dict[str, torch.Tensor]

# align_corners of the final resize to the input size: Meta's notebook uses False
# (transformers' post_process_depth_estimation uses True); only odd h/16 or w/16 ever resize.
OUTPUT_ALIGN_CORNERS = False

_SHIFT = 1e-8          # eps_shift; the clamp(-min(relu(x)), 0, 1e-4) term is always 0
_EPS = 1e-12
_SCALE = 8.0           # the bins span [min, max / 8]; heights are scaled back by 8
#: Logits decoded at once (pixels x bins x batch): bounds the decoding's extra memory.
CHUNK_ELEMENTS = 1 << 24


def chmv2_mixlog_bins(n_bins: int, min_depth: float = CHMV2_MIN_DEPTH, max_depth: float = CHMV2_MAX_DEPTH,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """The ``n_bins`` bin centres (in metres / 8), float32, exactly as Meta and transformers build them."""
    top = max_depth / _SCALE
    linear = torch.linspace(min_depth, top, n_bins, device=device)
    log = torch.exp(torch.linspace(torch.log(torch.tensor(min_depth)).item(),
                                   torch.log(torch.tensor(top)).item(), n_bins, device=device))
    t = torch.linspace(1.0, 0.0, n_bins, device=device)
    return t * log + (1.0 - t) * linear


def mixlog_to_metres(logits: torch.Tensor, bins: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """``[B, n_bins, H, W]`` logits (any float dtype) -> float32 heights ``[B, 1, H, W]`` in metres.

    Works in float32 on pixel chunks of at most ``2**24`` logits, so the peak extra memory is a
    chunk, not copies of the whole logit tensor; under ``torch.compile`` it is one fused reduction.
    """
    b, k, h, w = logits.shape
    flat = logits.reshape(b, k, h * w)
    weights = bins.to(device=logits.device, dtype=torch.float32).clamp_min(_EPS).view(1, k, 1)
    shift_num = _SHIFT * weights.sum()
    n = h * w
    step = n if torch.compiler.is_compiling() else max(1, chunk_elements // max(1, b * k))
    out = torch.empty(b, n, dtype=torch.float32, device=logits.device)
    for start in range(0, n, step):
        y = torch.relu(flat[:, :, start:start + step].float())
        den = torch.nan_to_num(y.sum(1) + _SHIFT * k, nan=1.0, posinf=1.0, neginf=1.0).clamp_min(_EPS)
        num = (y * weights).sum(1) + shift_num
        out[:, start:start + step] = (num / den).clamp_min(_EPS) * _SCALE
    return out.view(b, 1, h, w)


def resize_heights(metres: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``[B,1,h,w]`` heights to ``size`` (a no-op when already that size)."""
    size = (int(size[0]), int(size[1]))
    if tuple(metres.shape[-2:]) == size:
        return metres
    return F.interpolate(metres, size=size, mode="bilinear", align_corners=OUTPUT_ALIGN_CORNERS)


class CHMv2Head(DPTHead):
    """DPT head + "chmv2_mixlog" decoding: backbone features -> canopy height in metres.

    The parameters carry Meta's decoder key names (see :mod:`.dpt`), so the official ``.pth``
    loads with ``load_state_dict(strict=True)``.
    """

    def __init__(self, cfg: DPTHeadConfig = DPTHeadConfig(), min_depth: float = CHMV2_MIN_DEPTH,
                 max_depth: float = CHMV2_MAX_DEPTH):
        super().__init__(cfg)
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)
        self.chunk_elements = CHUNK_ELEMENTS     # logits decoded per band of rows (memory bound)

    def bins(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """Float32 bin centres (kept out of the state dict and of dtype casts), computed once per
        device so that ``forward`` has no host round trip (and no graph break under compile)."""
        key = str(torch.device(device) if device is not None else torch.device("cpu"))
        cache = self.__dict__.setdefault("_bins_cache", {})
        if key not in cache:
            cache[key] = chmv2_mixlog_bins(self.cfg.n_output_channels, self.min_depth, self.max_depth).to(key)
        return cache[key]

    def forward(self, features: Features, out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Float32 heights ``[B,1,H,W]`` in metres, bilinearly resized to ``out_size`` if given."""
        head = self.conv_depth.head
        hidden = head[:-1](self.forward_features(features))     # up to the ReLU before the bins
        metres = decode_in_bands(hidden, head[-1], self.bins(hidden.device), self.chunk_elements)
        return metres if out_size is None else resize_heights(metres, out_size)


def decode_in_bands(hidden: torch.Tensor, to_logits: torch.nn.Module, bins: torch.Tensor,
                    chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Heights from the last hidden map, band of rows by band of rows: the final 1x1 conv makes
    ``n_bins`` logits for a band only and :func:`mixlog_to_metres` reduces them at once, so the
    full-resolution logits (``n_bins`` x the chip: 134 MB per 512 px chip in bf16) never exist and
    each band's logits are reduced while still in cache. Per pixel it is the same conv and the same
    reduction as decoding the whole map; under ``torch.compile`` the whole map goes in one piece
    (inductor fuses the reduction itself)."""
    b, _, h, w = hidden.shape
    k = to_logits.out_channels
    if torch.compiler.is_compiling():
        return mixlog_to_metres(to_logits(hidden), bins)
    rows = max(1, chunk_elements // max(1, b * k * w))
    if rows >= h:
        return mixlog_to_metres(to_logits(hidden), bins)
    out = torch.empty(b, 1, h, w, dtype=torch.float32, device=hidden.device)
    for top in range(0, h, rows):
        out[:, :, top:top + rows] = mixlog_to_metres(to_logits(hidden[:, :, top:top + rows]), bins)
    return out


# --------------------------------------------------------------------------------------------
# Weights


@dataclass
class CHMv2Weights:
    """A CHMv2 head read from disk, in Meta's key names, with what is needed to build its model."""

    head_state: StateDict
    head_config: DPTHeadConfig
    source: str
    layout: str                                   # "meta" (.pth) or "hf" (folder)
    min_depth: float = CHMV2_MIN_DEPTH
    max_depth: float = CHMV2_MAX_DEPTH
    layers: Optional[tuple[int, ...]] = None      # 0-based backbone blocks; None: the ViT-L default
    backbone_state: Optional[StateDict] = None    # HF folder only: DINOv3ViTModel key layout
    backbone_config: Optional[dict[str, Any]] = None


_BACKBONE_MARKERS = re.compile(r"^(cls_token|storage_tokens|blocks\.0\.|patch_embed\.|embeddings\.|layer\.0\.|"
                               r"model\.layer\.0\.|reg_token|backbone\.)")
_WRAPPER_PREFIXES = ("decoder.", "head.", "module.", "model.", "depther.")


def read_chmv2_weights(path: os.PathLike | str) -> CHMv2Weights:
    """Read a CHMv2 head: Meta's decoder ``.pth`` or a transformers ``CHMv2ForDepthEstimation`` folder."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(path, "not found")
    if path.is_dir():
        return _read_hf_folder(path)

    state = read_tensors(path)
    check_meta_head_keys(state, path)
    return CHMv2Weights(head_state=state, head_config=_config_of(state, path), source=str(path), layout="meta")


def check_meta_head_keys(state: StateDict, path: os.PathLike | str) -> None:
    """A WeightsError with a clear sentence if ``state`` is not a CHMv2 decoder state dict."""
    keys = list(state)
    if not any(k.startswith("reassemble_blocks.") for k in keys):
        if any(_BACKBONE_MARKERS.match(k) for k in keys) and not any("reassemble" in k for k in keys):
            raise WeightsError(path, "this is a DINOv3 backbone checkpoint, not a CHMv2 head "
                                     "(give it as the backbone weights and the head file as the weights)")
        prefix = next((p for p in _WRAPPER_PREFIXES if any(k.startswith(p + "reassemble_blocks.") for k in keys)), None)
        if prefix:
            raise WeightsError(path, f"the decoder keys are nested under '{prefix}': Meta's head file is the bare "
                                     "decoder state dict (dinov3_vitl16_chmv2_dpt_head-3703d643.pth); "
                                     "extract the decoder part")
        raise WeightsError(path, f"not a DPT head state dict (keys start: {', '.join(keys[:3])})")
    if any(k.startswith("reassemble_blocks.batchnorm_layers.") or k.startswith("project.") for k in keys):
        raise WeightsError(path, "this is the DPT head of another task (the ViT-7B SYNTHMIX depther: batch-norm "
                                 "inputs, no CLS readout), not the CHMv2 canopy-height head")
    if "reassemble_blocks.readout_projects.0.0.weight" not in state:
        raise WeightsError(path, "this DPT head has no CLS-token readout, so it is not the CHMv2 canopy-height head")


def _config_of(state: StateDict, path: os.PathLike | str) -> DPTHeadConfig:
    """Head sizes from the tensor shapes (WeightsError if a sizing key is absent)."""
    try:
        return config_from_state_dict(state)
    except KeyError as exc:
        raise WeightsError(path, f"incomplete CHMv2 head: missing key {exc.args[0]}") from exc


def _read_hf_folder(path: Path) -> CHMv2Weights:
    """Head (renamed to Meta's keys), backbone tensors and configs of a CHMv2 HF folder."""
    config, tensors = read_hf_directory(path)
    if config.get("model_type") != "chmv2":
        what = config.get("model_type")
        hint = " (a backbone folder: give it as the backbone weights)" if what == "dinov3_vit" else ""
        raise WeightsError(path, f"config.json describes a '{what}' model, not CHMv2 (model_type 'chmv2'){hint}")
    head_cfg, layers, bb_cfg = _hf_configs(config, path)
    head_hf = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    backbone = {_hf_backbone_key(k[len("backbone."):]): v for k, v in tensors.items() if k.startswith("backbone.")}
    others = sorted(k for k in tensors if not k.startswith(("head.", "backbone.")))
    head_state, unknown = hf_to_meta_head_state(head_hf)
    unexpected = others + ["head." + k for k in unknown]
    if unexpected:
        raise WeightsError(path, f"unexpected tensors for CHMv2: {key_list(unexpected)}")
    if not backbone:
        raise WeightsError(path, "the folder holds no backbone tensors ('backbone.*')")
    return CHMv2Weights(head_state=head_state, head_config=head_cfg, source=str(path), layout="hf",
                        min_depth=float(config.get("min_depth", CHMV2_MIN_DEPTH)),
                        max_depth=float(config.get("max_depth", CHMV2_MAX_DEPTH)),
                        layers=layers, backbone_state=backbone, backbone_config=bb_cfg)


def _hf_backbone_key(key: str) -> str:
    """``DINOv3ViTBackbone`` names -> ``DINOv3ViTModel`` file names (``model.layer.N`` -> ``layer.N``)."""
    return key[len("model."):] if key.startswith("model.layer.") else key


def _hf_configs(config: dict[str, Any], path: Path) -> tuple[DPTHeadConfig, tuple[int, ...], dict[str, Any]]:
    """Head config, 0-based backbone layers and the backbone config dict of a CHMv2 ``config.json``."""
    bb = config.get("backbone_config")
    if not isinstance(bb, dict) or bb.get("model_type", "dinov3_vit") != "dinov3_vit":
        raise WeightsError(path, "config.json has no DINOv3 ViT backbone_config")
    _require(config, path, "reassemble_factors", [4, 2, 1, 0.5])
    _require(config, path, "bins_strategy", "chmv2_mixlog")
    _require(config, path, "norm_strategy", "chmv2_mixlog")
    _require(bb, path, "apply_layernorm", True)
    readout = config.get("readout_type", "project")
    if readout not in ("project", "ignore"):
        raise WeightsError(path, f"readout_type '{readout}' is not supported (only 'project' and 'ignore')")
    out_indices = [int(i) for i in bb.get("out_indices", [])]
    if len(out_indices) != 4 or min(out_indices) < 1:
        raise WeightsError(path, f"backbone out_indices {out_indices} are not 4 block outputs")
    hidden = int(bb.get("hidden_size", 1024))
    cfg = DPTHeadConfig(
        in_channels=hidden,
        channels=int(config.get("fusion_hidden_size", 256)),
        post_process_channels=tuple(int(c) for c in config.get("post_process_channels", (128, 256, 512, 1024))),
        n_hidden_channels=int(config.get("head_hidden_size", 128)),
        n_output_channels=int(config.get("number_output_channels", 256)),
        readout=readout,
    )
    return cfg, tuple(i - 1 for i in out_indices), bb


def _require(config: dict[str, Any], path: Path, key: str, expected: Any) -> None:
    """WeightsError unless ``config[key]`` (when present) equals ``expected``."""
    if key in config and config[key] != expected:
        raise WeightsError(path, f"config.json {key}={config[key]!r} is not supported (CHMv2 uses {expected!r})")


def build_chmv2_head(weights: CHMv2Weights, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> CHMv2Head:
    """A :class:`CHMv2Head` with ``weights`` loaded strictly (WeightsError naming keys and file)."""
    head = CHMv2Head(weights.head_config, weights.min_depth, weights.max_depth)
    own = head.state_dict()
    missing = sorted(set(own) - set(weights.head_state))
    unexpected = sorted(set(weights.head_state) - set(own))
    if missing or unexpected:
        parts = ([f"missing keys: {key_list(missing)}"] if missing else []) + \
                ([f"unexpected keys: {key_list(unexpected)}"] if unexpected else [])
        raise WeightsError(weights.source, "not a CHMv2 head of the expected layout; " + "; ".join(parts))
    wrong = [k for k, v in own.items() if tuple(weights.head_state[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise WeightsError(weights.source, f"tensor {k} has shape {tuple(weights.head_state[k].shape)}, "
                                           f"expected {tuple(own[k].shape)} ({len(wrong)} mismatched)")
    head.load_state_dict(weights.head_state, strict=True)
    return head.to(device=device, dtype=dtype).eval()

