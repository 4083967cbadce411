"""The training loop: model and data set-up, the step loop, evaluation, checkpoints, preemption, export."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from ..models.families import family_of
from . import checkpoint as ckpt
from . import metrics as metrics_lib
from . import steps
from .batches import BatchSource
from .mesh import local_data_shards, make_mesh, maybe_initialize_distributed, replicated
from .setup import build_model, resolve_data, validate_config

log = logging.getLogger("medee_jax.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class RunResult:
    """What a finished run reports (also written to workdir/result.json)."""

    workdir: str
    steps: int
    final_metrics: dict
    eval_metrics: dict
    stopped: str  # "done" | "preempted" | "nonfinite"


class Preemption:
    """Turns SIGTERM into a flag the loop checks at step boundaries."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _step_options(config) -> steps.StepOptions:
    return steps.StepOptions(
        mode=config.mode, loss_type=config.dpo.loss_type, beta=config.dpo.beta,
        label_smoothing=config.dpo.label_smoothing, sft_weight=config.dpo.sft_weight,
        reference=config.dpo.reference if config.mode == "dpo" else "none",
        share_image_features=not config.model.train_vision and not config.model.train_projector,
        vocab_chunk=config.train.vocab_chunk, seq_chunk=config.train.seq_chunk)


def _global_norms(micro_batches: list[dict], mode: str) -> dict:
    """Returns the optimizer step's global normalisers (summed over micro-batches and processes)."""
    if mode == "sft":
        local = np.array([sum(float(b["loss_mask"].sum()) for b in micro_batches)])
        names = ("tokens",)
    else:
        pairs, chosen_tokens = 0.0, 0.0
        for b in micro_batches:
            n = b["loss_mask"].shape[-2] // 2  # sequences: chosen then rejected
            chosen = b["loss_mask"][..., :n, :].sum(-1)  # [S, n]
            pairs += float((chosen > 0).sum())
            chosen_tokens += float(chosen.sum())
        local = np.array([pairs, chosen_tokens])
        names = ("pairs", "chosen_tokens")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        local = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(names)).sum(0)
    return {name: jnp.float32(v) for name, v in zip(names, local)}


class Trainer:
    """Builds everything a run needs from its config; ``run()`` trains and returns a RunResult."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | None = None):
        self.config = config
        self.workdir = os.path.abspath(workdir or config.workdir)
        validate_config(config)
        maybe_initialize_distributed(config.train.distributed)
        self.is_chief = jax.process_index() == 0
        self.mesh = make_mesh(dict(config.mesh))
        os.makedirs(self.workdir, exist_ok=True)
        if self.is_chief:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        self.data = resolve_data(config, self.workdir)
        self.model = build_model(config, self.mesh, self.data)
        if self.is_chief:
            with open(os.path.join(self.workdir, "model_config.json"), "w") as f:
                json.dump(self.model.config.to_hf_dict(), f, indent=2)
        self.opts = _step_options(config)
        filt = steps.trainable_filter(family_of(self.model.config), config.model.train_vision,
                                      config.model.train_projector)
        self.graphdef, params, frozen = nnx.split(self.model, filt, nnx.Param)
        self.params = params.to_pure_dict()
        self.frozen = frozen.to_pure_dict()
        if config.mode == "dpo" and config.dpo.reference == "precomputed":
            self._use_precomputed_reference()
        self.train_source = BatchSource(self.data, "train", config, self.model.config, self.mesh)
        self.eval_source = BatchSource(self.data, "eval", config, self.model.config, self.mesh) \
            if self.data.eval_path else None
        self.total_steps = self._total_steps()

    def _use_precomputed_reference(self) -> None:
        """Annotates the train (and eval) data with the initial policy's log-probs, then trains on that copy."""
        from . import reference

        updates = {}
        for split, path in (("train", self.data.train_path), ("eval", self.data.eval_path)):
            if path and not reference.has_reference_logps(path):
                updates[f"{split}_path"] = reference.precompute(self, split)
        if updates and not self.data.media_root:  # image paths stay relative to the original data file
            updates["media_root"] = os.path.dirname(os.path.abspath(self.data.train_path))
        self.data = dataclasses.replace(self.data, **updates)

    def _total_steps(self) -> int:
        c = self.config
        if c.train.steps > 0:
            return int(c.train.steps)
        per_step = self.train_source.batches_per_epoch // c.data.grad_accum_steps
        if per_step < 1:
            raise ValueError(f"{self.data.train_path}: too few records for one optimizer step with "
                             f"data.batch_size={c.data.batch_size} x data.grad_accum_steps={c.data.grad_accum_steps}"
                             f" x {local_data_shards(self.mesh)} shards")
        return per_step * c.data.num_epochs

    def _init_state(self):
        c = self.config
        schedule = steps.warmup_cosine(c.optimizer.lr, self.total_steps, c.optimizer.warmup_ratio,
                                       c.optimizer.final_lr_ratio)
        optimizer = steps.make_optimizer(schedule, weight_decay=c.optimizer.weight_decay, b1=c.optimizer.b1,
                                         b2=c.optimizer.b2, eps=c.optimizer.eps, params=self.params)
        ref = None
        if c.mode == "dpo" and c.dpo.reference == "frozen":
            compute = DTYPES[c.model.dtype]
            ref = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(compute), p))(self.params)
        rep = replicated(self.mesh)
        state = {
            "params": self.params,
            "frozen": self.frozen,
            "ref": ref,
            "opt_state": steps.init_optimizer_state(optimizer, self.params, rep),
            "step": jax.device_put(jnp.int32(0), rep),
            "nonfinite_in_a_row": jax.device_put(jnp.int32(0), rep),
            "nonfinite_total": jax.device_put(jnp.int32(0), rep),
        }
        # Leaves created inside jit without inputs (optimizer counts) land on one device: replicate them.
        state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, rep), state)
        return state, optimizer, schedule

    def run(self) -> RunResult:
        c = self.config
        state, optimizer, schedule = self._init_state()
        shardings = jax.tree.map(lambda x: x.sharding, state)
        checkpointer = ckpt.RunCheckpointer(self.workdir, keep=c.train.keep_checkpoints,
                                            async_save=c.train.async_checkpointing)
        start = checkpointer.latest_step()
        if start is not None:
            restorable = {k: v for k, v in state.items() if k != "ref"}
            restored, iterator_state = checkpointer.restore(start, ckpt.abstract_like(restorable))
            state.update(restored)
            self.train_source.set_state(iterator_state)
            log.info("resumed from %s at step %d", checkpointer.directory, start)
        start = int(start or 0)

        step_fns = steps.jit_step(self.graphdef, self.opts, optimizer, schedule, shardings, c.optimizer.max_grad_norm)

        flops_per_token = metrics_lib.flops_per_token(
            self.model.config.text, seq_len=c.data.max_length,
            mode="dpo_frozen_ref" if self.opts.reference == "frozen" else "sft")
        peak = metrics_lib.peak_flops_per_device(c.train.peak_flops_per_device or None)
        logger = metrics_lib.MetricsLogger(self.workdir, total_steps=self.total_steps, is_chief=self.is_chief)
        stopped, last_metrics, eval_metrics = "done", {}, {}
        step = start
        with Preemption() as preemption:
            while step < self.total_steps:
                t0 = time.perf_counter()
                micro = [self.train_source.next_local() for _ in range(c.data.grad_accum_steps)]
                norms = _global_norms(micro, c.mode)
                acc = step_fns.accumulate_first(state, self.train_source.to_device(micro[0]), norms)
                for batch in micro[1:]:
                    acc = step_fns.accumulate(acc, state, self.train_source.to_device(batch), norms)
                state, m = step_fns.apply(state, acc)
                step += 1
                if step % c.train.log_every == 0 or step == self.total_steps:
                    m = {k: float(v) for k, v in jax.device_get(m).items()}
                    dt = time.perf_counter() - t0
                    m["tokens_per_s"] = m["tokens"] / dt
                    m["step_s"] = dt
                    m["mfu"] = metrics_lib.mfu(m["tokens_per_s"], flops_per_token, jax.device_count(), peak)
                    m["nonfinite_total"] = int(state["nonfinite_total"])
                    logger.log(step, m)
                    last_metrics = m
                if int(state["nonfinite_in_a_row"]) >= c.train.max_nonfinite_in_a_row:
                    stopped = "nonfinite"
                    log.error("stopping: %d non-finite steps in a row; the last good checkpoint is kept",
                              int(state["nonfinite_in_a_row"]))
                    break
                if self.eval_source is not None and c.train.eval_every and step % c.train.eval_every == 0 \
                        and step < self.total_steps:
                    eval_metrics = self.evaluate(state)
                    logger.log(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                if step % c.train.checkpoint_every == 0 or preemption.requested:
                    checkpointer.save(step, {k: v for k, v in state.items() if k != "ref"},
                                      self.train_source.get_state(), force=True)
                if preemption.requested:
                    stopped = "preempted"
                    log.warning("SIGTERM: saved a checkpoint at step %d and stopping", step)
                    break
        if stopped == "done":
            if checkpointer.latest_step() != step:
                checkpointer.save(step, {k: v for k, v in state.items() if k != "ref"},
                                  self.train_source.get_state(), force=True)
            if self.eval_source is not None:
                eval_metrics = self.evaluate(state)
                logger.log(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
        checkpointer.close()
        logger.close()
        self.state = state
        if stopped == "done" and c.train.export_hf:
            self.export_hf(state)
        result = RunResult(self.workdir, step, last_metrics, eval_metrics, stopped)
        if self.is_chief:
            with open(os.path.join(self.workdir, "result.json"), "w") as f:
                json.dump(dataclasses.asdict(result), f, indent=2, default=float)
        return result

    def merged_model(self, state):
        """Returns the NNX model with the state's current parameters."""
        return nnx.merge(self.graphdef, state["params"], state["frozen"])

    def export_hf(self, state) -> str:
        """Writes ``workdir/hf`` (safetensors + config.json + tokenizer files); every process must call it."""
        from ..models import save_pretrained

        out = os.path.join(self.workdir, "hf")
        parts = {"params": state["params"], "frozen": state["frozen"]}
        if jax.process_count() > 1:  # parameters span hosts: gather them to every host, the chief writes
            from jax.experimental import multihost_utils
            parts = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), parts)
        if self.is_chief:
            save_pretrained(self.merged_model(parts), out, source_dir=self.data.tokenizer_dir)
            log.info("exported Hugging Face checkpoint to %s", out)
        return out

    def evaluate(self, state) -> dict:
        """Returns held-out metrics: SFT token-mean loss; DPO loss and reward metrics (exact means over the split)."""
        c = self.config
        fn = _eval_fn(self.graphdef, self.opts)
        totals: dict[str, list[float]] = {}
        self.eval_source.reset()
        for _ in range(c.train.eval_batches):
            local = self.eval_source.next_local(allow_end=True)
            if local is None:
                break
            sums = jax.device_get(fn(state, self.eval_source.to_device(local)))
            for k, (t, n) in sums.items():
                acc = totals.setdefault(k, [0.0, 0.0])
                acc[0] += float(t)
                acc[1] += float(n)
        return {k: t / max(n, 1.0) for k, (t, n) in totals.items()}


@functools.lru_cache(maxsize=None)
def _eval_fn(graphdef, opts: steps.StepOptions):
    def fn(state, batch):
        model = nnx.merge(graphdef, state["params"], state["frozen"])
        if opts.mode == "sft":
            total, count = steps.sft_sums(model, batch, opts)
            return {"loss": (total, count)}
        ref = nnx.merge(graphdef, state["ref"], state["frozen"]) if state.get("ref") is not None else None
        ones = {"pairs": jnp.float32(1.0), "chosen_tokens": jnp.float32(1.0)}
        _, sums = steps.dpo_sums_and_loss(model, ref, batch, ones, opts)
        return sums
    return jax.jit(fn)


def train(config: ml_collections.ConfigDict, workdir: str | None = None) -> RunResult:
    """Runs one training job end to end and returns its result."""
    trainer = Trainer(config, workdir)
    result = trainer.run()
    where = {"done": "finished", "preempted": "stopped on SIGTERM", "nonfinite": "stopped on non-finite steps"}
    print(f"{config.mode}: {where[result.stopped]} at step {result.steps}; workdir {result.workdir} "
          f"(checkpoints/, metrics.jsonl, tensorboard/" + (", hf/" if config.train.export_hf else "") + ")",
          file=sys.stderr)
    if result.eval_metrics:
        print("held-out: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.eval_metrics.items())),
              file=sys.stderr)
    return result
