"""Pure SFT and DPO train steps over a split model.

The model is split once (``nnx.split``, `state.split_model`) into a graph definition and pure dicts of parameters,
held by a `state.TrainState`:
  * ``params``  the trainable parameters (the language model and LM head by default) — updated by the optimizer;
  * ``frozen``  the rest (the family's vision tower and projector by default) — never updated;
  * ``ref``     the DPO reference's parameters (a frozen copy of what the policy trains, in compute dtype), or None.
A step is jitted pure functions so gradient accumulation compiles once per batch shape:
  ``accumulate_first(state, batch, norms) -> acc`` for the first micro-batch, then
  ``accumulate(acc, state, batch, norms) -> acc``: gradients and metric sums of one micro-batch, already divided
      by the *global* normalisers of the whole optimizer step (tokens for SFT, pairs for DPO), so summing
      micro-batches gives exact global means across accumulation steps and hosts;
  ``clip_gradients(acc) -> acc`` then ``apply(state, acc) -> (state, metrics)``: global-norm clipping and the
      non-finite guard, then the AdamW update (two programs, so clipping needs no parameter-sized temporary).
Batches carry a leading data-shard axis S (see mesh.py); the forward is vmapped over it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .. import losses
from ..models.sharding import context_mesh
from .mesh import BATCH_AXES

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
    # The LM head's matmul operand dtype (``train.lm_head_dtype``): "bfloat16" runs it on bf16 operands with fp32
    # accumulation; None: the operands' own dtype (fp32 master weights make it an fp32 matmul).
    lm_head_dtype: str | None = None


def trainable_filter(family, train_vision: bool, train_projector: bool):
    """Returns the nnx filter selecting trainable parameters: the language model always, the family's vision tower
    (``family.vision_paths``) and projector (``family.projector_paths``) if asked (``families.Family``)."""
    frozen = ()
    if not train_vision:
        frozen += tuple(family.vision_paths)
    if not train_projector:
        frozen += tuple(family.projector_paths)
    if not frozen:
        return nnx.Param
    return nnx.All(nnx.Param, nnx.Not(path_prefix_filter(frozen)))


def path_prefix_filter(prefixes: tuple[str, ...]):
    """Returns an nnx filter matching the parameters whose dotted path is, or lies under, one of ``prefixes``."""
    def matches(path, _value) -> bool:
        dotted = ".".join(str(getattr(p, "key", p)) for p in path)
        return any(dotted == prefix or dotted.startswith(prefix + ".") for prefix in prefixes)
    return matches


def decay_mask(params: dict) -> dict:
    """Returns a same-structure tree of bools: weight decay on matrices, not on norms or biases."""
    def keep(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name.endswith("bias") or "norm" in name or name == "ln_q")
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(lr_schedule, *, weight_decay: float, b1: float, b2: float, eps: float,
                   params: dict, mu_dtype=None) -> optax.GradientTransformation:
    """Returns AdamW (no decay on norms/biases). Global-norm clipping runs before it, in ``clip_gradients``.

    ``mu_dtype``: the first moment's dtype (None: the parameters'). bfloat16 saves 2 bytes per trainable parameter;
    the second moment stays in the parameters' dtype: its update adds (1 - b2) = 0.001 of g² per step, under
    bfloat16's relative resolution (2^-8), so a bf16 ``nu`` would round most updates away and stop tracking g²."""
    return optax.adamw(lr_schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask(params),
                       mu_dtype=mu_dtype)


def init_optimizer_state(optimizer: optax.GradientTransformation, params: dict, replicated):
    """Returns ``optimizer.init(params)`` with every per-parameter leaf (AdamW's moments) placed on its parameter's
    sharding and the rest (step counts) on ``replicated``. Without explicit output shardings a jitted init leaves
    the moments replicated on every device: each would hold two full copies of the parameters under fsdp."""
    abstract = jax.eval_shape(optimizer.init, params)
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    shardings = optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract, param_shardings,
                                      transform_non_params=lambda _: replicated)
    return jax.jit(optimizer.init, out_shardings=shardings)(params)


def warmup_cosine(lr: float, total_steps: int, warmup_ratio: float, final_ratio: float = 0.0):
    """Returns an optax schedule: linear warmup to ``lr`` then cosine decay to ``final_ratio * lr``."""
    warmup = int(round(total_steps * warmup_ratio))
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), max(total_steps, warmup + 1), lr * final_ratio)


# ----------------------------------------------------------------------------------------------------------------
# Forward pieces (one data shard: arrays without the leading S axis).


def image_features(model, shard):
    """Returns the image features [F, D] of one data shard's images (None for a text-only batch)."""
    if "pixel_values" not in shard:
        return None
    return model.encode_images(shard["pixel_values"], **shard["vision"])


def decoder_hidden(model, shard, features):
    """Returns the final hidden states [B, L, D] of one data shard's rows, image features scattered in. The text
    attention sees the step's context mesh (so ``auto`` runs splash on a TPU mesh) with ``batch_axes=()``: a shard's
    rows stay on its devices, and the vmap over shards (``spmd_axis_name``) splits the shard axis."""
    embeds = model.embed(shard["input_ids"], features, shard.get("image_token_index"))
    return model.hidden_states(embeds, shard["position_ids"], shard["attention_mask"], shard.get("segment_ids"),
                               shard.get("branch_ids"), mesh=context_mesh(), batch_axes=())


def target_hidden(model, shard, features):
    """Returns the final hidden states at each sequence's training targets [S, T, D] (``target_row`` and
    ``target_index``, see training/batches.py): the LM head then runs on T places per sequence instead of L."""
    hidden = decoder_hidden(model, shard, features)  # [B, L, D]
    b, length, d = hidden.shape
    flat = shard["target_row"] * length + shard["target_index"]  # [S, T]
    return jnp.take(hidden.reshape(b * length, d), flat, axis=0)  # [S, T, D]


def sequence_logps(model, shard, features, opts: StepOptions):
    """Returns each sequence's summed target log-probs [S] (the chunked LM head on its target positions only)."""
    hidden = target_hidden(model, shard, features)  # [S, T, D]
    return losses.chunked_sequence_logps(hidden, model.lm_head_kernel(), shard["target_labels"],
                                         shard["target_mask"], vocab_chunk=opts.vocab_chunk,
                                         seq_chunk=opts.seq_chunk, matmul_dtype=opts.lm_head_dtype)  # [S]


def shard_axes() -> tuple[str, ...] | None:
    """Returns the context mesh's data-shard axes (data, fsdp) for the vmap over a batch's shard axis S, so that the
    sharding constraints inside (the decoder's residual stream) keep S split over them; None without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return axes or None


def sft_sums(model, batch, opts: StepOptions):
    """Returns (Σ token NLL, Σ target tokens) over all shards of a stacked SFT batch."""
    def one(shard):
        hidden = target_hidden(model, shard, image_features(model, shard))  # [S, T, D]
        return losses.chunked_sft_loss_sum_count(hidden, model.lm_head_kernel(), shard["target_labels"],
                                                 shard["target_mask"], vocab_chunk=opts.vocab_chunk,
                                                 seq_chunk=opts.seq_chunk, matmul_dtype=opts.lm_head_dtype)
    total, count = jax.vmap(one, spmd_axis_name=shard_axes())(batch)
    return total.sum(), count.sum()


def dpo_logps(model, ref_model, batch, opts: StepOptions):
    """Returns {policy, reference} summed completion log-probs [S, 2n] and completion lengths [S, 2n]."""
    def one(shard):
        features = image_features(model, shard)
        policy = sequence_logps(model, shard, features, opts)
        if opts.reference == "frozen":
            ref_features = features if opts.share_image_features else image_features(ref_model, shard)
            reference = jax.lax.stop_gradient(sequence_logps(ref_model, shard, ref_features, opts))
        elif opts.reference == "precomputed":
            reference = shard["ref_logps"].astype(jnp.float32)
        else:
            reference = jnp.zeros_like(policy)
        return policy, reference, shard["loss_mask"].sum(-1)
    return jax.vmap(one, spmd_axis_name=shard_axes())(batch)


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


def accumulate_first(graphdef, state, batch: dict, norms: dict, opts: StepOptions, grad_shardings=None) -> dict:
    """Returns the accumulator of a step's first stacked micro-batch: fp32 gradients, loss share, metric sums (what
    ``accumulate`` would give from a zero accumulator, without allocating and adding a zero gradient tree).

    ``norms`` are the global counts of the whole optimizer step: {"tokens"} for SFT, {"pairs", "chosen_tokens"}
    for DPO. Each micro-batch's loss is its sum over those counts, so the shares add up to the exact global mean.
    """
    frozen, ref = state.frozen, state.ref

    def loss_fn(params):
        model = nnx.merge(graphdef, params, frozen)
        if opts.mode == "sft":
            total, _ = sft_sums(model, batch, opts)
            return total / jnp.maximum(norms["tokens"], 1.0), {}
        ref_model = nnx.merge(graphdef, ref, frozen) if ref is not None else None
        return dpo_sums_and_loss(model, ref_model, batch, norms, opts)

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if grad_shardings is not None:  # the parameters' own layout: reduce-scattered, never left whole on every device
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    names = () if opts.mode == "sft" else DPO_METRICS
    return {"grads": jax.tree.map(lambda g: g.astype(jnp.float32), grads),
            "loss": loss.astype(jnp.float32),
            "sums": {name: tuple(jnp.asarray(x, jnp.float32) for x in sums.get(name, (0.0, 0.0))) for name in names},
            "tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32)}


def accumulate(graphdef, acc: dict, state, batch: dict, norms: dict, opts: StepOptions, grad_shardings=None) -> dict:
    """Returns ``acc`` plus the gradients, loss share and metric sums of one more stacked micro-batch."""
    return jax.tree.map(jnp.add, acc, accumulate_first(graphdef, state, batch, norms, opts, grad_shardings))


def clip_gradients(max_grad_norm: float, acc: dict) -> dict:
    """Returns ``acc`` with its gradients clipped to global norm ``max_grad_norm`` (optax.clip_by_global_norm; <= 0:
    no clipping) and zeroed when the norm or the loss is not finite, plus "grad_norm" (before clipping) and
    "finite". Jitted on its own with ``acc`` donated, the clipped gradients overwrite the accumulated ones: inside the
    optimizer update they would be a parameter-sized temporary (AdamW reads them twice, for both moments)."""
    grads, loss = acc["grads"], acc["loss"]
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    if max_grad_norm and max_grad_norm > 0:
        grads, _ = optax.clip_by_global_norm(max_grad_norm).update(grads, optax.EmptyState())
    grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    return {**acc, "grads": grads, "grad_norm": grad_norm, "finite": finite}


def apply(optimizer: optax.GradientTransformation, lr_schedule, state, acc: dict) -> tuple[Any, dict]:
    """Returns (new `state.TrainState`, metrics): the AdamW update from clipped gradients (``clip_gradients``'
    output), skipped when they were not finite."""
    grads, loss, finite = acc["grads"], acc["loss"], acc["finite"]

    def update(operand):
        params, opt_state = operand
        updates, new_opt = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt

    # A branch, not a select of new against old values: selecting would keep both AdamW moment trees alive at once
    # (two parameter-sized temporaries); the branch updates the donated buffers in place.
    new_params, new_opt = jax.lax.cond(finite, update, lambda operand: operand, (state.params, state.opt_state))
    new_state = state.replace(params=new_params, opt_state=new_opt, step=state.step + 1,
                              nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
                              nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, 1))
    metrics = {"loss": loss, "grad_norm": acc["grad_norm"], "lr": lr_schedule(state.step),
               "tokens": acc["tokens"], "skipped": 1.0 - finite.astype(jnp.float32)}
    for name, (total, count) in acc["sums"].items():
        metrics[name] = total / jnp.maximum(count, 1.0)
    return new_state, metrics


class StepFunctions(NamedTuple):
    """The trainer's jitted step pieces, accumulators and state donated. One optimizer step over micro-batches
    b_1..b_k is ``acc = accumulate_first(state, b_1, norms); acc = accumulate(acc, state, b_i, norms) ...;
    state, metrics = apply(state, acc)``, where ``apply`` runs ``clip`` then ``update``."""

    accumulate_first: Any
    accumulate: Any
    clip: Any
    update: Any

    def apply(self, state, acc: dict) -> tuple[Any, dict]:
        return self.update(state, self.clip(acc))


class UnderMesh:
    """A jitted function traced, lowered and run with ``mesh`` as the context mesh (``jax.sharding.use_abstract_mesh``,
    which also works inside another trace such as ``jax.eval_shape``), so that the
    decoder's activation sharding constraints (`models.sharding.constrain_residual`) resolve against the mesh the
    state lives on. Calls like the function; ``lower`` like its ``.lower``."""

    def __init__(self, fn, mesh):
        self.fn, self.mesh = fn, mesh

    def __call__(self, *args, **kwargs):
        if self.mesh is None:
            return self.fn(*args, **kwargs)
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            return self.fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        if self.mesh is None:
            return self.fn.lower(*args, **kwargs)
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            return self.fn.lower(*args, **kwargs)


def mesh_of(shardings):
    """Returns the mesh of the first NamedSharding in a tree of shardings with more than one device, or None."""
    for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)):
        if isinstance(s, jax.sharding.NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def jit_step(graphdef, opts: StepOptions, optimizer: optax.GradientTransformation, lr_schedule, state_shardings,
             max_grad_norm: float, compiler_options: dict[str, str] | None = None) -> StepFunctions:
    """Returns the jitted step pieces (see StepFunctions), traced under the state's mesh (`UnderMesh`). On a mesh
    the accumulated gradients take their parameters' shardings (with the decoder's activations pinned to the batch,
    GSPMD would otherwise leave them whole on every device: measured on 7B DPO, v5p-8, 28.4 instead of 8.6 GiB).
    ``compiler_options``: XLA options for the forward/backward programs (``accumulate_first``, ``accumulate``), e.g.
    `setup.cpu_step_compiler_options`; clipping and the update keep XLA's defaults."""
    mesh = mesh_of(state_shardings)
    grads = state_shardings.params if mesh is not None else None
    return StepFunctions(
        accumulate_first=UnderMesh(jax.jit(functools.partial(accumulate_first, graphdef, opts=opts,
                                                             grad_shardings=grads),
                                           compiler_options=compiler_options), mesh),
        accumulate=UnderMesh(jax.jit(functools.partial(accumulate, graphdef, opts=opts, grad_shardings=grads),
                                     donate_argnums=0, compiler_options=compiler_options), mesh),
        clip=jax.jit(functools.partial(clip_gradients, max_grad_norm), donate_argnums=0),
        update=jax.jit(functools.partial(apply, optimizer, lr_schedule), donate_argnums=0,
                       out_shardings=(state_shardings, None)),
    )
