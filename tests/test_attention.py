"""Tests for medee_jax.models.attention: every implementation that runs on CPU equals the reference (values and
gradients, fp32, 1e-5) on the rows that matter; the reference equals today's decoder attention exactly; blockwise
memory grows linearly; ``auto`` and unsupported arguments behave as documented."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medee_jax.models import attention as attn
from medee_jax.models import attention_kernels
from medee_jax.models.attention import AttentionFeatures, attention, choose_implementation, dense_mask
from medee_jax.models.decoder import text_attention_mask
from medee_jax.models.layers import dot_product_attention

TOL = 1e-5
B, L, HQ, HKV, DH = 2, 40, 4, 2, 16


def qkv(lq=L, lk=L, hq=HQ, hkv=HKV, dh=DH, seed=0, dtype=jnp.float32):
    """Returns random q [B, lq, hq, dh], k, v [B, lk, hkv, dh]."""
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, lq, hq, dh))
    k = r.normal(size=(B, lk, hkv, dh))
    v = r.normal(size=(B, lk, hkv, dh))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def case(name):
    """Returns (kwargs for attention, rows [B, Lq] that matter, decoder-mask args or None) for a named input kind."""
    am = np.ones((B, L), np.int32)
    if name == "causal":
        return dict(causal=True), am.astype(bool), dict(attention_mask=am)
    if name == "right_padded":
        am[0, 29:] = 0
        am[1, 35:] = 0
        return dict(causal=True, kv_mask=am), am.astype(bool), dict(attention_mask=am)
    if name == "left_padded":
        am[0, :11] = 0
        am[1, :3] = 0
        return dict(causal=True, kv_mask=am), am.astype(bool), dict(attention_mask=am)
    if name == "kv_lengths":
        lengths = np.array([29, 40], np.int32)
        am = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
        return dict(causal=True, kv_lengths=lengths), am.astype(bool), dict(attention_mask=am)
    if name == "packed":  # three and two examples in a row, then padding (segment 0)
        seg = np.zeros((B, L), np.int32)
        seg[0, :9], seg[0, 9:25], seg[0, 25:33] = 1, 2, 3
        seg[1, :20], seg[1, 20:38] = 1, 2
        am = (seg > 0).astype(np.int32)
        return (dict(causal=True, kv_mask=am, q_segment_ids=seg), am.astype(bool),
                dict(attention_mask=am, segment_ids=seg))
    if name == "branch":  # DPO share_prompt rows: [prompt | chosen | rejected | padding]
        br = np.zeros((B, L), np.int32)
        br[0, 12:21], br[0, 21:34] = 1, 2
        br[1, 7:25], br[1, 25:40] = 1, 2
        am[0, 34:] = 0
        seg = am.copy()
        return (dict(causal=True, kv_mask=am, q_segment_ids=seg, q_branch_ids=br), am.astype(bool),
                dict(attention_mask=am, segment_ids=seg, branch_ids=br))
    if name == "bidirectional_segments":  # vision tower: images as segments, no causal mask
        seg = np.zeros((B, L), np.int32)
        seg[:, 16:] = 1
        seg[1, 30:] = 2
        return dict(causal=False, q_segment_ids=seg), am.astype(bool), None
    raise KeyError(name)


SELF_CASES = ["causal", "right_padded", "left_padded", "kv_lengths", "packed", "branch", "bidirectional_segments"]


def masked_loss(impl, rows, kwargs, **extra):
    """Returns f(q, k, v) = Σ attention(...) · w over the rows that matter (w fixed, not constant)."""
    def f(q, k, v):
        weights = jnp.asarray(rows, jnp.float32)[:, :, None, None] * jnp.cos(jnp.arange(q.shape[-1]) * 0.7)
        return jnp.sum(attention(q, k, v, implementation=impl, **kwargs, **extra) * weights)

    return f


def assert_close_on_rows(out, ref, rows, tol=TOL):
    rows = np.asarray(rows, bool)
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=tol, rtol=tol)


def assert_same_values_and_grads(impl, kwargs, rows, shapes=None, tol=TOL, **extra):
    """``impl`` equals reference on the rows that matter, in values and in the gradients of a loss over those rows;
    its output is finite everywhere (each side jitted once)."""
    q, k, v = qkv(**(shapes or {}))
    ref = jax.jit(lambda q, k, v: attention(q, k, v, implementation="reference", **kwargs))(q, k, v)
    out = jax.jit(lambda q, k, v: attention(q, k, v, implementation=impl, **kwargs, **extra))(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(jnp.all(jnp.isfinite(out)))
    assert_close_on_rows(out, ref, rows, tol)
    g_ref = jax.jit(jax.grad(masked_loss("reference", rows, kwargs), argnums=(0, 1, 2)))(q, k, v)
    g_out = jax.jit(jax.grad(masked_loss(impl, rows, kwargs, **extra), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g_out, g_ref):
        assert bool(jnp.all(jnp.isfinite(a))), f"d{name} not finite"
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol, err_msg=f"d{name}")


@pytest.mark.parametrize("name", [c for c in SELF_CASES if c != "bidirectional_segments"])
def test_reference_equals_decoder_attention(name):
    """attention(reference) is bit-identical to layers.dot_product_attention under decoder.text_attention_mask, on
    every row (padding rows too)."""
    kwargs, _, decoder_args = case(name)
    q, k, v = qkv()
    allowed = text_attention_mask(**{key: jnp.asarray(val) for key, val in decoder_args.items()})
    np.testing.assert_array_equal(np.asarray(dense_mask(B, L, L, **kwargs)), np.asarray(allowed))
    expected = dot_product_attention(q, k, v, allowed)
    np.testing.assert_array_equal(np.asarray(attention(q, k, v, implementation="reference", **kwargs)),
                                  np.asarray(expected))


@pytest.mark.parametrize("name", SELF_CASES)
def test_blockwise_equals_reference(name):
    kwargs, rows, _ = case(name)
    assert_same_values_and_grads("blockwise", kwargs, rows, block_q=16, block_k=8)


@pytest.mark.parametrize("blocks", [(64, 64), (7, 13)], ids=["one_block", "7x13_padded"])
def test_blockwise_block_sizes(blocks):
    """One block covering everything, and blocks that divide neither length (queries and keys padded)."""
    kwargs, rows, _ = case("branch")
    assert_same_values_and_grads("blockwise", kwargs, rows, block_q=blocks[0], block_k=blocks[1])


@pytest.mark.parametrize("hkv", [1, 4], ids=["mqa", "mha"])
def test_blockwise_head_groupings(hkv):
    kwargs, rows, _ = case("left_padded")
    assert_same_values_and_grads("blockwise", kwargs, rows, shapes=dict(hkv=hkv), block_q=16, block_k=16)


def decode_case(offsets):
    """One new query per row at ``offsets[b]`` against a cache of L keys of which the first offsets[b]+1 are filled."""
    offsets = np.asarray(offsets, np.int32)
    kwargs = dict(causal=True, kv_lengths=offsets + 1, q_offset=offsets)
    return kwargs, np.ones((B, 1), bool)


def test_decode_offset_matches_full_sequence():
    """A decode step (1 query at q_offset against a KV cache with per-row lengths) equals row ``q_offset`` of the full
    causal attention, in reference and blockwise; gradients agree too."""
    q, k, v = qkv()
    offsets = np.array([17, 33], np.int32)
    kwargs, rows = decode_case(offsets)
    q_new = jnp.stack([q[b, offsets[b]] for b in range(B)])[:, None]  # [B, 1, H, Dh]
    full = attention(q, k, v, causal=True, implementation="reference")
    expected = jnp.stack([full[b, offsets[b]] for b in range(B)])[:, None]
    for impl in ("reference", "blockwise"):
        out = attention(q_new, k, v, implementation=impl, block_k=8, **kwargs)
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=TOL, rtol=TOL, err_msg=impl)
    assert_same_values_and_grads("blockwise", kwargs, rows, shapes=dict(lq=1), block_k=8)


def test_query_block_at_static_offset():
    """A chunk of 5 queries at offset 20 (chunked prefill) equals rows 20..24 of the full causal attention."""
    q, k, v = qkv()
    full = attention(q, k, v, causal=True, implementation="reference")
    for impl in ("reference", "blockwise"):
        out = attention(q[:, 20:25], k, v, causal=True, q_offset=20, implementation=impl, block_q=2, block_k=8)
        np.testing.assert_allclose(np.asarray(out), np.asarray(full[:, 20:25]), atol=TOL, rtol=TOL, err_msg=impl)


def test_fully_masked_rows_are_defined():
    """Left-padding queries have no allowed key: reference averages v over all keys (finite MASK_VALUE, as
    transformers eager), blockwise returns exactly 0, and neither leaks into the gradients of real rows."""
    kwargs, rows, _ = case("left_padded")
    q, k, v = qkv()
    ref = attention(q, k, v, implementation="reference", **kwargs)
    blk = attention(q, k, v, implementation="blockwise", block_q=8, block_k=8, **kwargs)
    empty = ~np.asarray(rows)  # here padding rows are exactly the rows with no allowed key
    groups = HQ // HKV
    mean_v = jnp.repeat(jnp.mean(v, axis=1), groups, axis=1)  # [B, Hq, Dh]
    for b in range(B):
        np.testing.assert_allclose(np.asarray(ref[b][empty[b]]),
                                   np.broadcast_to(mean_v[b], ref[b][empty[b]].shape), atol=1e-6)
    assert np.all(np.asarray(blk)[empty] == 0.0)


def test_pallas_gpu_interpret_equals_reference():
    """The Pallas GPU (Triton) kernel in interpret mode: causal + left and right padding + packing + GQA, block 64
    forward / 64 backward after padding L=100 to 128."""
    am = np.ones((B, 100), np.int32)
    am[0, 80:] = 0
    am[1, :13] = 0
    seg = np.ones((B, 100), np.int32)
    seg[:, 50:] = 2
    kwargs = dict(causal=True, kv_mask=am, q_segment_ids=seg)
    assert_same_values_and_grads("pallas_gpu", kwargs, am.astype(bool), shapes=dict(lq=100, lk=100),
                                 interpret=True, block_q=64, block_k=64)


def test_splash_interpret_equals_reference():
    """The TPU splash kernel in interpret mode: causal + left and right padding + packing + GQA (L=150 padded to
    256, 128-row tiles, 2 query heads per KV head)."""
    am = np.ones((B, 150), np.int32)
    am[0, 120:] = 0
    am[1, :21] = 0
    seg = np.ones((B, 150), np.int32)
    seg[:, 70:] = 2
    kwargs = dict(causal=True, kv_mask=am, q_segment_ids=seg)
    assert_same_values_and_grads("splash", kwargs, am.astype(bool), shapes=dict(lq=150, lk=150, dh=32),
                                 interpret=True, block_q=128, block_k=128)


def test_cudnn_argument_mapping_on_xla():
    """The cudnn path passes only is_causal and key lengths to jax.nn.dot_product_attention; run the same call with
    jax's XLA backend on CPU: equal to reference on right-padded GQA input, values and gradients."""
    kwargs, rows, _ = case("kv_lengths")
    q, k, v = qkv()

    def via_jax_nn(q, k, v):
        return attention_kernels.jax_nn_attention(q, k, v, causal=True, kv_lengths=kwargs["kv_lengths"],
                                                  scale=DH**-0.5, backend="xla")

    ref = attention(q, k, v, implementation="reference", **kwargs)
    assert_close_on_rows(via_jax_nn(q, k, v), ref, rows)
    weights = jnp.asarray(rows, jnp.float32)[:, :, None, None]
    g = jax.grad(lambda *a: jnp.sum(via_jax_nn(*a) * weights), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(attention(*a, implementation="reference", **kwargs) * weights),
                     argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=TOL)


def test_unsupported_arguments_raise_clear_errors():
    q, k, v = qkv()
    kwargs, _, _ = case("branch")
    with pytest.raises(ValueError, match="'splash' does not support branch ids"):
        attention(q, k, v, implementation="splash", interpret=True, **kwargs)
    with pytest.raises(ValueError, match="'cudnn' does not support .*segment ids"):
        attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), causal=True,
                  q_segment_ids=np.ones((B, L), np.int32), implementation="cudnn")
    with pytest.raises(ValueError, match="kv_mask"):
        attention(q, k, v, causal=True, kv_mask=np.ones((B, L), bool), implementation="cudnn")
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), causal=True,
                  implementation="cudnn")
    with pytest.raises(ValueError, match="per-row q_offset"):
        attention(q[:, :1], k, v, causal=True, q_offset=np.array([3, 4]), implementation="splash")
    with pytest.raises(ValueError, match="self-attention only"):
        attention(q[:, :1], k, v, causal=True, q_offset=3, implementation="pallas_gpu")
    with pytest.raises(ValueError, match="unknown implementation"):
        attention(q, k, v, causal=True, implementation="flash")
    with pytest.raises(ValueError, match="kv_mask has shape"):
        attention(q, k, v, causal=True, kv_mask=np.ones((B, L + 1), bool))
    with pytest.raises(ValueError, match="not a multiple"):
        attention(q[:, :, :3], k, v, causal=True)


def features(**overrides):
    base = dict(causal=True, kv_mask=False, kv_lengths=True, segments=False, branches=False, static_offset=True,
                zero_offset=True, same_length=True, dtype=jnp.dtype(jnp.bfloat16), head_dim=128,
                num_scores=4096 * 4096)
    base.update(overrides)
    return AttentionFeatures(**base)


def test_auto_choice_per_platform():
    assert choose_implementation(features(), "tpu") == "splash"
    assert choose_implementation(features(segments=True, kv_mask=True), "tpu") == "splash"
    assert choose_implementation(features(branches=True), "tpu") == "blockwise"
    assert choose_implementation(features(), "gpu") == "cudnn"
    assert choose_implementation(features(segments=True), "gpu") == "blockwise"
    assert choose_implementation(features(kv_mask=True), "gpu") == "blockwise"
    assert choose_implementation(features(dtype=jnp.dtype(jnp.float32)), "gpu") == "blockwise"
    small = attn.CPU_BLOCKWISE_MIN_SCORES - 1
    assert choose_implementation(features(num_scores=small), "cpu") == "reference"
    assert choose_implementation(features(num_scores=attn.CPU_BLOCKWISE_MIN_SCORES), "cpu") == "blockwise"
    assert choose_implementation(features(num_scores=1 * 100_000, branches=True), "cpu") == "reference"


def test_auto_on_cpu_runs_the_chosen_implementation():
    """auto on CPU: equal to reference both below (dense) and above (blockwise) the crossover."""
    kwargs, rows, _ = case("packed")
    q, k, v = qkv()
    assert_close_on_rows(attention(q, k, v, **kwargs), attention(q, k, v, implementation="reference", **kwargs),
                         rows)
    lq = 520  # 520 * 520 > CPU_BLOCKWISE_MIN_SCORES: blockwise
    q, k, v = qkv(lq=lq, lk=lq, hq=2, hkv=1, dh=8)
    np.testing.assert_allclose(np.asarray(attention(q, k, v, causal=True)),
                               np.asarray(attention(q, k, v, causal=True, implementation="reference")),
                               atol=TOL, rtol=TOL)


def test_blockwise_bf16_close_to_reference():
    """bf16 inputs: blockwise accumulates in fp32 like the reference's softmax; outputs agree to bf16 rounding."""
    kwargs, rows, _ = case("packed")
    q, k, v = qkv(dtype=jnp.bfloat16)
    out = attention(q, k, v, implementation="blockwise", block_q=16, block_k=16, **kwargs)
    ref = attention(q, k, v, implementation="reference", **kwargs)
    assert out.dtype == jnp.bfloat16
    assert_close_on_rows(out.astype(jnp.float32), ref.astype(jnp.float32), rows, tol=2e-2)


def compiled_temp_bytes(impl, length, with_grad):
    """Returns XLA's temporary buffer size for causal padded attention (and its gradient) at ``length`` tokens."""
    shapes = (jax.ShapeDtypeStruct((1, length, 4, 64), jnp.float32),
              jax.ShapeDtypeStruct((1, length, 2, 64), jnp.float32),
              jax.ShapeDtypeStruct((1, length, 2, 64), jnp.float32), jax.ShapeDtypeStruct((1, length), bool))

    def f(q, k, v, mask):
        out = attention(q, k, v, causal=True, kv_mask=mask, implementation=impl, block_q=256, block_k=256)
        return jnp.sum(out * out)

    fn = jax.grad(f, argnums=(0, 1, 2)) if with_grad else f
    return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("with_grad", [False, True], ids=["forward", "forward_backward"])
def test_blockwise_memory_grows_linearly(with_grad):
    """XLA's compiled temporaries at 1k, 2k, 4k tokens: blockwise grows by equal steps per added token (second
    difference ratio ≈ 2, as a linear function; the dense reference's is ≈ 4), and at 4k stays far below one fp32
    [H, L, L] score matrix."""
    sizes = {n: compiled_temp_bytes("blockwise", n, with_grad) for n in (1024, 2048, 4096)}
    ratio = (sizes[4096] - sizes[2048]) / (sizes[2048] - sizes[1024])
    assert 1.8 <= ratio <= 2.2, sizes
    scores_bytes = 4 * 4096 * 4096 * 4
    assert sizes[4096] < scores_bytes / 8, sizes
    dense = {n: compiled_temp_bytes("reference", n, with_grad) for n in (512, 1024, 2048)}
    dense_ratio = (dense[2048] - dense[1024]) / (dense[1024] - dense[512])
    assert dense_ratio > 3.5, dense  # the check tells quadratic from linear


def test_splash_interpret_query_block_at_offset():
    """splash with a static q_offset (a chunk of 128 queries at position 128 of a 256-key cache filled to 200 and
    180 keys), against reference, values and gradients."""
    lengths = np.array([200, 180], np.int32)
    kwargs = dict(causal=True, kv_lengths=lengths, q_offset=128)
    rows = np.ones((B, 128), bool)
    rows[1, 180 - 128:] = False  # queries beyond row 1's filled cache are padding
    assert_same_values_and_grads("splash", kwargs, rows, shapes=dict(lq=128, lk=256, dh=32), interpret=True,
                                 block_q=128, block_k=128)


def test_pallas_gpu_interpret_bidirectional_segments():
    """The Pallas GPU kernel without the causal mask (vision tower: images as segments), values and gradients."""
    seg = np.zeros((B, 64), np.int32)
    seg[:, 20:] = 1
    seg[1, 50:] = 2
    assert_same_values_and_grads("pallas_gpu", dict(causal=False, q_segment_ids=seg), np.ones((B, 64), bool),
                                 shapes=dict(lq=64, lk=64), interpret=True, block_q=32, block_k=32)


def test_platform_and_heads_rules_of_auto_under_a_mesh(monkeypatch):
    """auto's platform comes from the mesh the program is compiled for (a concrete mesh, or the abstract mesh the
    train step traces under); splash needs the mesh's tensor axis to divide both head counts; without a mesh, a
    multi-chip TPU runs blockwise (splash there needs a shard_map) and a single chip keeps auto."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tensor",))
    assert attn.mesh_platform(mesh) == attn.mesh_platform(mesh.abstract_mesh) == attn.mesh_platform(None) == "cpu"
    two = jax.sharding.AbstractMesh((2, 2), ("data", "tensor"))  # no device: the default backend
    assert attn.mesh_platform(two) == "cpu"
    assert attn.heads_divide(two, "tensor", 4, 2) and not attn.heads_divide(two, "tensor", 4, 1)
    assert attn.heads_divide(two, None, 3, 1) and attn.heads_divide(None, "tensor", 3, 1)
    assert attn.heads_divide(jax.sharding.AbstractMesh((2,), ("data",)), "tensor", 3, 1)  # no tensor axis
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(jax, "device_count", lambda: 4)
    assert attn.implementation_without_mesh("auto") == "blockwise"
    assert attn.implementation_without_mesh("reference") == "reference"
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert attn.implementation_without_mesh("auto") == "auto"


def test_splash_outside_a_tpu_program_names_the_platform():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"'splash' needs a TPU \(this program is compiled for cpu\)"):
        attention(q, k, v, causal=True, implementation="splash")
