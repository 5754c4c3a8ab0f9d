"""The DINOv3 model card's GEO-Bench figures (no heavy imports: the command line lists the tasks)."""
from __future__ import annotations

#: DINOv3 MODEL_CARD, frozen SAT backbones (accuracy / mIoU, %): task -> (kind, ViT-L, ViT-7B).
MODEL_CARD: dict[str, tuple[str, float, float]] = {
    "m-bigearthnet": ("classify", 73.0, 74.0),
    "m-brick-kiln": ("classify", 96.5, 97.2),
    "m-eurosat": ("classify", 94.1, 94.8),
    "m-forestnet": ("classify", 60.6, 62.3),
    "m-pv4ger": ("classify", 96.0, 96.1),
    "m-so2sat": ("classify", 57.4, 62.1),
    "m-cashew-plantation": ("segment", 94.2, 94.1),
    "m-chesapeake-landcover": ("segment", 75.6, 76.6),
    "m-NeonTree": ("segment", 61.8, 62.6),
    "m-nz-cattle": ("segment", 83.7, 83.4),
    "m-pv4ger-seg": ("segment", 95.2, 95.5),
    "m-SA-crop-type": ("segment", 36.8, 37.6),
}
