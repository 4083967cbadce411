"""tools/aot_compile.py: the trainer's step compiled ahead of time for a slice on this CPU host, on a tiny model.

TPU slices need libtpu (the test extra installs it on Linux x86-64: ``pip install libtpu`` next to the pinned jax);
GPU hosts compile on the CPU backend and always run here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from medee_jax import recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "aot_compile.py")
JSON_FIELDS = ("topology", "devices", "peak_memory_gib_per_device", "hbm_gib", "fits", "flops_per_step", "mesh",
               "state_gib_per_device", "collectives", "pieces", "batch_shape", "text_attention")
SMALL = ("--config.data.max_length=128", "--config.data.length_buckets=(128,)", "--config.data.patch_buckets=(64,)",
         "--config.data.target_buckets=(64,)")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A directory with only a tiny Qwen2.5-VL config.json: the tool reads no weights."""
    from medee_jax.models.qwen2_5_vl.config import tiny_config

    out = tmp_path_factory.mktemp("aot_tiny")
    with open(out / "config.json", "w") as f:
        json.dump(tiny_config(512, image_token_id=500, vision_start_token_id=501, vision_end_token_id=502)
                  .to_hf_dict(), f)
    return str(out)


def run_tool(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)
    return proc, (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else None)


def test_gpu_host_plan_compiles_on_the_cpu_backend(tiny_checkpoint):
    proc, report = run_tool("--config", "configs/dpo.py", "--topology", "h200-8", f"--config.model.checkpoint="
                            f"{tiny_checkpoint}", "--config.mesh.fsdp=-1", "--config.mesh.data=1", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for field in JSON_FIELDS:
        assert field in report, field
    assert report["topology"] == "h200-8" and report["devices"] == 8 and report["mesh"]["fsdp"] == 8
    assert report["fits"] is True and 0 < report["state_gib_per_device"] < report["peak_memory_gib_per_device"]
    assert report["hbm_gib"] == pytest.approx(141e9 / 2**30 * 0.95, rel=1e-3)  # train.gpu_memory_fraction
    assert report["batch_shape"] == {"rows": 2, "length": 128, "patches": 64}
    # fsdp over 8 devices: parameters gathered, gradients reduce-scattered
    assert report["collectives"].get("all-gather", 0) > 0 and report["flops_per_step"] > 0
    assert set(report["pieces"]) == {"accumulate_first", "clip", "update"}
    assert any(line.endswith(": fits") for line in proc.stdout.splitlines())


def test_a_plan_that_does_not_fit_exits_1(tiny_checkpoint):
    proc, report = run_tool("--config", "configs/sft.py", "--topology", "h100-1", "--hbm_gib=0.002",
                            f"--config.model.checkpoint={tiny_checkpoint}", "--text_only", *SMALL)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert report["fits"] is False and report["hbm_gib"] == 0.002 and report["images"] is False
    assert report["batch_shape"]["patches"] == 0


def test_usage_errors_name_what_is_missing():
    proc, _ = run_tool("--config", "configs/dpo.py", "--topology", "h100-1")
    assert proc.returncode == 2 and "name a preset" in proc.stderr
    proc, _ = run_tool("--config", "configs/dpo.py:qwen2_5_vl_7b")
    assert proc.returncode == 2 and "--topology is required" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (the test extra installs it on Linux x86-64: pip install libtpu)")
def test_tpu_slice_plan_compiles_with_libtpu(tiny_checkpoint):
    proc, report = run_tool("--config", "configs/dpo.py", "--topology", "v5p-8",
                            f"--config.model.checkpoint={tiny_checkpoint}", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["platform"] == "tpu" and report["devices"] == 4 and report["device_kind"].startswith("TPU v5")
    assert report["fits"] is True and report["hbm_gib"] == 95.0 and report["flops_per_step"] > 0
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}  # the recipe: data parallel over the slice
    assert report["collectives"].get("all-reduce", 0) > 0  # the gradients' sum over the data shards
    assert report["collectives_counted"] is True  # read from the compiler's own HLO dump
    # model.attention=auto on a TPU mesh: the splash kernel inside the step (forward, remat recompute, backward)
    assert report["text_attention"] == "splash" and report["pieces"]["accumulate_first"]["pallas_kernel_calls"] >= 2
    assert "text attention: splash" in proc.stdout
    # 4 tensor shards do not divide the tiny model's 2 KV heads: auto runs blockwise, with no Pallas kernel
    proc, report = run_tool("--config", "configs/dpo.py", "--topology", "v5p-8", "--config.mesh.data=1",
                            "--config.mesh.tensor=4", f"--config.model.checkpoint={tiny_checkpoint}", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["mesh"]["tensor"] == 4 and report["text_attention"] == "blockwise"
    assert report["pieces"]["accumulate_first"]["pallas_kernel_calls"] == 0


def test_slice_plans_apply_before_the_command_line():
    c = recipes.apply_preset(recipes.base_config("dpo"), "qwen2_5_vl_7b,topology=h200-1")
    assert c.preset == "qwen2_5_vl_7b" and c.topology == "h200-1"
    for field, value in recipes.slice_plan_values("qwen2_5_vl_7b", "h200-1", "dpo").items():
        assert recipes.get_field(c, field) == value, field
    with pytest.raises(ValueError, match="no plan for slice 'v9-1'"):
        recipes.apply_preset(recipes.base_config("dpo"), "qwen2_5_vl_7b,topology=v9-1")
    with pytest.raises(ValueError, match="only option after a preset is topology"):
        recipes.apply_preset(recipes.base_config("dpo"), "qwen2_5_vl_7b,size=7b")
    c = recipes.apply_preset(recipes.base_config("dpo"), "qwen2_5_vl_7b")
    assert not recipes.apply_slice_plan(c, "v6e-256") and c.topology == "v6e-256"  # no plan: preset defaults
    assert recipes.apply_slice_plan(c, "h200-1", keep={"dpo.reference"}) and c.dpo.reference == "frozen"


def test_every_slice_plan_names_a_known_slice_and_preset():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from aot_compile import SLICES

    assert recipes.SLICE_PLANS
    for preset, plans in recipes.SLICE_PLANS.items():
        assert preset in recipes.PRESETS
        for slice_name, plan in plans.items():
            assert slice_name in SLICES, slice_name
            base = recipes.base_config("dpo")
            for field in plan:
                recipes.get_field(base, field)  # an existing field
