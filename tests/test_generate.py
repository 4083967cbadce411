"""Generation (``medee_jax.models.generate``) against transformers' ``generate`` on tiny random fp32 checkpoints of
both families, and its own guarantees: cached decoding equals the full forward at every step, a batch equals its rows
one at a time, sampling follows transformers' warpers and a seed, one compiled program per prompt bucket, the cache
updated in place, the thinking budget, and errors before any compute."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

from medee_jax.models import decoding, from_pretrained, generate, generate_with_info
from medee_jax.models.generate import bucket_length
from medee_jax.models.sampling import filter_logits
from tests import internvl_reference as ivl
from tests import qwen_reference as qwen

T = 10  # new tokens per test generation
QWEN_GRIDS = np.array([(1, 8, 12), (1, 16, 16), (1, 4, 4)])  # row 0: two images; row 2: one


@pytest.fixture(scope="module")
def qwen_models(tmp_path_factory):
    """(transformers model, our fp32 model) of one tiny random Qwen2.5-VL checkpoint saved by transformers."""
    path = tmp_path_factory.mktemp("qwen_generate")
    hf_model = qwen.random_hf_model(qwen.tiny_hf_config(), seed=0)
    hf_model.save_pretrained(path)
    return hf_model, from_pretrained(str(path), dtype=jnp.float32)


@pytest.fixture(scope="module")
def internvl_models(tmp_path_factory):
    """(transformers model, our fp32 model) of one tiny random InternVL checkpoint saved by transformers."""
    path = tmp_path_factory.mktemp("internvl_generate")
    hf_model = ivl.random_hf_model(ivl.tiny_hf_config("300m"), seed=0)
    hf_model.save_pretrained(path)
    return hf_model, from_pretrained(str(path), dtype=jnp.float32)


def qwen_rows(rng):
    """Three prompts of different lengths: two images, text only, one image."""
    def text(n):
        return list(rng.integers(2, qwen.TEXT_VOCAB, n))

    rows = [text(5) + qwen.image_span(QWEN_GRIDS[0]) + text(7) + qwen.image_span(QWEN_GRIDS[1]) + text(4),
            text(23), text(3) + qwen.image_span(QWEN_GRIDS[2]) + text(9)]
    pixels = rng.standard_normal((int(QWEN_GRIDS.prod(1).sum()), 1176)).astype(np.float32)
    return rows, pixels


def internvl_rows(rng):
    """Three prompts of different lengths: two images (3 tiles and 1 tile), text only, one image (2 tiles)."""
    def text(n):
        return list(rng.integers(3, ivl.TEXT_VOCAB, n))

    rows = [text(5) + ivl.image_span(3) + text(6) + ivl.image_span(1) + text(4), text(21),
            text(3) + ivl.image_span(2) + text(8)]
    return rows, rng.standard_normal((6, 3, ivl.TILE, ivl.TILE)).astype(np.float32)


def hf_generate(hf_model, family, ids, mask, pixels, *, eos, max_new_tokens=T):
    """Returns transformers' greedy new tokens [B, max_new_tokens] (pad 0 after eos, and after an early stop)."""
    import torch

    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels),
                  max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    if family == "qwen":
        kwargs.update(image_grid_thw=torch.tensor(QWEN_GRIDS),
                      mm_token_type_ids=torch.tensor((ids == qwen.IMAGE_TOKEN).astype(np.int64)))
    with torch.no_grad():
        out = hf_model.generate(**kwargs)[:, ids.shape[1]:].numpy()
    return np.pad(out, [(0, 0), (0, max_new_tokens - out.shape[1])])


def our_inputs(family, pixels):
    return dict(pixel_values=pixels, image_grid_thw=QWEN_GRIDS if family == "qwen" else None)


@pytest.mark.parametrize("family", ["qwen", "internvl"])
def test_greedy_equals_transformers_generate(family, qwen_models, internvl_models):
    """Left padding, prompts of different lengths, rows with two images, none and one; an eos that one row emits
    mid-way (the row is padded after it, the others go on)."""
    hf_model, ours = qwen_models if family == "qwen" else internvl_models
    rows, pixels = (qwen_rows if family == "qwen" else internvl_rows)(np.random.default_rng(1))
    ids, mask = qwen.pad_rows(rows, "left")
    free = generate(ours, ids, mask, **our_inputs(family, pixels), max_new_tokens=T)
    np.testing.assert_array_equal(free, hf_generate(hf_model, family, ids, mask, pixels, eos=None))
    eos = int(free[0, 4])  # a token row 0 emits at step 4: it stops there
    assert eos not in free[0, :4]
    out = generate_with_info(ours, ids, mask, **our_inputs(family, pixels), max_new_tokens=T, eos_token_id=[eos, 1])
    np.testing.assert_array_equal(out.tokens, hf_generate(hf_model, family, ids, mask, pixels, eos=[eos, 1]))
    assert out.tokens[0, 4] == eos and (out.tokens[0, 5:] == 0).all()
    assert out.finish_reasons[0] == "stop" and out.lengths[0] == 5
    for b in (1, 2):
        stopped = np.isin(out.tokens[b], [eos, 1])
        assert out.finish_reasons[b] == ("stop" if stopped.any() else "length")
        assert out.lengths[b] == (np.argmax(stopped) + 1 if stopped.any() else T)


def full_forward_logits(model, family, rows, new_tokens, pixels):
    """Returns fp32 logits [B, T, V]: step t's logits of each row from one full forward over prompt + the first t
    new tokens (left-padded batch)."""
    seqs = [list(r) + list(map(int, t[:-1])) for r, t in zip(rows, new_tokens)]
    ids, mask = qwen.pad_rows(seqs, "left")
    if family == "qwen":
        logits = np.asarray(model(ids, mask, pixels, None if pixels is None else QWEN_GRIDS))
    else:
        logits = np.asarray(model(ids, mask, pixels))
    steps = new_tokens.shape[1]
    return logits[:, ids.shape[1] - steps:]


@pytest.mark.parametrize("family", ["qwen", "internvl"])
def test_cached_decode_logits_equal_full_forward_at_every_step(family, qwen_models, internvl_models):
    _, ours = qwen_models if family == "qwen" else internvl_models
    rows, pixels = (qwen_rows if family == "qwen" else internvl_rows)(np.random.default_rng(2))
    ids, mask = qwen.pad_rows(rows, "right")
    out = generate_with_info(ours, ids, mask, **our_inputs(family, pixels), max_new_tokens=T, output_logits=True)
    reference = full_forward_logits(ours, family, rows, out.tokens, pixels)
    assert np.abs(reference).max() > 1.0
    np.testing.assert_allclose(out.logits, reference, atol=1e-4, rtol=0)


def test_batch_equals_rows_one_at_a_time(qwen_models):
    """Right-padded batch vs each row alone (its own images only): same tokens, logits within fp32 rounding."""
    _, ours = qwen_models
    rows, pixels = qwen_rows(np.random.default_rng(3))
    ids, mask = qwen.pad_rows(rows, "right")
    batch = generate_with_info(ours, ids, mask, pixel_values=pixels, image_grid_thw=QWEN_GRIDS, max_new_tokens=T,
                               output_logits=True)
    patches = QWEN_GRIDS.prod(1)
    row_images = [([0, 1]), [], [2]]
    for b, images in enumerate(row_images):
        start = [int(patches[:i].sum()) for i in images]
        pv = np.concatenate([pixels[s:s + patches[i]] for s, i in zip(start, images)]) if images else None
        one = generate_with_info(ours, np.array([rows[b]]), np.ones((1, len(rows[b])), np.int32), pixel_values=pv,
                                 image_grid_thw=QWEN_GRIDS[images] if images else None, max_new_tokens=T,
                                 output_logits=True)
        np.testing.assert_array_equal(one.tokens[0], batch.tokens[b])
        np.testing.assert_allclose(one.logits[0], batch.logits[b], atol=2e-5, rtol=0)


def test_sampling_filters_equal_transformers_warpers():
    import torch
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((6, 300)) * 3).astype(np.float32)
    logits[0, :5] = logits[0, 5]  # ties at the top-k boundary are kept, as transformers keeps them
    for temperature, top_k, top_p in [(0.7, 0, 0.9), (1.3, 20, 1.0), (1.0, 40, 0.5), (0.5, 5, 0.95), (1.0, 0, 0.3)]:
        ref = torch.tensor(logits)
        ref = TemperatureLogitsWarper(temperature)(None, ref)
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        ref = ref.numpy()
        ours = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p, top_p < 1))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
        kept = ~np.isinf(ref)
        assert 0 < kept.sum() < kept.size
        np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)


def test_top_k_1_equals_greedy_and_a_seed_reproduces(qwen_models):
    _, ours = qwen_models
    rows, pixels = qwen_rows(np.random.default_rng(5))
    ids, mask = qwen.pad_rows(rows, "left")
    kw = dict(pixel_values=pixels, image_grid_thw=QWEN_GRIDS, max_new_tokens=T)
    greedy = generate(ours, ids, mask, **kw)
    np.testing.assert_array_equal(generate(ours, ids, mask, **kw, temperature=0.7, top_k=1, seed=3), greedy)
    first = generate(ours, ids, mask, **kw, temperature=1.0, top_p=0.9, seed=11)
    np.testing.assert_array_equal(generate(ours, ids, mask, **kw, temperature=1.0, top_p=0.9, seed=11), first)
    other = generate(ours, ids, mask, **kw, temperature=1.0, top_p=0.9, seed=12)
    assert (first != other).any() and (first != greedy).any()


def test_row_seeds_make_a_sample_independent_of_the_batch(qwen_models):
    _, ours = qwen_models
    rng = np.random.default_rng(6)
    rows = [list(rng.integers(2, qwen.TEXT_VOCAB, n)) for n in (12, 20, 7)]
    ids, mask = qwen.pad_rows(rows, "left")
    kw = dict(max_new_tokens=T, temperature=1.0, top_k=50)
    batch = generate(ours, ids, mask, row_seeds=[7, 8, 9], **kw)
    alone = generate(ours, np.array([rows[1]]), np.ones((1, 20)), row_seeds=[8], **kw)
    np.testing.assert_array_equal(alone[0], batch[1])
    moved = generate(ours, ids[::-1], mask[::-1], row_seeds=[9, 8, 7], **kw)
    np.testing.assert_array_equal(moved[::-1], batch)


def test_one_compiled_program_per_prompt_bucket(qwen_models):
    _, ours = qwen_models
    rng = np.random.default_rng(7)
    before = decoding.prefill._cache_size(), decoding.decode._cache_size()
    lengths = [(9, 11), (13, 16), (21, 23), (22, 24), (40, 33)]  # buckets 16, 16, 24, 24, 40
    assert [bucket_length(max(p)) for p in lengths] == [16, 16, 24, 24, 40]
    assert [bucket_length(n) for n in (17, 20, 21, 29, 33, 264, 2048)] == [20, 20, 24, 32, 40, 320, 2048]
    for pair in lengths:
        ids, mask = qwen.pad_rows([list(rng.integers(2, qwen.TEXT_VOCAB, n)) for n in pair], "left")
        generate(ours, ids, mask, max_new_tokens=4, eos_token_id=1)
    after = decoding.prefill._cache_size(), decoding.decode._cache_size()
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3)


def test_too_long_prompt_is_an_error_before_compute(qwen_models):
    _, ours = qwen_models
    ids = np.full((2, 30), 5, np.int32)
    mask = np.ones_like(ids)
    mask[0, :10] = 0
    before = decoding.prefill._cache_size()
    with pytest.raises(ValueError, match=r"row 1 has 30 prompt tokens \+ max_new_tokens 20 = 50 > the cache limit 40"):
        generate(ours, ids, mask, max_new_tokens=20, max_cache_length=40)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        generate(ours, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        generate(ours, np.array([[5, qwen.IMAGE_TOKEN, 6]]), None, max_new_tokens=2)
    assert decoding.prefill._cache_size() == before
    out = generate_with_info(ours, ids, mask, max_new_tokens=10, max_cache_length=40)
    assert out.finish_reasons == ["length", "length"] and out.lengths.tolist() == [10, 10]


def test_thinking_budget_forces_the_end_marker(qwen_models):
    """Row 0's prompt ends inside <think> (ids 5): after 3 tokens the end marker (6, 7) is forced, and decoding
    goes on from it (the tokens after it are what a full forward over the forced tokens predicts). Row 1 has no open
    block and is unchanged."""
    _, ours = qwen_models
    rng = np.random.default_rng(8)
    rows = [list(rng.integers(10, qwen.TEXT_VOCAB, 9)) + [5], list(rng.integers(10, qwen.TEXT_VOCAB, 12))]
    ids, mask = qwen.pad_rows(rows, "left")
    plain = generate(ours, ids, mask, max_new_tokens=T)
    out = generate_with_info(ours, ids, mask, max_new_tokens=T, thinking_budget=3, think_start_ids=[5],
                             think_end_ids=[6, 7], output_logits=True)
    np.testing.assert_array_equal(out.tokens[0, :3], plain[0, :3])
    np.testing.assert_array_equal(out.tokens[0, 3:5], [6, 7])
    np.testing.assert_array_equal(out.tokens[1], plain[1])
    reference = full_forward_logits(ours, "qwen", rows, out.tokens, None)
    np.testing.assert_array_equal(out.tokens[0, 5:], reference[0, 5:].argmax(-1))
    with pytest.raises(ValueError, match="think_start_ids and think_end_ids"):
        generate(ours, ids, mask, max_new_tokens=T, thinking_budget=3)


def test_decode_updates_the_donated_cache_in_place(qwen_models):
    """The compiled decode loop aliases the donated K/V cache to its output and never copies it."""
    _, ours = qwen_models
    from flax import nnx

    from medee_jax.models.kv_cache import empty_cache
    from medee_jax.models.sampling import row_keys

    cfg, b, steps, size = ours.config.text, 2, 4, 24
    settings = decoding.DecodeSettings(max_new_tokens=steps, eos_ids=(1,), pad_id=0, greedy=True, top_k=0,
                                       use_top_p=False, thinking_budget=-1, think_start=(), think_end=(), mrope=True,
                                       implementation="auto", mesh=None, output_logits=False)
    state = decoding.DecodeState(
        tokens=jnp.zeros((b, steps), jnp.int32), step=jnp.int32(0), done=jnp.zeros(b, bool),
        num_tokens=jnp.zeros(b, jnp.int32), next_position=jnp.zeros(b, jnp.int32), keys=row_keys(0, None, b),
        think_count=jnp.full(b, -1, jnp.int32), force_pos=jnp.full(b, -1, jnp.int32),
        window=jnp.zeros((b, 1), jnp.int32), logits=None)
    graphdef, params = nnx.split(ours)
    cache = empty_cache(cfg, b, size, jnp.float32)
    hlo = decoding.decode.lower(graphdef, params, cache, state, jnp.float32(1), jnp.float32(1),
                                settings=settings).compile().as_text()
    header = hlo.splitlines()[0]
    shape = f"f32[{cfg.num_hidden_layers},{b},{size},{cfg.num_key_value_heads},{cfg.head_dim}]"
    inputs = header.split("entry_computation_layout={(")[1].split(")->")[0]
    cache_params = [i for i, s in enumerate(re.findall(r"(\w+\[[\d,]*\])\{[\d,]*\}", inputs)) if s == shape]
    assert len(cache_params) == 2  # K and V
    for output, param in enumerate(cache_params):
        assert f"{{{output}}}: ({param}, {{}}, may-alias)" in header
    assert not [line for line in hlo.splitlines() if shape in line and (" copy(" in line or "copy-start" in line)]
    assert [line for line in hlo.splitlines() if shape in line and " scatter(" in line]


MESH_SCRIPT = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from medee_jax.models import from_pretrained, generate
from medee_jax.training.mesh import make_mesh
from tests import qwen_reference as qwen
from tests.test_generate import QWEN_GRIDS, qwen_rows

path = sys.argv[1]
qwen.random_hf_model(qwen.tiny_hf_config(), seed=0).save_pretrained(path)
rows, pixels = qwen_rows(np.random.default_rng(9))
ids, mask = qwen.pad_rows(rows, "left")
kw = dict(pixel_values=pixels, image_grid_thw=QWEN_GRIDS, max_new_tokens=6)
single = generate(from_pretrained(path, dtype=jnp.float32), ids, mask, **kw)
mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
sharded = from_pretrained(path, dtype=jnp.float32, mesh=mesh)
spec = sharded.language_model.layers.q_proj_kernel[...].sharding.spec
assert tuple(spec) == (None, None, "tensor"), spec
on_mesh = generate(sharded, ids, mask, **kw)
np.testing.assert_array_equal(on_mesh, single)
sampled = [generate(sharded, ids, mask, **kw, temperature=1.0, seed=4, row_seeds=[1, 2, 3]) for _ in range(2)]
np.testing.assert_array_equal(*sampled)
print("mesh ok", jax.device_count())
"""


def test_runs_on_a_mesh_with_sharded_weights(tmp_path):
    """4 CPU devices, mesh data=2 x tensor=2: weights sharded by the training rules, 3 rows split over the data
    axis (padded to 4): the same greedy tokens as one device."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path / "qwen")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mesh ok 4" in done.stdout
