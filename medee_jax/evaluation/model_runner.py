"""The adapter between our checkpoints and the injected-generator interface of `generation.py`.

- `parse_model_specs("base=embedded,stage1=workdir/sft")` -> named `ModelSpec`s: "embedded" (the untrained tiny
  demo model, seeded), a Hugging Face checkpoint directory (config.json), or a training workdir (checkpoints/).
- `check_model(spec)` raises `FileNotFoundError` saying which command creates a missing demo workdir.
- `model_identity(spec)`: the cache key's model part (path, config and weight files' sizes and mtimes, or the
  workdir's latest checkpoint step), so a retrained model never reuses another model's generations.
- `encode_prompts(requests, chat_tokenizer)`: chat template + images -> the arrays `medee_jax.models.generate`
  takes (left-padded `input_ids` / `attention_mask` [B, L], Qwen2.5-VL `pixel_values` [P, 1176] and
  `image_grid_thw` [n, 3]); `decode_rows(tokens, ...)` -> [(text, "stop" | "length")].
- `load_generator(spec, ...)` returns the generator callable. It needs `medee_jax.models.generate`; until that
  exists it raises `GenerationUnavailable` ("generation not available yet") before loading anything.

jax is imported only inside `load_generator`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Sequence

import numpy as np

from .generation import GenerationRequest, GenerationUnavailable
from .items import IMAGE_PLACEHOLDER

DEMO_COMMANDS = {
    "workdir/sft": "python -m medee_jax.train --config configs/sft.py",
    "workdir/dpo": "python -m medee_jax.train --config configs/dpo.py --config.model.init_from=workdir/sft",
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "embedded" | "hf" | "workdir"
    path: str = ""
    seed: int = 0


def parse_model_specs(text: str, *, seed: int = 0) -> list[ModelSpec]:
    """"name=location,..." (a bare location is named after its folder); location "embedded" is the untrained
    demo model, a folder with config.json a Hugging Face checkpoint, anything else a training workdir."""
    specs = []
    for entry in [e.strip() for e in text.split(",") if e.strip()]:
        name, _, location = entry.rpartition("=")
        name = name or os.path.basename(os.path.normpath(location)) or location
        if location == "embedded":
            specs.append(ModelSpec(name, "embedded", seed=seed))
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


def encode_prompts(requests: Sequence[GenerationRequest], chat_tokenizer, *, min_pixels: int, max_pixels: int,
                   pad_token_id: int = 0) -> dict[str, np.ndarray | None]:
    """Left-padded prompt arrays for a batch of requests (Qwen2.5-VL image layout)."""
    from medee_jax.data.images import qwen2_vl_preprocess
    from medee_jax.data.tokenize import image_token_counts

    rows, pixels, grids = [], [], []
    for request in requests:
        text = chat_tokenizer.render(template_messages(request.messages), add_generation_prompt=True)
        ids = np.asarray(chat_tokenizer.encode([text])[0], dtype=np.int64)
        if request.images:
            values, grid = qwen2_vl_preprocess([im.load() for im in request.images], min_pixels, max_pixels)
            pixels.append(values)
            grids.append(grid)
            counts = image_token_counts(grid, chat_tokenizer.merge_size)
            slots = np.flatnonzero(ids == chat_tokenizer.image_token_id)
            if len(slots) != len(counts):
                raise ValueError(f"the chat template wrote {len(slots)} image tokens for {len(counts)} images")
            pieces, start = [], 0
            for pos, n in zip(slots, counts):
                pieces += [ids[start:pos], np.full(n, chat_tokenizer.image_token_id, np.int64)]
                start = pos + 1
            ids = np.concatenate(pieces + [ids[start:]])
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = np.full((len(rows), length), pad_token_id, np.int32)  # [B, L], left-padded
    attention_mask = np.zeros((len(rows), length), np.int32)
    for b, ids in enumerate(rows):
        input_ids[b, length - len(ids):] = ids
        attention_mask[b, length - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "pixel_values": np.concatenate(pixels) if pixels else None,  # [P, 1176]
            "image_grid_thw": np.concatenate(grids) if grids else None}  # [n, 3]


def decode_rows(tokens: np.ndarray, tokenizer, eos_ids: Sequence[int]) -> list[tuple[str, str]]:
    """(text, finish_reason) per row of new tokens [B, T]: text up to the first eos ("stop"), or the whole row
    when it has none ("length")."""
    out = []
    for row in np.asarray(tokens):
        stops = np.flatnonzero(np.isin(row, list(eos_ids)))
        end, reason = (int(stops[0]), "stop") if len(stops) else (len(row), "length")
        out.append((tokenizer.decode(row[:end].tolist(), skip_special_tokens=False), reason))
    return out


def load_generator(spec: ModelSpec, **_settings):
    """The generator callable for `spec` (see `generation.py`). Needs `medee_jax.models.generate`.

    Wiring at integration: load the model (`models.from_pretrained` for "hf", `training.setup.model_from_workdir`
    for "workdir", the embedded tiny config with `nnx.Rngs(spec.seed)` for "embedded") and its ChatTokenizer;
    per batch, `encode_prompts` -> `models.generate(model, input_ids, attention_mask, pixel_values=...,
    image_grid_thw=..., max_new_tokens=..., temperature=..., top_p=..., eos_token_id=[<|im_end|>, eos],
    pad_token_id=..., seed=...)` once per sample k (seed = request seeds mixed with k) -> `decode_rows`.
    """
    from medee_jax import models

    if not hasattr(models, "generate"):
        raise GenerationUnavailable(
            f"generation not available yet: cannot sample model {spec.name!r} because medee_jax.models.generate "
            "does not exist in this build (it arrives with the generation work); the readers, prompts, answer "
            "extraction, metrics, caching and reports run with any injected generator (see "
            "medee_jax.evaluation.generation)")
    raise GenerationUnavailable("generation not available yet: medee_jax.models.generate exists but "
                                "medee_jax.evaluation.model_runner.load_generator is not wired to it yet")
