"""Compiled peak memory of log-probs from hidden states: direct [B, L, V] logits vs `chunked_token_logps`.

Only lowers and compiles (nothing runs), so it works on a laptop CPU at full size:

    python tools/bench_logps_memory.py                     # V=152064, L=4096, B=2, D=3584 (Qwen2.5-VL-7B head)
    python tools/bench_logps_memory.py --vocab 32000 --length 1024 --batch 1 --hidden 512

Inputs are bf16 hidden states [B, L, D] and an LM-head kernel [D, V]; both paths do fp32 math
(the direct path computes fp32 logits `hidden @ kernel` and then `token_logps`). For each path it compiles the
forward program (Σ token log-probs) and the value-and-grad program (w.r.t. hidden and kernel) and reports
`peak_bytes` = temp + argument + output sizes from `compiled.memory_analysis()`, and the chunked/direct ratios of
peak and of temp (the memory the computation itself allocates, beyond its inputs and outputs). Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from medee_jax.losses import DEFAULT_SEQ_CHUNK, DEFAULT_VOCAB_CHUNK, chunked_token_logps, token_logps


def direct_logps(hidden, kernel, labels):
    logits = jnp.einsum("bld,dv->blv", hidden, kernel, preferred_element_type=jnp.float32)  # [B, L, V] fp32
    return token_logps(logits, labels)  # [B, L]


def memory_of(fn, *args) -> dict:
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    out = {
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0)),
    }
    out["peak_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"]
    out["peak_gib"] = round(out["peak_bytes"] / 2**30, 3)
    return out


def measure(vocab: int, length: int, batch: int, hidden_size: int, vocab_chunk: int, seq_chunk: int) -> dict:
    hidden = jax.ShapeDtypeStruct((batch, length, hidden_size), jnp.bfloat16)  # [B, L, D]
    kernel = jax.ShapeDtypeStruct((hidden_size, vocab), jnp.bfloat16)  # [D, V]
    labels = jax.ShapeDtypeStruct((batch, length), jnp.int32)  # [B, L]

    def chunked(h, w, y):
        return chunked_token_logps(h, w, y, vocab_chunk=vocab_chunk, seq_chunk=seq_chunk)

    result = {
        "shape": {"batch": batch, "length": length, "vocab": vocab, "hidden": hidden_size},
        "chunks": {"vocab_chunk": vocab_chunk, "seq_chunk": seq_chunk},
        "backend": jax.default_backend(),
    }
    for name, logps_fn in (("direct", direct_logps), ("chunked", chunked)):

        def total(h, w, y, logps_fn=logps_fn):
            return jnp.sum(logps_fn(h, w, y))

        result[f"{name}_forward"] = memory_of(total, hidden, kernel, labels)
        result[f"{name}_value_and_grad"] = memory_of(jax.value_and_grad(total, argnums=(0, 1)), hidden, kernel, labels)
    for program in ("forward", "value_and_grad"):
        chunked, direct = result[f"chunked_{program}"], result[f"direct_{program}"]
        result[f"ratio_peak_{program}"] = round(chunked["peak_bytes"] / direct["peak_bytes"], 4)
        result[f"ratio_temp_{program}"] = round(chunked["temp_bytes"] / direct["temp_bytes"], 4)
        # No program can go below its own arguments + outputs (the bf16 LM-head kernel and, for value_and_grad,
        # its gradient); this is the smallest peak ratio any implementation could reach.
        floor = chunked["argument_bytes"] + chunked["output_bytes"]
        result[f"ratio_peak_floor_{program}"] = round(floor / direct["peak_bytes"], 4)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--vocab-chunk", type=int, default=DEFAULT_VOCAB_CHUNK)
    parser.add_argument("--seq-chunk", type=int, default=DEFAULT_SEQ_CHUNK)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.vocab, args.length, args.batch, args.hidden, args.vocab_chunk, args.seq_chunk)))


if __name__ == "__main__":
    main()
