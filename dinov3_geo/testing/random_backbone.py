"""Write a tiny DINOv3 ViT backbone with random weights, through transformers, in an official layout.

    python -m dinov3_geo.testing.random_backbone OUT_DIR [--seed 0] [--layout hf|meta]

``hf``: a Hugging Face folder like ``facebook/dinov3-vitl16-pretrain-sat493m`` (``config.json`` +
safetensors); ``meta``: Meta's ``.pth`` state dict. Toy sizes (width 32, 4 blocks): for trying
``dinov3geo train`` and for the tests; its features mean nothing. Needs transformers.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dinov3_geo.models.weights import hf_to_meta_backbone_state


def write_random_backbone(out: Path, seed: int = 0, layout: str = "hf", hidden: int = 32) -> Path:
    """Save a random toy DINOv3ViTModel (``hidden`` wide, 4 blocks, 4 registers) to ``out``."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel


    cfg = DINOv3ViTConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=4,
                          num_attention_heads=2, num_register_tokens=4, layerscale_value=0.5,
                          layer_norm_eps=1e-5, rope_theta=100.0)
    torch.manual_seed(seed)
    model = DINOv3ViTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    if layout == "hf":
        model.save_pretrained(out)
    else:
        torch.save(hf_to_meta_backbone_state(model.state_dict(), cfg.to_dict()), out)
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("hf", "meta"), default="hf")
    args = parser.parse_args()
    print(write_random_backbone(args.out, args.seed, args.layout))


if __name__ == "__main__":
    main()
