"""A synthetic task whose answer is visible only in the image, and multiple-choice scoring of a trained model.

Task: "which quadrant holds the lesion?" with four fixed options. Every case has the same prompt text; its image
is a small demo scan (`medee_jax.data.demo.render_scan`) with one large bright lesion wholly inside one quadrant.
At 56 x 56 px an image is 4 x 4 patches = 4 LLM tokens (one per quadrant), so sequences stay short. Answer letters
are exactly balanced in every split. Records are LLaMA-Factory sharegpt JSONL with the images beside them, the
same format the trainer reads.

Scoring (`score_choices`): each case is written out four times, once per answer, as SFT records and sent through
the input pipeline's own per-example stages (parse, load images, tokenize: `pipeline.example_dataset`), so the
model sees exactly the token ids and pixels training produced; each answer's score is the summed log-prob of the
assistant turn ("The answer is X." and the end of turn) given the prompt and image; the prediction is the argmax.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from medee_jax.data.demo import QUADRANTS, Finding, render_scan

LETTERS = "ABCD"
PROMPT = "<image>Which quadrant of the image holds the lesion?\n" + "\n".join(
    f"{letter}. {name}" for letter, name in zip(LETTERS, QUADRANTS))
BLANK_LEVEL = 6  # the demo scans' background grey level outside the body


def answer_text(letter: str) -> str:
    return f"The answer is {letter}."


def record(image: str, letter: str) -> dict:
    """One sharegpt SFT record: the fixed prompt with ``image``, answered with ``letter``."""
    return {"conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": answer_text(letter)}],
            "images": [image]}


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def write_split(out_dir: str, split: str, n: int, *, size: int = 56, seed: int = 0) -> list[dict]:
    """Renders ``n`` cases (answer letters balanced, in shuffled order) into ``out_dir/images``.

    Returns [{"image": path relative to out_dir, "answer": letter}]. Lesions are large (over 5 cm) and
    hyperdense, with a random round or irregular outline; the body, texture and placement vary per case.
    """
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    stream = {"train": 1, "eval": 2}[split]
    quadrants = np.random.default_rng([seed, stream]).permutation(np.arange(n) % 4)
    cases = []
    for i, quadrant in enumerate(quadrants):
        rng = np.random.default_rng([seed, stream, i])
        finding = Finding(int(quadrant), large=True, irregular=bool(rng.integers(2)), hyperdense=True)
        pixels, _ = render_scan(rng, size, size, finding)
        rel = f"images/{split}_{i:04d}.png"
        Image.fromarray(pixels, "L").save(os.path.join(out_dir, rel))
        cases.append({"image": rel, "answer": LETTERS[int(quadrant)]})
    return cases


def write_blank(out_dir: str, *, size: int = 56) -> str:
    """A uniform image of the cases' size (same patch grid, no content); returns its path relative to out_dir."""
    rel = "images/blank.png"
    Image.fromarray(np.full((size, size), BLANK_LEVEL, np.uint8), "L").save(os.path.join(out_dir, rel))
    return rel


def write_task(out_dir: str, *, num_train: int, num_eval: int, size: int = 56, seed: int = 0) -> dict:
    """Writes train.jsonl (SFT records) and the held-out cases; returns paths and the held-out cases."""
    train = write_split(out_dir, "train", num_train, size=size, seed=seed)
    held_out = write_split(out_dir, "eval", num_eval, size=size, seed=seed)
    train_path = write_jsonl(os.path.join(out_dir, "train.jsonl"), [record(c["image"], c["answer"]) for c in train])
    return {"train": train_path, "held_out": held_out, "blank": write_blank(out_dir, size=size), "root": out_dir}


def score_choices(model, images: list[str], *, root: str, data_config, name: str = "choices",
                  batch_cases: int = 16) -> np.ndarray:
    """Returns log-prob scores [len(images), 4] of answers A..D for the fixed prompt with each image.

    ``images`` are paths relative to ``root``; the candidate records are written to ``root/<name>.jsonl``.
    ``data_config`` is the training run's `pipeline.DataConfig` (``trainer.train_source.data_config``): the inputs
    are built with its tokenizer, max_length and image settings, read in order, once.
    """
    from medee_jax.data import pipeline
    from medee_jax.data.batching import shifted_targets
    from medee_jax.data.images import normalize_patches
    from medee_jax.losses import sequence_logps

    path = write_jsonl(os.path.join(root, f"{name}.jsonl"),
                       [record(image, letter) for image in images for letter in LETTERS])
    data = data_config.with_updates(paths=(path,), shuffle=False, num_epochs=1, media_root=None)
    examples = pipeline.example_dataset(data, model.config.vision)
    rows = []
    for start in range(0, len(images) * 4, batch_cases * 4):
        chunk = [examples[i] for i in range(start, min(start + batch_cases * 4, len(images) * 4))]
        for ex in chunk:
            if isinstance(ex, pipeline.Dropped):
                raise ex.error
        length = max(len(ex["input_ids"]) for ex in chunk)
        input_ids = np.zeros((len(chunk), length), np.int32)  # [R, L]
        attention_mask = np.zeros_like(input_ids)
        labels = np.zeros_like(input_ids)
        mask = np.zeros(input_ids.shape, np.float32)
        for r, ex in enumerate(chunk):
            n = len(ex["input_ids"])
            input_ids[r, :n] = ex["input_ids"]
            attention_mask[r, :n] = 1
            labels[r, :n], mask[r, :n] = shifted_targets(np.asarray(ex["input_ids"]), np.asarray(ex["target_mask"]))
        # the examples carry uint8 patches [p, 588]; batch assembly would normalise them the same way
        pixel_values = normalize_patches(np.concatenate([ex["pixel_values"] for ex in chunk]))  # [patches, 1176]
        grid = np.concatenate([np.asarray(ex["image_grid_thw"]).reshape(-1, 3) for ex in chunk])  # [R, 3]
        logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                       image_grid_thw=grid)  # [R, L, V]
        rows.append(np.asarray(sequence_logps(logits, labels, mask)))  # [R]
    return np.concatenate(rows).reshape(len(images), 4)
