"""Measurements for the day an accelerator is lent; one JSON line per measurement on stdout.

    python tools/device_check.py                       # everything, at the sizes of issue 13 (an H200: ~5 min)
    python tools/device_check.py --only matmul,attention
    python tools/device_check.py --smoke               # tiny sizes: checks the script itself on a CPU in seconds
    python tools/device_check.py --only attention_crossover   # CPU: reference vs blockwise by length (auto's switch)

Sections (each prints its lines and goes on after a failure, printing {"section": ..., "error": ...}):
  device              platform, device kind, jax version, memory_stats() at start.
  matmul              bf16 [8192, 8192] x [8192, 8192] matmul: TFLOP/s, median of 10 after 3 warm-ups.
  attention           medee_jax.models.attention at [2, 4096, 28 q heads, 4 KV heads, 128] bf16, causal, key
                      lengths [4096, 3000]: forward and forward+backward for reference, blockwise, cudnn, pallas_gpu:
                      median ms, TFLOP/s (causal FLOPs), XLA temp bytes, max |Δ| to reference on real rows.
  dpo_step            a DPO train step at Qwen2.5-VL-7B width with --layers decoder layers (vision tower 1 block,
                      text-only pairs of --prompt-len + --response-len tokens), built from the trainer's public
                      step functions (steps.jit_step, StepOptions, make_optimizer, init_optimizer_state), per remat
                      policy (--remat): compile s, median step s, tokens/s, MFU (metrics.flops_per_token, the
                      trainer's count) and memory_stats() peak.
  attention_crossover reference vs blockwise, causal forward+backward fp32, B=2, 8 q / 2 KV heads, Dh 64, by length
                      (the CPU_BLOCKWISE_MIN_SCORES measurement; not in the default set).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_SECTIONS = ("device", "matmul", "attention", "dpo_step")
ALL_SECTIONS = DEFAULT_SECTIONS + ("attention_crossover",)


def emit(**record):
    """Prints one measurement as a JSON line (flushed at once: a run cut short keeps what it printed)."""
    print(json.dumps(record, default=float), flush=True)


def timed(fn, *args, warmup=2, repeats=5):
    """Returns (median seconds, first result) of ``fn(*args)`` after ``warmup`` calls, results waited for."""
    out = jax.block_until_ready(fn(*args))
    for _ in range(warmup - 1):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def memory_stats():
    """Returns the first device's allocator statistics in GiB (None where the platform has none)."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_alloc_size")
    return {k.replace("bytes", "gib"): round(stats[k] / 2**30, 3) for k in keys if k in stats}


def reset_peak_memory():
    """Returns whether the allocator's peak counter could be reset (some backends cannot)."""
    try:
        jax.devices()[0].reset_memory_stats()  # not on every backend / jax version
        return True
    except Exception:  # noqa: BLE001 - optional API
        return False


def section_device(args):
    d = jax.devices()[0]
    emit(section="device", platform=d.platform, device_kind=d.device_kind, devices=jax.device_count(),
         jax=jax.__version__, memory=memory_stats())


def section_matmul(args):
    n = 1024 if args.smoke else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    seconds, _ = timed(jax.jit(jnp.matmul), a, b, warmup=3, repeats=10)
    emit(section="matmul", dtype="bfloat16", n=n, median_ms=round(seconds * 1e3, 3),
         tflops=round(2 * n**3 / seconds / 1e12, 1))


def attention_inputs(b, length, hq, hkv, dh, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, length, hq, dh), dtype)
    k = jax.random.normal(keys[1], (b, length, hkv, dh), dtype)
    v = jax.random.normal(keys[2], (b, length, hkv, dh), dtype)
    do = jax.random.normal(keys[3], (b, length, hq, dh), dtype)
    return q, k, v, do


def attention_functions(impl, lengths, rows):
    """Returns jitted (forward, forward+backward) of attention(implementation=impl) with key lengths; the backward
    seeds a cotangent that is zero on padding rows (their values are implementation-defined)."""
    from medee_jax.models.attention import attention

    def forward(q, k, v):
        return attention(q, k, v, causal=True, kv_lengths=lengths, implementation=impl)

    def forward_backward(q, k, v, do):
        out, vjp = jax.vjp(forward, q, k, v)
        return (out, *vjp(do * rows[:, :, None, None].astype(do.dtype)))

    return jax.jit(forward), jax.jit(forward_backward)


def section_attention(args):
    b, length, hq, hkv, dh = (2, 256, 4, 2, 64) if args.smoke else (2, 4096, 28, 4, 128)
    lengths = jnp.array([length, length * 3 // 4], jnp.int32)
    rows = jnp.arange(length)[None, :] < lengths[:, None]  # [B, L] real query rows
    q, k, v, do = attention_inputs(b, length, hq, hkv, dh, jnp.bfloat16)
    # Causal FLOPs: q·k and p·v over the lower triangle; the backward does 2.5x the forward's matmul work.
    fwd_flops = 2 * 2 * b * hq * dh * length * (length + 1) / 2
    reference = None
    impls = ["reference", "blockwise", "cudnn", "pallas_gpu"]
    if jax.default_backend() == "cpu":
        impls = ["reference", "blockwise"]
    for impl in impls:
        try:
            fwd, fwd_bwd = attention_functions(impl, lengths, rows)
            record = {"section": "attention", "impl": impl, "shape": [b, length, hq, hkv, dh], "dtype": "bfloat16"}
            t0 = time.perf_counter()
            fwd = fwd.lower(q, k, v).compile()
            fwd_bwd = fwd_bwd.lower(q, k, v, do).compile()
            record["compile_s"] = round(time.perf_counter() - t0, 1)
            t_fwd, _ = timed(fwd, q, k, v)
            t_all, grads = timed(fwd_bwd, q, k, v, do)
            record.update(forward_ms=round(t_fwd * 1e3, 3), forward_backward_ms=round(t_all * 1e3, 3),
                          forward_tflops=round(fwd_flops / t_fwd / 1e12, 1),
                          forward_backward_tflops=round(3.5 * fwd_flops / t_all / 1e12, 1))
            for name, compiled in (("forward", fwd), ("forward_backward", fwd_bwd)):
                memory = compiled.memory_analysis()
                if memory is not None:
                    record[f"{name}_temp_gib"] = round(memory.temp_size_in_bytes / 2**30, 3)
            if reference is None and impl == "reference":
                reference = grads
            if reference is not None:
                mask = rows[:, :, None, None]
                record["max_abs_diff_out"] = float(jnp.max(jnp.abs(jnp.where(mask, grads[0] - reference[0], 0))))
                record["max_abs_diff_grads"] = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))))
                                                for g, r in zip(grads[1:], reference[1:])]
            emit(**record)
        except Exception as e:  # noqa: BLE001 - report and go on with the next implementation
            emit(section="attention", impl=impl, error=f"{type(e).__name__}: {str(e)[:500]}")


def section_attention_crossover(args):
    from medee_jax.models.attention import attention

    lengths = (128, 256) if args.smoke else (128, 256, 512, 1024, 2048)
    block = 256
    results = {}
    for length in lengths:
        q, k, v, _ = attention_inputs(2, length, 8, 2, 64, jnp.float32)
        fns = {}
        for impl in ("reference", "blockwise"):
            def loss(q, k, v, impl=impl):
                out = attention(q, k, v, causal=True, implementation=impl, block_q=block, block_k=block)
                return jnp.sum(out * out)
            fns[impl] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        best = {impl: float("inf") for impl in fns}
        for _ in range(2):  # interleaved: a busy spell of a shared machine hits both
            for impl, fn in fns.items():
                seconds, _ = timed(fn, q, k, v, warmup=1, repeats=3 if args.smoke else 7)
                best[impl] = min(best[impl], seconds)
        results[length] = best
        emit(section="attention_crossover", length=length, block=block,
             **{f"{impl}_ms": round(s * 1e3, 2) for impl, s in best.items()})
    faster = [n for n, best in results.items() if best["blockwise"] < best["reference"]]
    emit(section="attention_crossover", blockwise_faster_from=min(faster) if faster else None)


def dpo_batch(rows, prompt_len, response_len, vocab, seed=0):
    """Returns a stacked (S=1) text-only DPO batch in the device batch contract of training/steps.py: rows =
    chosen then rejected, all tokens real, the response is the target."""
    r = np.random.default_rng(seed)
    length = prompt_len + response_len
    input_ids = r.integers(0, vocab, (rows, length), dtype=np.int32)
    loss_mask = np.zeros((rows, length), np.float32)
    loss_mask[:, prompt_len - 1:length - 1] = 1.0  # position t predicts token t + 1
    target_index = np.broadcast_to(np.arange(prompt_len - 1, length - 1, dtype=np.int32), (rows, response_len))
    batch = {
        "input_ids": input_ids,
        "attention_mask": np.ones((rows, length), np.int32),
        "segment_ids": np.ones((rows, length), np.int32),
        "position_ids": np.broadcast_to(np.arange(length, dtype=np.int32), (3, rows, length)).copy(),
        "loss_mask": loss_mask,
        "pair_mask": np.ones((rows // 2,), np.float32),
        "target_row": np.broadcast_to(np.arange(rows, dtype=np.int32)[:, None], (rows, response_len)).copy(),
        "target_index": target_index.copy(),
        "target_labels": np.take_along_axis(input_ids, target_index + 1, axis=1),
        "target_mask": np.ones((rows, response_len), np.float32),
    }
    return {key: jnp.asarray(value[None]) for key, value in batch.items()}


def dpo_model_config(args):
    from medee_jax.models.qwen2_5_vl.config import PRESETS, tiny_config

    if args.smoke:
        cfg = tiny_config(vocab_size=1024)
        return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=args.layers))
    cfg = PRESETS["qwen2_5_vl_7b"]
    text = dataclasses.replace(cfg.text, num_hidden_layers=args.layers)
    vision = dataclasses.replace(cfg.vision, depth=1, fullatt_block_indexes=(0,))  # frozen and unused here
    return dataclasses.replace(cfg, text=text, vision=vision)


def section_dpo_step(args):
    from medee_jax.training import metrics

    cfg = dpo_model_config(args)
    rows = 2 * args.pairs
    length = args.prompt_len + args.response_len
    compute = jnp.float32 if args.smoke else jnp.bfloat16
    batch = dpo_batch(rows, args.prompt_len, args.response_len, cfg.text.vocab_size)
    norms = {"pairs": jnp.float32(args.pairs), "chosen_tokens": jnp.float32(args.pairs * args.response_len)}
    tokens = rows * length
    flops = metrics.flops_per_token(cfg.text, seq_len=length, mode="dpo_frozen_ref") * tokens
    peak = metrics.peak_flops_per_device(args.peak_flops or None)
    for policy in args.remat.split(","):
        record = {"section": "dpo_step", "remat": policy, "layers": cfg.text.num_hidden_layers,
                  "hidden": cfg.text.hidden_size, "pairs": args.pairs, "seq_len": length}
        try:
            record.update(dpo_step_measure(cfg, policy, compute, batch, norms, args.steps))
            step_s = record["median_step_s"]
            record.update(tokens_per_s=round(tokens / step_s, 1), model_tflops_per_s=round(flops / step_s / 1e12, 2),
                          mfu=metrics.mfu(tokens / step_s, flops / tokens, 1, peak), peak_flops=peak)
        except Exception as e:  # noqa: BLE001 - report and go on with the next policy
            record["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            traceback.print_exc(file=sys.stderr)
        emit(**record)


def dpo_step_measure(cfg, policy, compute, batch, norms, num_steps):
    """Returns compile and median step seconds, the last loss / grad norm and memory_stats() of the trainer's DPO
    step (frozen bf16 reference copy, AdamW) on a fresh model; everything it allocated is freed on return."""
    from flax import nnx

    from medee_jax.models.families import family_of
    from medee_jax.models.qwen2_5_vl.model import Qwen25VL
    from medee_jax.training import steps
    from medee_jax.training.state import TrainState

    reset_peak_memory()
    model = Qwen25VL(cfg, dtype=compute, param_dtype=jnp.float32, remat=policy, rngs=nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, steps.trainable_filter(family_of(cfg), False, False), nnx.Param)
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    del model
    schedule = steps.warmup_cosine(1e-6, 100, 0.1)
    optimizer = steps.make_optimizer(schedule, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, params=params)
    replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = TrainState(
        params=params, frozen=frozen, ref=jax.jit(lambda p: jax.tree.map(lambda x: x.astype(compute), p))(params),
        opt_state=steps.init_optimizer_state(optimizer, params, replicated),
        step=jnp.int32(0), nonfinite_in_a_row=jnp.int32(0), nonfinite_total=jnp.int32(0))
    del params, frozen
    fns = steps.jit_step(graphdef, steps.StepOptions(mode="dpo"), optimizer, schedule,
                         jax.tree.map(lambda x: x.sharding, state), max_grad_norm=1.0)

    def one_step(state):
        acc = fns.accumulate_first(state, batch, norms)
        state, m = fns.apply(state, acc)
        return state, jax.device_get(m)

    t0 = time.perf_counter()
    state, m = one_step(state)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(num_steps):
        t0 = time.perf_counter()
        state, m = one_step(state)
        times.append(time.perf_counter() - t0)
    return {"compile_s": round(compile_s, 1), "median_step_s": round(statistics.median(times), 4),
            "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "memory": memory_stats()}


SECTIONS = {"device": section_device, "matmul": section_matmul, "attention": section_attention,
            "dpo_step": section_dpo_step, "attention_crossover": section_attention_crossover}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS), help=f"comma list of {', '.join(ALL_SECTIONS)}")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (fp32 model) to check the script on a CPU")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the DPO step (default 4; smoke 2)")
    p.add_argument("--pairs", type=int, default=None, help="DPO pairs per step (default 2; smoke 1)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 1024 (smoke 16)")
    p.add_argument("--response-len", type=int, default=None, help="default 3072 (smoke 16)")
    p.add_argument("--steps", type=int, default=3, help="timed DPO steps after the compiling one")
    p.add_argument("--remat", default="full,minimal", help="comma list of the model's remat policies")
    p.add_argument("--peak-flops", type=float, default=0.0, help="per-device peak FLOP/s (0: the trainer's table)")
    args = p.parse_args(argv)
    defaults = dict(layers=2, pairs=1, prompt_len=16, response_len=16) if args.smoke else \
        dict(layers=4, pairs=2, prompt_len=1024, response_len=3072)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.only.split(",")) - set(ALL_SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; valid: {', '.join(ALL_SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    failures = 0
    for name in args.only.split(","):
        t0 = time.perf_counter()
        try:
            SECTIONS[name](args)
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            failures += 1
            emit(section=name, error=f"{type(e).__name__}: {str(e)[:500]}")
            traceback.print_exc(file=sys.stderr)
        emit(section=name, seconds=round(time.perf_counter() - t0, 1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
