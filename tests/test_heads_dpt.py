"""The DPT head's key names and shapes (Meta's official decoder) and the mixlog decoding."""
from __future__ import annotations

import re

import pytest
import torch
from transformers import CHMv2Config
from transformers.models.chmv2.modeling_chmv2 import CHMv2FeaturesToDepth, CHMv2Head as HFHead

from dinov3_geo.models.heads import chmv2
from dinov3_geo.models.heads.chmv2 import CHMv2Head, chmv2_mixlog_bins, mixlog_to_metres
from dinov3_geo.models.heads.dpt import DPTHead, DPTHeadConfig, config_from_state_dict, hf_to_meta_head_state

# Meta's decoder keys of dinov3_vitl16_chmv2_dpt_head-3703d643.pth (spec 4.1, dpt_head.py).
META_KEY_PATTERNS = [
    r"reassemble_blocks\.projects\.[0-3]\.conv\.(weight|bias)",
    r"reassemble_blocks\.resize_layers\.[013]\.(weight|bias)",
    r"reassemble_blocks\.readout_projects\.[0-3]\.0\.(weight|bias)",
    r"convs\.[0-3]\.conv\.weight",
    r"fusion_blocks\.[0-3]\.project\.conv\.(weight|bias)",
    r"fusion_blocks\.[1-3]\.res_conv_unit1\.conv[12]\.conv\.(weight|bias)",
    r"fusion_blocks\.[0-3]\.res_conv_unit2\.conv[12]\.conv\.(weight|bias)",
    r"conv_depth\.head\.[024]\.(weight|bias)",
]


def meta_device_state(module_factory) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in module_factory().state_dict().items()}


def test_full_size_keys_are_meta_official_names():
    shapes = meta_device_state(CHMv2Head)
    assert all(any(re.fullmatch(p, k) for p in META_KEY_PATTERNS) for k in shapes), sorted(shapes)
    assert len(shapes) == 4 * 2 + 3 * 2 + 4 * 2 + 4 + 4 * 2 + 3 * 4 + 4 * 4 + 3 * 2
    assert shapes["reassemble_blocks.readout_projects.0.0.weight"] == (1024, 2048)
    assert shapes["reassemble_blocks.resize_layers.0.weight"] == (128, 128, 4, 4)
    assert shapes["reassemble_blocks.resize_layers.3.weight"] == (1024, 1024, 3, 3)
    assert shapes["convs.3.conv.weight"] == (256, 1024, 3, 3)
    assert shapes["conv_depth.head.0.weight"] == (128, 256, 3, 3)
    assert shapes["conv_depth.head.4.weight"] == (256, 128, 1, 1)


def test_full_size_matches_transformers_head_after_renaming():
    ours = meta_device_state(CHMv2Head)
    theirs = meta_device_state(lambda: HFHead(CHMv2Config()))
    renamed, unknown = hf_to_meta_head_state(theirs)
    assert unknown == []
    assert renamed == ours


def test_config_read_back_from_state():
    cfg = DPTHeadConfig(in_channels=48, channels=24, post_process_channels=(8, 16, 32, 48), n_hidden_channels=12,
                        n_output_channels=20)
    assert config_from_state_dict(DPTHead(cfg).state_dict()) == cfg
    ignore = DPTHeadConfig(in_channels=48, readout="ignore", use_bias=False)
    assert config_from_state_dict(DPTHead(ignore).state_dict()) == ignore


@pytest.mark.parametrize("grid", [(32, 32), (25, 25), (24, 31)])
def test_head_output_size(grid):
    cfg = DPTHeadConfig(in_channels=32, channels=16, post_process_channels=(8, 8, 16, 16), n_hidden_channels=8,
                        n_output_channels=16)
    head = CHMv2Head(cfg).eval()
    h, w = grid
    feats = [(torch.randn(1, 32, h, w), torch.randn(1, 32)) for _ in range(4)]
    with torch.no_grad():
        logits = DPTHead.forward(head, feats)
        metres = head(feats, out_size=(16 * h, 16 * w))
    # each odd grid side overshoots by 16 px (stride-32 level ceil-divided)
    assert logits.shape[-2:] == (16 * (h + h % 2), 16 * (w + w % 2))
    assert metres.shape == (1, 1, 16 * h, 16 * w)


def test_bins_equal_transformers():
    ref = CHMv2FeaturesToDepth(CHMv2Config())
    for n in (256, 32):
        assert torch.equal(chmv2_mixlog_bins(n), ref._create_mixlog_bins(n, torch.device("cpu")))


@pytest.mark.parametrize("chunk", [1 << 24, 1000], ids=["one-pass", "chunked"])
def test_mixlog_matches_transformers(chunk):
    torch.manual_seed(0)
    logits = torch.randn(2, 256, 40, 56) * 3
    logits[0, :, 0, 0] = -1.0                       # all bins negative: the shift keeps it finite
    ref = CHMv2FeaturesToDepth(CHMv2Config())(logits)
    got = mixlog_to_metres(logits, chmv2_mixlog_bins(256), chunk_elements=chunk)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=0)


def test_mixlog_low_precision_input_accumulates_in_float32():
    torch.manual_seed(1)
    logits = torch.randn(1, 256, 16, 16).bfloat16()
    ref = CHMv2FeaturesToDepth(CHMv2Config())(logits.float())
    got = mixlog_to_metres(logits, chmv2_mixlog_bins(256))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=0)


def test_mixlog_does_not_modify_logits():
    logits = torch.randn(1, 32, 8, 8)
    before = logits.clone()
    mixlog_to_metres(logits, chmv2_mixlog_bins(32))
    assert torch.equal(logits, before)
