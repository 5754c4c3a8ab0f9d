"""A tiny DINOv3-shaped backbone with random weights, for tests and notebooks without the real ones.

    from dinov3_geo.testing.random_backbone import write_random_backbone
    write_random_backbone("toy-backbone.safetensors")

Built with timm (the project's own backbone code) and saved with ``save_backbone``, so
``load_backbone(OUT)`` and ``--backbone OUT`` run the whole pipeline offline. Its features are
random projections of the pixels, not DINOv3's: they exist to try the tools and to test them.
"""
from __future__ import annotations

from pathlib import Path


def random_backbone(seed: int = 0, embed_dim: int = 64, depth: int = 4):
    """A random ViT of DINOv3's kind (RoPE, 4 registers, layer scale) at toy size, in eval mode."""
    import torch
    from timm.models.eva import Eva

    from dinov3_geo.models.backbone import backbone_from_state_dict
    from dinov3_geo.models.weights import ViTArch

    arch = ViTArch(embed_dim=embed_dim, depth=depth, num_heads=4, mlp_hidden=4 * embed_dim, gated_mlp=False,
                   qkv_bias=True, num_reg_tokens=4)
    torch.manual_seed(seed)
    vit = Eva(**arch.timm_kwargs())
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith("gamma") or ".ls" in name:
                p.fill_(0.5)          # layer scales large enough that every block matters
    return backbone_from_state_dict(vit.state_dict(), source=f"random-dinov3-d{embed_dim}-seed{seed}")


def write_random_backbone(path, seed: int = 0, embed_dim: int = 64, depth: int = 4) -> Path:
    """Save :func:`random_backbone` to ``path`` (safetensors); returns the path."""
    from dinov3_geo.models.backbone import save_backbone

    path = Path(path)
    save_backbone(random_backbone(seed, embed_dim, depth), path)
    return path

