"""Times one full training step, as the trainer runs it, on random data of given shapes; prints one JSON line last.

    python tools/bench_step.py --make-checkpoint /tmp/qwen62m        # synthetic 62M Qwen2.5-VL-shaped checkpoint
    python tools/bench_step.py --mode dpo --model-dir /tmp/qwen62m --pairs 2 --prompt-len 64 --response-len 192 \
        --image-size 224 --steps 5 [--dtype float32|bfloat16] [--remat none|full] [--framework jax|torch]

JAX (default): the trainer's own pieces, not a re-implementation. The run config is ``configs/{mode}.py`` with the
benchmark's overrides; the model comes from ``setup.build_model`` (``from_pretrained(model_dir, dtype=...,
param_dtype=float32)``; random init of the checkpoint's config if that fails); parameters are split with
``steps.trainable_filter`` (vision tower and merger frozen, image features shared by policy and reference); the
state, optimizer and schedule come from ``Trainer._init_state`` (frozen reference copy in compute dtype, AdamW with
global-norm clipping); the step is the loop's jitted ``accumulate_first`` + ``apply`` (``steps.jit_step``, donated
buffers), with ``StepOptions`` from the config. One timed step = host batch -> device arrays, global normalisers,
accumulate, apply, and fetching the step metrics (what the loop does with ``log_every=1``).

The batch follows the device batch contract of ``medee_jax/data/batching.py`` and is assembled by its own
``BatchSpec.build`` from synthetic examples: per pair a prompt of ``--prompt-len`` text tokens (the
<|vision_start|>/<|vision_end|> markers included) around one image of ``--image-size``² pixels (grid from
``smart_resize``; ``t·h·w/4`` image tokens), and a ``--response-len`` response that is the training target (loss
mask on the response). DPO: N pairs -> 2N rows (chosen then rejected; the trainer's default), or with
``--share-prompt`` N rows [prompt | chosen | rejected] (``dpo.share_prompt``: the prompt and its image tokens run
through the decoder once per pair); the image is encoded once per pair either way. SFT: N rows, one example (and image) each. No padding: the length, patch and
target buckets (``data.target_buckets``: the LM head runs on each row's target positions) are the exact sizes.

Torch (``--framework torch``, see tools/bench_step_torch.py): the same step in transformers + PyTorch eager.

Reported (last line, JSON): ``median_step_s`` over ``--steps`` timed steps after compilation and ``--warmup``
steps; ``tokens_per_s`` = every token of every sequence in the step (prompt, image and response tokens of chosen and
rejected) / median step; ``peak_rss_mb`` = the process's peak resident memory (``getrusage``, whole run: load,
compile, steps); ``step_peak_rss_mb`` = the peak during the timed steps alone (Linux: the high-water mark is reset
before them); ``mfu`` = model FLOPs per step (text: ``metrics.flops_per_token`` x tokens; vision: frozen forward once
per image, the family's ``vision_flops_per_unit`` x patches) / median step / peak FLOP/s (CPU: this machine's measured
fp32 matmul peak, ``metrics.measure_cpu_matmul_peak``; ``--peak-flops`` overrides). Both frameworks use these same
model FLOPs, so their MFU ratio is their throughput ratio. Also ``compile_s`` (the first step, compiling),
``tokens_per_step``, ``flops_per_token``, ``device``, ``rss_trail_mb`` (resident memory after imports, model, state,
first step, timed steps), ``step_cpu_s`` (this process's CPU time per step) and, for a shared machine,
``foreign_cores_per_step`` / ``steal_cores_per_step`` (cores other processes / the hypervisor took during each step,
from /proc/stat), ``median_quiet_step_s`` / ``quiet_tokens_per_s`` over the steps where others took < 0.25 core,
and ``loadavg_start`` / ``loadavg_end``. Read timings together with these.

``--profile`` (jax) adds ``pieces_s``: the step's parts jitted and timed alone (vision, decoder forward and
forward+backward, chunked LM head forward and forward+backward on the target positions, reference forward,
optimizer update). ``--memory-analysis`` (jax) adds XLA's compiled temp/argument/output sizes of ``accumulate`` and
``apply`` and the bytes of live arrays before the first step.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Special token ids of the synthetic checkpoint (inside its 32000-token vocabulary).
SYNTHETIC_IDS = {"vision_start_token_id": 31990, "vision_end_token_id": 31991, "image_token_id": 31992,
                 "video_token_id": 31993}


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by both frameworks (numpy only: the torch side must not load jax before it has measured).


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


def model_flops_per_step(model_dir_or_cfg, mode: str, summary: dict) -> dict:
    """Model FLOPs of one step: text decoder (metrics.flops_per_token) + frozen vision forward once per image."""
    from medee_jax.models import load_config
    from medee_jax.models.families import family_of
    from medee_jax.training import metrics

    cfg = load_config(model_dir_or_cfg) if isinstance(model_dir_or_cfg, (str, os.PathLike)) else model_dir_or_cfg
    per_token = metrics.flops_per_token(cfg.text, seq_len=summary["seq_len"],
                                        mode="dpo_frozen_ref" if mode == "dpo" else "sft")
    per_patch = family_of(cfg).config().vision_flops_per_unit(cfg, trained=False,
                                                              units_per_image=summary["patches_per_image"])
    text = per_token * summary["tokens_per_step"]
    vision = per_patch * summary["patches_per_step"]
    return {"flops_per_token": per_token, "vision_flops_per_patch": per_patch, "text_flops_per_step": text,
            "vision_flops_per_step": vision, "flops_per_step": text + vision}


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
    median = result["median_step_s"]
    result["tokens_per_s"] = summary["tokens_per_step"] / median
    result.update(flops)
    result["peak_flops"] = peak
    result["peak_flops_source"] = peak_source
    result["achieved_flops"] = flops["flops_per_step"] / median
    result["mfu"] = None if not peak else flops["flops_per_step"] / median / peak
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


# ----------------------------------------------------------------------------------------------------------------
# Synthetic checkpoint


def make_checkpoint(out_dir: str, seed: int = 0) -> dict:
    """Writes a random fp32 Qwen2.5-VL-shaped checkpoint (~62M parameters) with transformers; returns its sizes."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}, rope_theta=1000000.0,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vision = dict(depth=4, hidden_size=256, intermediate_size=688, num_heads=4, out_hidden_size=512,
                  fullatt_block_indexes=[3], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **SYNTHETIC_IDS)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    total = sum(p.numel() for p in model.parameters())
    vision_params = sum(p.numel() for p in model.model.visual.parameters())
    info = {"checkpoint": os.path.abspath(out_dir), "params": total, "vision_params": vision_params,
            "text_params": total - vision_params, "dtype": "float32"}
    print(f"wrote {out_dir}: {total:,} parameters ({total - vision_params:,} text incl. embedding and LM head, "
          f"{vision_params:,} vision incl. merger)", file=sys.stderr)
    return info


# ----------------------------------------------------------------------------------------------------------------
# JAX: the trainer's step


def load_run_config(mode: str):
    """The trainer's ml_collections config of configs/{mode}.py (ml_collections only: no jax)."""
    spec = importlib.util.spec_from_file_location(f"bench_{mode}_config", os.path.join(REPO, "configs", f"{mode}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


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
    if args.vocab_chunk:
        c.train.vocab_chunk = args.vocab_chunk
    if args.seq_chunk:
        c.train.seq_chunk = args.seq_chunk
    return c


def build_jax_model(config, mesh, model_dir: str | None, hf_config: dict):
    """The trainer's model (setup.build_model -> from_pretrained); random init of the checkpoint's config if that
    fails."""
    import jax.numpy as jnp
    from flax import nnx

    from medee_jax.models import config_from_hf_dict
    from medee_jax.models.families import family_of
    from medee_jax.training import setup

    if model_dir:
        try:
            return setup.build_model(config, mesh, None), "from_pretrained"
        except Exception as e:  # noqa: BLE001 - the loader may be mid-change; time the same shapes anyway
            reason = f"random init (from_pretrained failed: {type(e).__name__}: {str(e)[:200]})"
            print(f"warning: {reason}", file=sys.stderr)
    else:
        reason = "random init (no --model-dir)"
    cfg = config_from_hf_dict(hf_config)
    model = family_of(cfg).model()(cfg, dtype=setup.DTYPES[config.model.dtype], param_dtype=jnp.float32,
                                   remat=config.model.remat, rngs=nnx.Rngs(config.seed))
    return setup.place_on_mesh(model, mesh, dict(config.sharding_rules)), reason


def host_batch(config, model_cfg, examples: list[dict], shards: int) -> dict:
    """The stacked host batch [S, ...] the loop's BatchSource would yield (one BatchSpec.build per shard)."""
    from medee_jax.data.batching import BatchSpec
    from medee_jax.models.families import family_of
    from medee_jax.training.batches import DEVICE_KEYS, add_target_arrays, target_width
    from medee_jax.training.mesh import stack_shards

    d = config.data
    family = family_of(model_cfg)
    spec = BatchSpec(mode=config.mode, batch_size=d.batch_size, max_length=d.max_length,
                     length_buckets=tuple(d.length_buckets), patch_buckets=tuple(d[family.bucket_field]),
                     image_token_id=model_cfg.image_token_id, images=family.image_inputs(model_cfg), packing=False)
    built = []
    for s in range(shards):
        part = examples[s * d.batch_size:(s + 1) * d.batch_size]
        items = part if config.mode == "dpo" else [[ex] for ex in part]
        built.append(spec.build(items))
    width = target_width(built, tuple(d.target_buckets) or tuple(d.length_buckets))
    built = [add_target_arrays(b, width) for b in built]
    return stack_shards([{k: v for k, v in b.items() if k in DEVICE_KEYS} for b in built])




def run_jax(args, model_dir: str | None, hf_config: dict) -> dict:
    import jax
    from flax import nnx

    from medee_jax.data.batching import shared_prefix_length, shifted_targets
    from medee_jax.models.families import family_of
    from medee_jax.training import loop, setup, steps
    from medee_jax.training.mesh import local_data_shards, make_mesh, to_global

    # Shapes first (numpy): one step's examples for every local data shard.
    probe = synthetic_examples(args.mode, 1, args.prompt_len, args.response_len, args.image_size, hf_config)
    length = int(probe[0]["chosen_input_ids" if args.mode == "dpo" else "input_ids"].shape[0])
    patches_per_image = int(probe[0]["pixel_values"].shape[0])
    side = "chosen_" if args.mode == "dpo" else ""
    _, probe_targets = shifted_targets(probe[0][f"{side}input_ids"], probe[0][f"{side}target_mask"])
    row_length = length
    if args.mode == "dpo" and args.share_prompt:
        row_length = length + int(probe[0]["rejected_input_ids"].shape[0]) - shared_prefix_length(probe[0])
    config = trainer_config(args, model_dir, length, args.pairs * patches_per_image, int(probe_targets.sum()),
                            row_length)
    setup.validate_config(config)
    mesh = make_mesh(dict(config.mesh))
    shards = local_data_shards(mesh)
    examples = synthetic_examples(args.mode, args.pairs * shards, args.prompt_len, args.response_len,
                                  args.image_size, hf_config, seed=args.seed)
    summary = shape_summary(args.mode, examples, special_ids(hf_config)["image_token_id"])

    trail = {"imports": current_rss_mb()}
    t_load = time.perf_counter()
    model, source = build_jax_model(config, mesh, model_dir, hf_config)
    trail["model"] = current_rss_mb()
    load_s = time.perf_counter() - t_load
    model_cfg = model.config

    # Trainer.__init__: options and the params/frozen split.
    opts = setup.step_options(config)
    filt = steps.trainable_filter(family_of(model_cfg), config.model.train_vision, config.model.train_projector)
    graphdef, params, frozen = nnx.split(model, filt, nnx.Param)
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    # Trainer._init_state on the attributes it reads (state, optimizer, schedule exactly as a run builds them).
    holder = SimpleNamespace(config=config, params=params, frozen=frozen, mesh=mesh,
                             total_steps=int(config.train.steps))
    state, optimizer, schedule = loop.Trainer._init_state(holder)
    del holder, params, frozen
    trail["state"] = current_rss_mb()
    shardings = jax.tree.map(lambda x: x.sharding, state)

    # Trainer.run: the jitted halves of a step (one micro-batch: accumulate_first, then apply).
    step_fns = steps.jit_step(graphdef, opts, optimizer, schedule, shardings, config.optimizer.max_grad_norm)

    local = host_batch(config, model_cfg, examples, shards)
    box = {"state": state, "metrics": None}
    del state

    def step():
        batch = to_global(mesh, local)
        norms = loop._global_norms([local], config.mode)
        acc = step_fns.accumulate_first(box["state"], batch, norms)
        box["state"], m = step_fns.apply(box["state"], acc)
        box["metrics"] = {k: float(v) for k, v in jax.device_get(m).items()}
        int(box["state"]["nonfinite_in_a_row"])

    memory = None
    if args.memory_analysis:
        batch = to_global(mesh, local)
        norms = loop._global_norms([local], config.mode)
        compiled = step_fns.accumulate_first.lower(box["state"], batch, norms).compile()
        mem = compiled.memory_analysis()
        memory = {"accumulate_temp_mb": mem.temp_size_in_bytes / 2**20,
                  "accumulate_argument_mb": mem.argument_size_in_bytes / 2**20,
                  "accumulate_output_mb": mem.output_size_in_bytes / 2**20,
                  "accumulate_alias_mb": mem.alias_size_in_bytes / 2**20}
        acc_shape = jax.eval_shape(step_fns.accumulate_first, box["state"], batch, norms)
        mem = step_fns.clip.lower(acc_shape).compile().memory_analysis()
        memory["clip_temp_mb"] = mem.temp_size_in_bytes / 2**20
        acc_shape = jax.eval_shape(step_fns.clip, acc_shape)
        mem = step_fns.update.lower(box["state"], acc_shape).compile().memory_analysis()
        memory.update({"apply_temp_mb": mem.temp_size_in_bytes / 2**20,
                       "apply_argument_mb": mem.argument_size_in_bytes / 2**20,
                       "apply_output_mb": mem.output_size_in_bytes / 2**20,
                       "apply_alias_mb": mem.alias_size_in_bytes / 2**20,
                       "live_arrays_mb": sum(x.nbytes for x in jax.live_arrays()) / 2**20})
        del compiled

    compile_s = timed(step, 1)[0]  # compiles accumulate_first and apply
    trail["first_step"] = current_rss_mb()
    timed(step, args.warmup)
    gc.collect()
    before_steps = peak_rss_mb()
    reset = reset_peak_rss()
    timing = timed_steps(step, args.steps)
    step_peak = high_water_rss_mb() if reset else None
    peak_rss = max(before_steps, peak_rss_mb(), step_peak or 0.0)
    trail["after_steps"] = current_rss_mb()

    device = jax.devices()[0]
    result = {
        "framework": "jax", "mode": args.mode, "median_step_s": timing.pop("median_step_s"),
        "tokens_per_s": None, "peak_rss_mb": peak_rss, "mfu": None,
        "step_peak_rss_mb": step_peak, "compile_s": compile_s, "load_s": load_s, **timing, "rss_trail_mb": trail,
        **summary, "dtype": args.dtype, "remat": args.remat, "vocab_chunk": opts.vocab_chunk,
        "seq_chunk": opts.seq_chunk, "reference": opts.reference, "share_image_features": opts.share_image_features,
        "share_prompt": bool(config.mode == "dpo" and config.dpo.share_prompt),
        "model_source": source, "device": f"{device.platform}:{device.device_kind}", "num_devices": jax.device_count(),
        "data_shards": shards, "loss": box["metrics"]["loss"], "skipped_steps": box["metrics"]["skipped"],
        "jax_version": jax.__version__,
    }
    if memory:
        result.update(memory)
    flops = model_flops_per_step(model_cfg, args.mode, summary)
    peak, source_peak = peak_flops(args, device.device_kind)
    if peak is not None and jax.default_backend() != "cpu":
        peak *= jax.device_count()
    result = finish(result, summary, flops, peak, source_peak)
    if args.profile:
        from_profile = profile_pieces(args, graphdef, box["state"], to_global(mesh, local),
                                      loop._global_norms([local], config.mode), opts, optimizer, schedule,
                                      config.optimizer.max_grad_norm)
        result["pieces_s"] = from_profile
    return result


def profile_pieces(args, graphdef, state, batch, norms, opts, optimizer, schedule, max_grad_norm: float) -> dict:
    """Median seconds of the step's parts, each jitted alone (vision, hidden states, log-probs, backward, update)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from medee_jax import losses
    from medee_jax.training import steps

    params, frozen, ref = state["params"], state["frozen"], state.get("ref")
    shard = jax.tree.map(lambda x: x[0], batch)  # one data shard

    def model_of(p):
        return nnx.merge(graphdef, p, frozen)

    @jax.jit
    def vision(p):
        return steps._image_features(model_of(p), shard)

    features = vision(params)

    @jax.jit
    def hidden_fwd(p, f):
        return steps._target_hidden(model_of(p), shard, f)

    hidden = hidden_fwd(params, features)

    @jax.jit
    def logps_fwd(p, h):
        return losses.chunked_sequence_logps(h, model_of(p).lm_head_kernel(), shard["target_labels"],
                                             shard["target_mask"], vocab_chunk=opts.vocab_chunk,
                                             seq_chunk=opts.seq_chunk)

    @jax.jit
    def logps_fwd_bwd(p, h):
        def f(p, h):
            return logps_fwd(p, h).sum()
        return jax.grad(f, argnums=(0, 1))(p, h)

    @jax.jit
    def policy_fwd(p, f):
        return steps._sequence_logps(model_of(p), shard, f, opts)

    @jax.jit
    def policy_fwd_bwd(p, f):
        return jax.grad(lambda p: steps._sequence_logps(model_of(p), shard, f, opts).sum())(p)

    @jax.jit
    def hidden_fwd_bwd(p, f):
        return jax.grad(lambda p: jnp.sum(steps._hidden(model_of(p), shard, f) ** 2))(p)

    acc = jax.jit(functools.partial(steps.accumulate_first, graphdef, opts=opts))(state, batch, norms)
    clip = jax.jit(functools.partial(steps.clip_gradients, max_grad_norm))
    update = jax.jit(functools.partial(steps.apply, optimizer, schedule))

    def apply(state, acc):
        return update(state, clip(acc))

    pieces = {
        "vision_fwd": lambda: vision(params),
        "hidden_fwd (embed+decoder)": lambda: hidden_fwd(params, features),
        "logps_fwd (chunked LM head on targets)": lambda: logps_fwd(params, hidden),
        "logps_fwd_bwd (chunked LM head on targets)": lambda: logps_fwd_bwd(params, hidden),
        "hidden_fwd_bwd (embed+decoder)": lambda: hidden_fwd_bwd(params, features),
        "policy_fwd": lambda: policy_fwd(params, features),
        "policy_fwd_bwd": lambda: policy_fwd_bwd(params, features),
        "apply (clip+AdamW+guard)": lambda: apply(state, acc),
    }
    if ref is not None:
        pieces["reference_fwd"] = lambda: policy_fwd(ref, features)
    out = {}
    for name, fn in pieces.items():
        jax.block_until_ready(fn())  # compile
        times = timed(lambda: jax.block_until_ready(fn()), max(3, args.steps))
        out[name] = statistics.median(times)
    return out


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("sft", "dpo"), default="dpo")
    p.add_argument("--model-dir", default=None, help="Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("--pairs", type=int, default=2, help="DPO pairs per step (2N rows); SFT: rows per step")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt text tokens (vision markers included)")
    p.add_argument("--response-len", type=int, default=192)
    p.add_argument("--image-size", type=int, default=224, help="one SxS image per pair (SFT: per row)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after compilation and --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the compiling one")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"), default="none",
                   help="decoder/vision remat policy (torch: full = gradient checkpointing)")
    p.add_argument("--framework", choices=("jax", "torch"), default="jax")
    p.add_argument("--share-prompt", action="store_true",
                   help="jax DPO: one row per pair, the prompt once (dpo.share_prompt=True)")
    p.add_argument("--vocab-chunk", type=int, default=0, help="StepOptions.vocab_chunk (0: the config's)")
    p.add_argument("--seq-chunk", type=int, default=0, help="StepOptions.seq_chunk (0: the config's)")
    p.add_argument("--peak-flops", type=float, default=0.0, help="peak FLOP/s per device for MFU (0: measure/look up)")
    p.add_argument("--profile", action="store_true", help="also time the step's parts separately (jax)")
    p.add_argument("--memory-analysis", action="store_true", help="report XLA's temp memory of accumulate (jax)")
    p.add_argument("--threads", type=int, default=0, help="torch: intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--make-checkpoint", metavar="DIR", default=None,
                   help="write the synthetic 62M-parameter Qwen2.5-VL-shaped checkpoint to DIR (and exit unless "
                        "--model-dir is also given)")
    args = p.parse_args(argv)
    if min(args.pairs, args.steps, args.image_size) < 1 or args.warmup < 0:
        p.error("--pairs, --steps and --image-size must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.make_checkpoint:
        info = make_checkpoint(args.make_checkpoint, seed=args.seed)
        if not args.model_dir:
            print(json.dumps(info))
            return info
    model_dir = args.model_dir
    if model_dir is None:
        raise SystemExit("--model-dir is required (make one with --make-checkpoint DIR)")
    hf_config = read_hf_config(model_dir)
    start = loadavg()
    if args.framework == "torch":
        if args.profile or args.memory_analysis:
            raise SystemExit("--profile and --memory-analysis are for --framework jax")
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_step_torch

        result = bench_step_torch.run_torch(args, model_dir, hf_config)
    else:
        result = run_jax(args, model_dir, hf_config)
    result["loadavg_start"] = start
    result["loadavg_end"] = loadavg()
    result["cpu_count"] = os.cpu_count()
    print(json.dumps(result, default=float))
    return result


if __name__ == "__main__":
    main()
