"""Input-pipeline throughput: examples/s of the Grain pipeline on image examples, per worker count.

    python tools/bench_data.py                                  # 448x448 JPEGs, SFT packing, workers 0, 1, 2
    python tools/bench_data.py --workers 0 2 4 --image-size 448 --examples 400 --mode dpo
    python tools/bench_data.py --tokenizer-dir /path/to/Qwen2.5-VL-7B-Instruct   # the real tokenizer

Writes synthetic records (one image each, `--image-size` square, scan-like content; a question and a ~150-token
answer) into a temporary folder, builds the pipeline exactly as training does (`pipeline.make_iterator`), takes
one batch to start the workers, then times whole batches until `--timed-examples` examples have passed (the
data repeats, so any count works). For each worker count it prints one JSON line: examples_per_s,
examples_per_s_per_worker (divided by max(1, num_workers)), batches, packing efficiency, the CPU time per example
of the workers and of the consuming process, examples_per_cpu_s_per_worker (the rate one worker reaches with a
core to itself: examples / worker CPU seconds) and the load average (other processes on a shared machine slow the
wall-clock figures down). Before that, `stages_ms_per_example` gives the in-process cost of each map stage (read,
parse, images, tokenize) and of batch assembly. The last line is a JSON summary.
Without --tokenizer-dir the offline demo tokenizer is used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def write_dataset(root: str, n: int, size: int, fmt: str, mode: str, seed: int = 0) -> str:
    """n records with one size×size image each; returns the JSONL path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    words = ("the chest radiograph shows a rounded opacity in the right upper lobe with smooth margins and no "
             "calcification consistent with a benign granuloma although malignancy cannot be excluded").split()
    records = []
    unique = min(n, 64)  # distinct image files (decoding is per record either way)
    for i in range(unique):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
        body = 0.5 + 0.3 * np.cos(3 * xx + i) * np.sin(2 * yy)
        lesion = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) * 0.4
        gray = np.clip((body + lesion + 0.05 * rng.standard_normal((size, size))) * 255, 0, 255).astype(np.uint8)
        rgb = np.stack([gray, gray, (gray * 0.9).astype(np.uint8)], axis=-1)
        options = {"quality": 90} if fmt == "jpg" else {}
        Image.fromarray(rgb).save(os.path.join(root, "img", f"{i}.{fmt}"), **options)
    for i in range(n):
        question = "<image>Describe the main finding. " + " ".join(rng.choice(words, 20))
        answer = " ".join(rng.choice(words, 120))
        image = [f"img/{i % unique}.{fmt}"]
        if mode == "sft":
            records.append({"conversations": [{"from": "human", "value": question},
                                              {"from": "gpt", "value": answer}], "images": image})
        else:
            records.append({"conversations": [{"from": "human", "value": question}],
                            "chosen": {"from": "gpt", "value": answer},
                            "rejected": {"from": "gpt", "value": "no " + " ".join(rng.choice(words, 100))},
                            "images": image})
    path = os.path.join(root, f"{mode}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def stage_costs(config, vision, n: int = 24) -> dict:
    """ms per example of each map stage, run sequentially in this process, and of batch assembly."""
    from medee_jax.data import pipeline
    from medee_jax.data.sources import open_source
    from medee_jax.data.tokenize import load_chat_tokenizer

    source = open_source(config.paths)
    parse = pipeline.ParseRecord(config.mode, config.media_root)
    inputs = pipeline.image_inputs(config, vision)
    images = pipeline.LoadImages(inputs, max_patches=config.max_patches)
    tokenize = pipeline.Tokenize(config.tokenizer_dir, config.max_length, inputs)
    tokenize.map(images.map(parse.map(source[0])))  # load the tokenizer outside the timing
    times = {"read": 0.0, "parse": 0.0, "images": 0.0, "tokenize": 0.0}
    examples = []
    for i in range(n):
        t0 = time.perf_counter()
        raw = source[i % len(source)]
        t1 = time.perf_counter()
        ex = parse.map(raw)
        t2 = time.perf_counter()
        ex = images.map(ex)
        t3 = time.perf_counter()
        ex = tokenize.map(ex)
        t4 = time.perf_counter()
        times["read"] += t1 - t0
        times["parse"] += t2 - t1
        times["images"] += t3 - t2
        times["tokenize"] += t4 - t3
        examples.append(ex)
    tok = load_chat_tokenizer(config.tokenizer_dir, **inputs.chat_tokens)
    spec = pipeline.batch_spec(config, inputs, tok.image_token_id)
    warm = spec.new_packer()
    warm.add(examples[0])
    spec.build(warm.items)  # first-call imports and allocations outside the timing
    t0, built, packer = time.perf_counter(), 0, spec.new_packer()
    for ex in examples:
        if not packer.add(ex):
            spec.build(packer.items)
            built += packer.num_examples
            packer = spec.new_packer()
            packer.add(ex)
    spec.build(packer.items)
    times["batch"] = time.perf_counter() - t0
    out = {k: round(1000 * v / n, 2) for k, v in times.items()}
    out["total"] = round(sum(out.values()), 2)
    return out


def _children_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process's live child processes (Linux /proc)."""
    tick, me, total = os.sysconf("SC_CLK_TCK"), os.getpid(), 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def run(config, vision, timed_examples: int) -> dict:
    from medee_jax.data.pipeline import make_iterator

    t_start = time.perf_counter()
    it = make_iterator(config, vision)
    try:
        next(it)  # starts the workers and loads their tokenizers
        warm = it.stats()["examples"]
        t0, main0, workers0 = time.perf_counter(), time.process_time(), _children_cpu_s()
        done = 0
        while it.stats()["examples"] - warm < timed_examples:
            next(it)
            done += 1
        elapsed = time.perf_counter() - t0
        main_cpu, workers_cpu = time.process_time() - main0, _children_cpu_s() - workers0
        stats = it.stats()
    finally:
        it.close()
    examples = stats["examples"] - warm
    rate = examples / elapsed
    # CPU per example: what the rate would be with a free core per process (the machine may be shared).
    per_example_ms = 1000 * (workers_cpu if config.num_workers else main_cpu) / examples
    return {
        "num_workers": config.num_workers,
        "examples_per_s": round(rate, 1),
        "examples_per_s_per_worker": round(rate / max(1, config.num_workers), 1),
        "examples": examples,
        "batches": done,
        "seconds": round(elapsed, 2),
        "startup_s": round(t0 - t_start, 2),
        "examples_per_batch": round(stats["examples_per_batch"], 2),
        "packing_efficiency": round(stats["packing_efficiency"], 3),
        "main_cpu_ms_per_example": round(1000 * main_cpu / examples, 2),
        "worker_cpu_ms_per_example": round(1000 * workers_cpu / examples, 2) if config.num_workers else None,
        "examples_per_cpu_s_per_worker": round(1000 / per_example_ms, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mode", choices=["sft", "dpo"], default="sft")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--image-format", choices=["jpg", "png"], default="jpg")
    parser.add_argument("--examples", type=int, default=600, help="records in the synthetic file")
    parser.add_argument("--timed-examples", type=int, default=160, help="examples timed per worker count")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--max-patches", type=int, default=16384)
    parser.add_argument("--read-threads", type=int, default=1)
    parser.add_argument("--tokenizer-dir", default=None)
    args = parser.parse_args(argv)

    from medee_jax.data.pipeline import DataConfig
    from medee_jax.models.qwen2_5_vl.config import tiny_config

    vision = tiny_config().vision  # patch 14, merge 2, window 112: the released models' layout parameters
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tokenizer_dir = args.tokenizer_dir
        if tokenizer_dir is None:
            from medee_jax.data.demo_tokenizer import build_demo_tokenizer

            tokenizer_dir = os.path.join(tmp, "tokenizer")
            build_demo_tokenizer(tokenizer_dir)
        path = write_dataset(tmp, args.examples, args.image_size, args.image_format, args.mode)
        side = args.image_size
        config = DataConfig(
            paths=path, tokenizer_dir=tokenizer_dir, mode=args.mode, batch_size=args.batch_size,
            max_length=args.max_length, max_patches=args.max_patches, num_epochs=None, shard_index=0,
            shard_count=1, min_pixels=side * side, max_pixels=side * side, read_threads=args.read_threads,
        )
        stages = stage_costs(config, vision)
        print(json.dumps({"stages_ms_per_example": stages, "image": f"{side}x{side} {args.image_format}",
                          "mode": args.mode}), flush=True)
        results = []
        for workers in args.workers:
            result = run(config.with_updates(num_workers=workers), vision, args.timed_examples)
            results.append(result)
            print(json.dumps(result), flush=True)
    summary = {
        "image_size": args.image_size, "mode": args.mode,
        "examples_per_s": {str(r["num_workers"]): r["examples_per_s"] for r in results},
        "examples_per_s_per_worker": {str(r["num_workers"]): r["examples_per_s_per_worker"] for r in results},
        "examples_per_cpu_s_per_worker": {str(r["num_workers"]): r["examples_per_cpu_s_per_worker"] for r in results},
        "in_process_ms_per_example": stages["total"],
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
