"""Pure SFT and DPO train steps over a split model.

The model is split once (``nnx.split``) into a graph definition and pure dicts of parameters:
  * ``params``  the trainable parameters (the language model and LM head by default) — updated by the optimizer;
  * ``frozen``  the rest (vision tower and projector by default) — never updated;
  * ``ref``     the DPO reference's parameters (a frozen copy of what the policy trains, in compute dtype), or None.
A step is two jitted pure functions so gradient accumulation compiles once per batch shape:
  ``accumulate(acc, state, batch, norms) -> acc``: gradients and metric sums of one micro-batch, already divided
      by the *global* normalisers of the whole optimizer step (tokens for SFT, pairs for DPO), so summing
      micro-batches gives exact global means across accumulation steps and hosts;
  ``apply(state, acc) -> (state, metrics)``: clip, AdamW update, non-finite guard.
Batches carry a leading data-shard axis S (see mesh.py); the forward is vmapped over it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .. import losses

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StepOptions:
    mode: str = "sft"  # "sft" | "dpo"
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    reference: str = "frozen"  # "frozen" | "precomputed" | "none"
    share_image_features: bool = True  # vision frozen: encode images once for policy and reference
    vocab_chunk: int = losses.DEFAULT_VOCAB_CHUNK
    seq_chunk: int = losses.DEFAULT_SEQ_CHUNK


def trainable_filter(train_vision: bool, train_projector: bool):
    """Returns the nnx filter selecting trainable parameters (language model always; vision parts if asked)."""
    frozen = []
    if not train_vision:
        frozen += [nnx.PathContains("patch_embed"), nnx.PathContains("blocks")]
    if not train_projector:
        frozen.append(nnx.PathContains("merger"))
    if not frozen:
        return nnx.Param
    return nnx.All(nnx.Param, nnx.Not(nnx.Any(*frozen)))


def decay_mask(params: dict) -> dict:
    """Returns a same-structure tree of bools: weight decay on matrices, not on norms or biases."""
    def keep(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name.endswith("bias") or "norm" in name or name == "ln_q")
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(lr_schedule, *, weight_decay: float, b1: float, b2: float, eps: float, max_grad_norm: float,
                   params: dict) -> optax.GradientTransformation:
    """Returns global-norm clipping followed by AdamW (no decay on norms/biases)."""
    parts = []
    if max_grad_norm and max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(lr_schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask(params)))
    return optax.chain(*parts)


def warmup_cosine(lr: float, total_steps: int, warmup_ratio: float, final_ratio: float = 0.0):
    """Returns an optax schedule: linear warmup to ``lr`` then cosine decay to ``final_ratio * lr``."""
    warmup = int(round(total_steps * warmup_ratio))
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), max(total_steps, warmup + 1), lr * final_ratio)


# ----------------------------------------------------------------------------------------------------------------
# Forward pieces (one data shard: arrays without the leading S axis).


def _image_features(model, shard):
    if "pixel_values" not in shard:
        return None
    return model.encode_images(shard["pixel_values"], **shard["vision"])


def _hidden(model, shard, features):
    embeds = model.embed(shard["input_ids"], features, shard.get("image_token_index"))
    return model.hidden_states(embeds, shard["position_ids"], shard["attention_mask"], shard.get("segment_ids"))


def _sequence_logps(model, shard, features, opts: StepOptions):
    hidden = _hidden(model, shard, features)
    return losses.chunked_sequence_logps(hidden, model.lm_head_kernel(), shard["labels"], shard["loss_mask"],
                                         vocab_chunk=opts.vocab_chunk, seq_chunk=opts.seq_chunk)  # [rows]


def sft_sums(model, batch, opts: StepOptions):
    """Returns (Σ token NLL, Σ target tokens) over all shards of a stacked SFT batch."""
    def one(shard):
        hidden = _hidden(model, shard, _image_features(model, shard))
        return losses.chunked_sft_loss_sum_count(hidden, model.lm_head_kernel(), shard["labels"], shard["loss_mask"],
                                                 vocab_chunk=opts.vocab_chunk, seq_chunk=opts.seq_chunk)
    total, count = jax.vmap(one)(batch)
    return total.sum(), count.sum()


def dpo_logps(model, ref_model, batch, opts: StepOptions):
    """Returns {policy, reference} summed completion log-probs [S, 2n] and completion lengths [S, 2n]."""
    def one(shard):
        features = _image_features(model, shard)
        policy = _sequence_logps(model, shard, features, opts)
        if opts.reference == "frozen":
            ref_features = features if opts.share_image_features else _image_features(ref_model, shard)
            reference = jax.lax.stop_gradient(_sequence_logps(ref_model, shard, ref_features, opts))
        elif opts.reference == "precomputed":
            reference = shard["ref_logps"].astype(jnp.float32)
        else:
            reference = jnp.zeros_like(policy)
        return policy, reference, shard["loss_mask"].sum(-1)
    return jax.vmap(one)(batch)


def _split_pairs(x):
    """[S, 2n] rows (chosen then rejected per shard) -> (chosen [S*n], rejected [S*n])."""
    n = x.shape[1] // 2
    return x[:, :n].reshape(-1), x[:, n:].reshape(-1)


def dpo_sums_and_loss(model, ref_model, batch, norms, opts: StepOptions):
    """Returns (this micro-batch's share of the global loss, metric (sum, count) pairs)."""
    policy, reference, lengths = dpo_logps(model, ref_model, batch, opts)
    pc, pr = _split_pairs(policy)
    rc, rr = _split_pairs(reference)
    lc, lr = _split_pairs(lengths.astype(jnp.float32))
    valid = lc > 0  # padding pairs have no chosen targets
    kw = dict(loss_type=opts.loss_type, beta=opts.beta, label_smoothing=opts.label_smoothing, chosen_lengths=lc,
              rejected_lengths=lr, sft_weight=opts.sft_weight, pair_mask=valid)
    loss, _ = losses.dpo_loss(pc, pr, rc, rr, num_pairs=norms["pairs"], num_chosen_tokens=norms["chosen_tokens"], **kw)
    sums = losses.dpo_loss_sums(pc, pr, rc, rr, **kw)
    return loss, sums


# ----------------------------------------------------------------------------------------------------------------
# The two jitted halves of a step.


DPO_METRICS = ("loss/dpo", "loss/sft", "rewards/chosen", "rewards/rejected", "rewards/margins",
               "rewards/accuracies", "logps/chosen", "logps/rejected")


def zero_accumulator(params: dict, mode: str) -> dict:
    """Returns an empty accumulator: fp32 gradient sums shaped like ``params``, the loss and metric sums."""
    zero = jnp.zeros((), jnp.float32)
    grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    sums = {} if mode == "sft" else {name: (zero, zero) for name in DPO_METRICS}
    return {"grads": grads, "loss": zero, "sums": sums, "tokens": zero}


def accumulate(graphdef, acc: dict, state: dict, batch: dict, norms: dict, opts: StepOptions) -> dict:
    """Returns ``acc`` plus the gradients, loss share and metric sums of one stacked micro-batch.

    ``norms`` are the global counts of the whole optimizer step: {"tokens"} for SFT, {"pairs", "chosen_tokens"}
    for DPO. Each micro-batch's loss is its sum over those counts, so the shares add up to the exact global mean.
    """
    frozen, ref = state["frozen"], state.get("ref")

    def loss_fn(params):
        model = nnx.merge(graphdef, params, frozen)
        if opts.mode == "sft":
            total, _ = sft_sums(model, batch, opts)
            return total / jnp.maximum(norms["tokens"], 1.0), {}
        ref_model = nnx.merge(graphdef, ref, frozen) if ref is not None else None
        return dpo_sums_and_loss(model, ref_model, batch, norms, opts)

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    new_sums = {}
    for name, (total, count) in acc["sums"].items():
        t, c = sums.get(name, (0.0, 0.0))
        new_sums[name] = (total + jnp.asarray(t, jnp.float32), count + jnp.asarray(c, jnp.float32))
    return {"grads": jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc["grads"], grads),
            "loss": acc["loss"] + loss.astype(jnp.float32),
            "sums": new_sums,
            "tokens": acc["tokens"] + jnp.sum(batch["attention_mask"]).astype(jnp.float32)}


def apply(optimizer: optax.GradientTransformation, lr_schedule, state: dict, acc: dict) -> tuple[dict, dict]:
    """Returns (new state, metrics): AdamW update from accumulated gradients, skipped when not finite."""
    grads, loss = acc["grads"], acc["loss"]
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, new_opt = optimizer.update(safe_grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)

    def keep(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = dict(state)
    new_state["params"] = keep(new_params, state["params"])
    new_state["opt_state"] = keep(new_opt, state["opt_state"])
    new_state["step"] = state["step"] + 1
    new_state["nonfinite_in_a_row"] = jnp.where(finite, 0, state["nonfinite_in_a_row"] + 1)
    new_state["nonfinite_total"] = state["nonfinite_total"] + jnp.where(finite, 0, 1)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state["step"]), "tokens": acc["tokens"],
               "skipped": 1.0 - finite.astype(jnp.float32)}
    for name, (total, count) in acc["sums"].items():
        metrics[name] = total / jnp.maximum(count, 1.0)
    return new_state, metrics
