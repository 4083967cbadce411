"""Slow: each size preset's train step, compiled for the CPU backend on a simulated mesh of the smallest slice the
preset is meant for, at its largest buckets with full-size images, stays under 80 GiB per device (XLA's memory
analysis: resident state + the largest transient). CPU figures, not GPU/TPU ones: a guard against a preset that
grows out of any accelerator, not a fit guarantee (run --check on the real slice).

    python -m tests.test_preset_memory PRESET MODE     # one JSON line (run with XLA_FLAGS setting the devices)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = {"qwen2_5_vl_3b": 8, "qwen2_5_vl_7b": 8, "qwen2_5_vl_32b": 32, "qwen2_5_vl_72b": 64}
LIMIT_GIB = 80


def preset_step_memory(preset: str, mode: str) -> dict:
    """The preset's step memory on this process's devices, for a batch of full-length rows with one full-size
    image per row (SFT) or per pair (DPO)."""
    from medee_jax import recipes
    from medee_jax.data import pipeline
    from medee_jax.models.qwen2_5_vl.config import PRESETS
    from medee_jax.training import setup
    from medee_jax.training.mesh import make_mesh
    from medee_jax.training.step_memory import step_memory
    from tests.run_training import load_config

    cfg = PRESETS[preset]
    c = recipes.apply_preset(load_config(os.path.join(ROOT, "configs", f"{mode}.py"), []), preset)
    with tempfile.TemporaryDirectory() as ckpt:
        with open(os.path.join(ckpt, "config.json"), "w") as f:
            json.dump(cfg.to_hf_dict(), f)
        c.model.checkpoint = c.data.train = ckpt
        c = setup.resolve_config(c)
        data = setup.DataSpec(os.path.join(ckpt, "train.jsonl"), "", ckpt, "", False)
        spec = pipeline.batch_spec(dc := setup.pipeline_config(c, data, "train"), pipeline.image_inputs(dc, cfg),
                                   cfg.image_token_id)
    length, patches = c.data.max_length, recipes.QWEN_PATCHES_PER_IMAGE
    ids = np.full(length, 100, np.int32)
    ids[10:10 + patches // 4] = cfg.image_token_id
    targets = np.zeros(length, np.int32)
    targets[length // 4:] = 1
    image = {"pixel_values": np.zeros((patches, 588), np.uint8), "image_grid_thw": np.array([[1, 56, 64]]),
             "source": "synthetic:1"}
    if mode == "sft":
        items = [[{"input_ids": ids, "target_mask": targets, **image}]] * c.data.batch_size
    else:
        items = [{"chosen_input_ids": ids, "chosen_target_mask": targets, "rejected_input_ids": ids,
                  "rejected_target_mask": targets, **image}] * c.data.batch_size
    memory = step_memory(c, cfg, make_mesh(dict(c.mesh)), spec.build(items), spec)
    return {"preset": preset, "mode": mode, "peak_gib": memory["peak_bytes_per_device"] / 2**30,
            "state_gib": memory["state"] / 2**30, **memory["batch_shape"]}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sft", "dpo"])
@pytest.mark.parametrize("preset", list(DEVICES))
def test_preset_step_fits_80_gib_per_device(preset, mode):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES[preset]}")
    proc = subprocess.run([sys.executable, "-m", "tests.test_preset_memory", preset, mode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["length"] == 4096 and result["patches"] > 0
    assert 0 < result["state_gib"] < result["peak_gib"] < LIMIT_GIB, result


if __name__ == "__main__":
    print(json.dumps(preset_step_memory(sys.argv[1], sys.argv[2])))
