"""The CHMv2 canopy model against transformers' ``CHMv2ForDepthEstimation`` (the oracle).

Small random CHMv2 models are written by ``save_pretrained`` (one file and sharded) and, converted
to Meta's key names, as the official ``.pth`` pair (head + backbone); each must predict the
oracle's heights on a real Landsat crop preprocessed by ``CHMv2ImageProcessor``.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from dinov3_geo.errors import WeightsError
from dinov3_geo.models.canopy import (CHMV2_LAYERS, CHMV2_MEAN, CHMV2_STD, CanopyModel, even_layers,
                                      load_canopy_model)
from dinov3_geo.models.heads.chmv2 import OUTPUT_ALIGN_CORNERS
from dinov3_geo.models.heads.dpt import hf_to_meta_head_state
from helpers import SAMPLES, oracle, processed, small_chmv2, write_meta_pair

SCENE = SAMPLES / "landsat7_saltlake_truecolor_utm12n.tif"
REL_TOL = 1e-3


@pytest.fixture(scope="module", params=[(True, 1e-5), (False, 1e-6)], ids=["kbias-eps1e-5", "nokbias-eps1e-6"])
def hf_case(request, tmp_path_factory):
    """(transformers model, its save_pretrained folder, our model loaded from it)."""
    key_bias, eps = request.param
    model = small_chmv2(key_bias, eps)
    folder = tmp_path_factory.mktemp("chmv2") / "hf"
    model.save_pretrained(folder)
    return model, folder, load_canopy_model(folder)


@pytest.fixture(scope="module")
def meta_files(hf_case, tmp_path_factory):
    """The same tensors as Meta's official pair: decoder ``.pth`` + backbone ``.pth``."""
    _, folder, _ = hf_case
    return write_meta_pair(folder, tmp_path_factory.mktemp("meta"))


def scene_crop(height: int, width: int) -> torch.Tensor:
    """uint8 RGB [3,H,W] from the Landsat true-colour scene."""
    with rasterio.open(SCENE) as src:
        arr = src.read([1, 2, 3], window=((300, 300 + height), (200, 200 + width)))
    return torch.from_numpy(np.ascontiguousarray(arr))


def max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((ours - ref).abs() / ref.abs()).max())


@pytest.mark.parametrize("size", [(512, 512), (512, 384), (400, 400)], ids=["512x512", "512x384", "400x400-odd"])
def test_hf_folder_matches_transformers(hf_case, size):
    model, _, ours = hf_case
    pv = processed(scene_crop(*size))
    assert pv.shape[-2:] == size
    ref = oracle(model, pv)
    if size == (400, 400):           # 25 patches: the stride-32 level overshoots by 16 px
        assert ref.shape[-2:] == (416, 416)
    ref = F.interpolate(ref, size=size, mode="bilinear", align_corners=OUTPUT_ALIGN_CORNERS)
    with torch.no_grad():
        got = ours(pv)
    assert got.shape == (1, 1, *size) and got.dtype == torch.float32
    assert float(ref.std()) > 0.5, "degenerate test model: heights barely vary"
    assert max_rel(got, ref) < REL_TOL


def test_decoding_band_by_band_matches_whole_map_and_oracle(hf_case):
    """The bins are decoded band of rows by band (the full-resolution logits never exist); with
    7-row bands (not a divisor of the height) the heights equal the one-piece decode and the oracle."""
    model, _, ours = hf_case
    pv = processed(scene_crop(512, 384))
    with torch.no_grad():
        whole = ours(pv)
        ours.head.chunk_elements = 32 * 384 * 7
        try:
            banded = ours(pv)
        finally:
            ours.head.chunk_elements = 1 << 24
    torch.testing.assert_close(banded, whole, rtol=1e-6, atol=0)
    assert max_rel(banded, oracle(model, pv)) < REL_TOL


def test_size_not_multiple_of_patch_is_padded_and_cropped(hf_case):
    model, _, ours = hf_case
    img = scene_crop(390, 500)
    pv = processed(img)                                   # center-padded to 400x512
    ref = F.interpolate(oracle(model, pv), size=pv.shape[-2:], mode="bilinear", align_corners=False)
    ref = ref[..., 5:395, 6:506]
    with torch.no_grad():
        got = ours(ours.normalise(img[None].float() / 255))
    assert got.shape == (1, 1, 390, 500)
    assert max_rel(got, ref) < REL_TOL


def test_normalise_matches_processor(hf_case):
    _, _, ours = hf_case
    img = scene_crop(64, 96)
    assert ours.mean == CHMV2_MEAN and ours.std == CHMV2_STD
    torch.testing.assert_close(ours.normalise(img[None].float() / 255), processed(img), atol=1e-5, rtol=0)


def test_layers_from_hf_out_indices(hf_case):
    assert hf_case[2].layers == [0, 1, 2, 3]
    assert even_layers(24) == CHMV2_LAYERS == (5, 11, 17, 23)


def test_batch_of_two(hf_case):
    model, _, ours = hf_case
    pv = torch.cat([processed(scene_crop(256, 256)), processed(scene_crop(256, 256).flip(-1))])
    with torch.no_grad():
        got = ours(pv)
    assert max_rel(got, oracle(model, pv)) < REL_TOL


def test_meta_pth_pair_matches(hf_case, meta_files):
    model, _, from_hf = hf_case
    head, backbone = meta_files
    ours = load_canopy_model(head, backbone_weights=backbone)
    assert isinstance(ours, CanopyModel) and ours.layers == [0, 1, 2, 3]     # even_layers(4 blocks)
    pv = processed(scene_crop(512, 384))
    with torch.no_grad():
        got, same = ours(pv), from_hf(pv)
    # A Meta .pth carries no LayerNorm eps (1e-5 is assumed), so the eps=1e-6 case differs slightly.
    torch.testing.assert_close(got, same, atol=0, rtol=1e-5 if hf_case[0].config.backbone_config.layer_norm_eps == 1e-5
                               else 1e-4)
    assert max_rel(got, oracle(model, pv)) < REL_TOL


def test_sharded_hf_folder(tmp_path):
    model = small_chmv2(seed=3)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_canopy_model(tmp_path)
    pv = processed(scene_crop(128, 192))
    with torch.no_grad():
        assert max_rel(ours(pv), oracle(model, pv)) < REL_TOL


def test_readout_ignore_head(tmp_path):
    model = small_chmv2(readout="ignore", seed=4)
    model.save_pretrained(tmp_path)
    ours = load_canopy_model(tmp_path)
    assert not hasattr(ours.head.reassemble_blocks, "readout_projects")
    pv = processed(scene_crop(128, 128))
    with torch.no_grad():
        assert max_rel(ours(pv), oracle(model, pv)) < REL_TOL


def test_bfloat16_model_close(hf_case):
    model, folder, _ = hf_case
    ours = load_canopy_model(folder, dtype=torch.bfloat16)
    pv = processed(scene_crop(256, 256))
    with torch.no_grad():
        got = ours(pv)
    assert got.dtype == torch.float32
    assert float(((got - oracle(model, pv)).abs()).median()) < 2.0


# ----------------------------------------------------------------------------------------------
# Bad inputs


def expect_error(match: str, *args, **kwargs) -> WeightsError:
    with pytest.raises(WeightsError, match=match) as info:
        load_canopy_model(*args, **kwargs)
    return info.value


def test_head_without_backbone(meta_files):
    err = expect_error("need the SAT ViT-L backbone weights: pass `backbone_weights`", meta_files[0])
    assert err.where == str(meta_files[0])


def test_backbone_given_as_head(meta_files):
    expect_error("backbone checkpoint, not a CHMv2 head", meta_files[1], backbone_weights=meta_files[1])


def test_backbone_folder_given_as_head(tmp_path):
    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4)).save_pretrained(tmp_path)
    expect_error("'dinov3_vit' model, not CHMv2", tmp_path)


def test_truncated_head(meta_files, tmp_path):
    data = meta_files[0].read_bytes()
    bad = tmp_path / "head.pth"
    bad.write_bytes(data[: len(data) // 2])
    err = expect_error("truncated", bad, backbone_weights=meta_files[1])
    assert err.where == str(bad)


def test_random_bytes_head(meta_files, tmp_path):
    bad = tmp_path / "head.pth"
    bad.write_bytes(os.urandom(4096))
    expect_error("not a PyTorch checkpoint", bad, backbone_weights=meta_files[1])


def test_missing_head_key_named(meta_files, tmp_path):
    state = torch.load(meta_files[0], weights_only=True)
    del state["fusion_blocks.2.res_conv_unit1.conv2.conv.bias"]
    bad = tmp_path / "head.pth"
    torch.save(state, bad)
    expect_error(r"missing keys: fusion_blocks\.2\.res_conv_unit1\.conv2\.conv\.bias", bad,
                 backbone_weights=meta_files[1])


def test_wrapped_head_rejected_with_reason(meta_files, tmp_path):
    state = torch.load(meta_files[0], weights_only=True)
    bad = tmp_path / "head.pth"
    torch.save({"decoder." + k: v for k, v in state.items()}, bad)
    expect_error("nested under 'decoder.'", bad, backbone_weights=meta_files[1])


def synthmix_like_state() -> dict[str, torch.Tensor]:
    """Key layout of the 7B SYNTHMIX depther (batch-norm inputs, no readout, bias-free RCUs, project)."""
    d, c, ppc = 32, 16, [8, 8, 8, 8]
    s: dict[str, torch.Tensor] = {}
    for i, p in enumerate(ppc):
        s[f"reassemble_blocks.projects.{i}.conv.weight"] = torch.zeros(p, d, 1, 1)
        s[f"reassemble_blocks.projects.{i}.conv.bias"] = torch.zeros(p)
        for name in ("weight", "bias", "running_mean", "running_var"):
            s[f"reassemble_blocks.batchnorm_layers.{i}.{name}"] = torch.zeros(d)
        s[f"convs.{i}.conv.weight"] = torch.zeros(c, p, 3, 3)
        s[f"fusion_blocks.{i}.project.conv.weight"] = torch.zeros(c, c, 1, 1)
        s[f"fusion_blocks.{i}.res_conv_unit2.conv1.conv.weight"] = torch.zeros(c, c, 3, 3)
    s["project.conv.weight"] = torch.zeros(c, c, 3, 3)
    s["conv_depth.head.0.weight"] = torch.zeros(c // 2, c, 3, 3)
    return s


def test_7b_synthmix_head_rejected(meta_files, tmp_path):
    bad = tmp_path / "dinov3_vit7b16_synthmix_dpt_head-02040be1.pth"
    torch.save(synthmix_like_state(), bad)
    expect_error("SYNTHMIX depther", bad, backbone_weights=meta_files[1])


def test_backbone_width_mismatch(meta_files, tmp_path):
    other = small_chmv2(seed=5)
    cfg = other.config.backbone_config.to_dict()
    wide = DINOv3ViTModel(DINOv3ViTConfig(**{**cfg, "hidden_size": 128, "intermediate_size": 256}))
    wide.save_pretrained(tmp_path / "wide")
    expect_error("backbone width 128 does not match the head, which expects 64", meta_files[0],
                 backbone_weights=tmp_path / "wide")


def test_unsupported_hf_config_rejected(tmp_path):
    model = small_chmv2(seed=6)
    model.config.bins_strategy = "linear"
    model.save_pretrained(tmp_path)
    expect_error("bins_strategy='linear' is not supported", tmp_path)


def test_head_state_dict_converts_without_leftovers(hf_case):
    model = hf_case[0]
    hf_head = {k: v for k, v in model.head.state_dict().items()}
    state, unknown = hf_to_meta_head_state(hf_head)
    assert unknown == [] and len(state) == len(hf_head)
    assert set(state) == set(hf_case[2].head.state_dict())
