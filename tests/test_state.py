"""The typed train state: a pytree with a documented checkpoint layout (old checkpoints still resume), frozen
parameters stored in the compute dtype without changing what the model computes, AdamW's first moment in bf16
within a stated tolerance of fp32, and the GPU memory fraction set at the trainer's start."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medee_jax import recipes
from medee_jax.models.qwen2_5_vl.config import tiny_config
from medee_jax.models.qwen2_5_vl.model import Qwen25VL
from medee_jax.training import checkpoint as ckpt
from medee_jax.training import state as state_lib
from medee_jax.training import steps
from medee_jax.training.loop import GPU_MEMORY_FRACTION_ENV, set_gpu_memory_fraction
from medee_jax.training.mesh import make_mesh

CFG = tiny_config(64, image_token_id=60, vision_start_token_id=61, vision_end_token_id=62)


def run_config(**fields):
    c = recipes.base_config("dpo")
    c.mesh.data = 1
    for field, value in fields.items():
        recipes.set_field(c, field, value)
    return c


def bf16_representable_model(dtype=jnp.bfloat16):
    """The tiny model (compute ``dtype``, fp32 master weights) with every parameter rounded to bf16, like a model
    loaded from a released bf16 checkpoint."""
    model = Qwen25VL(CFG, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), state))
    return model


def test_train_state_is_a_pytree_and_its_checkpoint_items_leave_out_the_reference():
    s = state_lib.TrainState(params={"w": jnp.ones(3)}, frozen={"v": jnp.zeros(2)}, ref={"w": jnp.ones(3)},
                             opt_state=(jnp.zeros(3),), step=jnp.int32(4), nonfinite_in_a_row=jnp.int32(1),
                             nonfinite_total=jnp.int32(2))
    assert len(jax.tree.leaves(s)) == 7
    doubled = jax.tree.map(lambda x: x * 2, s)
    assert isinstance(doubled, state_lib.TrainState) and int(doubled.step) == 8
    items = s.checkpoint_items()
    assert list(items) == list(state_lib.CHECKPOINT_FIELDS) and "ref" not in items
    back = s.replace(step=jnp.int32(0)).with_checkpoint_items(items)
    assert int(back.step) == 4 and back.ref is s.ref
    no_ref = s.replace(ref=None)
    assert len(jax.tree.leaves(no_ref)) == 6


def test_split_model_stores_frozen_parameters_in_the_compute_dtype():
    model = Qwen25VL(CFG, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    _, params, frozen = state_lib.split_model(model, run_config())
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert "visual" in frozen and "visual" not in params
    _, _, kept = state_lib.split_model(model, run_config(**{"model.frozen_dtype": "param"}))
    assert {x.dtype for x in jax.tree.leaves(kept)} == {jnp.dtype(jnp.float32)}


def test_frozen_vision_in_bf16_gives_the_same_features():
    """The tower casts its weights to the compute dtype at use: stored in bf16 (half the bytes) it computes exactly
    what it computes from fp32 storage of the same (bf16-representable) weights."""
    model = bf16_representable_model()
    rng = np.random.default_rng(0)
    from medee_jax.models.qwen2_5_vl.host import QwenImageInputs

    images = QwenImageInputs(CFG.vision)
    grid = np.array([[1, 8, 8]])
    pixels = jnp.asarray(rng.standard_normal((64, CFG.vision.patch_dim)), jnp.float32)
    layout = {k: jnp.asarray(v) for k, v in images.layout(grid, pad_to=64).items()}
    features = {}
    for choice in ("param", "compute"):
        graphdef, params, frozen = state_lib.split_model(model, run_config(**{"model.frozen_dtype": choice}))
        merged = nnx.merge(graphdef, params, frozen)
        features[choice] = np.asarray(jax.jit(lambda m: m.encode_images(pixels, **layout))(merged), np.float32)
    assert np.abs(features["param"]).max() > 0
    np.testing.assert_array_equal(features["compute"], features["param"])


def test_an_old_checkpoint_with_fp32_frozen_parameters_resumes(tmp_path):
    """The on-disk layout is the dict every checkpoint has had; a checkpoint written before frozen parameters were
    stored in bf16 (here: saved as that dict, fp32) restores into the new TrainState, cast to its dtypes."""
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    model = bf16_representable_model()
    config = run_config()
    _, params32, frozen32 = state_lib.split_model(model, run_config(**{"model.frozen_dtype": "param"}))
    old, _, _ = state_lib.init_train_state(config, params32, frozen32, mesh, total_steps=10)
    old = old.replace(step=jnp.int32(7), nonfinite_total=jnp.int32(1))
    saver = ckpt.RunCheckpointer(str(tmp_path), async_save=False)
    layout = {"params": old.params, "frozen": old.frozen, "opt_state": old.opt_state, "step": old.step,
              "nonfinite_in_a_row": old.nonfinite_in_a_row, "nonfinite_total": old.nonfinite_total}
    saver.save(7, layout, {"position": 3}, force=True)
    saver.close()

    _, params, frozen = state_lib.split_model(model, config)  # frozen now bf16
    fresh, _, _ = state_lib.init_train_state(config, params, frozen, mesh, total_steps=10)
    reader = ckpt.RunCheckpointer(str(tmp_path), async_save=False)
    restored, iterator_state = reader.restore_state(reader.latest_step(), fresh)
    reader.close()
    assert iterator_state == {"position": 3}
    assert int(restored.step) == 7 and int(restored.nonfinite_total) == 1
    assert restored.ref is fresh.ref  # not checkpointed: rebuilt from the initial weights
    for a, b in zip(jax.tree.leaves(restored.frozen), jax.tree.leaves(old.frozen)):
        assert a.dtype == jnp.bfloat16 and b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))
    for a, b in zip(jax.tree.leaves((restored.params, restored.opt_state)), jax.tree.leaves((old.params,
                                                                                              old.opt_state))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_abstract_state_matches_the_real_one():
    """What step_memory / aot_compile compile on is the trainer's state: same tree, shapes, dtypes, shardings."""
    from medee_jax.models import abstract_model
    from medee_jax.training.step_memory import abstract_state

    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    for fields in ({}, {"optimizer.mu_dtype": "bfloat16", "dpo.reference": "precomputed"}):
        config = run_config(**fields)
        model = Qwen25VL(CFG, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        _, params, frozen = state_lib.split_model(model, config)
        real, _, _ = state_lib.init_train_state(config, params, frozen, mesh, total_steps=10)
        _, abstract, _, _ = abstract_state(config, abstract_model(CFG, jnp.bfloat16, param_dtype=jnp.float32),
                                           mesh)
        assert jax.tree.structure(real) == jax.tree.structure(abstract)
        for a, b in zip(jax.tree.leaves(real), jax.tree.leaves(abstract)):
            assert (a.shape, a.dtype) == (b.shape, b.dtype)
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        assert (real.ref is None) == (fields.get("dpo.reference") == "precomputed")


def test_gpu_memory_fraction_is_set_unless_the_environment_sets_it(monkeypatch):
    monkeypatch.delenv(GPU_MEMORY_FRACTION_ENV, raising=False)
    assert set_gpu_memory_fraction(0.0) is None and GPU_MEMORY_FRACTION_ENV not in os.environ
    assert set_gpu_memory_fraction(0.95) == "0.95" == os.environ[GPU_MEMORY_FRACTION_ENV]
    monkeypatch.setenv(GPU_MEMORY_FRACTION_ENV, "0.5")
    assert set_gpu_memory_fraction(0.95) == "0.5"  # the user's environment wins
    monkeypatch.delenv(GPU_MEMORY_FRACTION_ENV)
    with pytest.raises(ValueError, match="gpu_memory_fraction"):
        set_gpu_memory_fraction(1.5)
    assert recipes.base_config("sft").train.gpu_memory_fraction == 0.95


def test_adam_first_moment_in_bf16_stays_close_to_fp32_over_10_steps():
    """optimizer.mu_dtype=bfloat16 against fp32 moments: 10 AdamW steps (the run config's optimizer: warmup-cosine,
    weight decay) on the same gradients (unit-normal noise around a drifting mean). Every parameter ends within 2%
    of the largest total fp32 update (measured: 0.5%); mu is stored in bf16, nu stays fp32."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32), "b_bias": jnp.zeros((32,), jnp.float32)}
    grads = [jax.tree.map(lambda p, k=k: jnp.asarray(rng.normal(size=p.shape) + 0.3 * np.sin(k), jnp.float32),
                          params) for k in range(10)]

    def train(mu_dtype):
        c = run_config(**{"optimizer.lr": 1e-3, "optimizer.warmup_ratio": 0.0, "optimizer.weight_decay": 0.1,
                          "optimizer.mu_dtype": mu_dtype})
        optimizer, _ = state_lib.optimizer_for(c, params, total_steps=10)
        p, opt = params, optimizer.init(params)
        for g in grads:
            updates, opt = optimizer.update(g, opt, p)
            p = jax.tree.map(jnp.add, p, updates)
        return p, opt

    p32, opt32 = train("float32")
    p16, opt16 = train("bfloat16")
    assert opt16[0].mu["w"].dtype == jnp.bfloat16 and opt16[0].nu["w"].dtype == jnp.float32
    assert opt32[0].mu["w"].dtype == jnp.float32
    for name in params:
        moved = float(jnp.abs(p32[name] - params[name]).max())
        assert moved > 3e-3  # 10 steps of lr <= 1e-3 (cosine decay)
        assert float(jnp.abs(p16[name] - p32[name]).max()) <= 0.02 * moved


def test_make_optimizer_defaults_to_the_parameters_dtype():
    params = {"w": jnp.ones((2, 2), jnp.float32)}
    adam = steps.make_optimizer(1e-3, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, params=params).init(params)[0]
    assert adam.mu["w"].dtype == jnp.float32


def test_step_options_translate_the_lm_head_dtype():
    from medee_jax.training.setup import step_options

    assert step_options(run_config()).lm_head_dtype == "bfloat16"  # "compute": model.dtype's operands
    assert step_options(run_config(**{"model.dtype": "float32"})).lm_head_dtype == "float32"
    assert step_options(run_config(**{"train.lm_head_dtype": "float32"})).lm_head_dtype == "float32"
