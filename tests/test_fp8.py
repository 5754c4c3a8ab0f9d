"""``--precision fp8``: float8 products in the backbone's linear layers, close to fp32, clear errors.

Float8 is emulated on the CPU (slow, same arithmetic as the fp8 GPU kernels: e4m3 inputs, float32
accumulation, bf16 output), so the accuracy is checked here; speed is measured on a GPU
(``benchmarks/bench_model.py``, ``benchmarks/RESULTS.md``).
"""
from __future__ import annotations


import numpy as np
import pytest
import rasterio
import torch

import dinov3_geo
from dinov3_geo.engine import Engine, RunSettings
from dinov3_geo.errors import DeviceError
from dinov3_geo.models.fp8 import Float8Linear, linears_to_fp8
from helpers import SAMPLES, small_chmv2

NAIP = SAMPLES / "opengeos_naip_m_4709963_se_14_1_20200831.tif"


@pytest.mark.parametrize("rows,bias", [(64, True), (37, False)], ids=["aligned-bias", "padded-rows"])
def test_float8_linear_close_to_linear(rows, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48, bias=bias)
    x = torch.randn(rows, 128)
    ref = linear(x)
    got = Float8Linear(linear)(x.bfloat16())
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    rel = float((got.float() - ref).norm() / ref.norm())
    assert rel < 0.05, rel                     # e4m3 keeps 3 mantissa bits: a few % per product


def test_float8_linear_rejects_unaligned_features():
    with pytest.raises(ValueError, match="divisible by 16"):
        Float8Linear(torch.nn.Linear(100, 48))


def test_every_block_linear_is_converted_and_qkv_bias_kept(tmp_path):
    """timm's attention adds its q/k/v bias with F.linear on the raw weight: after conversion the
    fp8 qkv is called and the bias added, so a K bias (CHMv2's key_bias) still counts."""
    from dinov3_geo.models.canopy import load_canopy_model

    model = small_chmv2(key_bias=True)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    ours = load_canopy_model(folder, dtype=torch.bfloat16)
    blocks = ours.backbone.vit.blocks
    plain = sum(isinstance(m, torch.nn.Linear) for m in blocks.modules())
    assert ours.use_fp8_matmuls() == plain == 4 * len(blocks)    # qkv, proj, fc1, fc2
    assert not any(isinstance(m, torch.nn.Linear) for m in blocks.modules())
    assert all(b.attn.qkv_bias_separate for b in blocks)
    assert linears_to_fp8(torch.nn.Sequential()) == 0


def test_fp8_segment_close_to_fp32(tmp_path):
    """The whole command path with fp8 products: heights within a few % of fp32 (median), NaN in the
    same places."""
    model = small_chmv2(seed=3)
    model.save_pretrained(tmp_path / "hf")
    outs = {}
    for precision in ("fp32", "fp8"):
        result = dinov3_geo.segment(NAIP, task="canopy", output=tmp_path / f"{precision}.tif",
                                    weights=tmp_path / "hf", tile=256, overlap=32, batch_size=4, device="cpu",
                                    precision=precision, progress=False)
        with rasterio.open(result.output) as ds:
            outs[precision] = ds.read(1)
    ref, got = outs["fp32"], outs["fp8"]
    np.testing.assert_array_equal(np.isnan(ref), np.isnan(got))
    ok = ~np.isnan(ref)
    rel = np.abs(got[ok] - ref[ok]) / np.abs(ref[ok])
    assert np.median(rel) < 0.03, np.median(rel)
    assert np.corrcoef(got[ok], ref[ok])[0, 1] > 0.99
    assert np.abs(got[ok] - ref[ok]).max() > 0          # fp8 really ran


def test_fp8_on_a_gpu_without_fp8_is_a_device_error(monkeypatch):
    """A GPU older than compute capability 8.9 (e.g. a V100 or an A100) gets one clear line."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    model = torch.nn.Module()
    with pytest.raises(DeviceError, match=r"compute capability 8\.9.*A100.*`precision` bf16"):
        Engine(model, RunSettings(torch.device("cuda"), "fp8", torch.bfloat16))
