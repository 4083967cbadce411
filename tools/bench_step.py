"""Times one full training step, as the trainer runs it, on random data of given shapes; prints one JSON line last.

    python tools/bench_step.py --make-checkpoint /tmp/qwen62m        # synthetic 62M Qwen2.5-VL-shaped checkpoint
    python tools/bench_step.py --mode dpo --model-dir /tmp/qwen62m --pairs 2 --prompt-len 64 --response-len 192 \
        --image-size 224 --steps 5 [--dtype float32|bfloat16] [--remat none|full] [--framework jax|torch]

JAX (default): the trainer's own pieces, not a re-implementation. The run config is ``configs/{mode}.py`` with the
benchmark's overrides (``bench_common.trainer_config``); the model comes from ``setup.build_model``
(``from_pretrained(model_dir, dtype=..., param_dtype=float32)``; random init of the checkpoint's config if that
fails); parameters are split by ``state.split_model`` (vision tower and merger frozen and stored in the compute
dtype, image features shared by policy and reference); the state, optimizer and schedule come from
``state.init_train_state`` (frozen reference copy in compute dtype, AdamW with global-norm clipping); the step is the
loop's jitted ``accumulate_first`` + ``apply`` (``steps.jit_step``, donated buffers), with ``StepOptions`` from the
config and ``loop.global_norms``. One timed step = host batch -> device arrays, global normalisers, accumulate,
apply, and fetching the step metrics (what the loop does with ``log_every=1``).

The batch is built from synthetic examples by the run's own BatchSpec (``batches.run_batch_spec``, the input
pipeline's constructor: buckets and ``dpo.share_prompt`` from the config) and assembled as the loop's BatchSource
does (``batches.assemble_step``): per pair a prompt of ``--prompt-len`` text tokens (the
<|vision_start|>/<|vision_end|> markers included) around one image of ``--image-size``² pixels (grid from
``smart_resize``; ``t·h·w/4`` image tokens), and a ``--response-len`` response that is the training target (loss
mask on the response). DPO: N pairs -> 2N rows (chosen then rejected; the trainer's default), or with
``--share-prompt`` N rows [prompt | chosen | rejected] (``dpo.share_prompt``: the prompt and its image tokens run
through the decoder once per pair; ``rows_per_step`` and ``row_length`` in the output say which layout ran); the
image is encoded once per pair either way. SFT: N rows, one example (and image) each. No padding: the length,
patch and target buckets (``data.target_buckets``: the LM head runs on each row's target positions) are the exact
sizes.

Torch (``--framework torch``, see tools/bench_step_torch.py): the same step in transformers + PyTorch eager
(``--dtype bfloat16``: pure bf16 weights; with ``--torch-autocast``: fp32 weights and optimizer, bf16 autocast
forwards, the JAX side's mixed precision).

Reported (last line, JSON): ``median_step_s`` over ``--steps`` timed steps after compilation and ``--warmup``
steps; ``tokens_per_s`` = every token of every sequence in the step (prompt, image and response tokens of chosen and
rejected) / median step; ``peak_rss_mb`` = the process's peak resident memory (``getrusage``, whole run: load,
compile, steps); ``step_peak_rss_mb`` = the peak during the timed steps alone (Linux: the high-water mark is reset
before them); ``mfu`` = model FLOPs per step (``metrics.step_flops`` on the step's host batch: the decoder on real
tokens, attention on the causal (query, key) pairs, the LM head on target tokens, the reference forward; vision:
frozen forward once per image) / median step / peak FLOP/s (CPU: this machine's measured fp32 matmul peak,
``metrics.measure_cpu_matmul_peak``; ``--peak-flops`` overrides); ``hfu`` the same with hardware FLOPs (remat and
the LM head's backward recompute added). FLOPs are those of the step's own batch: both frameworks run the
separate-rows layout, so their MFU ratio is their throughput ratio; ``--share-prompt`` needs fewer FLOPs for the
same tokens (the prompt once), so compare layouts by tokens/s.
Also ``compile_s`` (the first step, compiling),
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
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (SYNTHETIC_IDS, current_rss_mb, finish, high_water_rss_mb, host_step_batch,  # noqa: E402
                          loadavg, peak_flops, peak_rss_mb, plan_config, read_hf_config, reset_peak_rss,
                          shape_summary, special_ids, step_flops, synthetic_examples, timed, timed_steps)


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


def run_jax(args, model_dir: str | None, hf_config: dict) -> dict:
    import jax

    from medee_jax.training import loop, setup, state, steps
    from medee_jax.training.mesh import local_data_shards, make_mesh, to_global

    config = plan_config(args, model_dir, hf_config)
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

    # What the Trainer builds: options, the params / frozen split, the state, optimizer and schedule.
    opts = setup.step_options(config)
    graphdef, params, frozen = state.split_model(model, config)
    del model
    train_state, optimizer, schedule = state.init_train_state(config, params, frozen, mesh, int(config.train.steps))
    del params, frozen
    trail["state"] = current_rss_mb()

    # Trainer.run: the jitted pieces of a step (one micro-batch: accumulate_first, then apply).
    step_fns = steps.jit_step(graphdef, opts, optimizer, schedule, state.shardings_of(train_state),
                              config.optimizer.max_grad_norm, compiler_options=setup.cpu_step_compiler_options(config))

    local = host_step_batch(config, model_dir, model_cfg, examples, shards)
    box = {"state": train_state, "metrics": None}
    del train_state

    def step():
        batch = to_global(mesh, local)
        norms = loop.global_norms([local], config.mode)
        acc = step_fns.accumulate_first(box["state"], batch, norms)
        box["state"], m = step_fns.apply(box["state"], acc)
        box["metrics"] = {k: float(v) for k, v in jax.device_get(m).items()}
        int(box["state"].nonfinite_in_a_row)

    memory = None
    if args.memory_analysis:
        batch = to_global(mesh, local)
        norms = loop.global_norms([local], config.mode)
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
        **summary, "dtype": args.dtype, "remat": args.remat,
        "compiler_options": setup.cpu_step_compiler_options(config), "vocab_chunk": opts.vocab_chunk,
        "seq_chunk": opts.seq_chunk, "lm_head_dtype": opts.lm_head_dtype, "mu_dtype": config.optimizer.mu_dtype,
        "reference": opts.reference, "share_image_features": opts.share_image_features,
        "share_prompt": bool(config.mode == "dpo" and config.dpo.share_prompt),
        "rows_per_step": int(local["input_ids"].shape[0] * local["input_ids"].shape[1]),
        "row_length": int(local["input_ids"].shape[-1]),
        "model_source": source, "device": f"{device.platform}:{device.device_kind}", "num_devices": jax.device_count(),
        "data_shards": shards, "loss": box["metrics"]["loss"], "skipped_steps": box["metrics"]["skipped"],
        "jax_version": jax.__version__,
    }
    if memory:
        result.update(memory)
    flops = step_flops(config, model_cfg, local)
    peak, source_peak = peak_flops(args, device.device_kind)
    if peak is not None and jax.default_backend() != "cpu":
        peak *= jax.device_count()
    result = finish(result, summary, flops, peak, source_peak)
    if args.profile:
        result["pieces_s"] = profile_pieces(args, graphdef, box["state"], to_global(mesh, local),
                                            loop.global_norms([local], config.mode), opts, optimizer, schedule,
                                            config.optimizer.max_grad_norm)
    return result


def profile_pieces(args, graphdef, state, batch, norms, opts, optimizer, schedule, max_grad_norm: float) -> dict:
    """Median seconds of the step's parts, each jitted alone (vision, hidden states, log-probs, backward, update)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from medee_jax import losses
    from medee_jax.training import steps

    params, frozen, ref = state.params, state.frozen, state.ref
    shard = jax.tree.map(lambda x: x[0], batch)  # one data shard

    def model_of(p):
        return nnx.merge(graphdef, p, frozen)

    @jax.jit
    def vision(p):
        return steps.image_features(model_of(p), shard)

    features = vision(params)

    @jax.jit
    def hidden_fwd(p, f):
        return steps.target_hidden(model_of(p), shard, f)

    hidden = hidden_fwd(params, features)

    @jax.jit
    def logps_fwd(p, h):
        return losses.chunked_sequence_logps(h, model_of(p).lm_head_kernel(), shard["target_labels"],
                                             shard["target_mask"], vocab_chunk=opts.vocab_chunk,
                                             seq_chunk=opts.seq_chunk, matmul_dtype=opts.lm_head_dtype)

    @jax.jit
    def logps_fwd_bwd(p, h):
        def f(p, h):
            return logps_fwd(p, h).sum()
        return jax.grad(f, argnums=(0, 1))(p, h)

    @jax.jit
    def policy_fwd(p, f):
        return steps.sequence_logps(model_of(p), shard, f, opts)

    @jax.jit
    def policy_fwd_bwd(p, f):
        return jax.grad(lambda p: steps.sequence_logps(model_of(p), shard, f, opts).sum())(p)

    @jax.jit
    def hidden_fwd_bwd(p, f):
        return jax.grad(lambda p: jnp.sum(steps.decoder_hidden(model_of(p), shard, f) ** 2))(p)

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
    p.add_argument("--remat", default="none", choices=("none", "full", "minimal", "save_attention", "save_qkv_proj",
                                                       "minimal_offload", "save_attention_offload",
                                                       "save_qkv_proj_offload"),
                   help="decoder/vision remat policy (torch: full = gradient checkpointing)")
    p.add_argument("--framework", choices=("jax", "torch"), default="jax")
    p.add_argument("--share-prompt", action="store_true",
                   help="jax DPO: one row per pair, the prompt once (dpo.share_prompt=True)")
    p.add_argument("--lm-head-dtype", choices=("compute", "float32"), default="compute",
                   help="jax: train.lm_head_dtype (compute: --dtype operands, fp32 accumulation)")
    p.add_argument("--mu-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="jax: optimizer.mu_dtype (AdamW's first moment)")
    p.add_argument("--no-xla-cpu-fused-dot", dest="xla_cpu_fused_dot", action="store_false",
                   help="jax: train.xla_cpu_fused_dot=False (XLA's default CPU compiler options for the step)")
    p.add_argument("--vocab-chunk", type=int, default=0, help="StepOptions.vocab_chunk (0: the config's)")
    p.add_argument("--seq-chunk", type=int, default=0, help="StepOptions.seq_chunk (0: the config's)")
    p.add_argument("--peak-flops", type=float, default=0.0, help="peak FLOP/s per device for MFU (0: measure/look up)")
    p.add_argument("--profile", action="store_true", help="also time the step's parts separately (jax)")
    p.add_argument("--memory-analysis", action="store_true", help="report XLA's temp memory of accumulate (jax)")
    p.add_argument("--threads", type=int, default=0, help="torch: intra-op threads (0: torch's default)")
    p.add_argument("--torch-autocast", action="store_true",
                   help="torch with --dtype bfloat16: fp32 weights and optimizer, forwards under bf16 autocast (the "
                        "JAX side's mixed precision) instead of pure bf16 weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--make-checkpoint", metavar="DIR", default=None,
                   help="write the synthetic 62M-parameter Qwen2.5-VL-shaped checkpoint to DIR (and exit unless "
                        "--model-dir is also given)")
    args = p.parse_args(argv)
    if min(args.pairs, args.steps, args.image_size) < 1 or args.warmup < 0:
        p.error("--pairs, --steps and --image-size must be >= 1, --warmup >= 0")
    if args.torch_autocast and (args.framework != "torch" or args.dtype != "bfloat16"):
        p.error("--torch-autocast is for --framework torch --dtype bfloat16")
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
        if args.profile or args.memory_analysis or args.share_prompt:
            raise SystemExit("--profile, --memory-analysis and --share-prompt are for --framework jax")
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
