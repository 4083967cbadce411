"""What tools/bench_step.py's two sides share: synthetic examples and the step's shapes, the run config of the
benchmarked step, the host batch the trainer would build, model/hardware FLOPs, timing with the machine's load,
resident-memory readings and the final figures.

Importing this module loads numpy and ml_collections only: the PyTorch side (tools/bench_step_torch.py) must not
load jax before it has measured. Functions that need jax (`host_step_batch`, `step_flops`, `peak_flops`) import
it when called.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Special token ids of the synthetic checkpoint (inside its 32000-token vocabulary).
SYNTHETIC_IDS = {"vision_start_token_id": 31990, "vision_end_token_id": 31991, "image_token_id": 31992,
                 "video_token_id": 31993}


def loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


def peak_rss_mb() -> float:
    """The process's peak resident set size so far (ru_maxrss, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_kib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets this process's RSS high-water mark (Linux ``clear_refs`` 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024.0


def high_water_rss_mb() -> float | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024.0


def read_hf_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def special_ids(hf_config: dict) -> dict:
    """{image_token_id, vision_start_token_id, vision_end_token_id, vocab_size} of a config.json (flat or nested)."""
    text = hf_config.get("text_config", hf_config)
    out = {k: int(hf_config.get(k, text.get(k))) for k in ("image_token_id", "vision_start_token_id",
                                                           "vision_end_token_id")}
    out["vocab_size"] = int(text.get("vocab_size", hf_config.get("vocab_size")))
    return out


def image_grid(image_size: int, hf_config: dict) -> tuple[int, int, int]:
    """(t, h, w) patch grid of one image_size x image_size image, as the Qwen2-VL processor resizes it."""
    from medee_jax.data.images import smart_resize

    vision = hf_config.get("vision_config", {})
    patch, merge = int(vision.get("patch_size", 14)), int(vision.get("spatial_merge_size", 2))
    h, w = smart_resize(image_size, image_size, factor=patch * merge)
    return 1, h // patch, w // patch


def synthetic_examples(mode: str, n: int, prompt_len: int, response_len: int, image_size: int, hf_config: dict,
                       seed: int = 0) -> list[dict]:
    """Random examples in the tokenize stage's form (see batching.py): DPO pairs, or SFT examples.

    Prompt: ``prompt_len`` text tokens with <|vision_start|> <|image_pad|>*k <|vision_end|> after a short header;
    response: ``response_len`` tokens, the training target. Chosen and rejected share prompt and image.
    """
    ids = special_ids(hf_config)
    if prompt_len < 2 or response_len < 1:
        raise ValueError("--prompt-len must be >= 2 (the vision markers) and --response-len >= 1")
    vision = hf_config.get("vision_config", {})
    patch_dim = int(vision.get("in_channels", 3)) * int(vision.get("temporal_patch_size", 2)) * \
        int(vision.get("patch_size", 14)) ** 2
    merge = int(vision.get("spatial_merge_size", 2)) ** 2
    grid = np.array([image_grid(image_size, hf_config)], np.int64)  # [1, 3]
    patches = int(np.prod(grid))
    image_tokens = patches // merge
    top = min(ids["vocab_size"], min(v for k, v in ids.items() if k != "vocab_size")) - 1
    low = min(100, top // 2)
    rng = np.random.default_rng(seed)

    def text(k):
        return rng.integers(low, top, size=k, dtype=np.int64).astype(np.int32)

    header = min(8, prompt_len - 2)
    out = []
    for i in range(n):
        prompt = np.concatenate([text(header), [ids["vision_start_token_id"]],
                                 np.full(image_tokens, ids["image_token_id"]), [ids["vision_end_token_id"]],
                                 text(prompt_len - 2 - header)]).astype(np.int32)
        target = lambda: np.concatenate([np.zeros(prompt.size, np.int32), np.ones(response_len, np.int32)])  # noqa
        pixels = rng.standard_normal((patches, patch_dim), dtype=np.float32)
        common = {"source": f"synthetic:{i + 1}", "pixel_values": pixels, "image_grid_thw": grid}
        if mode == "dpo":
            out.append({"chosen_input_ids": np.concatenate([prompt, text(response_len)]),
                        "chosen_target_mask": target(),
                        "rejected_input_ids": np.concatenate([prompt, text(response_len)]),
                        "rejected_target_mask": target(), **common})
        else:
            out.append({"input_ids": np.concatenate([prompt, text(response_len)]), "target_mask": target(), **common})
    return out


def shape_summary(mode: str, examples: list[dict], image_token_id: int) -> dict:
    """Rows, sequence length, tokens and image patches of one step (``examples``: all of the step's examples)."""
    first = examples[0]
    ids = first["chosen_input_ids" if mode == "dpo" else "input_ids"]
    rows = (2 if mode == "dpo" else 1) * len(examples)
    return {"rows": rows, "seq_len": int(ids.shape[0]), "tokens_per_step": rows * int(ids.shape[0]),
            "image_tokens_per_row": int((ids == image_token_id).sum()),
            "response_tokens_per_row": int(first["chosen_target_mask" if mode == "dpo" else "target_mask"].sum()),
            "images_per_step": len(examples), "patches_per_image": int(first["pixel_values"].shape[0]),
            "patches_per_step": sum(int(ex["pixel_values"].shape[0]) for ex in examples)}


def step_flops(config, model_cfg, batch: dict) -> dict:
    """Model and hardware FLOPs of one step on its host ``batch`` (`host_step_batch`), by the trainer's own
    arithmetic (`metrics.step_flops`: decoder on real tokens, causal attention pairs, the LM head on target tokens,
    the frozen reference forward, remat recompute for the hardware count; the frozen vision tower's forward on the
    batch's images)."""
    from medee_jax.models.families import family_of
    from medee_jax.training import metrics

    mode = "sft" if config.mode == "sft" else ("dpo_frozen_ref" if config.dpo.reference == "frozen" else "dpo_no_ref")
    images = family_of(model_cfg).image_inputs(model_cfg)
    counts = metrics.batch_counts(batch)
    vision = metrics.vision_flops(model_cfg, batch, images, trained=config.model.train_vision)
    flops = metrics.step_flops(model_cfg.text, counts, mode=mode, remat=config.model.remat, vision=vision)
    return {"flops_per_step": flops["model"], "hardware_flops_per_step": flops["hardware"],
            "vision_flops_per_step": vision, "text_flops_per_step": flops["model"] - vision,
            "decoder_tokens_per_step": counts.tokens, "attention_pairs_per_step": counts.attention_pairs,
            "target_tokens_per_step": counts.targets}


def peak_flops(args, device_kind: str | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where it came from): --peak-flops, the accelerator table, or the measured CPU peak."""
    from medee_jax.training import metrics

    if args.peak_flops and args.peak_flops > 0:
        return float(args.peak_flops), "--peak-flops"
    import jax

    if jax.default_backend() != "cpu":
        return metrics.peak_flops_per_device(None, device_kind=device_kind), "table (dense bf16 peak)"
    # The machine may be shared: the best of several measurements is the nearest to its real peak.
    best = max(metrics.measure_cpu_matmul_peak() for _ in range(PEAK_TRIALS))
    return best, f"measured fp32 1024x1024 jax matmul (metrics.measure_cpu_matmul_peak, best of {PEAK_TRIALS})"


def finish(result: dict, summary: dict, flops: dict, peak: float | None, peak_source: str) -> dict:
    """Adds throughput, FLOPs, MFU and HFU to ``result`` (``peak``: FLOP/s of all the devices together)."""
    median = result["median_step_s"]
    result["tokens_per_s"] = summary["tokens_per_step"] / median
    result.update(flops)
    result["flops_per_token"] = flops["flops_per_step"] / summary["tokens_per_step"]
    result["peak_flops"] = peak
    result["peak_flops_source"] = peak_source
    result["achieved_flops"] = flops["flops_per_step"] / median
    result["mfu"] = None if not peak else flops["flops_per_step"] / median / peak
    result["hfu"] = None if not peak else flops["hardware_flops_per_step"] / median / peak
    quiet = result.get("median_quiet_step_s")
    result["quiet_tokens_per_s"] = summary["tokens_per_step"] / quiet if quiet else None
    return result


def timed(step, count: int) -> list[float]:
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _cpu_stat() -> tuple[float, float] | None:
    """(busy, steal) CPU-seconds of the whole machine since boot, from /proc/stat (None where unreadable)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0.0
    return (sum(fields[:8]) - idle - steal) / tick, steal / tick


PEAK_TRIALS = 7
QUIET_FOREIGN_CORES = 0.25  # a step counts as quiet when other processes used less than this many cores


def timed_steps(step, count: int) -> dict:
    """Times ``count`` steps; per step also this process's CPU time and the cores other processes (``foreign``) and
    the hypervisor (``steal``) took meanwhile, so figures from a shared machine can be read against its load."""
    walls, cpus, foreign, steal = [], [], [], []
    for _ in range(count):
        stat0, own0, t0 = _cpu_stat(), os.times(), time.perf_counter()
        step()
        wall = time.perf_counter() - t0
        own1, stat1 = os.times(), _cpu_stat()
        own = (own1.user + own1.system) - (own0.user + own0.system)
        walls.append(wall)
        cpus.append(own)
        if stat0 and stat1:
            foreign.append(max(0.0, (stat1[0] - stat0[0]) - own) / wall)
            steal.append((stat1[1] - stat0[1]) / wall)
    out = {"median_step_s": statistics.median(walls), "step_times_s": walls,
           "mean_step_cpu_s": sum(cpus) / len(cpus), "step_cpu_s": cpus}
    if foreign:
        quiet = [w for w, f in zip(walls, foreign) if f < QUIET_FOREIGN_CORES]
        out.update(foreign_cores_per_step=foreign, steal_cores_per_step=steal,
                   median_foreign_cores=statistics.median(foreign), quiet_steps=len(quiet),
                   median_quiet_step_s=statistics.median(quiet) if quiet else None,
                   min_step_s=min(walls))
    return out


def load_run_config(mode: str):
    """The trainer's ml_collections config of configs/{mode}.py (ml_collections only: no jax)."""
    spec = importlib.util.spec_from_file_location(f"bench_{mode}_config", os.path.join(REPO, "configs", f"{mode}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def schedule_lr(update: int, lr: float, total_steps: int, warmup_ratio: float, final_ratio: float = 0.0) -> float:
    """Returns the trainer's learning rate at optimizer update ``update`` (0-based): `steps.warmup_cosine`, linear
    warmup from 0 then cosine decay to ``final_ratio * lr``, written without jax for the PyTorch peer (a test holds
    the two equal)."""
    import math

    warmup = max(int(round(total_steps * warmup_ratio)), 0)
    if update < warmup:
        return lr * update / warmup
    decay = max(total_steps, warmup + 1) - warmup  # [update] steps of cosine after the warmup
    t = min(update - warmup, decay)
    cosine = 0.5 * (1.0 + math.cos(math.pi * t / decay))
    return lr * ((1.0 - final_ratio) * cosine + final_ratio)


def trainer_config(args, model_dir: str | None, length: int, patches: int, targets: int, row_length: int):
    """configs/{mode}.py with the benchmark's overrides (model, batch shapes, chunks)."""
    c = load_run_config(args.mode)
    c.model.checkpoint = model_dir or ""
    c.model.dtype = args.dtype
    c.model.param_dtype = "float32"
    c.model.remat = args.remat
    c.data.batch_size = args.pairs
    c.data.max_length = length
    c.data.length_buckets = tuple(sorted({length, row_length}))  # sequences; shared-prompt DPO rows
    c.dpo.share_prompt = args.share_prompt
    c.data.target_buckets = (targets,)
    c.data.patch_buckets = (patches,)
    c.data.packing = False
    c.train.steps = 1 + args.warmup + args.steps
    c.train.lm_head_dtype = getattr(args, "lm_head_dtype", "compute")
    c.optimizer.mu_dtype = getattr(args, "mu_dtype", "float32")
    c.train.xla_cpu_fused_dot = getattr(args, "xla_cpu_fused_dot", True)
    if args.vocab_chunk:
        c.train.vocab_chunk = args.vocab_chunk
    if args.seq_chunk:
        c.train.seq_chunk = args.seq_chunk
    return c


def plan_config(args, model_dir: str | None, hf_config: dict):
    """Returns the run config of the benchmarked step (`trainer_config`), its bucket sizes the exact sizes of one
    synthetic example: the sequence length, the patches of ``--pairs`` images, the target count and, with
    ``--share-prompt``, the shared row's length (numpy and ml_collections only)."""
    from medee_jax.data.batching import shared_prefix_length, shifted_targets

    probe = synthetic_examples(args.mode, 1, args.prompt_len, args.response_len, args.image_size, hf_config)[0]
    side = "chosen_" if args.mode == "dpo" else ""
    length = int(probe[f"{side}input_ids"].shape[0])
    _, targets = shifted_targets(probe[f"{side}input_ids"], probe[f"{side}target_mask"])
    row_length = length
    if args.mode == "dpo" and getattr(args, "share_prompt", False):
        row_length = length + int(probe["rejected_input_ids"].shape[0]) - shared_prefix_length(probe)
    return trainer_config(args, model_dir, length, args.pairs * int(probe["pixel_values"].shape[0]),
                          int(targets.sum()), row_length)


def host_step_batch(config, model_dir: str | None, model_cfg, examples: list[dict], shards: int) -> dict:
    """Returns the stacked host batch [S, ...] the trainer's BatchSource would yield for ``examples``: each data
    shard's batch built by the run's own BatchSpec (`batches.run_batch_spec`: dpo.share_prompt and the buckets of
    the config) and assembled as the loop does (`batches.assemble_step`)."""
    from medee_jax.data import pipeline
    from medee_jax.training import setup
    from medee_jax.training.batches import assemble_step, run_batch_spec

    d = config.data
    data = setup.DataSpec(train_path="synthetic", eval_path="", tokenizer_dir=model_dir or "", media_root="",
                          is_demo=False)
    spec = run_batch_spec(config, data, model_cfg)
    built = []
    for s in range(shards):
        part = examples[s * d.batch_size:(s + 1) * d.batch_size]
        built.append(spec.build(part if config.mode == "dpo" else [[ex] for ex in part]))
    dc = setup.pipeline_config(config, data, "train")
    return assemble_step(built, pipeline.image_inputs(dc, model_cfg), setup.target_buckets(config))
