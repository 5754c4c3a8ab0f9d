"""One head file: the head's tensors in safetensors plus JSON metadata that says how to use it.

Metadata (safetensors ``__metadata__`` key ``dinov3_geo_head``, JSON): ``format`` and ``version``,
``task`` (classify, segment), ``head`` (probe, linear, dpt), ``class_names``, ``colors`` (RGB per
class), ``backbone`` (name, embed_dim, depth, weights fingerprint), ``layers``, ``pooling`` (probe),
``normalisation`` (mean, std, what they come from), ``bands`` and ``scale`` (how chips were read),
``chip_size``, ``training`` (data summary, sweep) and ``metrics`` (validation).
A head loads only onto the backbone it was trained on.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ...errors import WeightsError, short_message
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


def save_head(path: PathLike, head: nn.Module, meta: dict, overwrite: bool = False) -> Path:
    """Write ``head``'s tensors and ``meta`` as one safetensors file, atomically."""
    from safetensors.torch import save_file

    from ...io.sinks import atomic_output

    meta = {"format": FORMAT, "version": VERSION, **meta}
    if isinstance(head, DPTSegHead):
        cfg = head.dpt.cfg
        meta["dpt"] = {**cfg.__dict__, "post_process_channels": list(cfg.post_process_channels)}
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
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
    return HeadFile(info.raw, state, str(path))


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
