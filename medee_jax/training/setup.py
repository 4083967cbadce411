"""Run set-up: config validation (before any compute), data locations, and the initial model on the mesh."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import typing
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from .. import losses, recipes
from ..data.dataset_info import spec_exists
from ..data.record_formats import FORMAT_NAMES
from ..models import config_from_hf_dict, load_config, presets
from ..models.families import DEFAULT_FAMILY, family_named
from ..models.layers import REMAT_POLICIES, RETIRED_REMAT_POLICIES

log = logging.getLogger("medee_jax.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# The text attention implementations the train step runs (``model.attention``; models/attention.py).
TRAIN_ATTENTION = ("auto", "reference", "blockwise", "splash")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "generation_config.json", "processor_config.json")


DEMO_INPUTS = ("model.checkpoint", "model.init_from", "data.train")  # any of these set: not the embedded demo


def resolve_config(c: ml_collections.ConfigDict, overridden: Iterable[str] | None = None) -> ml_collections.ConfigDict:
    """Returns the run's resolved copy of ``c``, decided once at the start, after command-line overrides.

    ``demo: "auto"`` becomes ``demo: true`` for the embedded demo (none of model.checkpoint, model.init_from,
    data.train is set) or ``demo: false``. The demo gets `recipes.DEMO_SIZES` for its mode, except on the fields in
    ``overridden`` (dotted names the user set, e.g. the command line's ``--config.data.batch_size``; None: no
    field is kept). A run that names a checkpoint or data never gets the demo sizes. A config that is already
    resolved (demo true/false) is returned as is after a consistency check, so resolving twice changes nothing.
    Raises ValueError for a preset without a checkpoint, or a demo value other than "auto".
    """
    named = [f for f in DEMO_INPUTS if recipes.get_field(c, f)]
    if isinstance(c.demo, bool):
        if c.demo and named:
            raise ValueError(f"demo=True but {', '.join(named)} is set: a resolved demo config cannot name a "
                             "checkpoint or data; start from the config file (demo='auto')")
        return c
    if c.demo != "auto":
        raise ValueError(f"demo={c.demo!r}: leave it 'auto'; the run is the embedded demo exactly when none of "
                         f"{', '.join(DEMO_INPUTS)} is set")
    is_demo = not named
    if is_demo and c.preset:
        raise ValueError(f"preset={c.preset!r} is for a real run: set model.checkpoint (or model.init_from) and "
                         "data.train")
    out = copy.deepcopy(c)
    with out.unlocked():
        del out["demo"]
        out.demo = is_demo
    if is_demo:
        keep = set(overridden or ())
        for field, value in recipes.DEMO_SIZES[c.mode].items():
            if field not in keep:
                recipes.set_field(out, field, value)
    return out


def describe_run(c: ml_collections.ConfigDict) -> str:
    """Returns one line saying what kind of run a resolved config is (printed at start)."""
    if c.demo is True:
        return (f"run: the embedded {c.mode} demo (no {', '.join(DEMO_INPUTS)}): tiny model, synthetic data, CPU "
                "sizes from medee_jax.recipes.DEMO_SIZES")
    preset = f"preset {c.preset}" if c.preset else "no preset"
    return f"run: a real {c.mode} run ({preset}); recipe values, the demo sizes are not applied"


def workdir_problem(path: str, create: bool = True) -> str | None:
    """Returns why ``path`` cannot be the run directory (not a directory, cannot be created, not writable), or None.

    A probe file is written (and removed) because permission bits do not show a read-only mount or a root user's
    rights. ``create``: make the directory if needed; otherwise probe its nearest existing ancestor and leave
    nothing behind (the pre-flight writes nothing)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"workdir={path!r}: exists and is not a directory"
    target = path
    if not create:
        while not os.path.exists(target) and os.path.dirname(target) != target:
            target = os.path.dirname(target)
        if not os.path.isdir(target):
            return f"workdir={path!r}: {target} is a file, not a directory"
    try:
        if create:
            os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as e:
        return f"workdir={path!r}: cannot write there ({e.strerror or e})"
    return None


def _preset_problem(c: ml_collections.ConfigDict) -> str | None:
    """Returns why the preset does not fit the checkpoint's model (another size or family), or None."""
    expected = presets().get(c.preset)
    source = c.model.checkpoint or c.model.init_from
    if expected is None or not source:
        return None
    found = initial_model_config(c)
    if found is None:
        return None
    got = (found.text.hidden_size, found.text.num_hidden_layers)
    want = (expected.text.hidden_size, expected.text.num_hidden_layers)
    if got != want:
        return (f"preset={c.preset!r} is for a model with hidden_size {want[0]} and {want[1]} layers, but {source} "
                f"has hidden_size {got[0]} and {got[1]} layers: pick the preset of that size")
    return None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_config(c: ml_collections.ConfigDict, workdir: str | None = None, *, create_workdir: bool = True) -> None:
    """Raises one ValueError naming every invalid field or combination, before anything is computed.

    Every cross-field rule lives in one function: DPO loss settings in `losses.dpo_settings_problems`, bucket
    settings in `batching.bucket_problems` (the vision merge unit is checked there once the model is known).
    With ``workdir``, the run directory must be usable: created (unless ``create_workdir`` is False) and writable.
    """
    from ..data import batching, errors

    problems = []

    def need(ok, msg):
        if not ok:
            problems.append(msg)

    need(c.mode in ("sft", "dpo"), f"mode={c.mode!r}: must be 'sft' or 'dpo'")
    need(c.model.dtype in DTYPES, f"model.dtype={c.model.dtype!r}: one of {', '.join(DTYPES)}")
    need(c.model.param_dtype in DTYPES, f"model.param_dtype={c.model.param_dtype!r}: one of {', '.join(DTYPES)}")
    if c.model.remat in RETIRED_REMAT_POLICIES:
        need(False, f"model.remat={c.model.remat!r} was retired; use {RETIRED_REMAT_POLICIES[c.model.remat]}")
    else:
        need(c.model.remat in REMAT_POLICIES, f"model.remat={c.model.remat!r}: one of {', '.join(REMAT_POLICIES)}")
    need(c.model.attention in TRAIN_ATTENTION,
         f"model.attention={c.model.attention!r}: {', '.join(TRAIN_ATTENTION)} (cudnn takes no padding or segment "
         "masks, which the step's rows carry; the Pallas GPU kernel is not partitioned over the step's mesh)")
    need(c.model.frozen_dtype in ("compute", "param"), f"model.frozen_dtype={c.model.frozen_dtype!r}: 'compute' or "
         "'param'")
    need(c.optimizer.mu_dtype in ("float32", "bfloat16"), f"optimizer.mu_dtype={c.optimizer.mu_dtype!r}: 'float32' "
         "or 'bfloat16'")
    need(c.train.lm_head_dtype in ("compute", "float32"), f"train.lm_head_dtype={c.train.lm_head_dtype!r}: "
         "'compute' (model.dtype operands, fp32 accumulation) or 'float32'")
    need(0 <= c.train.gpu_memory_fraction <= 1, f"train.gpu_memory_fraction={c.train.gpu_memory_fraction}: in "
         "(0, 1], or 0 for JAX's default")
    need(not (c.model.checkpoint and c.model.init_from),
         "model.checkpoint and model.init_from are both set: give one source of initial weights")
    for name in ("checkpoint", "init_from"):
        path = c.model[name]
        need(not path or os.path.isdir(path), f"model.{name}={path!r}: no such directory")
    if c.preset and not problems:
        need(c.preset in recipes.PRESETS, f"preset={c.preset!r}: one of {', '.join(recipes.PRESETS)}")
        try:
            problem = _preset_problem(c)
        except (OSError, ValueError) as e:
            problem = f"model.checkpoint / model.init_from: cannot read the model config ({e})"
        need(problem is None, problem)
    for name in ("batch_size", "grad_accum_steps"):
        value = c.data[name]
        need(_is_int(value) and value >= 1, f"data.{name}={value!r}: must be an integer >= 1")
    choices = typing.get_args(errors.OnBadRecord)
    need(c.data.on_bad_record in choices, f"data.on_bad_record={c.data.on_bad_record!r}: one of {', '.join(choices)}")
    problems += batching.bucket_problems(c.data.max_length, c.data.length_buckets, c.data.patch_buckets,
                                         prefix="data.")
    targets = c.data.target_buckets
    need(isinstance(targets, (list, tuple)) and all(_is_int(b) and b >= 1 for b in targets),
         f"data.target_buckets={targets!r}: positive sizes, or () for data.length_buckets")
    pixels = (c.data.min_pixels, c.data.max_pixels)
    need(all(_is_int(p) and p >= 0 for p in pixels) and (0 in pixels or pixels[0] <= pixels[1]),
         f"data.min_pixels={pixels[0]!r}, data.max_pixels={pixels[1]!r}: >= 0 (0 = the checkpoint's processor), "
         "min <= max")
    need(_is_int(c.data.image_max_pixels) and c.data.image_max_pixels >= 0,
         f"data.image_max_pixels={c.data.image_max_pixels!r}: >= 0 (0 = no pre-resize)")
    for name in ("train", "eval", "media_root", "eval_media_root", "tokenizer"):
        path = c.data[name]
        need(not path or spec_exists(path), f"data.{name}={path!r}: does not exist")
    need(c.data.get("format", "auto") in FORMAT_NAMES, f"data.format={c.data.get('format')!r}: one of "
         f"{', '.join(FORMAT_NAMES)}")
    need(c.optimizer.lr > 0, f"optimizer.lr={c.optimizer.lr}: must be > 0")
    need(0 <= c.optimizer.warmup_ratio < 1, f"optimizer.warmup_ratio={c.optimizer.warmup_ratio}: in [0, 1)")
    need(c.train.log_every >= 1 and c.train.checkpoint_every >= 1,
         "train.log_every and train.checkpoint_every must be >= 1")
    need(c.train.steps == -1 or c.train.steps >= 1,
         f"train.steps={c.train.steps}: must be -1 (data.num_epochs over the training set) or >= 1")
    need(c.data.num_epochs >= 1, f"data.num_epochs={c.data.num_epochs}: must be >= 1")
    need(c.train.keep_checkpoints == -1 or c.train.keep_checkpoints >= 1,
         f"train.keep_checkpoints={c.train.keep_checkpoints}: must be >= 1 (the final weights are a checkpoint) "
         "or -1 (keep every checkpoint)")
    need(0.0 <= c.data.max_bad_fraction <= 1.0, f"data.max_bad_fraction={c.data.max_bad_fraction}: in [0, 1]")
    need(c.data.high_bit_depth in ("min_max", "bit_depth", "refuse"),
         f"data.high_bit_depth={c.data.high_bit_depth!r}: 'min_max', 'bit_depth' or 'refuse'")
    if c.mode == "dpo":
        problems += losses.dpo_settings_problems(c.dpo.loss_type, c.dpo.beta, c.dpo.label_smoothing, prefix="dpo.")
        need(c.dpo.reference in ("frozen", "precomputed", "none"),
             f"dpo.reference={c.dpo.reference!r}: 'frozen', 'precomputed' or 'none'")
        need(not c.data.packing, "data.packing=True is for SFT only (DPO rows pair chosen and rejected)")
    for axis in ("data", "fsdp", "tensor"):
        need(c.mesh[axis] == -1 or c.mesh[axis] >= 1, f"mesh.{axis}={c.mesh[axis]}: >= 1 or -1")
    if workdir is not None and not problems:
        problem = workdir_problem(workdir, create=create_workdir)
        need(problem is None, problem)
    if problems:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))


@dataclasses.dataclass(frozen=True)
class DataSpec:
    train_path: str
    eval_path: str
    tokenizer_dir: str
    media_root: str
    is_demo: bool
    eval_media_root: str = ""  # the eval split's image folder when it differs (default: media_root, else its own)


def _copy_tokenizer(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def resolve_data(c: ml_collections.ConfigDict, workdir: str, *, keep_tokenizer: bool = True) -> DataSpec:
    """Returns where the data and tokenizer are; generates the embedded demo set when no data is configured.

    With ``keep_tokenizer`` the tokenizer files are copied into ``workdir/tokenizer`` so a later stage started from
    this workdir (``model.init_from``) and the Hugging Face export find them.
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
    if keep_tokenizer and jax.process_index() == 0 and os.path.abspath(tokenizer) != os.path.abspath(kept):
        _copy_tokenizer(tokenizer, kept)
    return DataSpec(train, evaluation, tokenizer, c.data.media_root, is_demo, c.data.eval_media_root)


def image_bounds(c: ml_collections.ConfigDict, data: DataSpec):
    """Returns the run's image size limits (`processor_config.ImageBounds`): data.min_pixels / max_pixels /
    min_tiles / max_tiles where > 0, else the checkpoint's own image processor (preprocessor_config.json)."""
    from ..data.processor_config import resolve_image_bounds

    d = c.data
    return resolve_image_bounds((c.model.checkpoint, data.tokenizer_dir), d.min_pixels, d.max_pixels, d.min_tiles,
                                d.max_tiles)


def pipeline_config(c: ml_collections.ConfigDict, data: DataSpec, split: str, *, path: str | None = None,
                    shuffle: bool | None = None, num_epochs: int | None | str = "default", bounds=None,
                    bucket_field: str = "patch_buckets"):
    """Returns the input pipeline's `DataConfig` for one split of the run: the one translation from the run
    config's fields (``data.*``, ``seed``, ``mode``, ``dpo.share_prompt``) to the pipeline's.

    ``path`` defaults to the split's data file, ``shuffle`` to data.shuffle for train (never for eval),
    ``num_epochs`` to None (endless: the loop counts steps) for train and 1 for eval; ``bounds`` to
    `image_bounds` (the eval split reads its images from data.eval_media_root when set); ``bucket_field``: the
    model family's vision-unit buckets (`Family.bucket_field`: data.patch_buckets or data.tile_buckets).
    """
    from ..data import pipeline

    d = c.data
    bounds = image_bounds(c, data) if bounds is None else bounds
    media_root = (data.eval_media_root or data.media_root) if split == "eval" else data.media_root
    if path is None:
        path = data.train_path if split == "train" else data.eval_path
    if shuffle is None:
        shuffle = bool(d.shuffle) and split == "train"
    if num_epochs == "default":
        num_epochs = None if split == "train" else 1
    return pipeline.DataConfig(
        paths=(path,), tokenizer_dir=data.tokenizer_dir, mode=c.mode, batch_size=d.batch_size,
        max_length=d.max_length, length_buckets=tuple(d.length_buckets), patch_buckets=tuple(d[bucket_field]),
        packing=bool(d.packing) and c.mode == "sft", seed=c.seed, shuffle=shuffle, num_epochs=num_epochs,
        num_workers=d.num_workers, min_pixels=bounds.min_pixels, max_pixels=bounds.max_pixels,
        min_tiles=bounds.min_tiles, max_tiles=bounds.max_tiles, format=d.format,
        image_max_pixels=d.image_max_pixels, high_bit_depth=d.high_bit_depth, on_bad_record=d.on_bad_record,
        media_root=media_root or None, share_prompt=c.mode == "dpo" and bool(c.dpo.share_prompt))


def target_buckets(c: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Returns the widths of the per-sequence target arrays (data.target_buckets, () meaning data.length_buckets)."""
    return tuple(c.data.target_buckets) or tuple(c.data.length_buckets)


def step_options(c: ml_collections.ConfigDict):
    """Returns the train step's `steps.StepOptions` for the run config (the one translation of those fields)."""
    from .steps import StepOptions

    return StepOptions(
        mode=c.mode, loss_type=c.dpo.loss_type, beta=c.dpo.beta, label_smoothing=c.dpo.label_smoothing,
        sft_weight=c.dpo.sft_weight, reference=c.dpo.reference if c.mode == "dpo" else "none",
        share_image_features=not c.model.train_vision and not c.model.train_projector,
        vocab_chunk=c.train.vocab_chunk, seq_chunk=c.train.seq_chunk,
        lm_head_dtype=c.model.dtype if c.train.lm_head_dtype == "compute" else c.train.lm_head_dtype)


# XLA:CPU options for the step's forward/backward program (``accumulate``) of an all-float32 run. YNNPACK's fused
# dot (``LIBRARY_FUSION_TYPE_DOT``, instead of the default ``INDIVIDUAL_DOT``) takes the transposes and elementwise
# producers around each matmul into the matmul itself: the weight-gradient transposes XLA otherwise materialises
# (0.5-0.7 s of a 2.2 s step) disappear. 512-bit vectors suit the AVX-512 loop fusions. Measured on the 62M DPO
# benchmark (tools/bench_step.py, 2 cores): the step 2.24 -> 1.93 s, loss equal to 1e-5 (fp32 reassociation).
# A program compiled with them and one without sum in different orders (log-probs differ by ~1e-6), so every
# program of a run that runs the model's forward takes the same options (tests/test_trainer.py compares the
# precomputed reference's pass with the step's frozen copy to 1e-6).
# float32 only: with bf16 operands the fused dot skips the operands' rounding to bf16 (the bf16 LM head comes out
# as the fp32 one) and hoists an fp32 copy of the bf16 kernel (tests/test_losses.py fails both ways), and a bf16
# step is slower with it (1.73 -> 2.06 s).
CPU_FP32_STEP_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
    "xla_cpu_prefer_vector_width": "512",
}


def cpu_step_compiler_options(c: ml_collections.ConfigDict, platform: str | None = None) -> dict[str, str]:
    """Returns the ``compiler_options`` for ``jax.jit`` of the step's forward/backward program: the XLA:CPU options
    above when ``train.xla_cpu_fused_dot`` is on and the run computes in float32 (model.dtype and model.param_dtype)
    on the CPU backend (``platform``, default ``jax.default_backend()``), else {}. The trainer gives them to every
    program that runs the model's forward (the step's accumulate pieces, evaluation, the precomputed reference's
    pass) so that all of them sum in the same order; clipping and the update keep XLA's defaults."""
    platform = jax.default_backend() if platform is None else platform
    if (not c.train.xla_cpu_fused_dot or platform != "cpu" or c.model.dtype != "float32"
            or c.model.param_dtype != "float32"):
        return {}
    return dict(CPU_FP32_STEP_COMPILER_OPTIONS)


def initial_model_config(c: ml_collections.ConfigDict):
    """Returns the config of the model the run starts from, read from small JSON files only (no weights):
    model.checkpoint's config.json, model.init_from's model_config.json (a run) or config.json (an Orbax model
    directory); None for the embedded model (its vocabulary follows the tokenizer: `embedded_model_config`)."""
    if c.model.checkpoint:
        return load_config(c.model.checkpoint)
    if c.model.init_from:
        run_config = os.path.join(c.model.init_from, "model_config.json")
        if os.path.isdir(os.path.join(c.model.init_from, "checkpoints")) and os.path.isfile(run_config):
            with open(run_config, encoding="utf-8") as f:
                return config_from_hf_dict(json.load(f), source=run_config)
        return load_config(c.model.init_from)
    return None


def embedded_family(c: ml_collections.ConfigDict):
    """Returns the family of the embedded tiny model: ``model.family``, or the registry's default when unset."""
    return family_named(c.model.get("family", "") or DEFAULT_FAMILY)


def embedded_model_config(tokenizer_dir: str, family=None):
    """Returns the family's tiny demo config matching the demo tokenizer's vocabulary and special ids."""
    from ..data.tokenize import load_hf_tokenizer

    family = family if family is not None else family_named(DEFAULT_FAMILY)
    return family.config().demo_config(load_hf_tokenizer(tokenizer_dir))


def place_on_mesh(model: nnx.Module, mesh, rules) -> nnx.Module:
    """Returns ``model`` with every parameter moved to its NamedSharding on ``mesh``."""
    from ..models.sharding import param_shardings

    graphdef, state = nnx.split(model)
    shardings = nnx.to_pure_dict(param_shardings(nnx.state(model, nnx.Param), mesh, rules))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    placed = jax.tree.map(jax.device_put, params, shardings)
    nnx.update(model, placed)
    return model


def build_model(c: ml_collections.ConfigDict, mesh, data: DataSpec):
    """Returns the initial model, its parameters placed on ``mesh`` by the config's sharding rules, its text
    attention set to ``model.attention`` (splash only on TPU devices)."""
    from ..models.attention import mesh_platform

    platform = mesh_platform(mesh)
    if c.model.attention == "splash" and platform != "tpu":
        raise ValueError(f"model.attention='splash' runs on TPU only (this run's devices: {platform}); use 'auto' "
                         "(splash on TPU, blockwise or reference elsewhere) or 'blockwise'")
    model = _initial_model(c, mesh, data)
    model.set_text_attention(c.model.attention)
    return model


def _initial_model(c: ml_collections.ConfigDict, mesh, data: DataSpec):
    """Returns the initial model (checkpoint, earlier run or embedded), placed on ``mesh``."""
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
    shardings = nnx.to_pure_dict(param_shardings(nnx.state(model, nnx.Param), mesh, rules))
    shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    params = ckpt.restore_model_params(path, target)
    nnx.update(model, jax.tree.map(lambda x, t: x.astype(t.dtype), params, target))
    return model
