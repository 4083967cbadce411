"""The PyTorch reference side of tools/bench_step.py: the same step in transformers + PyTorch eager (CPU).

DPO, as TRL's DPOTrainer does it: the checkpoint loaded with ``Qwen2_5_VLForConditionalGeneration.from_pretrained(
dir, attn_implementation="eager")``, the vision tower and merger frozen (``requires_grad=False``), a frozen
``deepcopy`` as the reference; chosen and rejected rows concatenated into one forward (``mm_token_type_ids`` given,
``pixel_values``/``image_grid_thw`` duplicated for the rejected half, so the tower runs for every row); summed
completion log-probs from the full [2N, L, V] logits (log-softmax normaliser per row, like TRL's
``selective_log_softmax``); the policy forward first, then the reference forward under ``torch.no_grad``; the
sigmoid DPO loss; backward; global-norm clipping (1.0, the trainer's and HF Trainer's default) and a
``torch.optim.AdamW`` step at the trainer's scheduled learning rate (warmup then cosine over the run's steps, so
both sides' losses after the same steps agree: a check that they ran the same step). SFT: one forward, token-mean
cross-entropy over the response, the same update.
``--remat full`` turns on transformers' gradient checkpointing (non-reentrant).

``--dtype bfloat16`` loads the weights in bfloat16 (pure bf16: bf16 parameters, gradients and AdamW moments).
``--torch-autocast`` (with ``--dtype bfloat16``) is the setting the JAX side runs instead: fp32 master weights and
optimizer, the forwards under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (bf16 matmuls); the reference is a
frozen bf16 copy (the JAX trainer keeps its reference in the compute dtype).

Called by bench_step.py (``--framework torch``), in its own process; the shared parts come from bench_common.py.
jax is not imported until the timed steps and the peak-RSS reading are done (it is needed only for the trainer's
host batch, the shared FLOPs arithmetic and the matmul peak).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import statistics
import time

import numpy as np

from bench_common import (current_rss_mb, finish, high_water_rss_mb, host_step_batch, peak_flops, peak_rss_mb,
                          plan_config, reset_peak_rss, schedule_lr, shape_summary, special_ids, step_flops,
                          synthetic_examples, timed, timed_steps)


def torch_batch(mode: str, examples: list[dict], image_token_id: int):
    """Rows, labels and loss masks as the JAX side has them (labels[t] = ids[t+1]), plus the vision inputs."""
    import torch

    from medee_jax.data.batching import shifted_targets

    if mode == "dpo":
        seqs = [(ex["chosen_input_ids"], ex["chosen_target_mask"]) for ex in examples] + \
               [(ex["rejected_input_ids"], ex["rejected_target_mask"]) for ex in examples]
        images = examples + examples  # the rejected half repeats every pair's image
    else:
        seqs = [(ex["input_ids"], ex["target_mask"]) for ex in examples]
        images = examples
    ids = np.stack([s for s, _ in seqs]).astype(np.int64)  # [rows, L]
    shifted = [shifted_targets(s, m) for s, m in seqs]
    labels = np.stack([lab for lab, _ in shifted]).astype(np.int64)
    loss_mask = np.stack([m for _, m in shifted]).astype(np.float32)
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.ones(ids.shape, dtype=torch.int64),
        "mm_token_type_ids": torch.from_numpy((ids == image_token_id).astype(np.int64)),
        "pixel_values": torch.from_numpy(np.concatenate([ex["pixel_values"] for ex in images])),
        "image_grid_thw": torch.from_numpy(np.concatenate([ex["image_grid_thw"] for ex in images])),
    }, torch.from_numpy(labels), torch.from_numpy(loss_mask)


def completion_logps(logits, labels, mask):
    """[rows] Σ_t mask · log p(labels) from logits [rows, L, V]; the normaliser one row at a time (as TRL does)."""
    import torch

    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1).float()  # [rows, L]
    lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])  # [rows, L]
    return ((picked - lse) * mask).sum(-1)


def run_torch(args, model_dir: str, hf_config: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2_5_VLForConditionalGeneration

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    autocast = bool(getattr(args, "torch_autocast", False))
    if autocast and args.dtype != "bfloat16":
        raise SystemExit("--torch-autocast needs --dtype bfloat16")
    load_dtype = torch.float32 if autocast else dtype
    ids = special_ids(hf_config)
    examples = synthetic_examples(args.mode, args.pairs, args.prompt_len, args.response_len, args.image_size,
                                  hf_config, seed=args.seed)
    summary = shape_summary(args.mode, examples, ids["image_token_id"])

    trail = {"imports": current_rss_mb()}
    t_load = time.perf_counter()
    policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager",
                                                                dtype=load_dtype)
    policy.train()
    policy.model.visual.requires_grad_(False)  # the tower and its merger
    ref = None
    if args.mode == "dpo":
        ref = copy.deepcopy(policy).eval().to(dtype)
        ref.requires_grad_(False)
    if args.remat == "full":
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif args.remat != "none":
        raise SystemExit(f"--framework torch supports --remat none|full, not {args.remat}")
    trainable = [p for p in policy.parameters() if p.requires_grad]
    # The trainer's optimizer settings (configs/{mode}.py): AdamW, global-norm clipping, its warmup-cosine schedule.
    run = plan_config(args, model_dir, hf_config)
    o = run.optimizer
    optimizer = torch.optim.AdamW(trainable, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    load_s = time.perf_counter() - t_load
    trail["model"] = current_rss_mb()
    inputs, labels, mask = torch_batch(args.mode, examples, ids["image_token_id"])
    n = args.pairs
    beta = run.dpo.beta
    box = {"updates": 0}

    phases: dict[str, list[float]] = {}

    def mark(name, t0):
        now = time.perf_counter()
        phases.setdefault(name, []).append(now - t0)
        return now

    def forward_context():
        return torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def step():
        t = time.perf_counter()
        with forward_context():
            out = policy(**inputs, use_cache=False)
        t = mark("policy_fwd (vision on every row + decoder + full logits)", t)
        if args.mode == "dpo":
            policy_logps = completion_logps(out.logits, labels, mask)
            del out
            t = mark("policy_logps", t)
            with torch.no_grad(), forward_context():
                ref_logps = completion_logps(ref(**inputs, use_cache=False).logits, labels, mask)
            t = mark("reference_fwd+logps", t)
            margin = (policy_logps[:n] - ref_logps[:n]) - (policy_logps[n:] - ref_logps[n:])
            loss = -F.logsigmoid(beta * margin).mean()
        else:
            logits = out.logits
            del out
            token_nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
            loss = (token_nll * mask.flatten()).sum() / mask.sum().clamp(min=1)
        loss.backward()
        t = mark("backward", t)
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, o.max_grad_norm)
        lr = schedule_lr(box["updates"], o.lr, int(run.train.steps), o.warmup_ratio, o.final_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        box["updates"] += 1
        optimizer.zero_grad(set_to_none=True)
        box["loss"] = float(loss.detach())
        mark("clip+AdamW", t)

    first_s = timed(step, 1)[0]
    trail["first_step"] = current_rss_mb()
    timed(step, args.warmup)
    gc.collect()
    before_steps = peak_rss_mb()
    reset = reset_peak_rss()
    phases.clear()
    timing = timed_steps(step, args.steps)
    step_peak = high_water_rss_mb() if reset else None
    peak_rss = max(before_steps, peak_rss_mb(), step_peak or 0.0)
    trail["after_steps"] = current_rss_mb()
    params = sum(p.numel() for p in policy.parameters())

    result = {
        "framework": "torch", "mode": args.mode, "median_step_s": timing.pop("median_step_s"),
        "tokens_per_s": None, "peak_rss_mb": peak_rss, "mfu": None,
        "step_peak_rss_mb": step_peak, "first_step_s": first_s, "load_s": load_s, **timing, "rss_trail_mb": trail,
        **summary, "dtype": args.dtype, "remat": args.remat, "torch_autocast": autocast,
        "model_source": "transformers from_pretrained (eager attention)", "model_params": params,
        "trainable_params": sum(p.numel() for p in trainable), "device": "cpu", "threads": torch.get_num_threads(),
        "loss": box["loss"], "torch_version": torch.__version__,
        "vision_forwards_per_image": 4 if args.mode == "dpo" else 1,
        "pieces_s": {name: statistics.median(v) for name, v in phases.items()},
    }
    del policy, ref, optimizer
    gc.collect()
    # Only now load jax (for the trainer's host batch and FLOPs arithmetic, and the measured matmul peak).
    from medee_jax.models import load_config

    model_cfg = load_config(model_dir)
    flops = step_flops(run, model_cfg, host_step_batch(run, model_dir, model_cfg, examples, 1))
    peak, source = peak_flops(args)
    return finish(result, summary, flops, peak, source)
