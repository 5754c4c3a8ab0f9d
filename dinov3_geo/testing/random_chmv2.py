"""Write a tiny CHMv2 model with random weights as a Hugging Face folder, through transformers.

    python -m dinov3_geo.testing.random_chmv2 OUT_DIR [--seed 0]

The folder has the layout of ``facebook/dinov3-vitl16-chmv2-dpt-head`` (``config.json`` +
safetensors) at toy sizes, so ``dinov3geo segment --weights OUT_DIR`` runs the whole pipeline
offline. Its heights are meaningless: it exists to try the tool and to test it. Needs transformers.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def write_random_chmv2(out_dir: Path, seed: int = 0) -> Path:
    """Save a random toy CHMv2ForDepthEstimation (hidden 64, 4 blocks, 32 bins) to ``out_dir``."""
    import torch
    from transformers import CHMv2Config, CHMv2ForDepthEstimation

    backbone = dict(model_type="dinov3_vit", hidden_size=64, intermediate_size=256, num_attention_heads=4,
                    num_hidden_layers=4, num_register_tokens=4, key_bias=False, out_indices=[1, 2, 3, 4],
                    reshape_hidden_states=True, apply_layernorm=True, layer_norm_eps=1e-5,
                    return_class_token=True, patch_size=16)
    config = CHMv2Config(backbone_config=backbone, post_process_channels=[16, 32, 64, 64],
                         fusion_hidden_size=32, head_hidden_size=16, number_output_channels=32)
    torch.manual_seed(seed)
    model = CHMv2ForDepthEstimation(config).eval()
    model.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_random_chmv2(args.out_dir, args.seed))


if __name__ == "__main__":
    main()
