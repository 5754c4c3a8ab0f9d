"""One identity of a backbone's weights, used wherever outputs must be tied to the backbone that
made them: head files (a head loads only onto its backbone), feature stores and chip embeddings
(features of different backbones are not comparable), the feature cache of training.

:func:`weights_fingerprint` hashes every tensor's name and shape and a sample of its values (fast
even for the 7B, different for any two real checkpoints); :func:`backbone_identity` is what a head
file records; :func:`backbone_id` is the short string feature stores carry.
"""
from __future__ import annotations

import hashlib

import torch


def weights_fingerprint(backbone) -> str:
    """A short hash of the backbone's architecture and weights (every tensor's shape, and a sample
    of its values)."""
    h = hashlib.sha256()
    for name, t in backbone.vit.state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def backbone_identity(backbone) -> dict:
    """What a head file records of the backbone it was trained on."""
    return {"name": backbone.name, "embed_dim": backbone.embed_dim, "depth": backbone.depth,
            "fingerprint": weights_fingerprint(backbone)}


def backbone_id(backbone) -> str:
    """``name:d<width>:l<depth>:<hash of the patch embedding>``: the identity feature stores and
    chip embeddings carry."""
    weight = backbone.vit.patch_embed.proj.weight.detach().to(torch.float32).cpu().contiguous()
    digest = hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:12]
    return f"{backbone.name}:d{backbone.embed_dim}:l{backbone.depth}:{digest}"
