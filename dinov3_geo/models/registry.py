"""Known DINOv3 checkpoints: one entry says everything about a set of weights.

Like timm's pretrained configs, each entry carries the official file name (with its hash prefix),
the Hugging Face repository, the normalisation the weights were trained with and the backbone
blocks that dense heads read. Callers take normalisation from here, never hard-code it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

SAT_MEAN = (0.430, 0.411, 0.296)
SAT_STD = (0.213, 0.156, 0.143)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHMV2_MEAN = (0.420, 0.411, 0.296)
CHMV2_STD = SAT_STD

NORMALISATIONS = {
    "sat493m": (SAT_MEAN, SAT_STD),
    "lvd1689m": (IMAGENET_MEAN, IMAGENET_STD),
    "chmv2": (CHMV2_MEAN, CHMV2_STD),
}

GATED_WEIGHTS_URL = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"


@dataclass(frozen=True)
class WeightsInfo:
    """One released set of backbone weights."""

    name: str
    arch: str                 # "vitl16" or "vit7b16"
    dataset: str              # "sat493m" or "lvd1689m"
    filename: str             # Meta's official .pth file name
    hf_repo: str              # Hugging Face repository id
    dense_layers: tuple[int, ...]  # 0-based blocks read by the dense (DPT) heads

    @property
    def mean(self) -> tuple[float, float, float]:
        return NORMALISATIONS[self.dataset][0]

    @property
    def std(self) -> tuple[float, float, float]:
        return NORMALISATIONS[self.dataset][1]


#: 0-based blocks the dense (DPT) heads read, by backbone depth: ViT-L/16 (24 blocks), ViT-7B/16 (40)
#: (``_get_out_layers`` in ``dinov3/hub/depthers.py``).
DENSE_LAYERS_BY_DEPTH: dict[int, tuple[int, ...]] = {24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}


def even_layers(depth: int) -> tuple[int, ...]:
    """Four evenly spaced 0-based blocks ending at the last (``FOUR_EVEN_INTERVALS``): (5, 11, 17, 23)
    for 24 blocks (CHMv2's), (9, 19, 29, 39) for 40."""
    return tuple((i + 1) * int(depth) // 4 - 1 for i in range(4))


def dense_layers(depth: int) -> tuple[int, ...]:
    """The four blocks a dense head reads from a backbone of ``depth`` blocks: the released models'
    (:data:`DENSE_LAYERS_BY_DEPTH`), else :func:`even_layers`."""
    return DENSE_LAYERS_BY_DEPTH.get(int(depth)) or even_layers(depth)
_DEPTH = {"vitl16": 24, "vit7b16": 40}
#: Embedding width of each released architecture.
WIDTHS = {"vitl16": 1024, "vit7b16": 4096}


def _entry(arch: str, dataset: str, hash8: str) -> WeightsInfo:
    return WeightsInfo(
        name=f"dinov3-{arch}-{dataset}",
        arch=arch,
        dataset=dataset,
        filename=f"dinov3_{arch}_pretrain_{dataset}-{hash8}.pth",
        hf_repo=f"facebook/dinov3-{arch}-pretrain-{dataset}",
        dense_layers=dense_layers(_DEPTH[arch]),
    )


BACKBONES: dict[str, WeightsInfo] = {
    e.name: e
    for e in (
        _entry("vitl16", "sat493m", "eadcf0ff"),
        _entry("vit7b16", "sat493m", "a6675841"),
        _entry("vitl16", "lvd1689m", "8aa4cbdd"),
        _entry("vit7b16", "lvd1689m", "a955f4ea"),
    )
}

# CHMv2 canopy height (the one released dense head for the SAT backbone): files, input statistics
# (Meta's notebook, transformers' CHMv2ImageProcessor: 0.420, not the backbone's 0.430), the ViT-L
# blocks it reads (``_get_chmv2_config``: four even intervals), its height range and the pixel size
# it was trained at.
CHMV2_HEAD_FILENAME = "dinov3_vitl16_chmv2_dpt_head-3703d643.pth"
CHMV2_HF_REPO = "facebook/dinov3-vitl16-chmv2-dpt-head"
CHMV2_LAYERS = even_layers(24)
CHMV2_MIN_DEPTH = 0.001
CHMV2_MAX_DEPTH = 96.0
CHMV2_TRAINING_GSD = 0.6

_HASH_RE = re.compile(r"-([0-9a-f]{8})\.pth$")


def official_hash_prefix(filename: str) -> Optional[str]:
    """The 8-hex-digit SHA-256 prefix that Meta's file names carry (``...-eadcf0ff.pth``), if any."""
    m = _HASH_RE.search(str(filename))
    return m.group(1) if m else None


def find_by_name(name: str) -> Optional[WeightsInfo]:
    """Registry entry for a model name, an official file name or a HF repo id (case-insensitive)."""
    key = str(name).strip().lower()
    for info in BACKBONES.values():
        if key in (info.name, info.filename.lower(), info.hf_repo.lower(), info.hf_repo.split("/")[1]):
            return info
    return None


def normalisation_for(source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std for a checkpoint, judged by its name; SAT-493M unless it names the web data."""
    low = str(source).lower()
    if "lvd1689m" in low:
        return NORMALISATIONS["lvd1689m"]
    return NORMALISATIONS["sat493m"]
