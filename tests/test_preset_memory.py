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

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = {"qwen2_5_vl_3b": 8, "qwen2_5_vl_7b": 8, "qwen2_5_vl_32b": 32, "qwen2_5_vl_72b": 64}
LIMIT_GIB = 80


def preset_step_memory(preset: str, mode: str) -> dict:
    """The preset's step memory on this process's devices at its largest buckets, vision inputs included (one
    full-size image per row for SFT, per pair for DPO: the largest patch bucket)."""
    from medee_jax import recipes
    from medee_jax.models import presets
    from medee_jax.training import setup
    from medee_jax.training.batches import run_batch_spec
    from medee_jax.training.mesh import make_mesh
    from medee_jax.training.step_memory import compile_step, memory_report, synthetic_batch
    from tests.run_training import load_config

    cfg = presets()[preset]
    c = recipes.apply_preset(load_config(os.path.join(ROOT, "configs", f"{mode}.py"), []), preset)
    data = setup.DataSpec("synthetic", "", "", "", False)
    spec = run_batch_spec(c, data, cfg)
    memory = memory_report(compile_step(c, cfg, make_mesh(dict(c.mesh)), synthetic_batch(c, spec, cfg), spec,
                                        with_images=True))
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
