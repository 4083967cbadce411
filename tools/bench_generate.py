"""Generation throughput: ``medee_jax.models.generate`` against transformers' ``generate`` on the same checkpoint and
prompts, run side by side; prints one JSON line last.

    python tools/bench_step.py --make-checkpoint /tmp/bench/qwen62m      # the synthetic 62M Qwen2.5-VL checkpoint
    python tools/bench_generate.py --model-dir /tmp/bench/qwen62m [--batch 8 --prompt-len 256 --image-size 224 \
        --new-tokens 256 --rounds 3 --torch-attn sdpa --torch-threads 0 --xla-threads 0]

Prompts: ``--batch`` rows, left-padded, of about ``--prompt-len`` tokens each (lengths spread over ±``--spread``),
random text around one ``--image-size``² random image (``qwen2_vl_preprocess``: 224² -> 256 patches, 64 image tokens
between <|vision_start|> and <|vision_end|>). Both sides decode greedily in fp32, with no eos (every row runs the
full ``--new-tokens``); transformers runs its default (sdpa) or eager attention, PyTorch with its default threads.

Timing: each round runs, interleaved, ours with 1 new token (the prefill: images, prompt, first token), transformers
with 1 new token, ours with ``--new-tokens``, transformers with ``--new-tokens``, after one untimed warm-up of each
(our compilation). Prefill tokens/s = real prompt tokens (image tokens included) / median 1-token time; decode
tokens/s = batch x (new tokens - 1) / (median full time - median 1-token time). Also reported: the tokens where our
output equals transformers' (fp32 near-ties may part the two after a while), the machine's load average, and the
cores other processes took during each timed run (/proc/stat): the machine may be shared, so read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


def busy_seconds() -> float | None:
    """CPU-seconds the whole machine has been busy since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    steal = fields[7] if len(fields) > 7 else 0.0
    return (sum(fields[:8]) - idle - steal) / os.sysconf("SC_CLK_TCK")


def timed(fn) -> tuple[float, float | None, object]:
    """Returns (wall seconds, cores other processes used meanwhile, fn's result)."""
    busy0, own0, t0 = busy_seconds(), os.times(), time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    busy1, own1 = busy_seconds(), os.times()
    foreign = None
    if busy0 is not None and busy1 is not None:
        own = (own1.user + own1.system) - (own0.user + own0.system)
        foreign = max(0.0, (busy1 - busy0) - own) / wall
    return wall, foreign, result


def make_prompts(cfg, args, rng):
    """Returns (input_ids, attention_mask [B, L] left-padded, pixel_values [P, 1176], image_grid_thw [B, 3])."""
    from PIL import Image

    from medee_jax.data.images import qwen2_vl_preprocess

    size = args.image_size
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(args.batch)]
    pixel_values, grids = qwen2_vl_preprocess(images, 3136, size * size)
    merge = cfg.vision.spatial_merge_size ** 2
    special = {cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    text_ids = np.array([i for i in range(3, 30000) if i not in special])
    rows = []
    for b in range(args.batch):
        image_tokens = int(np.prod(grids[b])) // merge
        total = args.prompt_len + int(rng.integers(-args.spread, args.spread + 1))
        text = rng.choice(text_ids, max(total - image_tokens - 2, 2))
        cut = len(text) // 4
        rows.append(list(text[:cut]) + [cfg.vision_start_token_id] + [cfg.image_token_id] * image_tokens
                    + [cfg.vision_end_token_id] + list(text[cut:]))
    length = max(len(r) for r in rows)
    ids = np.zeros((args.batch, length), np.int64)
    mask = np.zeros((args.batch, length), np.int64)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = row
        mask[b, length - len(row):] = 1
    return ids, mask, pixel_values, grids


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="a Qwen2.5-VL checkpoint (tools/bench_step.py --make-checkpoint)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--spread", type=int, default=8, help="prompt lengths vary by up to this many tokens")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--torch-attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default); on a "
                   "shared, oversubscribed machine 1 thread can be much faster for PyTorch")
    p.add_argument("--xla-threads", type=int, default=0, help="1: XLA:CPU on one thread (set before jax starts); 0: "
                   "its default (all cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.xla_threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        print(f"error: {args.model_dir} has no config.json (make the benchmark checkpoint with "
              "python tools/bench_step.py --make-checkpoint DIR)", file=sys.stderr)
        return 2

    import jax.numpy as jnp
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medee_jax.models import from_pretrained, generate

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    load_start = loadavg()
    ours = from_pretrained(args.model_dir, dtype=jnp.float32)
    ids, mask, pixel_values, grids = make_prompts(ours.config, args, np.random.default_rng(args.seed))
    torch_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model_dir, dtype=torch.float32,
                                                                     attn_implementation=args.torch_attn).eval()
    torch_model.generation_config.eos_token_id = None  # every row runs the full length on both sides
    torch_inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(grids),
                        mm_token_type_ids=torch.tensor((ids == ours.config.image_token_id).astype(np.int64)))

    def run_ours(new_tokens):
        return generate(ours, ids, mask, pixel_values=pixel_values, image_grid_thw=grids, max_new_tokens=new_tokens,
                        eos_token_id=None, pad_token_id=0)

    def run_torch(new_tokens):
        with torch.inference_mode():
            out = torch_model.generate(**torch_inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].numpy()

    runs = {"ours_1": lambda: run_ours(1), "torch_1": lambda: run_torch(1),
            "ours_full": lambda: run_ours(args.new_tokens), "torch_full": lambda: run_torch(args.new_tokens)}
    compile_s = {}
    outputs = {}
    for name, fn in runs.items():  # warm-up: our compilation, torch's first-call costs
        compile_s[name], _, outputs[name] = timed(fn)
    times = {name: [] for name in runs}
    foreign = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            wall, cores, outputs[name] = timed(fn)
            times[name].append(wall)
            foreign[name].append(cores)
    med = {name: statistics.median(t) for name, t in times.items()}
    ours_tokens, torch_tokens = outputs["ours_full"], outputs["torch_full"]
    if torch_tokens.shape[1] != args.new_tokens:
        print(f"warning: transformers stopped after {torch_tokens.shape[1]} tokens", file=sys.stderr)
    agree = ours_tokens[:, :torch_tokens.shape[1]] == torch_tokens
    first_diff = [int(np.argmin(row)) if not row.all() else int(row.size) for row in agree]
    prompt_tokens = int(mask.sum())
    decode_tokens = args.batch * (args.new_tokens - 1)
    ours_decode = decode_tokens / max(med["ours_full"] - med["ours_1"], 1e-9)
    torch_decode = decode_tokens / max(med["torch_full"] - med["torch_1"], 1e-9)
    result = {
        "batch": args.batch, "prompt_tokens": prompt_tokens, "prompt_len_max": int(ids.shape[1]),
        "image_tokens_per_row": int(np.prod(grids[0])) // ours.config.vision.spatial_merge_size ** 2,
        "new_tokens": args.new_tokens, "rounds": args.rounds, "torch_attn": args.torch_attn,
        "torch_threads": torch.get_num_threads(),
        "xla_threads": args.xla_threads or "default", "cpu_count": os.cpu_count(),
        "ours_prefill_tokens_per_s": prompt_tokens / med["ours_1"],
        "torch_prefill_tokens_per_s": prompt_tokens / med["torch_1"],
        "ours_decode_tokens_per_s": ours_decode, "torch_decode_tokens_per_s": torch_decode,
        "prefill_ratio": med["torch_1"] / med["ours_1"], "decode_ratio": ours_decode / torch_decode,
        "median_s": med, "times_s": times, "foreign_cores": foreign, "warmup_s": compile_s,
        "greedy_tokens_equal_first_diff_per_row": first_diff,
        "loadavg_start": load_start, "loadavg_end": loadavg(),
    }
    print(f"prefill tokens/s: ours {result['ours_prefill_tokens_per_s']:.0f}, transformers "
          f"{result['torch_prefill_tokens_per_s']:.0f} ({result['prefill_ratio']:.2f}x); decode tokens/s: ours "
          f"{ours_decode:.1f}, transformers {torch_decode:.1f} ({result['decode_ratio']:.2f}x)", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
