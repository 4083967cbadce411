"""Run set-up: config validation (before any compute), data locations, and the initial model on the mesh."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from .. import losses
from ..models import config_from_hf_dict
from ..models.families import DEFAULT_FAMILY, family_named
from ..models.layers import REMAT_POLICIES

log = logging.getLogger("medee_jax.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "generation_config.json")


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Raises one ValueError naming every invalid field or combination, before anything is computed."""
    problems = []

    def need(ok, msg):
        if not ok:
            problems.append(msg)

    need(c.mode in ("sft", "dpo"), f"mode={c.mode!r}: must be 'sft' or 'dpo'")
    need(c.model.dtype in DTYPES, f"model.dtype={c.model.dtype!r}: one of {', '.join(DTYPES)}")
    need(c.model.param_dtype in DTYPES, f"model.param_dtype={c.model.param_dtype!r}: one of {', '.join(DTYPES)}")
    need(c.model.remat in REMAT_POLICIES, f"model.remat={c.model.remat!r}: one of {', '.join(REMAT_POLICIES)}")
    need(not (c.model.checkpoint and c.model.init_from),
         "model.checkpoint and model.init_from are both set: give one source of initial weights")
    for name in ("checkpoint", "init_from"):
        path = c.model[name]
        need(not path or os.path.isdir(path), f"model.{name}={path!r}: no such directory")
    need(c.data.batch_size >= 1, f"data.batch_size={c.data.batch_size}: must be >= 1")
    need(c.data.grad_accum_steps >= 1, f"data.grad_accum_steps={c.data.grad_accum_steps}: must be >= 1")
    need(c.data.on_bad_record in ("raise", "skip"), f"data.on_bad_record={c.data.on_bad_record!r}: 'raise' or 'skip'")
    need(max(c.data.seq_buckets) >= c.data.max_length,
         f"data.seq_buckets={tuple(c.data.seq_buckets)}: the largest must be >= data.max_length={c.data.max_length}")
    need(all(int(b) >= 1 for b in c.data.target_buckets),
         f"data.target_buckets={tuple(c.data.target_buckets)}: each must be >= 1 (or () for data.seq_buckets)")
    need(all(b % 4 == 0 for b in c.data.patch_buckets), f"data.patch_buckets={tuple(c.data.patch_buckets)}: "
         "each must be a multiple of 4 (the 2x2 merge)")
    for name in ("train", "eval", "media_root", "tokenizer"):
        path = c.data[name]
        need(not path or os.path.exists(path), f"data.{name}={path!r}: does not exist")
    need(c.optimizer.lr > 0, f"optimizer.lr={c.optimizer.lr}: must be > 0")
    need(0 <= c.optimizer.warmup_ratio < 1, f"optimizer.warmup_ratio={c.optimizer.warmup_ratio}: in [0, 1)")
    need(c.train.log_every >= 1 and c.train.checkpoint_every >= 1,
         "train.log_every and train.checkpoint_every must be >= 1")
    if c.mode == "dpo":
        need(c.dpo.loss_type in losses.DPO_LOSS_TYPES,
             f"dpo.loss_type={c.dpo.loss_type!r}: one of {', '.join(losses.DPO_LOSS_TYPES)}")
        need(c.dpo.reference in ("frozen", "precomputed", "none"),
             f"dpo.reference={c.dpo.reference!r}: 'frozen', 'precomputed' or 'none'")
        need(c.dpo.beta > 0, f"dpo.beta={c.dpo.beta}: must be > 0")
        need(not (c.dpo.loss_type == "exo_pair" and c.dpo.label_smoothing <= 0),
             "dpo.loss_type='exo_pair' needs dpo.label_smoothing > 0")
        need(0 <= c.dpo.label_smoothing < 0.5, f"dpo.label_smoothing={c.dpo.label_smoothing}: in [0, 0.5)")
        need(not c.data.packing, "data.packing=True is for SFT only (DPO rows pair chosen and rejected)")
    for axis in ("data", "fsdp", "tensor"):
        need(c.mesh[axis] == -1 or c.mesh[axis] >= 1, f"mesh.{axis}={c.mesh[axis]}: >= 1 or -1")
    if problems:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))


@dataclasses.dataclass(frozen=True)
class DataSpec:
    train_path: str
    eval_path: str
    tokenizer_dir: str
    media_root: str
    is_demo: bool


def _copy_tokenizer(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def resolve_data(c: ml_collections.ConfigDict, workdir: str) -> DataSpec:
    """Returns where the data and tokenizer are; generates the embedded demo set when no data is configured.

    The tokenizer files are copied into ``workdir/tokenizer`` so a later stage started from this workdir
    (``model.init_from``) and the Hugging Face export find them.
    """
    from ..data import demo

    is_demo = not c.data.train
    demo_dir = os.path.join(workdir, "demo")
    if is_demo:
        paths = demo.ensure_demo(demo_dir)
        train = str(paths["sft_train" if c.mode == "sft" else "dpo_train"])
        evaluation = str(paths["sft_eval" if c.mode == "sft" else "dpo_eval"])
    else:
        train, evaluation = c.data.train, c.data.eval
    tokenizer = c.data.tokenizer or c.model.checkpoint
    if not tokenizer and c.model.init_from and os.path.isdir(os.path.join(c.model.init_from, "tokenizer")):
        tokenizer = os.path.join(c.model.init_from, "tokenizer")
    if not tokenizer:
        from ..data.demo_tokenizer import build_demo_tokenizer

        family = embedded_family(c)
        tokenizer = os.path.join(demo_dir, "tokenizer" if family.name == DEFAULT_FAMILY else f"tokenizer_{family.name}")
        if not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):
            build_demo_tokenizer(tokenizer, flavour=family.demo_tokenizer)
    if not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")) and \
            not os.path.isfile(os.path.join(tokenizer, "vocab.json")):
        raise FileNotFoundError(f"{tokenizer}: no tokenizer files (set data.tokenizer)")
    kept = os.path.join(workdir, "tokenizer")
    if jax.process_index() == 0 and os.path.abspath(tokenizer) != os.path.abspath(kept):
        _copy_tokenizer(tokenizer, kept)
    return DataSpec(train, evaluation, tokenizer, c.data.media_root, is_demo)


def embedded_family(c: ml_collections.ConfigDict):
    """Returns the family of the embedded tiny model: ``model.family``, or the registry's default when unset."""
    return family_named(c.model.get("family", "") or DEFAULT_FAMILY)


def embedded_model_config(tokenizer_dir: str, family=None):
    """Returns the family's tiny demo config matching the demo tokenizer's vocabulary and special ids."""
    from transformers import AutoTokenizer

    family = family if family is not None else family_named(DEFAULT_FAMILY)
    return family.config().demo_config(AutoTokenizer.from_pretrained(tokenizer_dir))


def place_on_mesh(model: nnx.Module, mesh, rules) -> nnx.Module:
    """Returns ``model`` with every parameter moved to its NamedSharding on ``mesh``."""
    from ..models.sharding import param_shardings

    graphdef, state = nnx.split(model)
    shardings = param_shardings(nnx.state(model, nnx.Param), mesh, rules).to_pure_dict()
    params = nnx.state(model, nnx.Param).to_pure_dict()
    placed = jax.tree.map(jax.device_put, params, shardings)
    nnx.update(model, placed)
    return model


def build_model(c: ml_collections.ConfigDict, mesh, data: DataSpec):
    """Returns the initial model, its parameters placed on ``mesh`` by the config's sharding rules."""
    dtype, param_dtype = DTYPES[c.model.dtype], DTYPES[c.model.param_dtype]
    rules = dict(c.sharding_rules)
    if c.model.checkpoint:
        from ..models import from_pretrained

        return from_pretrained(c.model.checkpoint, dtype=dtype, mesh=mesh, param_dtype=param_dtype,
                               remat=c.model.remat, rules=rules)
    if c.model.init_from:
        return model_from_workdir(c.model.init_from, mesh, rules, dtype=dtype, param_dtype=param_dtype,
                                  remat=c.model.remat)
    family = embedded_family(c)
    cfg = embedded_model_config(data.tokenizer_dir, family)
    model = family.model()(cfg, dtype=dtype, param_dtype=param_dtype, remat=c.model.remat, rngs=nnx.Rngs(c.seed))
    return place_on_mesh(model, mesh, rules)


def model_from_workdir(path: str, mesh, rules, *, dtype, param_dtype, remat):
    """Returns the model of an earlier run's workdir (its latest checkpoint) or of an Orbax model directory
    written by ``tools/convert_checkpoint.py hf2orbax``, each parameter restored onto its sharding."""
    from ..models import abstract_model, orbax_io
    from ..models.sharding import param_shardings
    from . import checkpoint as ckpt

    if not os.path.isdir(os.path.join(path, "checkpoints")):
        return orbax_io.load_model(path, dtype, mesh, param_dtype=param_dtype, remat=remat, rules=rules)
    config_file = os.path.join(path, "model_config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"model.init_from={path}: a run directory without model_config.json")
    with open(config_file) as f:
        cfg = config_from_hf_dict(json.load(f), source=config_file)
    model = abstract_model(cfg, dtype, param_dtype=param_dtype, remat=remat)
    shardings = param_shardings(nnx.state(model, nnx.Param), mesh, rules).to_pure_dict()
    shapes = nnx.state(model, nnx.Param).to_pure_dict()
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    params = ckpt.restore_model_params(path, target)
    nnx.update(model, jax.tree.map(lambda x, t: x.astype(t.dtype), params, target))
    return model
