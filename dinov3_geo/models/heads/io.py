"""One head file: the head's tensors in safetensors plus JSON metadata that says how to use it.

Metadata (safetensors ``__metadata__`` key ``dinov3_geo_head``, JSON): ``format`` and ``version``,
``task`` (classify, segment), ``head`` (probe, linear, dpt), ``class_names``, ``colors`` (RGB per
class), ``backbone`` (name, embed_dim, depth, weights fingerprint), ``layers``, ``pooling`` (probe),
``normalisation`` (mean, std, what they come from), ``bands`` and ``scale`` (how chips were read),
``chip_size``, ``training`` (data summary, sweep) and ``metrics`` (validation), and ``sha256``:
a checksum of the tensors and the rest of the metadata. A head's tensors must be finite, at save
and at load, and match the checksum (a damaged file never loads). A head loads only onto the
backbone it was trained on.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ...errors import WeightsError, short_message
from ...io.atomic import atomic_output
from .dpt import DPTHeadConfig
from .linear import DPTSegHead, LinearProbe, LinearSegHead
from .meta import FORMAT, META_KEY, VERSION, HeadMeta, read_head_meta

PathLike = Union[str, os.PathLike]


@dataclass
class HeadFile:
    """A head's metadata and tensors, as read from or written to one file."""

    meta: dict[str, Any]
    state: dict[str, torch.Tensor]
    source: str = "<memory>"

    @property
    def info(self) -> HeadMeta:
        """The metadata as a checked, typed value."""
        return HeadMeta.from_dict(self.meta, self.source)

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def colors(self) -> list[tuple[int, int, int]]:
        return [tuple(int(v) for v in c) for c in self.meta["colors"]]

    def colormap(self) -> dict[int, tuple[int, int, int]]:
        """{class value: (r, g, b)} for the class COG's colour table."""
        return {i: c for i, c in enumerate(self.colors)}

    def module(self) -> nn.Module:
        """The head as a module in eval mode, its tensors loaded strictly."""
        head = build_head(self.meta)
        try:
            head.load_state_dict(self.state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(self.source, f"head tensors do not match its metadata ({short_message(exc)})") from None
        return head.eval()


def default_colors(count: int) -> list[tuple[int, int, int]]:
    """Distinct colours for ``count`` classes (matplotlib's tab20, repeated past 20)."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [tuple(int(round(255 * v)) for v in cmap(i % 20)[:3]) for i in range(count)]


def build_head(meta: dict) -> nn.Module:
    """An untrained head of the kind and size the metadata describes."""
    k, d = len(meta["class_names"]), int(meta["backbone"]["embed_dim"])
    kind = meta["head"]
    if kind == "probe":
        width = d if meta.get("pooling", "cls") == "cls" else 2 * d
        return LinearProbe(width, k, meta.get("pooling", "cls"))
    if kind == "linear":
        return LinearSegHead(d, k, float(meta.get("dropout", 0.1)))
    cfg = dict(meta["dpt"])
    cfg["post_process_channels"] = tuple(cfg["post_process_channels"])
    return DPTSegHead(DPTHeadConfig(**cfg), float(meta.get("dropout", 0.1)))


def head_checksum(state: dict[str, torch.Tensor], meta: dict) -> str:
    """SHA-256 of every tensor (name, dtype, shape, bytes) and of the metadata without its checksum."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    return h.hexdigest()


def not_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinite values."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_head(path: PathLike, head: nn.Module, meta: dict, overwrite: bool = False) -> Path:
    """Write ``head``'s tensors and ``meta`` (with their checksum) as one safetensors file,
    atomically; a head with NaN or infinite weights is refused and nothing is written."""
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "version": VERSION, **meta}
    if isinstance(head, DPTSegHead):
        cfg = head.dpt.cfg
        meta["dpt"] = {**cfg.__dict__, "post_process_channels": list(cfg.post_process_channels)}
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    bad = not_finite(state)
    if bad:
        raise WeightsError(path, f"head weights hold NaN or infinite values ({', '.join(bad[:4])}): training "
                                 "diverged; not written (try smaller learning rates)")
    meta = json.loads(json.dumps(meta))          # exactly what load_head will read back
    meta["sha256"] = head_checksum(state, meta)
    with atomic_output(path, overwrite) as tmp:
        save_file(state, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return Path(path)


def load_head(path: PathLike) -> HeadFile:
    """Read a head file: its metadata checked (:func:`~.meta.read_head_meta`), then its tensors;
    anything else (a missing file, another safetensors file, a checkpoint) is one error naming the
    file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = read_head_meta(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(path, f"damaged head file: its tensors cannot be read ({short_message(exc)})") from None
    meta = info.raw
    bad = not_finite(state)
    if bad:
        raise WeightsError(path, f"damaged head file: tensors {', '.join(bad[:4])} hold NaN or infinite values")
    if "sha256" in meta and meta["sha256"] != head_checksum(state, meta):
        raise WeightsError(path, "damaged head file: its tensors or metadata do not match the checksum it was "
                                 "written with")
    return HeadFile(meta, state, str(path))


def check_backbone(head: HeadFile, identity: dict, task: Optional[str] = None) -> None:
    """One clear error when ``head`` was trained on another backbone (or for another task)."""
    if task is not None and head.task != task:
        raise WeightsError(head.source, f"a {head.task} head, not a {task} head")
    want = head.meta["backbone"]
    fields = ("embed_dim", "depth", "fingerprint")
    if any(want.get(f) != identity.get(f) for f in fields):
        raise WeightsError(head.source, f"trained on backbone '{want.get('name')}' (width {want.get('embed_dim')}, "
                                        f"{want.get('depth')} blocks, weights {want.get('fingerprint')}), not on "
                                        f"'{identity.get('name')}' (width {identity.get('embed_dim')}, "
                                        f"{identity.get('depth')} blocks, weights {identity.get('fingerprint')}): "
                                        "use the backbone it was trained with")
