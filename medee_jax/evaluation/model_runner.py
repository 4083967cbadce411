"""The adapter between our checkpoints and the injected-generator interface of `generation.py`.

- `parse_model_specs("base=embedded,stage1=workdir/sft")` -> named `ModelSpec`s: "embedded" (the untrained tiny
  demo model, seeded), a Hugging Face checkpoint directory (config.json), or a training workdir (checkpoints/).
- `check_model(spec)` raises `FileNotFoundError` saying which command creates a missing demo workdir.
- `model_identity(spec)`: the cache key's model part (path, config and weight files' sizes and mtimes, or the
  workdir's latest checkpoint step), so a retrained model never reuses another model's generations.
- `encode_prompts(requests, chat_tokenizer, image_inputs=...)`: chat template + images -> the arrays
  `medee_jax.models.generate` takes (left-padded `input_ids` / `attention_mask` [B, L]; the family's
  `pixel_values` — Qwen2.5-VL patches [P, 1176] with `image_grid_thw` [n, 3], InternVL tiles [T, 3, S, S]);
  `decode_rows(tokens, ...)` -> [(text, "stop" | "length")].
- `load_generator(spec, **settings)` loads the model and its chat tokenizer (any family, through the registry) and
  returns the generator callable (`ModelGenerator`).

jax is imported only inside `load_generator`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import tempfile
import types
from collections.abc import Sequence

import numpy as np

from .generation import GenerationRequest
from .items import IMAGE_PLACEHOLDER

DEMO_COMMANDS = {  # the demo workdirs configs/eval.py and configs/pairs.py name by default
    "workdir/sft": "python -m medee_jax.pipeline --config configs/pipeline.py (the whole demo loop; Stage-I alone: "
                   "python -m medee_jax.train --config configs/sft.py)",
    "workdir/dpo": "python -m medee_jax.pipeline --config configs/pipeline.py (the whole demo loop: Stage-I, "
                   "pairs, then Stage-II from Stage-I)",
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "embedded" | "hf" | "workdir"
    path: str = ""
    seed: int = 0


def parse_model_specs(text: str, *, seed: int = 0) -> list[ModelSpec]:
    """"name=location,..." (a bare location is named after its folder); location "embedded" is the untrained
    demo model, a folder with checkpoints/ a training workdir, one with config.json a Hugging Face checkpoint,
    anything else a training workdir (checked by `check_model`)."""
    specs = []
    for entry in [e.strip() for e in text.split(",") if e.strip()]:
        name, _, location = entry.rpartition("=")
        name = name or os.path.basename(os.path.normpath(location)) or location
        if location == "embedded":
            specs.append(ModelSpec(name, "embedded", seed=seed))
        elif os.path.isdir(os.path.join(location, "checkpoints")):  # a run dir (its config.json is the run's)
            specs.append(ModelSpec(name, "workdir", location))
        elif os.path.isfile(os.path.join(location, "config.json")):
            specs.append(ModelSpec(name, "hf", location))
        else:
            specs.append(ModelSpec(name, "workdir", location))
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"model names must be unique: {text!r}")
    return specs


def check_model(spec: ModelSpec) -> None:
    """Raises FileNotFoundError (with the command that creates it, for the demo workdirs) if the model is absent."""
    if spec.kind == "embedded":
        return
    if spec.kind == "workdir" and not os.path.isdir(os.path.join(spec.path, "checkpoints")):
        hint = DEMO_COMMANDS.get(os.path.normpath(spec.path).replace(os.sep, "/"))
        raise FileNotFoundError(f"model {spec.name!r}: {spec.path} is neither a Hugging Face checkpoint nor a "
                                "training workdir with checkpoints/" + (f"; run first: {hint}" if hint else ""))


def model_identity(spec: ModelSpec) -> str:
    """A string that changes whenever the model's weights may have changed."""
    if spec.kind == "embedded":
        return f"embedded-demo:seed={spec.seed}"
    if spec.kind == "hf":
        files = sorted(glob.glob(os.path.join(spec.path, "*.json")) + glob.glob(os.path.join(spec.path, "*.safetensors")))
        stamp = [(os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
        return f"hf:{os.path.abspath(spec.path)}:{json.dumps(stamp)}"
    steps = sorted(int(d) for d in os.listdir(os.path.join(spec.path, "checkpoints")) if d.isdigit())
    return f"workdir:{os.path.abspath(spec.path)}:step={steps[-1] if steps else 'none'}"


def template_messages(messages: Sequence[tuple[str, str]]) -> list[dict]:
    """(role, text with `<image>`) messages as chat templates take them (image parts where images go)."""
    out = []
    for role, text in messages:
        if IMAGE_PLACEHOLDER not in text:
            out.append({"role": role, "content": text})
            continue
        parts = []
        for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": role, "content": parts})
    return out


def qwen_image_inputs(min_pixels: int, max_pixels: int):
    """Qwen2.5-VL's `ImageInputs` with the standard vision layout (14 px patches, 2x2 merge, 2 frames)."""
    from medee_jax.models.families import family_named
    from medee_jax.models.qwen2_5_vl.config import VisionConfig

    vision = VisionConfig(depth=1, hidden_size=16, intermediate_size=16, num_heads=1, out_hidden_size=16,
                          fullatt_block_indexes=(0,))  # only the patch layout matters here
    options = types.SimpleNamespace(min_pixels=min_pixels, max_pixels=max_pixels)
    return family_named("qwen2_5_vl").image_inputs(vision, options)


def encode_prompts(requests: Sequence[GenerationRequest], chat_tokenizer, *, min_pixels: int = 3136,
                   max_pixels: int = 12845056, pad_token_id: int = 0, image_inputs=None) -> dict[str, np.ndarray | None]:
    """Left-padded prompt arrays for a batch of requests: `input_ids`, `attention_mask` [B, L], `pixel_values` (the
    family's units: Qwen patches [P, 1176], InternVL tiles [T, 3, S, S]; None without images) and `image_grid_thw`
    [n, 3] (Qwen; None otherwise). `image_inputs`: the model family's `ImageInputs` (default: Qwen2.5-VL's with
    min_pixels / max_pixels); each image placeholder becomes prefix + image token x its token count + suffix, as the
    training pipeline expands it."""
    images_io = image_inputs if image_inputs is not None else qwen_image_inputs(min_pixels, max_pixels)
    image_id = chat_tokenizer.image_token_id
    rows, pixels, infos = [], [], []
    for request in requests:
        text = chat_tokenizer.render(template_messages(request.messages), add_generation_prompt=True)
        ids = np.asarray(chat_tokenizer.encode([text])[0], dtype=np.int64)
        if request.images:
            values, info = images_io.load([im.load() for im in request.images])
            pixels.append(values)
            infos.append(info)
            counts = images_io.token_counts(info)
            slots = np.flatnonzero(ids == image_id)
            if len(slots) != len(counts):
                raise ValueError(f"the chat template wrote {len(slots)} image tokens for {len(counts)} images")
            prefix = np.asarray(chat_tokenizer.image_prefix_ids, np.int64)
            suffix = np.asarray(chat_tokenizer.image_suffix_ids, np.int64)
            pieces, start = [], 0
            for pos, n in zip(slots, counts):
                pieces += [ids[start:pos], prefix, np.full(n, image_id, np.int64), suffix]
                start = pos + 1
            ids = np.concatenate(pieces + [ids[start:]])
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = np.full((len(rows), length), pad_token_id, np.int32)  # [B, L], left-padded
    attention_mask = np.zeros((len(rows), length), np.int32)
    for b, ids in enumerate(rows):
        input_ids[b, length - len(ids):] = ids
        attention_mask[b, length - len(ids):] = 1
    pixel_values = grids = None
    if pixels:
        pixel_values = images_io.pixel_batch(pixels, sum(int(p.shape[0]) for p in pixels))
        if images_io.info_key == "image_grid_thw":
            grids = images_io.concat_info(infos)  # [n, 3]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_grid_thw": grids}


def decode_rows(tokens: np.ndarray, tokenizer, eos_ids: Sequence[int]) -> list[tuple[str, str]]:
    """(text, finish_reason) per row of new tokens [B, T]: text up to the first eos ("stop"), or the whole row
    when it has none ("length")."""
    out = []
    for row in np.asarray(tokens):
        stops = np.flatnonzero(np.isin(row, list(eos_ids)))
        end, reason = (int(stops[0]), "stop") if len(stops) else (len(row), "length")
        out.append((tokenizer.decode(row[:end].tolist(), skip_special_tokens=False), reason))
    return out


def sample_seed(request_seed: int, sample: int) -> int:
    """The row seed (< 2^32) of sample `sample` of a request: depends on the request's own seed only, so a request
    samples the same way in whatever batch it lands."""
    digest = hashlib.sha256(f"{request_seed}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class ModelGenerator:
    """The generator callable for one loaded model (see `generation.py` for the interface).

    Per call: `encode_prompts` -> `medee_jax.models.generate_with_info` once per sample k (greedy: once, the same
    output for every k) with per-row seeds `sample_seed(request.seed, k)` -> `decode_rows`-style text up to the
    first end token, with the finish reason generation reports ("stop" at an end token, "length" at
    max_new_tokens). End tokens: `<|im_end|>`, the tokenizer's eos and the model config's eos ids.
    """

    def __init__(self, model, chat_tokenizer, image_inputs, *, thinking_budget: int | None = None,
                 max_cache_length: int | None = None):
        self.model = model
        self.chat_tokenizer = chat_tokenizer
        self.image_inputs = image_inputs
        tok = chat_tokenizer.tokenizer
        eos = []
        vocab = tok.get_vocab()
        for candidate in ("<|im_end|>", "<|endoftext|>"):
            if candidate in vocab:
                eos.append(vocab[candidate])
        config_eos = model.config.text.eos_token_id
        for candidate in ([tok.eos_token_id] + (config_eos if isinstance(config_eos, list) else [config_eos])):
            if candidate is not None and int(candidate) not in eos:
                eos.append(int(candidate))
        self.eos_ids = eos
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.thinking = {}
        if thinking_budget is not None:
            start, end = chat_tokenizer.encode(["<think>", "</think>"])
            self.thinking = dict(thinking_budget=int(thinking_budget), think_start_ids=start, think_end_ids=end)
        self.max_cache_length = max_cache_length

    def __call__(self, requests, *, n_samples, temperature, top_p, max_new_tokens, seed):
        from medee_jax.models import generate_with_info

        arrays = encode_prompts(requests, self.chat_tokenizer, pad_token_id=self.pad_token_id,
                                image_inputs=self.image_inputs)
        outputs = [[] for _ in requests]
        runs = 1 if temperature == 0 else n_samples
        tok = self.chat_tokenizer.tokenizer
        for k in range(runs):
            out = generate_with_info(
                self.model, arrays["input_ids"], arrays["attention_mask"], pixel_values=arrays["pixel_values"],
                image_grid_thw=arrays["image_grid_thw"], max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, eos_token_id=self.eos_ids, pad_token_id=self.pad_token_id, seed=seed,
                row_seeds=[sample_seed(r.seed, k) for r in requests], max_cache_length=self.max_cache_length,
                **self.thinking)
            for b, (row, n, reason) in enumerate(zip(out.tokens, out.lengths, out.finish_reasons)):
                end = int(n) - 1 if reason == "stop" else int(n)  # the end token is not part of the text
                outputs[b].append((tok.decode(row[:end].tolist(), skip_special_tokens=False), reason))
        if runs == 1 and n_samples > 1:
            outputs = [samples * n_samples for samples in outputs]
        return outputs


def _demo_tokenizer_dir(flavour: str) -> str:
    """A directory with the embedded demo's tokenizer (built once per process)."""
    from medee_jax.data.demo_tokenizer import build_demo_tokenizer

    cache = _demo_tokenizer_dir.__dict__.setdefault("dirs", {})
    if flavour not in cache:
        cache[flavour] = tempfile.mkdtemp(prefix=f"medee_demo_tokenizer_{flavour}_")
        build_demo_tokenizer(cache[flavour], flavour)
    return cache[flavour]


def load_model(spec: ModelSpec, *, dtype: str = "float32", family: str = "", mesh_shape: dict | None = None):
    """Returns (model, tokenizer directory) for `spec`: `models.from_pretrained` ("hf"), the workdir's latest
    checkpoint with its tokenizer/ ("workdir"), or the embedded demo model of `family` (default: the registry's
    default family) with `nnx.Rngs(spec.seed)` and the demo tokenizer ("embedded"). Weights are placed on a mesh
    over all devices (`mesh_shape`, default fsdp over every device)."""
    import jax.numpy as jnp
    from flax import nnx

    from medee_jax.models import from_pretrained
    from medee_jax.models.families import DEFAULT_FAMILY, family_named
    from medee_jax.models.sharding import DEFAULT_RULES
    from medee_jax.training import setup
    from medee_jax.training.mesh import make_mesh

    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"model dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    mesh = make_mesh(mesh_shape or {"fsdp": -1})
    check_model(spec)
    if spec.kind == "hf":
        return from_pretrained(spec.path, dtype=dtypes[dtype], mesh=mesh), spec.path
    if spec.kind == "workdir":
        tokenizer_dir = os.path.join(spec.path, "tokenizer")
        if not os.path.isdir(tokenizer_dir):
            raise FileNotFoundError(f"model {spec.name!r}: {spec.path} has no tokenizer/ directory")
        model = setup.model_from_workdir(spec.path, mesh, DEFAULT_RULES, dtype=dtypes[dtype],
                                         param_dtype=dtypes[dtype], remat="none")
        return model, tokenizer_dir
    chosen = family_named(family or DEFAULT_FAMILY)
    tokenizer_dir = _demo_tokenizer_dir(chosen.demo_tokenizer)
    cfg = setup.embedded_model_config(tokenizer_dir, chosen)
    model = chosen.model()(cfg, dtype=dtypes[dtype], param_dtype=dtypes[dtype], rngs=nnx.Rngs(spec.seed))
    return setup.place_on_mesh(model, mesh, DEFAULT_RULES), tokenizer_dir


def image_bounds(spec: ModelSpec, min_pixels: int | None, max_pixels: int | None) -> tuple[int | None, int | None]:
    """The Qwen-style image size bounds to run `spec` with: values given (> 0) win; else a training workdir's own
    (`data.min_pixels` / `data.max_pixels` of its config.json, where > 0), the embedded demo model's
    (`data.demo.DEMO_MAX_PIXELS`, the resolution the demo pipeline trains at), or None (the family's defaults)."""
    given = (min_pixels or None, max_pixels or None)
    own: tuple[int | None, int | None] = (None, None)
    if spec.kind == "workdir":
        try:
            with open(os.path.join(spec.path, "config.json"), encoding="utf-8") as f:
                data = json.load(f).get("data", {})
            own = (data.get("min_pixels") or None, data.get("max_pixels") or None)
        except (OSError, ValueError, AttributeError):
            pass
    elif spec.kind == "embedded":
        from medee_jax.data.demo import DEMO_MAX_PIXELS

        own = (None, DEMO_MAX_PIXELS)
    return given[0] or own[0], given[1] or own[1]


def load_generator(spec: ModelSpec, *, dtype: str = "float32", min_pixels: int | None = None,
                   max_pixels: int | None = None, min_tiles: int | None = None, max_tiles: int | None = None,
                   thinking_budget: int | None = None, max_cache_length: int | None = None, family: str = "",
                   mesh_shape: dict | None = None, **unknown) -> ModelGenerator:
    """The generator callable for `spec` (see `generation.py`): the model (`load_model`), its chat tokenizer with
    the family's image tokens, and the family's image preprocessing (Qwen: min_pixels / max_pixels, None or 0 =
    `image_bounds`: a training workdir's own, else the family's defaults; InternVL: min_tiles / max_tiles tiles per
    image; None = the family's defaults)."""
    if unknown:
        raise TypeError(f"load_generator: unknown settings {', '.join(sorted(unknown))}")
    min_pixels, max_pixels = image_bounds(spec, min_pixels, max_pixels)
    from medee_jax.data.tokenize import load_chat_tokenizer
    from medee_jax.models.families import family_of

    model, tokenizer_dir = load_model(spec, dtype=dtype, family=family, mesh_shape=mesh_shape)
    chosen = family_of(model)
    options = types.SimpleNamespace(min_pixels=min_pixels, max_pixels=max_pixels, min_tiles=min_tiles,
                                    max_tiles=max_tiles)
    image_inputs = chosen.image_inputs(model.config, options)
    chat_tokenizer = load_chat_tokenizer(tokenizer_dir, **image_inputs.chat_tokens)
    return ModelGenerator(model, chat_tokenizer, image_inputs, thinking_budget=thinking_budget,
                          max_cache_length=max_cache_length)
