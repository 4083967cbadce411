"""Smoke test of tools/bench_step.py: a tiny transformers checkpoint, two timed DPO steps, the JSON keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.qwen_reference import tiny_hf_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "bench_step.py")
KEYS = ("median_step_s", "tokens_per_s", "peak_rss_mb", "mfu", "compile_s", "tokens_per_step", "flops_per_token",
        "device", "loadavg_start")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = tmp_path_factory.mktemp("bench_ckpt")
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(tiny_hf_config()).save_pretrained(out)
    return str(out)


def test_bench_step_dpo_prints_json_line(tiny_checkpoint):
    cmd = [sys.executable, TOOL, "--mode", "dpo", "--model-dir", tiny_checkpoint, "--pairs", "1", "--prompt-len", "8",
           "--response-len", "8", "--image-size", "56", "--steps", "2", "--warmup", "0", "--peak-flops", "1e10"]
    # Unoptimised XLA compiles the step in about half the time; only the keys and shapes are checked here.
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in KEYS:
        assert key in result, key
    # 2 rows (chosen, rejected) of 8 prompt + 4 image (56x56 -> 4x4 patches / 2x2 merge) + 8 response tokens.
    assert result["rows"] == 2 and result["seq_len"] == 20 and result["tokens_per_step"] == 40
    assert result["median_step_s"] > 0 and result["tokens_per_s"] == pytest.approx(40 / result["median_step_s"])
    assert result["peak_rss_mb"] > 0 and 0 < result["mfu"]
    assert result["model_source"] in ("from_pretrained",) or result["model_source"].startswith("random init")
    assert result["skipped_steps"] == 0.0
    assert len(result["step_times_s"]) == 2
