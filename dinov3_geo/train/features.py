"""Frozen-backbone features of a chip dataset, cached on disk so that head sweeps never recompute them.

Per chip: the CLS token and the mean patch token of the last block (classification probes), the
last block's patch tokens (linear segmentation head) and four intermediate blocks' (patches, CLS)
after the final norm (DPT head). The cache key covers the backbone (name, size, a fingerprint of its
weights), the chip pixels, the normalisation and what is extracted.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..models.backbone import Backbone, normalise_rgb
from ..models.identity import backbone_identity, weights_fingerprint  # noqa: F401  (one identity, see there)
from ..models.locate import cache_dir

PathLike = Union[str, os.PathLike]
KINDS = ("vector", "last", "layers")


@dataclass
class Features:
    """Features of N chips: ``cls``/``mean_patch`` [N,D]; ``last`` [N,D,h,w]; ``layers`` four of
    (patches [N,D,h,w], cls [N,D]); each present when extracted."""

    cls: Optional[torch.Tensor] = None
    mean_patch: Optional[torch.Tensor] = None
    last: Optional[torch.Tensor] = None
    layers: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None

    def take(self, idx: np.ndarray) -> "Features":
        """The features of the chips ``idx``."""
        i = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        pick = (lambda t: None if t is None else t[i])
        layers = None if self.layers is None else [(p[i], c[i]) for p, c in self.layers]
        return Features(pick(self.cls), pick(self.mean_patch), pick(self.last), layers)

    def vectors(self, pooling: str) -> np.ndarray:
        """Per-chip vectors for a probe: ``cls`` or ``cls+mean`` (CLS concatenated with the mean patch)."""
        if pooling == "cls":
            return self.cls.float().numpy()
        return torch.cat([self.cls, self.mean_patch], dim=1).float().numpy()

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in ("cls", "mean_patch", "last"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).contiguous()
        for i, (p, c) in enumerate(self.layers or []):
            out[f"layer{i}.patches"], out[f"layer{i}.cls"] = p.contiguous(), c.contiguous()
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Features":
        n = sum(1 for k in t if k.endswith(".patches"))
        layers = [(t[f"layer{i}.patches"], t[f"layer{i}.cls"]) for i in range(n)] or None
        return cls(t.get("cls"), t.get("mean_patch"), t.get("last"), layers)


def cache_key(identity: dict, images: np.ndarray, mean: Sequence[float], std: Sequence[float],
              kind: str, layers: Sequence[int]) -> str:
    """Hash of everything the features depend on."""
    h = hashlib.sha256()
    h.update(repr((identity["name"], identity["embed_dim"], identity["depth"], identity["fingerprint"],
                   tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std),
                   kind, tuple(layers), images.shape)).encode())
    h.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    return h.hexdigest()[:32]


def default_cache() -> Path:
    """``<dinov3-geo cache>/features``."""
    return cache_dir() / "features"


def extract_features(backbone: Backbone, images: np.ndarray, mean: Sequence[float], std: Sequence[float],
                     kind: str = "vector", layers: Optional[Sequence[int]] = None, batch_size: int = 16,
                     device: Union[str, torch.device] = "cpu", cache: Optional[PathLike] = None,
                     progress: Optional[Callable[[int, int], None]] = None) -> Features:
    """Features of ``images`` (float32 ``[N,3,T,T]`` in 0..1) normalised with ``mean``/``std``.

    ``kind``: ``vector`` (CLS and mean patch of the last block), ``last`` (also its patch tokens)
    or ``layers`` (CLS and mean patch, plus four blocks' patches and CLS; ``layers`` default
    ``backbone.dense_layers``). With ``cache`` (a folder), features are read from or written to a
    safetensors file named by :func:`cache_key`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    layers = tuple(backbone.dense_layers if layers is None else layers) if kind == "layers" else ()
    path = None
    if cache is not None:
        key = cache_key(backbone_identity(backbone), images, mean, std, kind, layers)
        path = Path(cache) / f"{key}.safetensors"
        if path.exists():
            from safetensors.torch import load_file
            return Features.from_tensors(load_file(str(path)))
    feats = _compute(backbone, images, mean, std, kind, layers, batch_size, torch.device(device), progress)
    if path is not None:
        _store(feats, path)
    return feats


def _store(feats: Features, path: Path) -> None:
    """Write the cache file atomically (a half-written file is never read back)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.partial")
    save_file(feats.to_tensors(), str(tmp))
    os.replace(tmp, path)


@torch.inference_mode()
def _compute(backbone: Backbone, images: np.ndarray, mean, std, kind: str, layers: tuple, batch_size: int,
             device: torch.device, progress) -> Features:
    backbone = backbone.to(device).eval()
    parts: dict[str, list] = {}
    n = len(images)
    for start in range(0, n, batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size], dtype=np.float32)).to(device)
        x = normalise_rgb(x, mean, std).to(next(backbone.parameters()).dtype)
        out = backbone.forward_features(x)
        parts.setdefault("cls", []).append(out["cls"].float().cpu())
        parts.setdefault("mean_patch", []).append(out["patches"].mean(dim=(2, 3)).float().cpu())
        if kind == "last":
            parts.setdefault("last", []).append(out["patches"].float().cpu())
        if kind == "layers":
            for i, (p, c) in enumerate(backbone.get_intermediate_layers(x, indices=layers)):
                parts.setdefault(f"layer{i}.patches", []).append(p.float().cpu())
                parts.setdefault(f"layer{i}.cls", []).append(c.float().cpu())
        if progress is not None:
            progress(min(start + batch_size, n), n)
    return Features.from_tensors({k: torch.cat(v) for k, v in parts.items()})
