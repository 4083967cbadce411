"""The training loop: model and data set-up, the step loop, evaluation, checkpoints, preemption, export."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
import weakref

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ..data.errors import NoUsableRecordsError
from ..models.export_dir import DestinationError, check_destination
from . import checkpoint as ckpt
from . import metrics as metrics_lib
from . import steps
from .batches import BatchSource
from .mesh import local_data_shards, make_mesh, maybe_initialize_distributed
from .preemption import Interrupted, Preemption
from .setup import (build_model, cpu_step_compiler_options, resolve_config, resolve_data, step_options,
                    validate_config)
from .state import TrainState, init_train_state, shardings_of, split_model
from .workdir import changed_fields, config_dict, lock_workdir, save_start_config

log = logging.getLogger("medee_jax.train")

GPU_MEMORY_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"


@dataclasses.dataclass
class RunResult:
    """What a finished run reports (also written to workdir/result.json)."""

    workdir: str
    steps: int
    final_metrics: dict
    eval_metrics: dict
    stopped: str  # "done" | "preempted" | "nonfinite"
    data: dict = dataclasses.field(default_factory=dict)  # per split: records used, skipped by reason, truncated


def label_smoothing_note(config) -> str | None:
    """The line logged when a DPO run's label_smoothing means cDPO here but is ignored by TRL (README, DPO)."""
    if config.mode == "dpo" and config.dpo.loss_type == "sigmoid" and config.dpo.label_smoothing > 0:
        return (f"dpo.label_smoothing={config.dpo.label_smoothing:g} with the sigmoid loss: conservative DPO (cDPO), "
                "as LLaMA-Factory applies it; TRL 1.16 ignores label_smoothing for this loss")
    return None


def set_gpu_memory_fraction(fraction: float) -> str | None:
    """Sets the share of each GPU's memory JAX preallocates (``XLA_PYTHON_CLIENT_MEM_FRACTION``; JAX's default is
    0.75, which leaves a quarter of an H200 unused) unless the environment already sets it; ``fraction`` <= 0
    leaves JAX's default. Only GPU clients read the variable (TPU and CPU ignore it), and only when the backend
    starts, so this is called before anything touches a device. Returns the value in effect (None: JAX's default).
    """
    if GPU_MEMORY_FRACTION_ENV in os.environ:
        return os.environ[GPU_MEMORY_FRACTION_ENV]
    if not fraction or fraction <= 0:
        return None
    if not fraction <= 1:
        raise ValueError(f"train.gpu_memory_fraction={fraction}: a fraction in (0, 1], or 0 for JAX's default")
    os.environ[GPU_MEMORY_FRACTION_ENV] = f"{float(fraction):g}"
    return os.environ[GPU_MEMORY_FRACTION_ENV]


def global_norms(micro_batches: list[dict], mode: str) -> dict:
    """Returns the optimizer step's global normalisers (summed over micro-batches and processes): {"tokens"} for
    SFT, {"pairs", "chosen_tokens"} for DPO, as float32 scalars (``steps.accumulate``'s ``norms``)."""
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
    """Builds everything a run needs from its config; ``run()`` trains and returns a RunResult.

    The workdir is locked from here until ``run()`` returns (or ``close()``): a second run on it is refused with the
    holder's pid and host. The config is written to the workdir only once the model and the data passed every check.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | None = None):
        self.config = config = resolve_config(config)
        self.workdir = os.path.abspath(workdir or config.workdir)
        validate_config(config, self.workdir)
        set_gpu_memory_fraction(config.train.get("gpu_memory_fraction", 0.0))
        maybe_initialize_distributed(config.train.distributed)
        self.is_chief = jax.process_index() == 0
        self.mesh = make_mesh(dict(config.mesh))
        os.makedirs(self.workdir, exist_ok=True)
        self._lock = lock_workdir(self.workdir, is_chief=self.is_chief)
        self._release = weakref.finalize(self, self._lock.release) if self._lock else None
        self.stop_signal = None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        config = self.config
        self.data = resolve_data(config, self.workdir)
        if config.train.export_hf:  # refuse now, not after training, an export directory that is not ours
            try:
                check_destination(os.path.join(self.workdir, "hf"), sources=(self.data.tokenizer_dir,))
            except DestinationError as e:
                raise DestinationError(f"train.export_hf: {e} For a training run: move that directory away (or "
                                       "remove the files named) before starting.") from None
        self.model = build_model(config, self.mesh, self.data)
        self.opts = step_options(config)
        # XLA options of every program that runs the model's forward (step, evaluation, reference pass)
        self.compiler_options = cpu_step_compiler_options(config)
        if label_smoothing_note(config):
            log.info("%s", label_smoothing_note(config))
        self.graphdef, self.params, self.frozen = split_model(self.model, config)
        # The model now holds the state's arrays (frozen ones in their stored dtype), not a second copy.
        self.model = nnx.merge(self.graphdef, self.params, self.frozen)
        if config.mode == "dpo" and config.dpo.reference == "precomputed":
            self._use_precomputed_reference()
        cache = os.path.join(self.workdir, "cache")
        self.train_source = BatchSource(self.data, "train", config, self.model.config, self.mesh, cache_dir=cache)
        self.eval_source = BatchSource(self.data, "eval", config, self.model.config, self.mesh, cache_dir=cache) \
            if self.data.eval_path else None
        self.census = self._check_data()
        self.total_steps = self._total_steps()
        self.config_file = None
        if self.is_chief:  # every check passed: this start's config describes what it trains
            self.config_file = save_start_config(self.workdir, config)
            with open(os.path.join(self.workdir, "model_config.json"), "w") as f:
                json.dump(self.model.config.to_hf_dict(), f, indent=2)

    def close(self) -> None:
        """Releases the workdir lock (``run()`` does it when it returns); safe to call twice."""
        if self._release is not None:
            self._release()

    def _use_precomputed_reference(self) -> None:
        """Annotates the train (and eval) data with the initial policy's log-probs, then trains on that copy."""
        from . import reference

        updates = {}
        for split, path in (("train", self.data.train_path), ("eval", self.data.eval_path)):
            if path and not reference.has_reference_logps(path):
                updates[f"{split}_path"] = reference.precompute(self, split)
        # Image paths stay relative to each original data file's own folder (unless media roots are configured).
        if updates and not self.data.media_root:
            if "train_path" in updates:
                updates["media_root"] = os.path.dirname(os.path.abspath(self.data.train_path))
            if self.data.eval_path and not self.data.eval_media_root:
                updates["eval_media_root"] = os.path.dirname(os.path.abspath(self.data.eval_path))
        self.data = dataclasses.replace(self.data, **updates)

    def _check_data(self) -> dict:
        """Counts one epoch of each split when the run needs it (a step count from the data, a bad-record limit,
        an eval split): a split without a usable record, or with more bad records than data.max_bad_fraction, is
        an error naming the counts by reason. Returns {split: census}; counts are cached per data file."""
        c = self.config
        out = {}
        sources = [("train", self.train_source, c.train.steps == -1 or c.data.max_bad_fraction < 1),
                   ("eval", self.eval_source, self.eval_source is not None)]
        for split, source, needed in sources:
            if not needed:
                continue
            path = getattr(self.data, f"{split}_path")
            try:
                census = source.census()
            except NoUsableRecordsError as e:
                raise ValueError(f"data.{split}: {e}") from None
            read = census["examples"] + census["skipped_total"]
            if read and census["skipped_total"] / read > c.data.max_bad_fraction:
                raise ValueError(f"data.{split}={path}: {census['skipped_total']} of {read} records are bad "
                                 f"({census['skipped_total'] / read:.1%}), more than data.max_bad_fraction="
                                 f"{c.data.max_bad_fraction}: {_reasons(census['skipped'])}")
            out[split] = census
        return out

    def _total_steps(self) -> int:
        c = self.config
        if c.train.steps > 0:
            return int(c.train.steps)
        per_step = self.train_source.batches_per_epoch // c.data.grad_accum_steps
        if per_step < 1:
            census = self.census["train"]
            raise ValueError(f"{self.data.train_path}: {census['examples']} usable records ({census['skipped_total']}"
                             f" skipped{': ' + _reasons(census['skipped']) if census['skipped_total'] else ''}) make "
                             f"fewer batches than one optimizer step needs: data.batch_size={c.data.batch_size} x "
                             f"data.grad_accum_steps={c.data.grad_accum_steps} x {local_data_shards(self.mesh)} shards")
        return per_step * c.data.num_epochs

    def run(self) -> RunResult:
        """Trains to ``total_steps`` (resuming from the workdir's latest checkpoint) and returns the result; releases
        the workdir lock when it returns."""
        try:
            return self._run()
        finally:
            self.close()

    def _restore(self, checkpointer: ckpt.RunCheckpointer, state: TrainState) -> tuple[TrainState, int]:
        """Returns (``state`` with the latest checkpoint's fields, its step; 0 without a checkpoint) and moves the
        data to its position unless data.reset_iterator; warns, naming them, about settings that differ from those
        the checkpoint was saved under."""
        c = self.config
        start = checkpointer.latest_step()
        if start is None:
            return state, 0
        state, iterator_state = checkpointer.restore_state(start, state)
        saved = checkpointer.saved_config(start)
        changes = changed_fields(saved, config_dict(c)) if saved is not None else []
        if changes and self.is_chief:
            log.warning("resuming from step %d with settings that differ from the checkpoint's:\n  %s", start,
                        "\n  ".join(changes))
        if c.data.reset_iterator:
            log.warning("data.reset_iterator: weights and optimizer state of step %d, data from its beginning", start)
        else:
            try:
                self.train_source.set_state(iterator_state)
            except ValueError as e:
                raise ValueError(f"{checkpointer.directory}/{start}: {e}. To keep the weights and optimizer state and "
                                 "start the data from its beginning, set data.reset_iterator=True") from None
        log.info("resumed from %s at step %d", checkpointer.directory, start)
        return state, int(start)

    def _run(self) -> RunResult:
        c = self.config
        state, optimizer, schedule = init_train_state(c, self.params, self.frozen, self.mesh, self.total_steps)
        checkpointer = ckpt.RunCheckpointer(self.workdir, keep=c.train.keep_checkpoints,
                                            async_save=c.train.async_checkpointing)
        saved_config = config_dict(c)

        def save(step, iterator_state):
            if checkpointer.latest_step() != step:
                checkpointer.save(step, state.checkpoint_items(), iterator_state, force=True, config=saved_config)

        state, start = self._restore(checkpointer, state)
        step_fns = steps.jit_step(self.graphdef, self.opts, optimizer, schedule, shardings_of(state),
                                  c.optimizer.max_grad_norm, compiler_options=self.compiler_options)
        peak = metrics_lib.peak_flops_per_device(c.train.peak_flops_per_device or None)
        logger = metrics_lib.MetricsLogger(self.workdir, total_steps=self.total_steps, is_chief=self.is_chief,
                                           resume_step=start)
        stopped, last_metrics, eval_metrics = "done", {}, {}
        step = start
        with Preemption() as preemption:
            while step < self.total_steps:
                t0 = time.perf_counter()
                position = self.train_source.get_state()  # where the data stands before this step
                try:
                    with preemption.loading():
                        micro = [self.train_source.next_local() for _ in range(c.data.grad_accum_steps)]
                except Interrupted:
                    if step > 0:
                        save(step, position)
                    stopped = "preempted"
                    break
                norms = global_norms(micro, c.mode)
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
                    flops = self.step_flops(micro)
                    m["mfu"] = metrics_lib.utilisation(flops["model"], dt, jax.local_device_count(), peak)
                    m["hfu"] = metrics_lib.utilisation(flops["hardware"], dt, jax.local_device_count(), peak)
                    m["nonfinite_total"] = int(state.nonfinite_total)
                    logger.log(step, m)
                    last_metrics = m
                if int(state.nonfinite_in_a_row) >= c.train.max_nonfinite_in_a_row:
                    stopped = "nonfinite"
                    log.error("stopping: %d non-finite steps in a row; the last good checkpoint is kept",
                              int(state.nonfinite_in_a_row))
                    break
                if self.eval_source is not None and c.train.eval_every and step % c.train.eval_every == 0 \
                        and step < self.total_steps:
                    eval_metrics = self.evaluate(state)
                    logger.log(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                if step % c.train.checkpoint_every == 0 or preemption.requested:
                    save(step, self.train_source.get_state())
                if preemption.requested:
                    stopped = "preempted"
                    break
        if stopped == "preempted":
            self.stop_signal = preemption.requested
            log.warning("%s: %s at step %d and stopping", preemption.requested,
                        "saved a checkpoint" if checkpointer.latest_step() == step else "nothing to save", step)
        if stopped == "done":
            save(step, self.train_source.get_state())
            if self.eval_source is not None:
                eval_metrics = self.evaluate(state)
                logger.log(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
        checkpointer.close()
        logger.close()
        self.state = state
        if stopped == "done" and c.train.export_hf:
            self.export_hf(state)
        result = RunResult(self.workdir, step, last_metrics, eval_metrics, stopped, self.data_report())
        if self.is_chief:
            with open(os.path.join(self.workdir, "result.json"), "w") as f:
                json.dump(dataclasses.asdict(result), f, indent=2, default=float)
        return result

    def data_report(self) -> dict:
        """Returns per split what the data gave: "train" counts what this run's data stream read (since the data
        began, across resumes): examples used, records skipped by reason, blank lines, examples and tokens cut to
        max_length; "train_epoch" / "eval" count one whole epoch of the file (when it was counted)."""
        keys = ("examples", "skipped", "skipped_total", "blank", "truncated_examples", "truncated_tokens")
        out = {}
        stats = self.train_source.stats()
        if stats is not None:
            out["train"] = {k: stats[k] for k in keys}
        if "train" in self.census:
            out["train_epoch"] = {k: self.census["train"][k] for k in keys}
        if "eval" in self.census:
            out["eval"] = {k: self.census["eval"][k] for k in keys}
        return out

    def step_flops(self, micro_batches: list[dict]) -> dict[str, float]:
        """Returns {"model", "hardware"} FLOPs of one optimizer step over this process's host micro-batches
        (`metrics.step_flops`: the decoder on real tokens, causal attention pairs, the LM head on targets, the
        reference forward, the vision tower on real images; hardware adds the remat policy's recompute)."""
        c, cfg = self.config, self.model.config
        mode = "sft" if c.mode == "sft" else ("dpo_frozen_ref" if self.opts.reference == "frozen" else "dpo_no_ref")
        images = self.train_source.images
        out = {"model": 0.0, "hardware": 0.0}
        for batch in micro_batches:
            vision = metrics_lib.vision_flops(cfg, batch, images, trained=c.model.train_vision)
            flops = metrics_lib.step_flops(cfg.text, metrics_lib.batch_counts(batch), mode=mode,
                                           remat=c.model.remat, vision=vision)
            out = {k: out[k] + flops[k] for k in out}
        return out

    def merged_model(self, state: TrainState):
        """Returns the NNX model with the state's current parameters."""
        return nnx.merge(self.graphdef, state.params, state.frozen)

    def export_hf(self, state) -> str:
        """Writes ``workdir/hf`` (safetensors + config.json + tokenizer files); every process must call it."""
        from ..models import save_pretrained

        out = os.path.join(self.workdir, "hf")
        parts = {"params": state.params, "frozen": state.frozen}
        if jax.process_count() > 1:  # parameters span hosts: gather them to every host, the chief writes
            from jax.experimental import multihost_utils
            parts = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), parts)
        if self.is_chief:
            save_pretrained(nnx.merge(self.graphdef, parts["params"], parts["frozen"]), out,
                            source_dir=self.data.tokenizer_dir)
            log.info("exported Hugging Face checkpoint to %s", out)
        return out

    def evaluate(self, state) -> dict:
        """Returns held-out metrics: SFT token-mean loss; DPO loss and reward metrics (exact means over the split)."""
        c = self.config
        fn = _eval_fn(self.graphdef, self.opts, tuple(sorted(self.compiler_options.items())))
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
def _eval_fn(graphdef, opts: steps.StepOptions, compiler_options: tuple[tuple[str, str], ...]):
    """Returns the jitted evaluation sums; ``compiler_options`` as (name, value) pairs (hashable for the cache)."""
    def fn(state, batch):
        model = nnx.merge(graphdef, state.params, state.frozen)
        if opts.mode == "sft":
            total, count = steps.sft_sums(model, batch, opts)
            return {"loss": (total, count)}
        ref = nnx.merge(graphdef, state.ref, state.frozen) if state.ref is not None else None
        ones = {"pairs": jnp.float32(1.0), "chosen_tokens": jnp.float32(1.0)}
        _, sums = steps.dpo_sums_and_loss(model, ref, batch, ones, opts)
        return sums
    return jax.jit(fn, compiler_options=dict(compiler_options))


def _reasons(skipped: dict) -> str:
    """Returns "reason: count, ..." most frequent first."""
    return ", ".join(f"{r}: {n}" for r, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))


def describe_data(report: dict) -> list[str]:
    """Returns one line per split of ``RunResult.data``: records used, skipped by reason, truncated."""
    names = {"train": "train data read", "train_epoch": "train file (one epoch)", "eval": "eval file"}
    lines = []
    for split, r in report.items():
        if split == "train_epoch" and r == report.get("train"):
            continue  # the run read exactly one epoch: the same line twice
        line = f"{names.get(split, split)}: {r['examples']} records used, {r['skipped_total']} skipped"
        if r["skipped_total"]:
            line += f" ({_reasons(r['skipped'])})"
        if r.get("blank"):
            line += f", {r['blank']} blank lines"
        line += f", {r['truncated_examples']} cut to data.max_length ({r['truncated_tokens']} tokens)"
        lines.append(line)
    return lines


def train(config: ml_collections.ConfigDict, workdir: str | None = None) -> RunResult:
    """Runs one training job end to end and returns its result."""
    trainer = Trainer(config, workdir)
    result = trainer.run()
    where = {"done": "finished", "preempted": f"stopped on {trainer.stop_signal or 'a stop signal'}",
             "nonfinite": "stopped on non-finite steps"}
    print(f"{config.mode}: {where[result.stopped]} at step {result.steps}; workdir {result.workdir} "
          f"(checkpoints/, metrics.jsonl, tensorboard/" + (", hf/" if config.train.export_hf else "") + ")",
          file=sys.stderr)
    for line in describe_data(result.data):
        print(line, file=sys.stderr)
    if result.eval_metrics:
        print("held-out: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.eval_metrics.items())),
              file=sys.stderr)
    return result
