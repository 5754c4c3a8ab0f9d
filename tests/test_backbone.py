"""The backbone against the reference (transformers' DINOv3ViTModel) through every checkpoint layout.

The same random tensors are written as a Hugging Face folder, as Meta's official ``.pth`` and as our
own safetensors export; each loads through ``load_backbone`` and must give the reference numbers.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

import dinov3_geo
from dinov3_geo.errors import InputError, WeightsError, WeightsNotFoundError
from dinov3_geo.models import registry
from dinov3_geo.models.locate import resolve_weights
from dinov3_geo.models.weights import hf_to_meta_backbone_state

TOL = 1e-4


def small_config(gated: bool = False, **over) -> DINOv3ViTConfig:
    """A DINOv3 ViT of the ViT-L (plain MLP, q/v bias) or 7B (SwiGLU, no qkv bias) kind, but tiny."""
    args = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                num_register_tokens=4, layerscale_value=0.5, layer_norm_eps=1e-5, rope_theta=100.0)
    if gated:
        args.update(hidden_size=128, num_attention_heads=4, intermediate_size=192, use_gated_mlp=True,
                    hidden_act="silu", query_bias=False, value_bias=False)
    args.update(over)
    return DINOv3ViTConfig(**args)


def reference_model(cfg: DINOv3ViTConfig, seed: int = 0) -> DINOv3ViTModel:
    torch.manual_seed(seed)
    model = DINOv3ViTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():          # every tensor random, biases and layer scales too
            p.normal_(0.0, 0.2)
    return model


def write_meta_pth(model: DINOv3ViTModel, path: Path) -> Path:
    state = hf_to_meta_backbone_state(model.state_dict(), model.config.to_dict())
    state["local_cls_norm.weight"] = torch.ones(model.config.hidden_size)   # training-only, SAT ViT-L
    state["local_cls_norm.bias"] = torch.zeros(model.config.hidden_size)
    torch.save(state, path)
    return path


def reference_tokens(model: DINOv3ViTModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


def assert_matches(backbone, model, x, n_reg=4):
    ref = reference_tokens(model, x)
    with torch.no_grad():
        out = backbone.forward_features(x)
    b, d, h, w = out["patches"].shape
    assert (h, w) == (x.shape[2] // 16, x.shape[3] // 16)
    assert out["registers"].shape == (x.shape[0], n_reg, d)
    torch.testing.assert_close(out["cls"], ref[:, 0], atol=TOL, rtol=0)
    torch.testing.assert_close(out["registers"], ref[:, 1:1 + n_reg], atol=TOL, rtol=0)
    torch.testing.assert_close(out["patches"].flatten(2).transpose(1, 2), ref[:, 1 + n_reg:], atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def vitl_like(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vitl")
    model = reference_model(small_config())
    model.save_pretrained(folder / "hf")
    return model, folder


SIZES = [(512, 512), (512, 384)]


@pytest.mark.parametrize("size", SIZES)
def test_hf_folder_matches_transformers(vitl_like, size):
    model, folder = vitl_like
    backbone = dinov3_geo.load_backbone(folder / "hf")
    assert_matches(backbone, model, torch.randn(2, 3, *size))


@pytest.mark.parametrize("size", SIZES)
def test_meta_pth_matches_transformers(vitl_like, size):
    model, folder = vitl_like
    pth = write_meta_pth(model, folder / "dinov3_small_pretrain_sat493m.pth")
    backbone = dinov3_geo.load_backbone(pth)
    assert_matches(backbone, model, torch.randn(2, 3, *size))


def test_own_safetensors_export_round_trips(vitl_like, tmp_path):
    model, folder = vitl_like
    backbone = dinov3_geo.load_backbone(folder / "hf")
    dinov3_geo.save_backbone(backbone, tmp_path / "bb.safetensors")
    again = dinov3_geo.load_backbone(tmp_path / "bb.safetensors")
    assert again.mean == backbone.mean and again.std == backbone.std
    assert_matches(again, model, torch.randn(1, 3, 256, 320))


def test_sharded_hf_folder(tmp_path):
    model = reference_model(small_config(), seed=3)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    backbone = dinov3_geo.load_backbone(tmp_path / "hf")
    assert_matches(backbone, model, torch.randn(1, 3, 128, 192))


def test_gated_7b_kind_without_qkv_bias(tmp_path):
    """The 7B's SwiGLU MLP and bias-free qkv, in both layouts."""
    model = reference_model(small_config(gated=True), seed=1)
    model.save_pretrained(tmp_path / "hf")
    assert_matches(dinov3_geo.load_backbone(tmp_path / "hf"), model, torch.randn(1, 3, 160, 224))
    pth = write_meta_pth(model, tmp_path / "seven.pth")
    keys = torch.load(pth, weights_only=True).keys()
    assert "blocks.0.mlp.w3.weight" in keys and "blocks.0.attn.qkv.bias" not in keys
    assert_matches(dinov3_geo.load_backbone(pth), model, torch.randn(1, 3, 160, 224))


def test_hf_key_bias_is_used(tmp_path):
    """A K bias (CHMv2's HF config has one) changes attention once RoPE rotates the keys."""
    model = reference_model(small_config(key_bias=True), seed=2)
    model.save_pretrained(tmp_path / "hf")
    backbone = dinov3_geo.load_backbone(tmp_path / "hf")
    assert_matches(backbone, model, torch.randn(1, 3, 224, 224))
    dinov3_geo.save_backbone(backbone, tmp_path / "own.safetensors")
    assert_matches(dinov3_geo.load_backbone(tmp_path / "own.safetensors"), model, torch.randn(1, 3, 96, 224))


def test_intermediate_layers_are_normed_block_outputs(vitl_like):
    model, folder = vitl_like
    backbone = dinov3_geo.load_backbone(folder / "hf")
    x = torch.randn(2, 3, 256, 192)
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states
        layers = backbone.get_intermediate_layers(x, indices=[0, 2, 3])
    for (patches, cls), block in zip(layers, [0, 2, 3]):
        ref = model.norm(hidden[block + 1])          # hidden_states[0] is the embedding
        assert patches.shape == (2, 64, 16, 12)
        torch.testing.assert_close(cls, ref[:, 0], atol=TOL, rtol=0)
        torch.testing.assert_close(patches.flatten(2).transpose(1, 2), ref[:, 5:], atol=TOL, rtol=0)


def test_official_rope_periods_are_kept_through_dtype_changes(vitl_like, tmp_path):
    model, folder = vitl_like
    state = hf_to_meta_backbone_state(model.state_dict(), model.config.to_dict())
    bf16_periods = state["rope_embed.periods"].to(torch.bfloat16).to(torch.float32)
    state["rope_embed.periods"] = bf16_periods
    torch.save(state, tmp_path / "b.pth")
    backbone = dinov3_geo.load_backbone(tmp_path / "b.pth")
    assert torch.equal(backbone.vit.rope.periods, bf16_periods)
    backbone = backbone.to(torch.bfloat16).to(torch.float32)
    assert torch.equal(backbone.vit.rope.periods, bf16_periods)


def test_normalisation_travels_with_the_weights(vitl_like, tmp_path):
    model, folder = vitl_like
    sat = dinov3_geo.load_backbone(folder / "hf")
    assert sat.mean == registry.SAT_MEAN and sat.std == registry.SAT_STD
    lvd = folder / "dinov3-vitl16-pretrain-lvd1689m"
    model.save_pretrained(lvd)
    web = dinov3_geo.load_backbone(lvd)
    assert web.mean == registry.IMAGENET_MEAN and web.std == registry.IMAGENET_STD


def test_bf16_weights(vitl_like):
    model, folder = vitl_like
    backbone = dinov3_geo.load_backbone(folder / "hf", dtype=torch.bfloat16)
    assert next(backbone.parameters()).dtype == torch.bfloat16
    x = torch.randn(1, 3, 128, 128)
    ref = reference_tokens(model, x)[:, 0]
    with torch.no_grad():
        out = backbone.forward_features(x.to(torch.bfloat16))["cls"].float()
    assert (out - ref).norm() / ref.norm() < 3e-2


def test_dense_layers_of_the_released_models():
    assert registry.BACKBONES["dinov3-vitl16-sat493m"].dense_layers == (4, 11, 17, 23)
    assert registry.BACKBONES["dinov3-vit7b16-sat493m"].dense_layers == (9, 19, 29, 39)
    assert registry.CHMV2_LAYERS == (5, 11, 17, 23)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error, never a bare traceback from torch


def test_input_not_multiple_of_16(vitl_like):
    _, folder = vitl_like
    backbone = dinov3_geo.load_backbone(folder / "hf")
    with pytest.raises(InputError, match="not a multiple of the patch size 16"):
        backbone.forward_features(torch.randn(1, 3, 500, 512))


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        dinov3_geo.load_backbone(tmp_path / "nope.pth")


def test_truncated_checkpoint(vitl_like, tmp_path):
    model, _ = vitl_like
    pth = write_meta_pth(model, tmp_path / "full.pth")
    data = pth.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.pth.*(truncated|corrupted)"):
        dinov3_geo.load_backbone(tmp_path / "cut.pth")


def test_truncated_safetensors(vitl_like, tmp_path):
    _, folder = vitl_like
    data = (folder / "hf" / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="truncated or corrupted"):
        dinov3_geo.load_backbone(tmp_path / "cut.safetensors")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth").write_text("hello, these are not weights\n")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        dinov3_geo.load_backbone(tmp_path / "notes.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_carrying_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1), "x": _Payload()}, path)
    with pytest.raises(WeightsError, match="refused"):
        dinov3_geo.load_backbone(path)


def test_unexpected_and_missing_keys_are_named(vitl_like, tmp_path):
    model, _ = vitl_like
    state = hf_to_meta_backbone_state(model.state_dict(), model.config.to_dict())
    state["blocks.0.attn.extra"] = torch.zeros(3)
    del state["blocks.1.norm1.weight"]
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(WeightsError) as err:
        dinov3_geo.load_backbone(tmp_path / "odd.pth")
    text = str(err.value)
    assert "odd.pth" in text and "blocks.1.norm1.weight" in text and "blocks.0.attn.extra" in text


def test_head_given_as_backbone(tmp_path):
    torch.save({"reassemble_blocks.projects.0.conv.weight": torch.zeros(4, 4, 1, 1),
                "conv_depth.head.0.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "head.pth")
    with pytest.raises(WeightsError, match="head checkpoint"):
        dinov3_geo.load_backbone(tmp_path / "head.pth")


def test_hash_prefix_is_verified(vitl_like, tmp_path, monkeypatch):
    model, _ = vitl_like
    monkeypatch.setenv("DINOV3GEO_CACHE", str(tmp_path / "cache"))
    pth = write_meta_pth(model, tmp_path / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth")
    with pytest.raises(WeightsError, match="SHA-256.*`verify=False`"):
        dinov3_geo.load_backbone(pth)
    assert dinov3_geo.load_backbone(pth, verify=False).depth == 4
    import hashlib
    right = tmp_path / f"dinov3_x-{hashlib.sha256(pth.read_bytes()).hexdigest()[:8]}.pth"
    right.write_bytes(pth.read_bytes())
    assert dinov3_geo.load_backbone(right).depth == 4


def test_weights_resolved_by_name_from_the_weights_folder(vitl_like, tmp_path, monkeypatch):
    model, folder = vitl_like
    monkeypatch.setenv("DINOV3GEO_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("DINOV3GEO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DINOV3GEO_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_weights("dinov3-vitl16-sat493m")
    msg = str(err.value)
    assert "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth" in msg and "facebook/dinov3-vitl16-pretrain-sat493m" in msg
    model.save_pretrained(tmp_path / "dinov3-vitl16-pretrain-sat493m")
    assert resolve_weights("dinov3-vitl16-sat493m") == tmp_path / "dinov3-vitl16-pretrain-sat493m"


@pytest.mark.slow
def test_host_memory_peaks_near_one_copy(tmp_path):
    """A wide, 7B-shaped (SwiGLU, 4096 wide, 32 heads) checkpoint: peak RSS while loading stays near
    one copy of the weights, measured in a fresh process by the benchmark script."""
    script = Path(__file__).parents[1] / "benchmarks" / "bench_load.py"
    out = subprocess.run([sys.executable, str(script), "--depth", "2", "--dir", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["embed_dim"] == 4096 and report["checkpoint_mb"] > 600
    assert report["load_peak_over_baseline_mb"] < 1.35 * report["checkpoint_mb"], report
