"""The train step's text attention (`model.attention`): the config reaches the compiled step, blockwise keeps the
step's temporaries O(L) where the dense reference holds [rows, heads, L, L] scores, and bad values are one error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 2048


def _step_temporaries(tokenizer_dir, attention: str, length: int = LENGTH) -> tuple[int, int]:
    """Returns (the DPO step's largest compiled temporaries in bytes, rows x heads) at ``length`` tokens a row."""
    from medee_jax.training import setup
    from medee_jax.training.batches import run_batch_spec
    from medee_jax.training.mesh import make_mesh
    from medee_jax.training.step_memory import compile_step, memory_report, synthetic_batch
    from tests.run_training import load_config

    c = load_config(os.path.join(ROOT, "configs", "dpo.py"), [
        f"model.attention={attention!r}", "model.dtype='float32'", "model.remat='full'",
        f"data.max_length={length}", f"data.length_buckets=({length},)", f"data.target_buckets=({length},)",
        "data.batch_size=1", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    cfg = setup.embedded_model_config(str(tokenizer_dir))
    data = setup.DataSpec("synthetic", "", str(tokenizer_dir), "", False)
    spec = run_batch_spec(c, data, cfg)
    compiled = compile_step(c, cfg, make_mesh(dict(c.mesh)), synthetic_batch(c, spec, cfg), spec, with_images=False)
    report = memory_report(compiled)
    temporaries = max(v["temporaries"] for v in report.values() if isinstance(v, dict) and "temporaries" in v)
    return temporaries, compiled.batch_shape["rows"] * cfg.text.num_attention_heads


def test_blockwise_step_has_no_quadratic_temporaries(demo_tokenizer_dir):
    dense, heads_rows = _step_temporaries(demo_tokenizer_dir, "reference")
    blockwise, _ = _step_temporaries(demo_tokenizer_dir, "blockwise")
    blockwise_twice, _ = _step_temporaries(demo_tokenizer_dir, "blockwise", 2 * LENGTH)
    auto, _ = _step_temporaries(demo_tokenizer_dir, "auto")
    scores = heads_rows * LENGTH * LENGTH * 4  # one layer's fp32 [rows, heads, L, L] score matrix
    assert dense - blockwise > scores, (dense, blockwise, scores)  # the reference path holds the scores ...
    assert blockwise_twice < 2.5 * blockwise, (blockwise, blockwise_twice)  # ... blockwise grows linearly in L
    assert auto == blockwise  # auto on CPU at 2048 tokens runs blockwise


def test_bad_attention_value_is_one_config_error(demo_tokenizer_dir):
    from medee_jax.training import setup
    from tests.run_training import load_config

    c = load_config(os.path.join(ROOT, "configs", "dpo.py"), ["model.attention='cudnn'"])
    with pytest.raises(ValueError, match=r"model.attention='cudnn': auto, reference, blockwise, splash \(cudnn takes "
                                         r"no padding or segment masks"):
        setup.validate_config(c, create_workdir=False)


def test_splash_on_a_cpu_mesh_is_refused_before_building_the_model(demo_tokenizer_dir):
    from medee_jax.training import setup
    from medee_jax.training.mesh import make_mesh
    from tests.run_training import load_config

    c = load_config(os.path.join(ROOT, "configs", "dpo.py"), ["model.attention='splash'"])
    setup.validate_config(c, create_workdir=False)  # a valid value: splash on a TPU mesh
    data = setup.DataSpec("", "", str(demo_tokenizer_dir), "", True)
    with pytest.raises(ValueError, match=r"model.attention='splash' runs on TPU only \(this run's devices: cpu\)"):
        setup.build_model(c, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}), data)


# ---------------------------------------------------------------------------------------------------------------
# splash inside the sharded train step: the step maps over data shards with vmap(spmd_axis_name=(data, fsdp)); the
# kernel runs under a shard_map over the step's context mesh (the vmap adds the shard axis, heads over tensor). On
# 8 simulated CPU devices, in Pallas interpret mode, the step's loss and gradients equal the dense reference's.


def sharded_step_results(mode: str, implementation: str) -> dict:
    """{"loss", "grads" (numpy), "manual": the shard_map shardings in the lowered step} of the trainer's
    accumulate_first for the tiny model on mesh data=2 x fsdp=2 x tensor=2 (4 data shards, each with its own rows:
    padding, packed SFT rows with segment ids, images), text attention ``implementation`` (Pallas in interpret
    mode), remat full, a reference model that differs from the policy."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from medee_jax.models.families import family_of
    from medee_jax.models.qwen2_5_vl.model import Qwen25VL
    from medee_jax.models.sharding import param_shardings
    from medee_jax.training import steps
    from medee_jax.training.mesh import batch_sharding, make_mesh, stack_shards
    from medee_jax.training.state import TrainState
    from tests.test_batching import make_example, make_pair
    from tests.test_steps import CFG, build, with_random_pixels

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rng = np.random.default_rng(11)
    shards = []
    for s in range(4):
        if mode == "dpo":
            items = with_random_pixels([make_pair(rng, 10 * s + 1, s % 2), make_pair(rng, 10 * s + 2, 1)], rng)
            shards.append(build("dpo", items, targets=(64,)))
        else:
            rows = with_random_pixels([make_example(rng, 10 * s + 1, 1, max_len=30),
                                       make_example(rng, 10 * s + 2, s % 2, max_len=20)], rng)
            shards.append(build("sft", [rows], targets=(64,)))  # one packed row: segment ids
    batch = stack_shards([jax.tree.map(lambda x: x[0], shard) for shard in shards])  # [S=4, ...]
    batch = jax.tree.map(lambda v: jax.device_put(v, batch_sharding(mesh, v.ndim)), batch)

    model = Qwen25VL(CFG, remat="full", rngs=nnx.Rngs(0))
    model.lm_head[...] = model.lm_head[...] * 30.0
    model.set_text_attention(implementation, interpret=True)
    graphdef, params, frozen = nnx.split(model, steps.trainable_filter(family_of(CFG), False, False), nnx.Param)
    shardings = nnx.to_pure_dict(param_shardings(nnx.state(model, nnx.Param), mesh))
    placed = {}
    for name, tree in (("params", nnx.to_pure_dict(params)), ("frozen", nnx.to_pure_dict(frozen))):
        placed[name] = jax.tree.map(jax.device_put, tree, {k: shardings[k] for k in tree})
    ref = jax.tree.map(lambda p: p * 1.05, placed["params"])  # the policy has moved away from its reference
    state = TrainState(params=placed["params"], frozen=placed["frozen"], ref=ref, opt_state=None, step=jnp.int32(0),
                       nonfinite_in_a_row=jnp.int32(0), nonfinite_total=jnp.int32(0))
    loss_mask = np.asarray(batch["loss_mask"])
    if mode == "dpo":
        norms = {"pairs": jnp.float32(8.0), "chosen_tokens": jnp.float32(float(loss_mask[:, :2].sum()))}
    else:
        norms = {"tokens": jnp.float32(float((loss_mask != 0).sum()))}
    opts = steps.StepOptions(mode=mode, vocab_chunk=24, seq_chunk=8)
    grad_shardings = jax.tree.map(lambda p: p.sharding, state.params)
    step = steps.UnderMesh(jax.jit(lambda st, b, n: steps.accumulate_first(graphdef, st, b, n, opts,
                                                                           grad_shardings=grad_shardings)), mesh)
    out = step(state, batch, norms)
    lowered = step.lower(state, batch, norms).as_text()
    manual = [line.split("in_shardings=")[1][:300] for line in lowered.splitlines() if "sdy.manual_computation" in line]
    return {"loss": float(out["loss"]), "grads": jax.tree.map(np.asarray, out["grads"]), "manual": manual}


def compare_splash_with_reference_in_the_sharded_step() -> dict:
    """Per mode: splash's and reference's loss, the largest gradient difference relative to the largest gradient,
    and splash's shard_map shardings."""
    out = {}
    for mode in ("dpo", "sft"):
        want = sharded_step_results(mode, "reference")
        got = sharded_step_results(mode, "splash")
        worst = max(float(np.abs(g - w).max() / (np.abs(w).max() + 1e-30))
                    for g, w in zip(jax.tree.leaves(got["grads"]), jax.tree.leaves(want["grads"])))
        out[mode] = {"loss": [got["loss"], want["loss"]], "grad_rel_diff": worst, "manual": got["manual"],
                     "reference_manual": want["manual"], "grad_max": max(float(np.abs(w).max())
                                                                         for w in jax.tree.leaves(want["grads"]))}
    return out


def test_splash_in_the_sharded_step_equals_reference():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    code = ("import json, sys; from tests.test_train_attention import compare_splash_with_reference_in_the_sharded_step"
            " as run; json.dump(run(), sys.stdout)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    for mode, r in result.items():
        got, want = r["loss"]
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7), mode
        assert r["grad_max"] > 0 and r["grad_rel_diff"] < 1e-5, (mode, r["grad_rel_diff"])
        assert not r["reference_manual"]  # the dense path runs without a shard_map
        # the kernel's shard_map: the vmap's shard axis over (data, fsdp), heads over tensor
        assert any('{"data", "fsdp"}, {}, {"tensor"}' in m for m in r["manual"]), (mode, r["manual"][:3])


def test_build_model_sets_the_decoders_attention(demo_tokenizer_dir):
    from medee_jax.training import setup
    from medee_jax.training.mesh import make_mesh
    from tests.run_training import load_config

    c = load_config(os.path.join(ROOT, "configs", "dpo.py"), ["model.attention='blockwise'", "model.dtype='float32'"])
    data = setup.DataSpec("", "", str(demo_tokenizer_dir), "", True)
    model = setup.build_model(c, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}), data)
    assert model.language_model.attention_implementation == "blockwise"
    with pytest.raises(ValueError, match="model.attention='nope'"):
        model.set_text_attention("nope")
