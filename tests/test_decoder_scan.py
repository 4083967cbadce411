"""The decoder's layer scan: each layer cast to the compute dtype inside the scan body (no whole-stack copy), the
named remat policies (same gradients as no remat), and the activation sharding at layer boundaries (the compiled
fsdp step gathers one layer's weights at a time inside the loop, never a whole stack or a whole batch)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medee_jax.models.decoder import Qwen2Decoder, decoder_layer_table
from medee_jax.models.families import family_of
from medee_jax.models.layers import REMAT_POLICIES, RETIRED_REMAT_POLICIES, maybe_remat
from medee_jax.models.qwen2_5_vl.config import tiny_config
from medee_jax.models.qwen2_5_vl.model import Qwen25VL
from medee_jax.training import steps
from medee_jax.training.state import TrainState

from .test_batching import IMAGE, make_pair
from .test_steps import build, with_random_pixels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = tiny_config(64).text


def decoder_inputs(b=2, length=8, d=TEXT.hidden_size, seed=0):
    x = jax.random.normal(jax.random.key(seed), (b, length, d), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(length), (3, b, length))
    mask = jnp.ones((b, length), jnp.int32).at[1, -3:].set(0)
    return x, positions, mask


def split_layers(decoder):
    """(graphdef, the stacked layer params, the rest) of a decoder."""
    return nnx.split(decoder, nnx.All(nnx.Param, nnx.PathContains("layers")), nnx.Param)


def cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


@pytest.mark.parametrize("remat", ["full", "save_qkv_proj", "none"])
def test_per_layer_cast_equals_casting_the_whole_stack_in_bf16(remat):
    """fp32 parameters, bf16 compute: casting each layer's slice in the scan body gives exactly what casting the
    whole stacked tree before the scan gave (the old code), in values and in the fp32 parameters' gradients."""
    decoder = Qwen2Decoder(TEXT, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=remat, rngs=nnx.Rngs(0))
    graphdef, layers, rest = split_layers(decoder)
    x, positions, mask = decoder_inputs()

    def loss(layer_params):  # the scan reads the fp32 stack and casts a layer at a time
        return nnx.merge(graphdef, layer_params, rest)(x, positions, mask).astype(jnp.float32).sum()

    def old_loss(layer_params):  # the old code: one bf16 copy of the whole stack, then the scan
        return loss(cast(layer_params, jnp.bfloat16))

    (value, grads), (old_value, old_grads) = (jax.jit(jax.value_and_grad(f))(layers) for f in (loss, old_loss))
    assert float(value) == float(old_value)
    for g, old in zip(jax.tree.leaves(grads), jax.tree.leaves(old_grads)):
        assert g.dtype == old.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(g), np.asarray(old))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("remat", ["full", "minimal"])
def test_per_layer_cast_leaves_no_bf16_copy_of_the_stack_in_temporaries(remat):
    """XLA's memory analysis of the gradient program: with fp32 stored and bf16 compute, the temporaries drop by at
    least the bf16 size of the stacked parameters against casting the whole stack first (measured: 12.0 -> 4.4 MB
    with "full", the bf16 stack being 7.6 MB). Without remat the decoder still casts the stack up front
    (decoder.Qwen2Decoder.__call__: smaller there), so both ways compile to the same program."""
    text = dataclasses.replace(TEXT, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=16, num_key_value_heads=4)
    decoder = Qwen2Decoder(text, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=remat, rngs=nnx.Rngs(0))
    graphdef, layers, rest = split_layers(decoder)
    x, positions, mask = decoder_inputs(b=1, length=16, d=256)

    def loss(layer_params):
        return nnx.merge(graphdef, layer_params, rest)(x, positions, mask).astype(jnp.float32).sum()

    def temp_bytes(f):
        return jax.jit(jax.grad(f)).lower(layers).compile().memory_analysis().temp_size_in_bytes

    stack_bf16 = sum(a.size * 2 for a in jax.tree.leaves(layers))  # ~8.4 MB
    new, old = temp_bytes(loss), temp_bytes(lambda p: loss(cast(p, jnp.bfloat16)))
    assert old - new >= 0.9 * stack_bf16, (old, new, stack_bf16)


# ---------------------------------------------------------------------------------------------------------------
# Remat policies

CFG = tiny_config(64, image_token_id=IMAGE, vision_start_token_id=8, vision_end_token_id=9)


@pytest.fixture(scope="module")
def dpo_and_sft_batches():
    from .test_batching import make_example

    rng = np.random.default_rng(7)
    pairs = with_random_pixels([make_pair(rng, 1, 1), make_pair(rng, 2, 0)], rng)
    rows = with_random_pixels([make_example(rng, 1, 1, max_len=30), make_example(rng, 3, 0, max_len=20)], rng)
    return {"dpo": jax.tree.map(jnp.asarray, build("dpo", pairs)),
            "sft": jax.tree.map(jnp.asarray, build("sft", [[r] for r in rows]))}


def step_grads(remat: str, mode: str, batch) -> dict:
    """The fp32 gradients of one accumulate_first (the trainer's step) of the tiny model under ``remat``."""
    model = Qwen25VL(CFG, remat=remat, rngs=nnx.Rngs(0))
    model.lm_head[...] = model.lm_head[...] * 30.0
    graphdef, params, frozen = nnx.split(model, steps.trainable_filter(family_of(CFG), False, False), nnx.Param)
    params = nnx.to_pure_dict(params)
    state = TrainState(params=params, frozen=nnx.to_pure_dict(frozen), ref=jax.tree.map(jnp.copy, params),
                       opt_state=None, step=jnp.int32(0), nonfinite_in_a_row=jnp.int32(0),
                       nonfinite_total=jnp.int32(0))
    if mode == "dpo":
        norms = {"pairs": jnp.float32(2.0), "chosen_tokens": jnp.float32(float(batch["loss_mask"][0, :2].sum()))}
    else:
        norms = {"tokens": jnp.float32(float(batch["loss_mask"].sum()))}
    opts = steps.StepOptions(mode=mode, vocab_chunk=24, seq_chunk=8)
    fn = jax.jit(lambda s, b, n: steps.accumulate_first(graphdef, s, b, n, opts))
    return fn(state, batch, norms)


@pytest.mark.parametrize("mode", ["dpo", "sft"])
def test_every_remat_policy_gives_the_gradients_of_no_remat(mode, dpo_and_sft_batches):
    batch = dpo_and_sft_batches[mode]
    want = step_grads("none", mode, batch)
    leaves = jax.tree.leaves(want["grads"])
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)
    for policy in REMAT_POLICIES:
        if policy == "none" or (mode == "sft" and policy.endswith("_offload")):  # offload: DPO checks it
            continue
        got = step_grads(policy, mode, batch)
        assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-6), policy
        for g, w in zip(jax.tree.leaves(got["grads"]), leaves):
            scale = float(jnp.abs(w).max()) + 1e-30
            np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(w) / scale, atol=1e-6, err_msg=policy)


def test_retired_remat_policies_name_their_replacement():
    for retired in ("dots", "dots_no_batch"):
        assert retired in RETIRED_REMAT_POLICIES and retired not in REMAT_POLICIES
        with pytest.raises(ValueError, match=f"remat policy '{retired}' was retired; use minimal"):
            maybe_remat(lambda x: x, retired)
    with pytest.raises(ValueError, match="unknown remat policy 'sometimes'; valid: none, full, minimal"):
        maybe_remat(lambda x: x, "sometimes")


# ---------------------------------------------------------------------------------------------------------------
# Activation sharding: the compiled fsdp step on 8 simulated devices (a subprocess: the device count is fixed
# when jax starts).

LAYERS = 3


def compile_fsdp_step_hlo(mode: str) -> dict:
    """{"hlo": {piece: optimized HLO text}, "grads_bytes": accumulate_first's output bytes per device,
    "params_bytes": the trainable parameters' bytes} of the trainer's step for a 3-layer tiny model, text-only
    batches, mesh fsdp=8."""
    from medee_jax.training import setup
    from medee_jax.training.batches import run_batch_spec
    from medee_jax.training.mesh import make_mesh
    from medee_jax.training.step_memory import compile_step, synthetic_batch
    from tests.run_training import load_config

    base = tiny_config(512, image_token_id=500, vision_start_token_id=501, vision_end_token_id=502)
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, num_hidden_layers=LAYERS))
    c = load_config(os.path.join(ROOT, "configs", f"{mode}.py"), [])
    with c.unlocked():
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
        c.data.max_length, c.data.length_buckets, c.data.target_buckets = 128, (128,), (64,)
        c.data.batch_size = 2
    spec = run_batch_spec(c, setup.DataSpec("synthetic", "", "", "", False), cfg)
    compiled = compile_step(c, cfg, make_mesh(dict(c.mesh)), synthetic_batch(c, spec, cfg), spec, with_images=False)
    first = compiled.pieces["accumulate_first"][0].memory_analysis()
    return {"hlo": {name: executable.as_text() for name, (executable, _) in compiled.pieces.items()},
            "grads_bytes": first.output_size_in_bytes,
            "params_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(compiled.state.params))}


def all_gathers(hlo: str) -> list[tuple[str, tuple[int, ...], bool]]:
    """(computation, per-device result shape, inside a while-loop body) of each all-gather of an HLO module."""
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    out, computation = [], None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            computation = header.group(1)
            continue
        m = re.search(r"= \(?\w+\[([\d,]*)\][^ ]* all-gather(?:-start)?\(", line)
        if m:
            shape = tuple(int(d) for d in m.group(1).split(",") if d)
            out.append((computation, shape, computation in bodies))
    return out


@pytest.mark.parametrize("mode", ["dpo", "sft"])
def test_fsdp_step_gathers_one_layer_at_a_time(mode):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    code = ("import json, sys; from tests.test_decoder_scan import compile_fsdp_step_hlo; "
            f"json.dump(compile_fsdp_step_hlo({mode!r}), sys.stdout)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    result = json.loads(proc.stdout)
    pieces = result["hlo"]
    # the accumulated fp32 gradients leave the step sharded like their parameters (1/8 each, norms replicated)
    assert result["grads_bytes"] < result["params_bytes"] / 4, result
    layer_shapes = {shape for shape, _, _ in decoder_layer_table(
        dataclasses.replace(tiny_config(512).text, num_hidden_layers=LAYERS)).values()}
    in_loop = []
    for name, hlo in pieces.items():
        for computation, shape, in_body in all_gathers(hlo):
            # no whole stacked-layer parameter (or its gradient) is ever gathered
            assert not (len(shape) >= 2 and shape[0] == LAYERS), (name, computation, shape)
            if in_body:
                in_loop.append(shape)
    # inside the layer scans only one layer's weights are gathered (fsdp), never the batch's activations
    assert in_loop, "no all-gather inside the layer loop: the weights were not gathered per layer"
    assert all(shape in layer_shapes for shape in in_loop), in_loop


def test_config_validation_names_the_replacement_of_a_retired_policy():
    from medee_jax.training import setup
    from tests.run_training import load_config

    c = load_config(os.path.join(ROOT, "configs", "dpo.py"), [])
    for policy, message in (("dots_no_batch", "model.remat='dots_no_batch' was retired; use minimal"),
                            ("often", "model.remat='often': one of none, full, minimal, save_attention")):
        with c.unlocked():
            c.model.remat = policy
        with pytest.raises(ValueError, match=re.escape(message)):
            setup.validate_config(c)
    with c.unlocked():
        c.model.remat = "save_qkv_proj_offload"
    setup.validate_config(c)  # no error
