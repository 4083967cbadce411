"""Smoke test of tools/bench_step.py: a tiny transformers checkpoint, two timed DPO steps, the JSON keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.qwen_reference import tiny_hf_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "bench_step.py")
KEYS = ("median_step_s", "tokens_per_s", "peak_rss_mb", "mfu", "hfu", "compile_s", "tokens_per_step",
        "flops_per_token", "device", "loadavg_start", "rows_per_step", "row_length")


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
    assert result["peak_rss_mb"] > 0 and 0 < result["mfu"] < result["hfu"]
    assert result["rows_per_step"] == 2 and result["row_length"] == 20
    assert result["model_source"] in ("from_pretrained",) or result["model_source"].startswith("random init")
    assert result["skipped_steps"] == 0.0
    assert len(result["step_times_s"]) == 2
    # A float32 run on CPU: the step compiled with the trainer's XLA:CPU options (train.xla_cpu_fused_dot).
    assert result["compiler_options"]["xla_cpu_experimental_ynn_fusion_type"] == "LIBRARY_FUSION_TYPE_DOT"


def test_bench_step_without_the_cpu_compiler_options():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_common
    import bench_step
    from medee_jax.training import setup

    args = bench_step.parse_args(["--no-xla-cpu-fused-dot"])
    config = bench_common.trainer_config(args, None, 20, 4, 8, 20)
    assert config.train.xla_cpu_fused_dot is False and setup.cpu_step_compiler_options(config, platform="cpu") == {}
    assert bench_common.trainer_config(bench_step.parse_args([]), None, 20, 4, 8, 20).train.xla_cpu_fused_dot


@pytest.mark.parametrize("share_prompt", [False, True])
def test_bench_batch_is_the_trainers_layout(tiny_checkpoint, share_prompt):
    """The benchmark's batch comes from the run's own BatchSpec: with --share-prompt one row per pair holding the
    prompt once (the layout dpo.share_prompt trains on), not the separate rows of the default."""
    import argparse

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_common
    from medee_jax.models import load_config

    args = argparse.Namespace(mode="dpo", pairs=2, prompt_len=8, response_len=8, image_size=56, dtype="float32",
                              remat="none", share_prompt=share_prompt, warmup=0, steps=1, vocab_chunk=0,
                              seq_chunk=0)
    hf_config = bench_common.read_hf_config(tiny_checkpoint)
    config = bench_common.plan_config(args, tiny_checkpoint, hf_config)
    assert bool(config.dpo.share_prompt) is share_prompt
    examples = bench_common.synthetic_examples("dpo", 2, 8, 8, 56, hf_config)
    model_cfg = load_config(tiny_checkpoint)
    batch = bench_common.host_step_batch(config, tiny_checkpoint, model_cfg, examples, shards=1)
    rows, length = batch["input_ids"].shape[1:]
    if share_prompt:  # [prompt (8 text + 4 image tokens) | chosen (8) | rejected (8)] per pair
        assert (rows, length) == (2, 28) and "branch_ids" in batch
    else:
        assert (rows, length) == (4, 20) and "branch_ids" not in batch
    flops = bench_common.step_flops(config, model_cfg, batch)
    assert flops["decoder_tokens_per_step"] == (56 if share_prompt else 80)
    assert flops["target_tokens_per_step"] == 4 * 8  # both layouts train on every completion token


def test_bench_step_torch_autocast_keeps_fp32_master_weights(tiny_checkpoint):
    """--framework torch --dtype bfloat16 --torch-autocast: the peer of the JAX side's mixed precision (fp32 weights
    and AdamW, bf16 forwards); the step runs, trains (a finite loss) and says which setting it ran."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_step

    args = bench_step.parse_args(["--mode", "dpo", "--model-dir", tiny_checkpoint, "--pairs", "1", "--prompt-len",
                                  "8", "--response-len", "8", "--image-size", "56", "--steps", "1", "--warmup", "0",
                                  "--framework", "torch", "--dtype", "bfloat16", "--torch-autocast",
                                  "--peak-flops", "1e10"])
    import bench_step_torch

    result = bench_step_torch.run_torch(args, tiny_checkpoint, bench_step.read_hf_config(tiny_checkpoint))
    assert result["torch_autocast"] is True and result["dtype"] == "bfloat16"
    assert result["tokens_per_step"] == 40 and result["median_step_s"] > 0
    assert np.isfinite(result["loss"])


@pytest.mark.parametrize("extra", [["--dtype", "bfloat16"], ["--framework", "torch"]])
def test_bench_step_torch_autocast_needs_bf16_and_torch(extra, capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_step

    with pytest.raises(SystemExit):
        bench_step.parse_args(["--torch-autocast", *extra])
    assert "--torch-autocast is for --framework torch --dtype bfloat16" in capsys.readouterr().err


@pytest.mark.parametrize("total,warmup_ratio,final_ratio", [(7, 0.1, 0.0), (20, 0.25, 0.1), (3, 0.0, 0.0)])
def test_torch_peer_schedule_is_the_trainers(total, warmup_ratio, final_ratio):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_common
    from medee_jax.training import steps

    schedule = steps.warmup_cosine(5e-7, total, warmup_ratio, final_ratio)
    for update in range(total + 2):
        assert bench_common.schedule_lr(update, 5e-7, total, warmup_ratio, final_ratio) == pytest.approx(
            float(schedule(update)), rel=1e-6, abs=1e-15), update


def test_both_sides_run_the_same_dpo_steps(tiny_checkpoint):
    """fp32, same checkpoint, batch, optimizer and schedule: the loss of the last of 4 steps (3 updates in) agrees
    between the trainer's step and the transformers + PyTorch peer, so the benchmark times the same work."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_step
    import bench_step_torch

    common = ["--mode", "dpo", "--model-dir", tiny_checkpoint, "--pairs", "2", "--prompt-len", "8", "--response-len",
              "8", "--image-size", "56", "--steps", "2", "--warmup", "1", "--peak-flops", "1e10"]
    hf_config = bench_step.read_hf_config(tiny_checkpoint)
    ours = subprocess.run([sys.executable, TOOL, *common], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert ours.returncode == 0, ours.stderr[-3000:]
    ours_loss = json.loads(ours.stdout.strip().splitlines()[-1])["loss"]
    torch_loss = bench_step_torch.run_torch(bench_step.parse_args([*common, "--framework", "torch"]), tiny_checkpoint,
                                            hf_config)["loss"]
    # After 3 updates at the DPO recipe's 5e-7 the loss has moved from log 2 by far more than fp32 reassociation.
    assert abs(ours_loss - np.log(2)) > 1e-5
    assert torch_loss == pytest.approx(ours_loss, abs=2e-6)
