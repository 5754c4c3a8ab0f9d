"""One identity of weights and files, used wherever an output must be tied to what made it.

Of a loaded backbone: :func:`weights_fingerprint` hashes every tensor's name and shape and a sample
of its values (fast even for the 7B, different for any two real checkpoints), what head files and
the training feature cache record (:func:`backbone_identity`); :func:`backbone_id` is the short
string feature stores and chip embeddings carry. Of files on disk: :func:`file_sha256` (official
checkpoints against the hash in their names, STAC checksums) and :func:`tree_sha256` (a weights
file or folder, as batch resume records it).
"""
from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

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


def file_sha256(path: os.PathLike) -> str:
    """The SHA-256 of one file (hex), read through the page cache without copying it."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return hashlib.sha256(view).hexdigest()


def tree_sha256(path: os.PathLike) -> str:
    """The SHA-256 of a file, or of a folder's files (each one's relative name and contents, in name
    order): one value for a weights file or a Hugging Face folder."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode() + b"\0" + bytes.fromhex(file_sha256(f)))
    return digest.hexdigest()
