"""Reading checkpoints and converting them to timm's DINOv3 (Eva) layout (finding them by name:
:mod:`.locate`).

Three layouts are understood: Meta's official ``.pth`` state dicts, Hugging Face directories
(``config.json`` + safetensors, the transformers ``DINOv3ViTModel`` layout, sharded or not, also
inside a CHMv2 directory) and timm state dicts (``.pth`` or ``.safetensors``, our own exports too).
Every read is ``weights_only`` or safetensors, and every failure is a :class:`WeightsError` that
names the file.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import WeightsError, short_message

StateDict = dict[str, torch.Tensor]

# Keys of Meta's checkpoints that exist only for training; nothing else may be dropped.
_META_TRAINING_ONLY = re.compile(r"^(local_cls_norm\.(weight|bias)|mask_token|blocks\.\d+\.attn\.qkv\.bias_mask)$")
_HEAD_MARKERS = ("reassemble_blocks.", "fusion_blocks.", "conv_depth.", "neck.", "head.conv", "decoder.")


@dataclass
class ViTArch:
    """Shape of a DINOv3 ViT, read from a checkpoint or a HF config."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    gated_mlp: bool
    qkv_bias: bool
    num_reg_tokens: int
    patch_size: int = 16
    rope_base: float = 100.0
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def timm_kwargs(self) -> dict[str, Any]:
        """Arguments for ``timm.models.eva.Eva`` that reproduce this architecture."""
        from functools import partial

        from timm.layers import LayerNorm

        return dict(
            img_size=224,
            patch_size=self.patch_size,
            num_classes=0,
            global_pool="token",
            dynamic_img_size=True,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            qkv_bias=self.qkv_bias,
            # (hidden + 0.5) / dim makes timm's int(dim * ratio) land exactly on the hidden size.
            mlp_ratio=(self.mlp_hidden + 0.5) / self.embed_dim,
            swiglu_mlp=self.gated_mlp,
            swiglu_align_to=1 if self.gated_mlp else 0,
            init_values=1e-5,
            rope_type="dinov3",
            rope_temperature=self.rope_base,
            use_rot_pos_emb=True,
            use_abs_pos_emb=False,
            rope_rotate_half=True,
            num_reg_tokens=self.num_reg_tokens,
            use_fc_norm=False,
            norm_layer=partial(LayerNorm, eps=self.layer_norm_eps),
        )


@dataclass
class Checkpoint:
    """A backbone checkpoint converted to timm's Eva layout."""

    state: StateDict
    arch: ViTArch
    source: str
    layout: str                       # "meta", "hf" or "timm"
    periods: Optional[torch.Tensor] = None   # RoPE periods stored in the file (Meta: bf16-rounded)
    metadata: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Reading raw tensors


def read_tensors(path: os.PathLike | str) -> StateDict:
    """All tensors of a ``.pth``/``.pt``/``.bin`` (weights_only) or ``.safetensors`` file."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(path, "file not found")
    if path.is_dir():
        raise WeightsError(path, "is a folder, expected a checkpoint file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path)


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(path, f"not a readable safetensors file (truncated or corrupted?): {short_message(exc)}") from exc


def _read_torch(path: Path) -> StateDict:
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head[:1] != b"\x80":
            raise WeightsError(path, "not a PyTorch checkpoint (neither a zip archive nor a pickle), or truncated")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            path, "refused: the file holds Python objects other than tensors (possible code); "
            "only plain state dicts are loaded (weights_only=True)") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise WeightsError(path, f"cannot read the checkpoint (truncated or corrupted?): {short_message(exc)}") from exc
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: Path) -> StateDict:
    """The tensor dict of a checkpoint, looking inside the usual ``model``/``state_dict`` wrappers."""
    for key in ("state_dict", "model", "teacher"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(path, "not a state dict of tensors")
    return dict(obj)


def key_list(keys: list[str], most: int = 8) -> str:
    """``a, b, c (+N more)``: checkpoint keys for an error message."""
    shown = ", ".join(keys[:most])
    return shown + (f" (+{len(keys) - most} more)" if len(keys) > most else "")


# --------------------------------------------------------------------------------------------
# Hugging Face directories


def read_hf_directory(path: os.PathLike | str) -> tuple[dict[str, Any], StateDict]:
    """``config.json`` and all tensors of a Hugging Face model directory (sharded or not)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise WeightsError(path, "folder has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(cfg_file, f"invalid JSON: {short_message(exc)}") from exc
    files = _hf_weight_files(path)
    state: StateDict = {}
    for f in files:
        state.update(read_tensors(f))
    return config, state


def _hf_weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise WeightsError(index, f"invalid shard index: {short_message(exc)}") from exc
            files = [path / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise WeightsError(path, f"shards listed in {index_name} are missing: {', '.join(missing)}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return [path / name]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise WeightsError(path, "folder has no model.safetensors (or pytorch_model.bin)")


def backbone_config_of(config: dict[str, Any]) -> dict[str, Any]:
    """The DINOv3 ViT config inside a HF config: itself, or the ``backbone_config`` of a CHMv2 model."""
    if config.get("model_type") == "dinov3_vit":
        return config
    inner = config.get("backbone_config")
    if isinstance(inner, dict) and inner.get("model_type", "dinov3_vit") == "dinov3_vit":
        return inner
    raise WeightsError(None, f"config.json describes a '{config.get('model_type')}' model, not a DINOv3 ViT")


def arch_from_hf_config(cfg: dict[str, Any]) -> ViTArch:
    """Architecture declared by a ``DINOv3ViTConfig`` dict (so small test models load like big ones)."""
    act = cfg.get("hidden_act", "gelu")
    gated = bool(cfg.get("use_gated_mlp", False))
    if (gated and act != "silu") or (not gated and act not in ("gelu", "gelu_python")):
        raise WeightsError(None, f"unsupported activation '{act}' for {'gated' if gated else 'plain'} MLP")
    patch = cfg.get("patch_size", 16)
    return ViTArch(
        embed_dim=int(cfg.get("hidden_size", 384)),
        depth=int(cfg.get("num_hidden_layers", 12)),
        num_heads=int(cfg.get("num_attention_heads", 6)),
        mlp_hidden=int(cfg.get("intermediate_size", 1536)),
        gated_mlp=gated,
        qkv_bias=bool(cfg.get("query_bias", True) or cfg.get("key_bias", False) or cfg.get("value_bias", True)),
        num_reg_tokens=int(cfg.get("num_register_tokens", 0)),
        patch_size=int(patch[0] if isinstance(patch, (list, tuple)) else patch),
        rope_base=float(cfg.get("rope_theta", 100.0)),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
    )


# --------------------------------------------------------------------------------------------
# Layout conversion to timm's Eva


def detect_layout(state: StateDict) -> str:
    """'meta', 'hf' or 'timm' by the keys present; a WeightsError for heads and other models."""
    keys = list(state)
    if "cls_token" in state and "storage_tokens" in state:
        return "meta"
    if any(k.endswith("embeddings.cls_token") for k in keys) and any(".layer.0." in f".{k}" for k in keys):
        return "hf"
    if "cls_token" in state and any(k.startswith("blocks.0.gamma_1") or k.startswith("blocks.0.attn.qkv") for k in keys):
        return "timm"
    if any(k.startswith(m) for k in keys for m in _HEAD_MARKERS):
        raise WeightsError(None, "this is a head checkpoint (DPT decoder), not a DINOv3 backbone")
    sample = ", ".join(keys[:3])
    raise WeightsError(None, f"not a DINOv3 ViT checkpoint (keys start: {sample})")


def meta_to_timm(state: StateDict) -> tuple[StateDict, Optional[torch.Tensor]]:
    """Meta's key names to timm's; drops exactly the training-only keys; returns (state, periods)."""
    out: StateDict = {}
    periods = None
    for key, value in state.items():
        if key == "rope_embed.periods":
            periods = value
            continue
        if _META_TRAINING_ONLY.match(key):
            continue
        if key.endswith("attn.qkv.bias"):
            q, _k, v = value.chunk(3, dim=0)   # the K bias is masked to zero by the official model
            out[key.replace("qkv.bias", "q_bias")] = q
            out[key.replace("qkv.bias", "v_bias")] = v
            continue
        new = key.replace("storage_tokens", "reg_token").replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        new = new.replace(".mlp.w1.", ".mlp.fc1_g.").replace(".mlp.w2.", ".mlp.fc1_x.").replace(".mlp.w3.", ".mlp.fc2.")
        out[new] = value
    return out, periods


_HF_RENAMES = [
    (re.compile(r"^embeddings\.cls_token$"), "cls_token"),
    (re.compile(r"^embeddings\.register_tokens$"), "reg_token"),
    (re.compile(r"^embeddings\.patch_embeddings\.(weight|bias)$"), r"patch_embed.proj.\1"),
    (re.compile(r"^layer\.(\d+)\.norm([12])\.(weight|bias)$"), r"blocks.\1.norm\2.\3"),
    (re.compile(r"^layer\.(\d+)\.attention\.o_proj\.(weight|bias)$"), r"blocks.\1.attn.proj.\2"),
    (re.compile(r"^layer\.(\d+)\.attention\.q_proj\.bias$"), r"blocks.\1.attn.q_bias"),
    (re.compile(r"^layer\.(\d+)\.attention\.v_proj\.bias$"), r"blocks.\1.attn.v_bias"),
    (re.compile(r"^layer\.(\d+)\.layer_scale([12])\.lambda1$"), r"blocks.\1.gamma_\2"),
    (re.compile(r"^norm\.(weight|bias)$"), r"norm.\1"),
]
_HF_MLP_PLAIN = {"up_proj": "fc1", "down_proj": "fc2"}
_HF_MLP_GATED = {"gate_proj": "fc1_g", "up_proj": "fc1_x", "down_proj": "fc2"}


def hf_to_timm(state: StateDict, gated: bool) -> StateDict:
    """transformers ``DINOv3ViTModel`` key names to timm's; q/k/v weights are fused.

    A K bias (``key_bias=True`` configs, such as CHMv2's) goes to timm's ``attn.k_bias`` buffer; the
    official model masks it to zero, but a transformers model uses it, and after RoPE it matters.
    """
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    mlp_names = _HF_MLP_GATED if gated else _HF_MLP_PLAIN
    for key, value in state.items():
        key = re.sub(r"^model\.layer\.", "layer.", key)   # in-memory layout of transformers >= 5
        if key in ("embeddings.mask_token",) or key.endswith("rope_embeddings.inv_freq"):
            continue
        m = re.match(r"^layer\.(\d+)\.attention\.([qkv])_proj\.weight$", key)
        if m:
            qkv.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        m = re.match(r"^layer\.(\d+)\.attention\.k_proj\.bias$", key)
        if m:   # kept: after RoPE a K bias is not a constant shift of the logits
            out[f"blocks.{m.group(1)}.attn.k_bias"] = value
            continue
        m = re.match(r"^layer\.(\d+)\.mlp\.(\w+)\.(weight|bias)$", key)
        if m and m.group(2) in mlp_names:
            out[f"blocks.{m.group(1)}.mlp.{mlp_names[m.group(2)]}.{m.group(3)}"] = value
            continue
        for pattern, repl in _HF_RENAMES:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            out[key] = value     # unknown: reported as unexpected by the strict check
    for block, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise WeightsError(None, f"layer {block} lacks some of q_proj/k_proj/v_proj weights")
        out[f"blocks.{block}.attn.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def strip_prefix(state: StateDict, prefix: str) -> StateDict:
    """Tensors under ``prefix`` with it removed (e.g. the ``backbone.`` part of a CHMv2 model)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def arch_from_timm_like(state: StateDict, periods: Optional[torch.Tensor]) -> ViTArch:
    """Architecture read from tensor shapes of a Meta or timm state dict (any size)."""
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    gated = "blocks.0.mlp.fc1_g.weight" in state
    hidden = state["blocks.0.mlp.fc1_g.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0]
    if periods is not None:
        head_dim = 4 * periods.numel()
    else:  # the released DINOv3 ViTs use 64-wide heads, except the 7B (128)
        head_dim = 128 if dim == 4096 else 64
    if dim % head_dim:
        raise WeightsError(None, f"embedding width {dim} is not a multiple of the head width {head_dim}")
    reg = state.get("reg_token")
    return ViTArch(
        embed_dim=dim,
        depth=depth,
        num_heads=dim // head_dim,
        mlp_hidden=hidden,
        gated_mlp=gated,
        qkv_bias="blocks.0.attn.q_bias" in state,
        num_reg_tokens=0 if reg is None else reg.shape[1],
        patch_size=state["patch_embed.proj.weight"].shape[-1],
    )


def checkpoint_from_state(state: StateDict, hf_config: Optional[dict[str, Any]] = None,
                          source: str = "<state dict>") -> Checkpoint:
    """A raw state dict (Meta, HF or timm layout) as a :class:`Checkpoint` in timm's layout."""
    try:
        layout = detect_layout(state)
        if layout == "hf":
            prefix = _hf_prefix(state)
            if prefix:
                state = strip_prefix(state, prefix)
            if not hf_config:
                raise WeightsError(None, "a transformers-layout state dict needs its config.json (load the whole folder)")
            arch = arch_from_hf_config(hf_config)
            return Checkpoint(hf_to_timm(state, arch.gated_mlp), arch, source, "hf")
        if layout == "meta":
            converted, periods = meta_to_timm(state)
        else:
            converted = dict(state)
            periods = converted.pop("rope.periods", None)
        return Checkpoint(converted, arch_from_timm_like(converted, periods), source, layout, periods)
    except WeightsError as exc:
        if exc.where is None:
            raise WeightsError(source, exc.problem) from exc
        raise
    except (KeyError, IndexError, ValueError) as exc:
        raise WeightsError(source, f"incomplete DINOv3 checkpoint: {short_message(exc)}") from exc


def _hf_prefix(state: StateDict) -> str:
    key = next(k for k in state if k.endswith("embeddings.cls_token"))
    return key[: -len("embeddings.cls_token")]


def read_checkpoint(path: os.PathLike | str) -> Checkpoint:
    """Read any supported backbone checkpoint (file or HF directory) into timm's layout."""
    path = Path(path)
    if path.is_dir():
        config, state = read_hf_directory(path)
        try:
            bb_cfg = backbone_config_of(config)
        except WeightsError as exc:
            raise WeightsError(path, exc.problem) from exc
        ckpt = checkpoint_from_state(state, bb_cfg, str(path))
        ckpt.metadata["hf_model_type"] = str(config.get("model_type"))
        return ckpt
    state = read_tensors(path)
    ckpt = checkpoint_from_state(state, None, str(path))
    if path.suffix == ".safetensors":
        ckpt.metadata.update(_safetensors_metadata(path))
    return ckpt


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


# --------------------------------------------------------------------------------------------
# Writing (tests, exports)


def timm_to_meta(state: StateDict, periods: Optional[torch.Tensor] = None) -> StateDict:
    """timm key names back to Meta's (K bias zero, ``bias_mask`` as the official model has it)."""
    gated = "blocks.0.mlp.fc1_g.weight" in state
    out: StateDict = {}
    for key, value in state.items():
        if key.endswith("attn.q_bias"):
            v = state[key.replace("q_bias", "v_bias")]
            out[key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.zeros_like(value), v])
            mask = torch.ones(3 * value.numel(), dtype=value.dtype)
            mask[value.numel(): 2 * value.numel()] = 0
            out[key.replace("q_bias", "qkv.bias_mask")] = mask
            continue
        if key.endswith("attn.v_bias"):
            continue
        new = key.replace("reg_token", "storage_tokens").replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        if gated:
            new = new.replace(".mlp.fc1_g.", ".mlp.w1.").replace(".mlp.fc1_x.", ".mlp.w2.").replace(".mlp.fc2.", ".mlp.w3.")
        out[new] = value
    dim = state["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, dim, dtype=state["cls_token"].dtype)
    if periods is not None:
        out["rope_embed.periods"] = periods
    return out


def hf_to_meta_backbone_state(hf_state: StateDict, hf_config: dict[str, Any]) -> StateDict:
    """A transformers DINOv3ViTModel state dict in Meta's official key names (for tests and tools)."""
    ckpt = checkpoint_from_state(hf_state, hf_config, "<hf state>")
    head_dim = ckpt.arch.head_dim
    base = ckpt.arch.rope_base
    periods = base ** (torch.arange(head_dim // 4, dtype=torch.float32) * 4 / head_dim)
    return timm_to_meta(ckpt.state, periods)
