"""The train step's pieces: target arrays (the LM head on target positions only), log-probs and SFT sums equal to
the full-logits computation, accumulate_first equal to accumulating from zero."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medee_jax import losses
from medee_jax.data.batching import BatchSpec
from medee_jax.models.families import family_of
from medee_jax.models.qwen2_5_vl.config import tiny_config
from medee_jax.models.qwen2_5_vl.host import QwenImageInputs
from medee_jax.models.qwen2_5_vl.model import Qwen25VL
from medee_jax.training import steps
from medee_jax.training.batches import DEVICE_KEYS, add_target_arrays, target_width
from medee_jax.training.mesh import stack_shards
from medee_jax.training.state import TrainState

from .test_batching import IMAGE, make_example, make_pair


def test_target_arrays_hold_every_target_once_in_order():
    rng = np.random.default_rng(0)
    rows, length = 5, 40
    loss_mask = (rng.random((rows, length)) < 0.4) * rng.uniform(0.5, 2.0, (rows, length))
    loss_mask[3] = 0.0  # a padding row
    loss_mask = loss_mask.astype(np.float32)
    labels = rng.integers(1, 100, (rows, length)).astype(np.int32)
    counts = (loss_mask != 0).sum(-1)
    batch = {"labels": labels, "loss_mask": loss_mask}
    width = target_width([batch], (8, 16, 32, 40))
    assert width == min(t for t in (8, 16, 32, 40) if t >= counts.max())
    out = add_target_arrays(batch, width)
    assert out["target_index"].shape == out["target_labels"].shape == out["target_mask"].shape == (rows, width)
    for r in range(rows):
        k = counts[r]
        positions = np.flatnonzero(loss_mask[r])
        np.testing.assert_array_equal(out["target_index"][r, :k], positions)
        np.testing.assert_array_equal(out["target_labels"][r, :k], labels[r, positions])
        np.testing.assert_array_equal(out["target_mask"][r, :k], loss_mask[r, positions])
        assert (out["target_index"][r, k:] == 0).all() and (out["target_mask"][r, k:] == 0).all()
        assert (out["target_labels"][r, k:] == 0).all()
    # the gathered weighted sum is the full one
    np.testing.assert_allclose((out["target_mask"] * out["target_labels"]).sum(-1), (loss_mask * labels).sum(-1),
                               rtol=1e-6)
    # no bucket large enough, or a bucket larger than the row: capped at L
    assert target_width([batch], (4,)) == length and target_width([batch], (64,)) == length
    with pytest.raises(ValueError, match="below a row's"):
        add_target_arrays(batch, int(counts.max()) - 1)


# ---------------------------------------------------------------------------------------------------------------
# The step's log-probs on gathered targets against full [B, L, V] logits


CFG = tiny_config(64, image_token_id=IMAGE, vision_start_token_id=8, vision_end_token_id=9)


@pytest.fixture(scope="module")
def model():
    m = Qwen25VL(CFG, rngs=nnx.Rngs(0))
    # O(1) logits: scale the LM head up so log-probs are far from uniform
    m.lm_head[...] = m.lm_head[...] * 30.0
    return m


def build(mode, items, targets=(16, 64), share_prompt=False):
    s = BatchSpec(mode=mode, batch_size=len(items), max_length=64, length_buckets=(64,), patch_buckets=(256,),
                  image_token_id=IMAGE, images=QwenImageInputs(CFG.vision), packing=mode == "sft",
                  share_prompt=share_prompt)
    batch = s.build(items)
    batch = add_target_arrays(batch, target_width([batch], targets))
    return stack_shards([{k: v for k, v in batch.items() if k in DEVICE_KEYS}])  # [S=1, ...]


def full_logits(model, shard):
    """[B, L, V] logits of one shard through the model's own forward pieces (no target gather)."""
    features = steps.image_features(model, shard)
    return model.logits(steps.decoder_hidden(model, shard, features))


def with_random_pixels(items, rng):
    for item in items:
        if "pixel_values" in item:
            item["pixel_values"] = rng.standard_normal(item["pixel_values"].shape).astype(np.float32)
    return items


@pytest.mark.parametrize("share_prompt", [False, True])
def test_dpo_logps_on_targets_equal_full_logits(model, share_prompt):
    """Both DPO layouts (a row per sequence; a row per pair with the prompt once) give the log-probs and gradients
    of full [B, L, V] logits over separate chosen and rejected rows."""
    rng = np.random.default_rng(1)
    pairs = with_random_pixels([make_pair(rng, 1, 1), make_pair(rng, 2, 0), make_pair(rng, 3, 2)], rng)
    batch = jax.tree.map(jnp.asarray, build("dpo", pairs, share_prompt=share_prompt))
    separate = jax.tree.map(jnp.asarray, build("dpo", pairs))
    assert batch["target_index"].shape[-1] < batch["input_ids"].shape[-1]  # the head runs on fewer positions
    if share_prompt:  # one row per pair, every prompt token once
        assert batch["input_ids"].shape[1] == 3
        assert int(batch["attention_mask"].sum()) < int(separate["attention_mask"].sum())
    opts = steps.StepOptions(mode="dpo", vocab_chunk=24, seq_chunk=8)
    policy, reference, lengths = steps.dpo_logps(model, model, batch, opts)
    shard = jax.tree.map(lambda x: x[0], separate)
    expected = losses.sequence_logps(full_logits(model, shard), shard["labels"], shard["loss_mask"])  # [2n]
    assert float(jnp.abs(expected).min()) > 1.0
    np.testing.assert_allclose(policy[0], expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(reference[0], expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(lengths[0], shard["loss_mask"].sum(-1))

    # gradients with respect to the trainable parameters agree too
    graphdef, params, frozen = nnx.split(model, steps.trainable_filter(family_of(CFG), False, False), nnx.Param)

    def on_targets(p):
        m = nnx.merge(graphdef, p, frozen)
        return steps.dpo_logps(m, None, batch, dataclasses.replace(opts, reference="none"))[0].sum()

    def on_full(p):
        m = nnx.merge(graphdef, p, frozen)
        return losses.sequence_logps(full_logits(m, shard), shard["labels"], shard["loss_mask"]).sum()

    g_targets, g_full = jax.grad(on_targets)(params), jax.grad(on_full)(params)
    flat_t, flat_f = jax.tree.leaves(g_targets), jax.tree.leaves(g_full)
    assert len(flat_t) == len(flat_f) > 0
    for a, b in zip(flat_t, flat_f):
        scale = float(jnp.abs(b).max()) + 1e-12
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=2e-5)


def test_sft_sums_on_targets_equal_full_logits(model):
    rng = np.random.default_rng(2)
    rows = [[make_example(rng, 1, 1, max_len=30), make_example(rng, 2, 0, max_len=20)],
            [make_example(rng, 3, 2, max_len=40)], [make_example(rng, 4, 0, max_len=12)]]
    rows = [with_random_pixels(r, rng) for r in rows]
    batch = jax.tree.map(jnp.asarray, build("sft", rows))
    total, count = steps.sft_sums(model, batch, steps.StepOptions(mode="sft", vocab_chunk=24, seq_chunk=8))
    shard = jax.tree.map(lambda x: x[0], batch)
    want_total, want_count = losses.sft_loss_sum_count(full_logits(model, shard), shard["labels"], shard["loss_mask"])
    assert float(want_count) == float(shard["loss_mask"].sum()) > 0
    np.testing.assert_allclose(float(count), float(want_count))
    np.testing.assert_allclose(float(total), float(want_total), rtol=1e-5)


def test_accumulate_first_equals_accumulating_from_zero(model):
    rng = np.random.default_rng(3)
    pairs = with_random_pixels([make_pair(rng, 1, 1), make_pair(rng, 2, 0)], rng)
    batch = jax.tree.map(jnp.asarray, build("dpo", pairs))
    graphdef, params, frozen = nnx.split(model, steps.trainable_filter(family_of(CFG), False, False), nnx.Param)
    state = TrainState(params=nnx.to_pure_dict(params), frozen=nnx.to_pure_dict(frozen),
                       ref=jax.tree.map(jnp.copy, nnx.to_pure_dict(params)), opt_state=None, step=jnp.int32(0),
                       nonfinite_in_a_row=jnp.int32(0), nonfinite_total=jnp.int32(0))
    norms = {"pairs": jnp.float32(2.0), "chosen_tokens": jnp.float32(float(batch["loss_mask"][0, :2].sum()))}
    opts = steps.StepOptions(mode="dpo", vocab_chunk=24, seq_chunk=8)
    first = steps.accumulate_first(graphdef, state, batch, norms, opts)
    zero = jax.tree.map(jnp.zeros_like, first)
    from_zero = steps.accumulate(graphdef, zero, state, batch, norms, opts)
    assert jax.tree.structure(first) == jax.tree.structure(from_zero)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(from_zero)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(first["sums"]["rewards/accuracies"][1]) == 2.0  # both pairs counted
    twice = steps.accumulate(graphdef, first, state, batch, norms, opts)
    np.testing.assert_allclose(float(twice["loss"]), 2 * float(first["loss"]), rtol=1e-6)


def test_optimizer_moments_take_their_parameters_sharding():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    params = {"w": jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("fsdp", "tensor"))),
              "b_bias": jax.device_put(jnp.ones((4,)), NamedSharding(mesh, P("tensor")))}
    opt = steps.make_optimizer(1e-3, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8, params=params)
    replicated = NamedSharding(mesh, P())
    state = steps.init_optimizer_state(opt, params, replicated)
    adam = state[0]
    for moments in (adam.mu, adam.nu):
        for name, value in moments.items():
            assert value.sharding == params[name].sharding, name
            np.testing.assert_array_equal(np.asarray(value), 0.0)
    assert adam.count.sharding == replicated
    # the same state as optax's own init, value for value
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(opt.init(params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_apply_skips_non_finite_and_matches_optax_otherwise():
    import optax

    params = {"w": jnp.arange(6.0).reshape(2, 3), "b_bias": jnp.ones((3,))}
    opt = steps.make_optimizer(1e-2, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8, params=params)
    state = TrainState(params=params, frozen={}, ref=None, opt_state=opt.init(params), step=jnp.int32(0),
                       nonfinite_in_a_row=jnp.int32(0), nonfinite_total=jnp.int32(0))
    grads = {"w": jnp.full((2, 3), 3.0), "b_bias": jnp.array([1.0, -2.0, 0.5])}
    acc = {"grads": grads, "loss": jnp.float32(1.5), "sums": {}, "tokens": jnp.float32(7.0)}
    new, metrics = steps.apply(opt, lambda step: 1e-2, state, steps.clip_gradients(1.0, acc))
    reference = optax.chain(optax.clip_by_global_norm(1.0), opt)
    updates, _ = reference.update(grads, reference.init(params), params)
    for name in params:
        np.testing.assert_allclose(new.params[name], optax.apply_updates(params, updates)[name], rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-6)
    assert int(new.step) == 1 and float(metrics["skipped"]) == 0.0 and int(new.nonfinite_in_a_row) == 0

    bad = dict(acc, grads={**grads, "w": grads["w"].at[0, 0].set(jnp.nan)})
    skipped, metrics = steps.apply(opt, lambda step: 1e-2, new, steps.clip_gradients(1.0, bad))
    for a, b in zip(jax.tree.leaves((skipped.params, skipped.opt_state)),
                    jax.tree.leaves((new.params, new.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(metrics["skipped"]) == 1.0 and int(skipped.nonfinite_in_a_row) == 1
    assert int(skipped.nonfinite_total) == 1 and int(skipped.step) == 2
