"""The pipeline benchmark runs on CPU (small model, a few chips) so that it cannot rot.

Only the shape of its JSON is checked: keys present, figures positive; never speeds.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers import run_benchmark

HAVE_TERRATORCH = importlib.util.find_spec("terratorch") is not None


def _run(tmp_path: Path, *args: str) -> dict:
    """``bench_pipeline.py`` on the CPU with its work files under ``tmp_path``: its JSON, once it succeeded."""
    proc, res = run_benchmark("bench_pipeline.py", "--device", "cpu", "--work", tmp_path, *args, TQDM_DISABLE="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return res


def _positive(res: dict, keys) -> None:
    for key in keys:
        assert key in res, f"{key} missing from {sorted(res)}"
        assert isinstance(res[key], (int, float)) and res[key] > 0, f"{key} = {res[key]!r}"


COMMON = ("model_only_chips_per_s", "end_to_end_chips_per_s", "ratio", "peak_rss_mb", "chips", "end_to_end_s")


@pytest.mark.slow
def test_bench_pipeline_canopy_small_cpu_with_peer(tmp_path):
    """The canopy command path (segment) on a crop of the Salt Lake scene cut into 3 x 4 chips of
    128 px (small random CHMv2), and TerraTorch's tiled_inference beside it when installed."""
    res = _run(tmp_path, "--model", "small", "--tile", "128", "--overlap", "16", "--batch", "4",
               "--grid", "3x4", "--iters", "2", "--json", str(tmp_path / "r.json"))
    assert res["device"].startswith("cpu") and res["model"] == "small"
    assert res["chip"] == 128 and res["batch"] == 4 and "error" not in res
    _positive(res, COMMON)
    assert res["chips"] == res["chips_total"] == 12
    assert res["scene_px"] == [112 * 2 + 128, 112 * 3 + 128]
    assert "peak_gpu_mb" not in res        # CPU run
    assert json.loads((tmp_path / "r.json").read_text()) == res
    if HAVE_TERRATORCH:
        _positive(res, ("peer_end_to_end_chips_per_s", "peer_ratio", "peer_model_only_chips_per_s"))
        assert res["peer_chips"] > 0 and "peer_error" not in res
    else:
        assert "peer_end_to_end_chips_per_s" not in res


@pytest.mark.slow
def test_bench_pipeline_embeddings_small_cpu(tmp_path):
    """The embeddings path (random backbone built by build_backbone, Engine, COG) without a peer,
    repeated twice (the median pair is reported), and the pass-through pipeline ceiling."""
    res = _run(tmp_path, "--model", "small-backbone", "--tile", "128", "--overlap", "16", "--batch", "4",
               "--grid", "2x3", "--iters", "2", "--peer", "off", "--repeats", "2", "--ceiling")
    _positive(res, COMMON + ("pipeline_ceiling_chips_per_s", "pipeline_ceiling_run_chips_per_s"))
    assert res["chips"] == 6 and res["model"] == "small-backbone" and "error" not in res
    assert "peer_ratio" not in res
    assert res["repeats"] == 2 and len(res["ratio_runs"]) == len(res["end_to_end_chips_per_s_runs"]) == 2
    assert res["ratio"] in res["ratio_runs"]


def test_bench_pipeline_reports_errors_as_json(tmp_path):
    """A failing run still ends with one JSON line (gpu.sh records it) and a non-zero exit."""
    proc, res = run_benchmark("bench_pipeline.py", "--device", "cpu", "--work", tmp_path,
                              "--source", tmp_path / "missing.tif", "--peer", "off", timeout=120)
    assert proc.returncode == 1
    assert "error" in res and res["model"] == "small"


def test_bench_model_variants_small_cpu(tmp_path):
    """bench_model.py: each variant (bf16, cuDNN autotuning, channels-last head, fp8) against fp32 on
    real chips: errors and model-only speed."""
    proc, res = run_benchmark("bench_model.py", "--model", "small", "--device", "cpu", "--tile", "128", "--batch", "2",
                              "--iters", "1", "--work", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for variant in ("bf16", "bf16_cudnn_benchmark", "bf16_channels_last", "fp8"):
        _positive(res[variant], ("median_rel_error", "p99_rel_error", "max_rel_error", "model_only_chips_per_s",
                                 "speedup_over_bf16"))
        assert 0.9 < res[variant]["corr"] <= 1.0
