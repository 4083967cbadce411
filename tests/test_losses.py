"""Tests for medee_jax.losses: formulas against float64 NumPy transcriptions, gradients against central finite
differences, the chunked hidden-state path against the direct logits path, reductions, errors and memory."""

from __future__ import annotations

import functools
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medee_jax.losses import (
    DPO_LOSS_TYPES,
    chunked_sequence_logps,
    chunked_sft_loss_sum_count,
    chunked_token_logps,
    dpo_loss,
    dpo_loss_sums,
    masked_sum_and_count,
    safe_mean,
    sequence_logps,
    sft_loss,
    sft_loss_sum_count,
    token_logps,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def x64():
    """float64 inside the test only; the previous setting is restored afterwards."""
    with jax.enable_x64(True):
        yield


# ----------------------------------------------------------------------------------------------------------------
# float64 NumPy transcription of reference/dpo_and_sft.md


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return np.exp(np_log_sigmoid(x))


def np_pair_losses(loss_type, beta, eps, pc, pr, rc, rr, lc=None, lr=None):
    dc, dr = pc - rc, pr - rr
    d = dc - dr
    if loss_type == "sigmoid":
        return -(1 - eps) * np_log_sigmoid(beta * d) - eps * np_log_sigmoid(-beta * d)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * d)
    if loss_type == "ipo":
        return ((dc / lc - dr / lr) - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - eps) * np_log_sigmoid(beta * d) + eps * np_log_sigmoid(-beta * d)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        return np_sigmoid(beta * d) * (np_log_sigmoid(beta * d) - np.log(1 - eps)) + np_sigmoid(-beta * d) * (
            np_log_sigmoid(-beta * d) - np.log(eps)
        )
    if loss_type == "bco_pair":
        return -np_log_sigmoid(beta * dc) - np_log_sigmoid(-beta * dr)
    if loss_type == "sppo_hard":
        return (dc - 1 / (2 * beta)) ** 2 + (dr + 1 / (2 * beta)) ** 2
    if loss_type == "nca_pair":
        return -np_log_sigmoid(beta * dc) - 0.5 * np_log_sigmoid(-beta * dc) - 0.5 * np_log_sigmoid(-beta * dr)
    if loss_type == "apo_zero":
        return (1 - np_sigmoid(beta * dc)) + np_sigmoid(beta * dr)
    if loss_type == "apo_down":
        return np_sigmoid(beta * dc) + (1 - np_sigmoid(beta * (dc - dr)))
    if loss_type == "sigmoid_norm":
        return -np_log_sigmoid(beta * (dc / lc - dr / lr))
    raise AssertionError(loss_type)


def np_metrics(beta, pc, pr, rc, rr):
    dc, dr = pc - rc, pr - rr
    return {
        "rewards/chosen": np.mean(beta * dc),
        "rewards/rejected": np.mean(beta * dr),
        "rewards/margins": np.mean(beta * (dc - dr)),
        "rewards/accuracies": np.mean((dc > dr).astype(np.float64)),
        "logps/chosen": np.mean(pc),
        "logps/rejected": np.mean(pr),
    }


def random_pairs(seed, n=6):
    rng = np.random.default_rng(seed)
    pc = -rng.uniform(5, 120, n)
    pr = -rng.uniform(5, 120, n)
    rc = pc - rng.normal(0, 4, n)
    rr = pr - rng.normal(0, 4, n)
    lc = rng.integers(3, 90, n).astype(np.float64)
    lr = rng.integers(3, 90, n).astype(np.float64)
    return pc, pr, rc, rr, lc, lr


# (loss_type, beta, label_smoothing): every type, ε > 0 where ε means something.
CASES = [
    ("sigmoid", 0.1, 0.0),
    ("sigmoid", 0.3, 0.15),
    ("hinge", 0.1, 0.0),
    ("ipo", 0.1, 0.0),
    ("ipo", 0.7, 0.0),
    ("robust", 0.1, 0.0),
    ("robust", 0.2, 0.2),
    ("exo_pair", 0.1, 1e-3),
    ("exo_pair", 0.4, 0.2),
    ("bco_pair", 0.1, 0.0),
    ("sppo_hard", 0.1, 0.0),
    ("nca_pair", 0.2, 0.0),
    ("apo_zero", 0.1, 0.0),
    ("apo_down", 0.1, 0.0),
    ("sigmoid_norm", 0.5, 0.0),
]


def test_cases_cover_every_loss_type():
    assert {case[0] for case in CASES} == set(DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type,beta,eps", CASES)
def test_dpo_loss_matches_float64_numpy(x64, loss_type, beta, eps):
    for seed in range(3):
        pc, pr, rc, rr, lc, lr = random_pairs(seed)
        loss, metrics = dpo_loss(
            jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(rc), jnp.asarray(rr),
            loss_type=loss_type, beta=beta, label_smoothing=eps,
            chosen_lengths=jnp.asarray(lc), rejected_lengths=jnp.asarray(lr),
        )  # fmt: skip
        assert loss.dtype == jnp.float64
        want = np.mean(np_pair_losses(loss_type, beta, eps, pc, pr, rc, rr, lc, lr))
        assert abs(float(loss) - want) <= 1e-9 * abs(want), (loss_type, float(loss), want)
        for name, value in np_metrics(beta, pc, pr, rc, rr).items():
            np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-12, atol=1e-14, err_msg=name)
        assert float(metrics["loss/dpo"]) == float(loss)


@pytest.mark.parametrize("loss_type,beta,eps", CASES)
def test_reward_metrics_exact_on_dyadic_inputs(x64, loss_type, beta, eps):
    # Multiples of 1/8 with beta = 1/4: every product and sum is exact, so the metrics must be bit-exact.
    rng = np.random.default_rng(7)
    pc, pr, rc, rr = (-rng.integers(8, 800, 8) / 8.0 for _ in range(4))
    lens = np.full(8, 4.0)
    _, metrics = dpo_loss(
        *map(jnp.asarray, (pc, pr, rc, rr)), loss_type=loss_type, beta=0.25, label_smoothing=eps,
        chosen_lengths=lens, rejected_lengths=lens,
    )  # fmt: skip
    for name, value in np_metrics(0.25, pc, pr, rc, rr).items():
        assert float(metrics[name]) == value, (name, float(metrics[name]), value)


# ----------------------------------------------------------------------------------------------------------------
# Gradients against central finite differences


def grad_and_central_differences(fn, x, step=1e-5):
    """(jax.grad(fn)(x), central-difference estimate of it) for a scalar fn of one float64 array. One compiled
    program serves both: the finite differences evaluate it at x ± step·e_i, one coordinate at a time."""
    value_and_grad = jax.jit(jax.value_and_grad(fn))
    x = np.asarray(x, np.float64)
    grad = np.asarray(value_and_grad(jnp.asarray(x))[1])
    flat = x.ravel()
    fd = np.empty_like(flat)
    for i in range(flat.size):
        up, down = flat.copy(), flat.copy()
        up[i] += step
        down[i] -= step
        f_up = float(value_and_grad(jnp.asarray(up.reshape(x.shape)))[0])
        f_down = float(value_and_grad(jnp.asarray(down.reshape(x.shape)))[0])
        fd[i] = (f_up - f_down) / (2 * step)
    return grad, fd.reshape(x.shape)


@pytest.mark.parametrize("loss_type,beta,eps", CASES)
def test_dpo_loss_gradients_match_finite_differences(x64, loss_type, beta, eps):
    pc, pr, rc, rr, lc, lr = random_pairs(11, n=4)
    stacked = np.stack([pc, pr, rc, rr])  # [4, N]

    def fn(x):
        return dpo_loss(
            x[0], x[1], x[2], x[3], loss_type=loss_type, beta=beta, label_smoothing=eps,
            chosen_lengths=lc, rejected_lengths=lr, sft_weight=0.3,
        )[0]  # fmt: skip

    grad, fd = grad_and_central_differences(fn, stacked)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
    assert np.any(grad != 0)


def test_token_and_sft_gradients_match_finite_differences(x64):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 3, 5)) * 2  # [B, L, V]
    labels = jnp.asarray([[1, 4, -100], [0, 2, 3]])
    mask = jnp.asarray([[1, 1, 0], [1, 0, 1]])
    weights = jnp.asarray([0.3, -1.2])

    def fn(x):
        return jnp.sum(weights * sequence_logps(x, labels, mask)) + 0.7 * sft_loss(x, labels, mask)

    grad, fd = grad_and_central_differences(fn, logits)
    np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-9)
    assert np.all(grad[0, 2] == 0)  # the ignored (-100, masked) position gets no gradient


def test_chunked_gradients_match_finite_differences(x64):
    rng = np.random.default_rng(5)
    hidden = rng.normal(size=(1, 5, 3))  # [B, L, D]
    kernel = rng.normal(size=(3, 7))  # [D, V]
    labels = jnp.asarray([[6, 0, 3, -100, 2]])
    weights = jnp.asarray(rng.normal(size=(1, 5)))
    flat = np.concatenate([hidden.ravel(), kernel.ravel()])  # both inputs in one vector: one compile

    def fn(x):
        h, w = x[: hidden.size].reshape(hidden.shape), x[hidden.size :].reshape(kernel.shape)
        return jnp.sum(weights * chunked_token_logps(h, w, labels, vocab_chunk=3, seq_chunk=2))

    grad, fd = grad_and_central_differences(fn, flat)
    np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Direct path


def test_token_logps_matches_numpy_and_clamps_ignore_labels(x64):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 6)) * 5
    labels = np.array([[0, 5, -100, 2], [3, 3, 1, -100]])
    got = np.asarray(token_logps(jnp.asarray(logits), jnp.asarray(labels)))
    lse = np.log(np.sum(np.exp(logits), axis=-1))
    safe = np.clip(labels, 0, 5)
    want = np.take_along_axis(logits, safe[..., None], -1)[..., 0] - lse
    np.testing.assert_allclose(got, want, rtol=1e-13)
    mask = labels != -100
    got_seq = sequence_logps(jnp.asarray(logits), labels, mask)
    np.testing.assert_allclose(np.asarray(got_seq), (want * mask).sum(-1), rtol=1e-13)


def test_x64_fixture_restores_the_default():
    # Runs after the x64 tests above: they must not leak float64 into other tests or files.
    assert not jax.config.jax_enable_x64
    assert jnp.asarray(1.0).dtype == jnp.float32


def test_bf16_logits_accumulate_in_fp32():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 8, 300)) * 30, jnp.bfloat16)  # large: bf16 math would drift
    labels = jnp.asarray(rng.integers(0, 300, (2, 8)))
    got = token_logps(logits, labels)
    assert got.dtype == jnp.float32
    want = token_logps(logits.astype(jnp.float32), labels)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert sft_loss(logits, labels, jnp.ones((2, 8))).dtype == jnp.float32
    loss, metrics = dpo_loss(*(jnp.full((3,), -v, jnp.bfloat16) for v in (10, 12, 11, 11)))
    assert loss.dtype == jnp.float32 and metrics["rewards/chosen"].dtype == jnp.float32


def test_sft_loss_is_token_mean_with_sum_and_count():
    logits = jnp.zeros((2, 3, 4))  # uniform: every token costs log 4
    labels = jnp.asarray([[1, 2, 3], [0, -100, -100]])
    mask = jnp.asarray([[1, 1, 0], [1, 0, 0]])
    total, count = sft_loss_sum_count(logits, labels, mask)
    assert float(count) == 3
    np.testing.assert_allclose(float(total), 3 * math.log(4), rtol=1e-6)
    np.testing.assert_allclose(float(sft_loss(logits, labels, mask)), math.log(4), rtol=1e-6)
    assert float(sft_loss(logits, labels, jnp.zeros((2, 3)))) == 0.0  # empty mask: 0, not NaN


def test_sums_and_counts_give_exact_global_means_across_microbatches(x64):
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(4, 6, 9)))  # [B, L, V]
    labels = jnp.asarray(rng.integers(0, 9, (4, 6)))
    mask = jnp.asarray([[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]])
    pc, pr, rc, rr, lc, lr = (jnp.asarray(x) for x in random_pairs(4, n=6))
    kw = dict(loss_type="sigmoid", beta=0.2, label_smoothing=0.1, sft_weight=0.5)
    halves = (slice(0, 3), slice(3, 6))

    def dpo_and_grad(pc, pr, rc, rr, lc, lr, **extra):
        def loss(pc):
            return dpo_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **kw, **extra)

        (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(pc)
        return value, metrics, grad, dpo_loss_sums(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **kw)

    @jax.jit  # one program for everything: eager float64 ops would each compile separately
    def everything():
        sft_parts = [sft_loss_sum_count(logits[sl], labels[sl], mask[sl]) for sl in (slice(0, 2), slice(2, 4))]
        full = dpo_and_grad(pc, pr, rc, rr, lc, lr)
        # Microbatches of a 6-pair step: the global pair and chosen-token counts are passed in.
        micro = [dpo_and_grad(*(x[sl] for x in (pc, pr, rc, rr, lc, lr)), num_pairs=6, num_chosen_tokens=jnp.sum(lc))
                 for sl in halves]  # fmt: skip
        return sft_parts, sft_loss(logits, labels, mask), full, micro

    sft_parts, sft_full, full, micro = everything()
    total, count = sft_parts[0][0] + sft_parts[1][0], sft_parts[0][1] + sft_parts[1][1]
    np.testing.assert_allclose(float(safe_mean(total, count)), float(sft_full), rtol=1e-14)
    mean_of_means = (float(safe_mean(*sft_parts[0])) + float(safe_mean(*sft_parts[1]))) / 2
    assert abs(mean_of_means - float(sft_full)) > 1e-3  # the pitfall the (sum, count) pairs avoid

    # DPO + SFT term: microbatch losses and gradients add up to the full-batch ones exactly, although the
    # microbatches differ in chosen tokens; summed metrics combine exactly too.
    full_loss, full_metrics, full_grad, _ = full
    np.testing.assert_allclose(float(micro[0][0] + micro[1][0]), float(full_loss), rtol=1e-13)
    np.testing.assert_allclose(np.concatenate([micro[0][2], micro[1][2]]), np.asarray(full_grad), rtol=1e-12)
    assert float(jnp.sum(lc[:3])) != float(jnp.sum(lc[3:]))
    for name, (s0, c0) in micro[0][3].items():
        s1, c1 = micro[1][3][name]
        np.testing.assert_allclose(float(safe_mean(s0 + s1, c0 + c1)), float(full_metrics[name]), rtol=1e-13)


def test_pair_mask_drops_padding_pairs(x64):
    pc, pr, rc, rr, lc, lr = random_pairs(8, n=5)
    pad = lambda x, v=0.0: np.concatenate([x, [v, v]])  # noqa: E731

    @jax.jit
    def both():
        out = {}
        for loss_type in ("sigmoid", "ipo", "sigmoid_norm"):
            kw = dict(loss_type=loss_type, beta=0.1, sft_weight=0.2)
            want = dpo_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **kw)
            got = dpo_loss(pad(pc), pad(pr, 3.0), pad(rc), pad(rr), chosen_lengths=pad(lc), rejected_lengths=pad(lr),
                           pair_mask=pad(np.ones(5), 0), **kw)  # fmt: skip
            out[loss_type] = (want, got)
        return out

    for loss_type, ((want, want_m), (got, got_m)) in both().items():
        np.testing.assert_allclose(float(got), float(want), rtol=1e-13, err_msg=loss_type)
        for name in want_m:
            np.testing.assert_allclose(float(got_m[name]), float(want_m[name]), rtol=1e-13, err_msg=name)


def test_log_sigmoid_is_stable_for_huge_margins():
    big = jnp.asarray([4e4, -4e4], jnp.float32)
    lens = jnp.asarray([3.0, 5.0])

    @jax.jit
    def every_type(x):
        zero = jnp.zeros_like(x)
        out = {}
        for loss_type in DPO_LOSS_TYPES:
            eps = 0.1 if loss_type in ("exo_pair", "robust", "sigmoid") else 0.0
            fn = lambda x: dpo_loss(x, -x, zero, zero, loss_type=loss_type, beta=1.0, label_smoothing=eps,  # noqa: E731
                                    chosen_lengths=lens, rejected_lengths=lens)[0]  # fmt: skip
            out[loss_type] = jax.value_and_grad(fn)(x)
        return out

    for loss_type, (value, grad) in every_type(big).items():
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad))), loss_type
    # βd = −8e4: −log σ(−8e4) must be 8e4, not inf.
    zero = jnp.zeros(1, jnp.float32)
    np.testing.assert_allclose(float(dpo_loss(-big[:1], big[:1], zero, zero, beta=1.0)[0]), 8e4, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Hand-computed example


def test_hand_computed_two_pairs():
    # pair 1: πc=−10 πr=−14 rc=−11 rr=−13 → Δc=1, Δr=−1, d=2
    # pair 2: πc=−8  πr=−6  rc=−8  rr=−7  → Δc=0, Δr=1,  d=−1
    pc, pr = jnp.asarray([-10.0, -8.0]), jnp.asarray([-14.0, -6.0])
    rc, rr = jnp.asarray([-11.0, -8.0]), jnp.asarray([-13.0, -7.0])
    beta = 0.5  # βd = (1, −0.5)

    # sigmoid: mean(−log σ(1), −log σ(−0.5)) = (log(1 + e^−1) + log(1 + e^0.5)) / 2
    #        = (0.31326168751822286 + 0.9740769841801067) / 2 = 0.6436693358491647
    loss, m = dpo_loss(pc, pr, rc, rr, beta=beta)
    np.testing.assert_allclose(float(loss), 0.6436693358491647, rtol=1e-6)
    assert float(m["rewards/chosen"]) == 0.25  # mean(0.5·1, 0.5·0)
    assert float(m["rewards/rejected"]) == 0.0  # mean(0.5·(−1), 0.5·1)
    assert float(m["rewards/margins"]) == 0.25  # mean(1, −0.5)
    assert float(m["rewards/accuracies"]) == 0.5  # pair 1 right, pair 2 wrong
    assert float(m["logps/chosen"]) == -9.0
    assert float(m["logps/rejected"]) == -10.0

    # hinge: mean(max(0, 1 − 1), max(0, 1 + 0.5)) = 0.75
    assert float(dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")[0]) == 0.75

    # ipo with |yc| = (2, 4), |yr| = (1, 2): Δc/|yc| − Δr/|yr| = (0.5 + 1, 0 − 0.5) = (1.5, −0.5); 1/(2β) = 1
    #   → mean(0.5², (−1.5)²) = mean(0.25, 2.25) = 1.25
    lc, lr = jnp.asarray([2, 4]), jnp.asarray([1, 2])
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    assert float(ipo) == 1.25

    # SFT term: token-mean NLL of chosen = −(−10 − 8) / (2 + 4) = 3; weight 0.5 adds 1.5
    with_sft, m = dpo_loss(pc, pr, rc, rr, beta=beta, chosen_lengths=lc, sft_weight=0.5)
    np.testing.assert_allclose(float(with_sft), 0.6436693358491647 + 1.5, rtol=1e-6)
    assert float(m["loss/sft"]) == 3.0

    # conservative DPO, ε = 0.25: mean(0.75·0.31326 + 0.25·1.31326, 0.75·0.97408 + 0.25·0.47408)
    #   (−log σ(−x) = x − log σ(x)): = mean(0.56326168751822286, 0.8490769841801067) = 0.7061693358491648
    cdpo, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.25)
    np.testing.assert_allclose(float(cdpo), 0.7061693358491648, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Chunked path equals the direct path


def direct_from_hidden(hidden, kernel, labels):
    dtype = jnp.promote_types(hidden.dtype, jnp.float32)
    logits = jnp.einsum("bld,dv->blv", hidden, kernel, preferred_element_type=dtype)  # [B, L, V]
    return token_logps(logits, labels)


@functools.partial(jax.jit, static_argnames=("vocab_chunk", "seq_chunk", "matmul_dtype"))
def chunked_value_and_grads(hidden, kernel, labels, weights, *, vocab_chunk, seq_chunk, matmul_dtype=None):
    def loss(h, w):
        logps = chunked_token_logps(h, w, labels, vocab_chunk=vocab_chunk, seq_chunk=seq_chunk,
                                    matmul_dtype=matmul_dtype)  # [B, L]
        return jnp.sum(weights * logps), logps

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, kernel)


# (vocab_chunk, seq_chunk) for V = 36, L = 10: dividing both, dividing neither, larger than V with a small
# non-dividing sequence chunk.
CHUNKS = [(12, 5), (10, 4), (64, 3)]


def test_chunked_equals_direct_values_and_gradients(x64):
    rng = np.random.default_rng(9)
    hidden = jnp.asarray(rng.normal(size=(2, 10, 6)))  # [B, L, D]
    kernel = jnp.asarray(rng.normal(size=(6, 36)) * 2)  # [D, V]
    labels = rng.integers(0, 36, (2, 10))
    labels[0, 3] = labels[1, 9] = -100
    labels[0, 0], labels[1, 0] = 35, 34  # in the last (pulled-back) vocab tile for non-dividing chunks
    labels = jnp.asarray(labels)
    weights = jnp.asarray(rng.normal(size=(2, 10)))  # a non-uniform upstream gradient

    def loss_direct(h, w):
        logps = direct_from_hidden(h, w, labels)
        return jnp.sum(weights * logps), logps

    (want_val, want_logps), want_grads = jax.jit(jax.value_and_grad(loss_direct, argnums=(0, 1), has_aux=True))(
        hidden, kernel
    )
    for vocab_chunk, seq_chunk in CHUNKS:
        (val, logps), grads = chunked_value_and_grads(
            hidden, kernel, labels, weights, vocab_chunk=vocab_chunk, seq_chunk=seq_chunk
        )
        assert logps.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(logps), np.asarray(want_logps), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(float(val), float(want_val), rtol=1e-12)
        for got, want in zip(grads, want_grads):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-12)


def test_chunked_sequence_and_sft_match_direct():
    rng = np.random.default_rng(4)
    hidden = jnp.asarray(rng.normal(size=(3, 9, 8)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
    labels = jnp.asarray(rng.integers(-1, 50, (3, 9)))
    mask = labels >= 0

    @jax.jit
    def both(hidden, kernel, labels, mask):
        logits = jnp.einsum("bld,dv->blv", hidden, kernel)  # [B, L, V]
        chunked = (
            chunked_sequence_logps(hidden, kernel, labels, mask, vocab_chunk=16, seq_chunk=4),
            chunked_sft_loss_sum_count(hidden, kernel, labels, mask, vocab_chunk=16, seq_chunk=4),
        )
        return chunked, (sequence_logps(logits, labels, mask), sft_loss_sum_count(logits, labels, mask))

    (seq, (nll, count)), (want_seq, (want_nll, want_count)) = both(hidden, kernel, labels, mask)
    np.testing.assert_allclose(np.asarray(seq), np.asarray(want_seq), rtol=2e-6)
    np.testing.assert_allclose(float(nll), float(want_nll), rtol=2e-6)
    assert float(count) == float(want_count) == float(mask.sum())


def test_chunked_bf16_inputs_fp32_math():
    rng = np.random.default_rng(6)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(16, 45)), jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 45, (2, 7)))
    weights = jnp.ones((2, 7), jnp.float32)
    (_, got), grads = chunked_value_and_grads(hidden, kernel, labels, weights, vocab_chunk=16, seq_chunk=3)
    assert got.dtype == jnp.float32
    def loss_direct(h, w):
        logps = direct_from_hidden(h, w, labels)
        return jnp.sum(logps), logps

    up = (hidden.astype(jnp.float32), kernel.astype(jnp.float32))  # the same values, direct path in fp32
    (_, want), want_grads = jax.jit(jax.value_and_grad(loss_direct, argnums=(0, 1), has_aux=True))(*up)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for got_g, want_g, primal in zip(grads, want_grads, (hidden, kernel)):
        assert got_g.dtype == jnp.bfloat16 and got_g.shape == primal.shape
        np.testing.assert_allclose(np.asarray(got_g, np.float32), np.asarray(want_g), rtol=2e-2, atol=2e-2)


def lm_head_inputs(seed=7, b=2, length=24, d=64, v=200):
    """A bf16 final hidden state (normed: unit scale) and an fp32 master-weight kernel giving logits of a few units,
    as a trained LM head does; labels include ignored (-100) positions."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(b, length, d)), jnp.bfloat16)  # [B, L, D]
    kernel = jnp.asarray(rng.normal(size=(d, v)) * 3 / np.sqrt(d), jnp.float32)  # [D, V]
    labels = rng.integers(0, v, (b, length))
    labels[0, :3] = -100
    weights = jnp.asarray(rng.normal(size=(b, length)), jnp.float32)  # a non-uniform upstream gradient
    return hidden, kernel, jnp.asarray(labels), weights


def test_lm_head_float32_option_is_the_fp32_path_exactly():
    """matmul_dtype="float32" on a bf16 hidden state and an fp32 kernel is exactly what the operands' own dtype
    gives (today's path: the kernel's fp32), values and gradients."""
    hidden, kernel, labels, weights = lm_head_inputs()
    (v0, l0), g0 = chunked_value_and_grads(hidden, kernel, labels, weights, vocab_chunk=64, seq_chunk=8)
    (v1, l1), g1 = chunked_value_and_grads(hidden, kernel, labels, weights, vocab_chunk=64, seq_chunk=8,
                                           matmul_dtype="float32")
    np.testing.assert_array_equal(np.asarray(l0), np.asarray(l1))
    assert float(v0) == float(v1)
    for a, b in zip(g0, g1):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_lm_head_in_bf16_with_fp32_accumulation_is_within_tolerance():
    """bf16 operands (one kernel tile at a time), fp32 accumulation: token log-probs (mean |log p| 9.4 here) within
    0.05 nats of the fp32 head (measured: 0.010), gradients within 2% of their largest entry (measured: 0.5% for the
    hidden state, 0.3% for the kernel); the kernel's gradient stays fp32 (accumulated in fp32 across sequence
    tiles) and the hidden state's keeps the hidden state's dtype."""
    hidden, kernel, labels, weights = lm_head_inputs()
    (_, want), want_grads = chunked_value_and_grads(hidden, kernel, labels, weights, vocab_chunk=64, seq_chunk=8,
                                                    matmul_dtype="float32")
    (_, got), grads = chunked_value_and_grads(hidden, kernel, labels, weights, vocab_chunk=64, seq_chunk=8,
                                              matmul_dtype="bfloat16")
    assert got.dtype == jnp.float32
    diff = np.abs(np.asarray(got) - np.asarray(want))
    assert 0 < diff.max() < 0.05, diff.max()  # really computed in bf16, and close
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float32
    for got_g, want_g in zip(grads, want_grads):
        got_g, want_g = np.asarray(got_g, np.float32), np.asarray(want_g, np.float32)
        assert np.abs(got_g - want_g).max() <= 0.02 * np.abs(want_g).max()
    # the same through the sequence-sum entry point the train step calls
    mask = (labels >= 0).astype(jnp.float32)
    seq = chunked_sequence_logps(hidden, kernel, labels, mask, vocab_chunk=64, seq_chunk=8, matmul_dtype="bfloat16")
    np.testing.assert_allclose(np.asarray(seq), (np.asarray(got) * np.asarray(mask)).sum(-1), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def test_unknown_loss_type_lists_valid_ones():
    x = jnp.zeros(2)
    with pytest.raises(ValueError) as err:
        dpo_loss(x, x, x, x, loss_type="kto")
    assert "'kto'" in str(err.value)
    for name in DPO_LOSS_TYPES:
        assert name in str(err.value)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_length_normalised_losses_need_lengths(loss_type):
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        dpo_loss(x, x, x, x, loss_type=loss_type)
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        dpo_loss(x, x, x, x, loss_type=loss_type, chosen_lengths=jnp.ones(2))


def test_hyperparameter_errors():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="exo_pair.*label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="exo_pair")
    with pytest.raises(ValueError, match="robust.*< 0.5"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="'hinge' has no label smoothing.*sigmoid, robust, exo_pair"):
        dpo_loss(x, x, x, x, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="sft_weight.*chosen_lengths"):
        dpo_loss(x, x, x, x, sft_weight=1.0)


def test_mismatched_shapes_name_both_shapes():
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        dpo_loss(jnp.zeros(3), jnp.zeros(2), jnp.zeros(3), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"\(2,\).*\(4,\)"):
        dpo_loss(*(jnp.zeros(2),) * 4, loss_type="ipo", chosen_lengths=jnp.ones(4), rejected_lengths=jnp.ones(2))
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*\(2, 4\)"):
        token_logps(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        sequence_logps(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"\(1, 4, 3\).*\(2, 7\)"):
        chunked_token_logps(jnp.zeros((1, 4, 3)), jnp.zeros((2, 7)), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        masked_sum_and_count(jnp.zeros((2, 2)), jnp.ones((2, 3)))


# ----------------------------------------------------------------------------------------------------------------
# Memory: compiled (never run) programs


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_logps_memory", REPO / "tools" / "bench_logps_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chunked_memory_full_size():
    # The shape, bf16 inputs, default chunks; compiled only, nothing is allocated. Temp is what a program
    # allocates beyond its arguments and outputs: for the chunked forward and value-and-grad programs it must stay
    # under 1/8 of ONE float32 [B, L, V] logits tensor (the direct path holds several: see
    # tools/bench_logps_memory.py, whose figures compare the two paths directly).
    B, L, V, D = 2, 4096, 152064, 3584
    bench = load_bench()
    hidden = jax.ShapeDtypeStruct((B, L, D), jnp.bfloat16)
    kernel = jax.ShapeDtypeStruct((D, V), jnp.bfloat16)
    labels = jax.ShapeDtypeStruct((B, L), jnp.int32)

    def total(h, w, y):
        return jnp.sum(chunked_token_logps(h, w, y))

    logits_f32_bytes = B * L * V * 4
    for program in (total, jax.value_and_grad(total, argnums=(0, 1))):
        memory = bench.memory_of(program, hidden, kernel, labels)
        assert memory["temp_bytes"] <= logits_f32_bytes / 8, memory
