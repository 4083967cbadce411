"""Synthetic medical-style demo data: the embedded default dataset, generated offline and deterministically.

`generate_demo(out_dir, seed=0)` writes, in the formats users bring (LLaMA-Factory sharegpt JSONL, images beside):

  images/train_00000.png ...   grayscale axial "scans": an elliptical body with soft texture and faint organs,
  images/eval_00000.png  ...   and one focal lesion that varies in quadrant, size, shape and density
  sft_train.jsonl / sft_eval.jsonl        Stage-I: text-only multiple-choice questions answerable from the text,
                                          answered with `<think>` reasoning and "The answer is X"
  dpo_train.jsonl / dpo_eval.jsonl        Stage-II: image questions with chosen (grounded in the visible finding,
                                          self-checked, correct) and rejected (hallucinated or ungrounded, wrong)
  mm_sft_train.jsonl / mm_sft_eval.jsonl  the same image cases as SFT (image + question -> short grounded answer),
                                          for image-dependence checks (train, then evaluate with blank images)
  mcq_text_eval.jsonl / mcq_image_eval.jsonl   the held-out cases in the multiple-choice evaluation format
  findings.jsonl                          ground truth per image (geometry and attributes), for tests and tools
  manifest.json                           generation parameters and file list (`ensure_demo` checks it)

Image questions are answerable only from the image: each question type has fixed prompt wordings and a fixed
option order, its answer classes are balanced, and the prompt text does not depend on the answer. Image
orientation words ("upper-left of the image") refer to the image as displayed, not to the patient's anatomy.
The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FIELD_OF_VIEW_CM = 40  # the image width corresponds to 40 cm: pixel spacing = 40 cm / width
# The resolution the demo pipeline (configs/pipeline.py) trains, samples and evaluates the tiny model at: images are
# resized to at most this many pixels: the Qwen2-VL resize rounds the demo's near-square 128-224 px scans down to
# 56 x 56 (4 x 4 patches, 4 image tokens, one per quadrant). Not 56 * 56 itself: with that bound the rounding gives
# 28 x 56 for any image that is not exactly square (2 tokens, upper and lower halves merged).
DEMO_MAX_PIXELS = 64 * 64
INSTRUCTION = 'Reason inside <think> </think>, then answer "The answer is X".'
LETTERS = "ABCD"
# 3: short prompts (the tiny demo model attends to its image tokens among fewer text tokens, and sampling and
# evaluation are faster); 2: concise chosen answers (no DPO pair cut to data.max_length).
FORMAT_VERSION = 3

QUADRANTS = ("upper-left", "upper-right", "lower-left", "lower-right")
SCAN_CONTEXT = f"Axial scan, {FIELD_OF_VIEW_CM} cm wide."

# Image question types: fixed wordings and a fixed option order, so the prompt never depends on the answer.
IMAGE_QUESTIONS = {
    "location": (
        ("Where is the lesion?", "Which quadrant holds the lesion?"),
        ("Upper-left quadrant", "Upper-right quadrant", "Lower-left quadrant", "Lower-right quadrant"),
    ),
    "appearance": (
        ("How does the lesion look?", "Which describes the lesion?"),
        ("Round, hyperdense", "Round, hypodense", "Irregular, hyperdense", "Irregular, hypodense"),
    ),
    "side_size": (
        ("Where is the lesion and how large is it?", "Which statement about the lesion is correct?"),
        ("Left half, under 3 cm", "Right half, under 3 cm", "Left half, over 5 cm", "Right half, over 5 cm"),
    ),
}
QUESTION_TYPES = tuple(IMAGE_QUESTIONS)


@dataclass(frozen=True)
class Finding:
    quadrant: int  # index into QUADRANTS
    large: bool  # over 5 cm (else under 3 cm)
    irregular: bool  # lobulated outline (else round)
    hyperdense: bool  # brighter than tissue (else darker)

    @property
    def right(self) -> bool:
        return self.quadrant % 2 == 1

    @property
    def lower(self) -> bool:
        return self.quadrant >= 2


def answer_class(qtype: str, f: Finding) -> int:
    """The index of the correct option of question type `qtype` for finding `f`."""
    if qtype == "location":
        return f.quadrant
    if qtype == "appearance":
        return 2 * f.irregular + (not f.hyperdense)
    if qtype == "side_size":
        return 2 * f.large + f.right
    raise ValueError(f"unknown image question type {qtype!r}")


def finding_for(qtype: str, cls: int, rng: np.random.Generator) -> Finding:
    """A finding whose answer to `qtype` is `cls`; the attributes the question does not ask about are random."""
    quadrant = int(rng.integers(4))
    large, irregular, hyper = (bool(rng.integers(2)) for _ in range(3))
    if qtype == "location":
        quadrant = cls
    elif qtype == "appearance":
        irregular, hyper = bool(cls // 2), cls % 2 == 0
    else:
        large = bool(cls // 2)
        quadrant = 2 * (quadrant // 2) + cls % 2
    return Finding(quadrant, large, irregular, hyper)


# ------------------------------------------------------------------------------------------------ rendering


def smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency texture in about [-1, 1]: a coarse random grid upsampled bicubically. [H, W] float32."""
    coarse = rng.normal(0.0, 0.5, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, "F").resize((width, height), Image.Resampling.BICUBIC))


def render_scan(rng: np.random.Generator, height: int, width: int, f: Finding) -> tuple[np.ndarray, dict]:
    """A synthetic axial scan with one lesion wholly inside quadrant `f.quadrant` -> (uint8 [H, W], geometry)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    cx, cy = width / 2, height / 2
    ax, ay = width * rng.uniform(0.43, 0.47), height * rng.uniform(0.42, 0.46)
    radial = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
    body = np.clip((1 - radial) * min(ax, ay) / 1.5 + 0.5, 0, 1)
    tissue = rng.uniform(100, 125)
    fat_rim = ((radial > 0.9) & (radial < 1.0)) * -18.0
    organs = np.zeros_like(xx)
    for side in (-1, 1):  # a faint symmetric pair of organs
        ox, oy = cx + side * 0.45 * ax, cy + 0.15 * ay
        organs -= 10.0 * (((xx - ox) / (0.22 * ax)) ** 2 + ((yy - oy) / (0.3 * ay)) ** 2 < 1)
    inside = tissue + 5.0 * smooth_noise(rng, height, width, 6) + fat_rim + organs

    # Lesion: size in cm -> pixels; an irregular outline is a radius modulated by a few harmonics.
    px_per_cm = width / FIELD_OF_VIEW_CM
    diameter_cm = rng.uniform(5.3, 6.2) if f.large else rng.uniform(2.0, 2.8)
    radius = diameter_cm * px_per_cm / 2
    harmonics = []
    if f.irregular:
        for k in rng.choice(np.arange(3, 8), size=3, replace=False):
            harmonics.append((int(k), rng.uniform(0.06, 0.09), rng.uniform(0, 2 * np.pi)))
    extent = radius * (1 + sum(a for _, a, _ in harmonics)) + 1.5
    sx, sy = (1 if f.right else -1), (1 if f.lower else -1)
    for _ in range(100):
        dx = rng.uniform(extent + 2, 0.3 * width)
        dy = rng.uniform(extent + 2, 0.3 * height)
        if ((dx + extent) / ax) ** 2 + ((dy + extent) / ay) ** 2 <= 0.85**2:
            break
    else:  # closest placement to the centre that keeps the lesion inside its quadrant
        dx, dy = extent + 2, extent + 2
    lx, ly = cx + sx * dx, cy + sy * dy
    dist = np.sqrt((xx - lx) ** 2 + (yy - ly) ** 2)
    theta = np.arctan2(yy - ly, xx - lx)
    outline = radius * (1 + sum(a * np.cos(k * theta + phase) for k, a, phase in harmonics))
    lesion = np.clip((outline - dist) / 1.2 + 0.5, 0, 1)
    contrast = rng.uniform(80, 100) if f.hyperdense else -rng.uniform(55, 70)

    background = 6.0
    pixels = background * (1 - body) + body * inside + lesion * contrast
    pixels = pixels + rng.normal(0, 2.5, pixels.shape)
    image = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    geometry = dict(
        width=width, height=height, body_center=[cx, cy], body_axes=[round(ax, 3), round(ay, 3)],
        lesion_center=[round(lx, 3), round(ly, 3)], lesion_radius_px=round(radius, 3),
        lesion_extent_px=round(extent, 3), diameter_cm=round(diameter_cm, 1), tissue_level=round(tissue, 2),
        contrast=round(contrast, 2),
    )
    return image, geometry


# ------------------------------------------------------------------------------------------------ image texts


def _describe(f: Finding, diameter_cm: float) -> dict:
    return dict(
        quadrant=QUADRANTS[f.quadrant],
        vertical="below" if f.lower else "above",
        horizontal="right" if f.right else "left",
        shape="irregular, lobulated" if f.irregular else "round, well-circumscribed",
        density="hyperdense" if f.hyperdense else "hypodense",
        brightness="brighter" if f.hyperdense else "darker",
        size=f"about {diameter_cm:.1f} cm across",
        size_class="over 5 cm" if f.large else "under 3 cm",
    )


def _short(option: str) -> str:
    """An option as a phrase inside a sentence: no parenthetical, lower-case first letter."""
    text = option.split(" (")[0]
    return text[0].lower() + text[1:]


def image_prompt(qtype: str, wording: int) -> str:
    questions, options = IMAGE_QUESTIONS[qtype]
    lines = [f"<image>{SCAN_CONTEXT} {questions[wording]}"]
    lines += [f"{LETTERS[i]}. {text}" for i, text in enumerate(options)]
    lines.append(INSTRUCTION)
    return "\n".join(lines)


def chosen_response(qtype: str, f: Finding, geometry: dict, rng: np.random.Generator) -> str:
    """Grounded reasoning: cites location, size, shape and density, checks itself, answers correctly.

    Concise on purpose (about 100 demo-tokenizer tokens): prompt + 64 image tokens + chosen fit the DPO demo's
    384-token rows without truncation."""
    d = _describe(f, geometry["diameter_cm"])
    cls = answer_class(qtype, f)
    opening = ["On the image", "In the scan", "Looking at the image"][int(rng.integers(3))]
    steps = [
        f"{opening}, one {d['shape']} lesion is {d['brightness']} than the tissue around it ({d['density']}).",
        f"It lies in the {d['quadrant']} quadrant, {d['size']} ({d['size_class']}).",
        f"Check: there is no second lesion, and option {LETTERS[cls]} fits every finding; the other options do not.",
    ]
    return "<think>\n" + "\n".join(steps) + f"\n</think>\nThe answer is {LETTERS[cls]}"


def rejected_response(qtype: str, f: Finding, geometry: dict, rng: np.random.Generator) -> str:
    """Hallucinated or ungrounded reasoning that answers wrongly (a wrong class of the asked attribute)."""
    cls = answer_class(qtype, f)
    wrong = (cls + int(rng.integers(1, 4))) % 4
    fake = finding_for(qtype, wrong, rng)
    # Keep the attributes the question does not ask about as they are; contradict the asked ones.
    if qtype == "location":
        fake = Finding(fake.quadrant, f.large, f.irregular, f.hyperdense)
    elif qtype == "appearance":
        fake = Finding(f.quadrant, f.large, fake.irregular, fake.hyperdense)
    else:
        fake = Finding(2 * f.lower + fake.right, fake.large, f.irregular, f.hyperdense)
    fake_cm = rng.uniform(5.6, 7.5) if fake.large else rng.uniform(1.2, 2.6)
    d = _describe(fake, fake_cm if fake.large != f.large else geometry["diameter_cm"])
    style = int(rng.integers(3))
    if style == 2:  # ungrounded: answers from a prior, never looks at the image
        steps = [
            "Focal lesions in questions like this are usually described this way, so I do not need to inspect "
            "the image in detail.",
            f"The most typical presentation is a {d['density']}, {d['shape']} lesion in the {d['quadrant']} "
            f"quadrant, {d['size_class']}.",
        ]
    else:
        steps = [
            f"The scan shows {'an' if fake.irregular else 'a'} {d['shape']} lesion that is {d['brightness']} "
            f"than the surrounding tissue ({d['density']}).",
            f"It is located in the {d['quadrant']} quadrant of the image and measures {d['size']}.",
        ]
        if style == 1:  # invented findings on top of the contradiction
            other = QUADRANTS[(fake.quadrant + 3) % 4]
            extra = [
                f"There is also a second, smaller nodule in the {other} quadrant.",
                "There is a thin rim of fluid along the body wall and an air-fluid level.",
                f"Several calcifications are scattered through the {other} quadrant.",
            ][int(rng.integers(3))]
            steps.append(extra)
    steps.append(f"This matches option {LETTERS[wrong]}.")
    return "<think>\n" + "\n".join(steps) + f"\n</think>\nThe answer is {LETTERS[wrong]}"


def short_answer(qtype: str, f: Finding, geometry: dict) -> str:
    """The multimodal SFT target: a brief grounded observation (every word in it is fixed or read from the image:
    quadrant, density, shape, size class), then the answer."""
    d = _describe(f, geometry["diameter_cm"])
    cls = answer_class(qtype, f)
    return (
        f"<think>\nThe lesion is in the {d['quadrant']} quadrant, {d['density']}, {d['shape']}, {d['size_class']}."
        f"\n</think>\nThe answer is {LETTERS[cls]}"
    )


# ------------------------------------------------------------------------------------------------ text questions


def _place(correct: str, distractors: list[str], letter: int, rng: np.random.Generator) -> list[str]:
    others = [distractors[i] for i in rng.permutation(len(distractors))]
    return others[:letter] + [correct] + others[letter:]


def text_hounsfield(rng, letter):
    classes = [("fat", -120, -70), ("simple fluid", 0, 15), ("soft tissue", 35, 65), ("calcification", 250, 900)]
    target = int(rng.integers(4))
    name, lo, hi = classes[target]
    value = int(rng.integers(lo, hi + 1))
    organ = ["liver", "kidney", "adrenal gland", "pancreas", "spleen"][int(rng.integers(5))]
    question = (
        f"A well-defined lesion in the {organ} has a mean attenuation of {value} HU on non-contrast CT. "
        "Which composition is most consistent with this value?"
    )
    reference = [(-150, -50), (0, 20), (20, 80), (200, 10_000)]
    margin = min(max(a - value, value - b) for j, (a, b) in enumerate(reference) if j != target)
    labels = ["Fat", "Simple fluid", "Soft tissue", "Calcification"]
    options = _place(labels[target], [l for i, l in enumerate(labels) if i != target], letter, rng)
    reasoning = [
        "Typical non-contrast CT attenuation: fat about -150 to -50 HU, simple fluid about 0 to 20 HU, "
        "soft tissue about 20 to 80 HU, calcification well above 200 HU.",
        f"The lesion measures {value} HU, which falls in the {name} range.",
        f"Check: {value} HU is at least {margin} HU away from every other range, so only {name} fits.",
    ]
    return question, options, labels[target], reasoning


def text_laterality(rng, letter):
    left_on_image, upper = bool(rng.integers(2)), bool(rng.integers(2))
    side = "right" if left_on_image else "left"
    surface = "anterior" if upper else "posterior"
    question = (
        f"On an axial CT image shown in the standard radiological convention (viewed from the patient's feet, "
        f"patient supine), a nodule appears on the viewer's {'left' if left_on_image else 'right'} side of the "
        f"image, in its {'upper' if upper else 'lower'} half. Where is the nodule in the patient?"
    )
    labels = [f"{s.capitalize()} side, {p}" for s in ("right", "left") for p in ("anterior", "posterior")]
    correct = f"{side.capitalize()} side, {surface}"
    options = _place(correct, [l for l in labels if l != correct], letter, rng)
    reasoning = [
        "In the radiological convention the patient's right is displayed on the viewer's left, and with the "
        "patient supine the top of an axial image is anterior.",
        f"The nodule is on the viewer's {'left' if left_on_image else 'right'}, so it is on the patient's {side}.",
        f"It is in the {'upper' if upper else 'lower'} half of the image, so it is {surface}.",
        f"Check: mirroring left and right is the usual pitfall; undoing it gives the patient's {side} side again.",
    ]
    return question, options, correct, reasoning


def text_measurement(rng, letter):
    pixels = int(rng.integers(12, 60))
    spacing = float(rng.choice([0.5, 0.6, 0.7, 0.75, 0.8, 0.9]))
    diameter = pixels * spacing
    question = (
        f"A round nodule spans {pixels} pixels across on a CT image with an in-plane pixel spacing of {spacing} mm. "
        "What is the nodule's diameter?"
    )
    correct = f"{diameter:.1f} mm"
    distractors = [f"{diameter / 10:.2f} mm", f"{diameter / 2:.1f} mm", f"{pixels / spacing:.1f} mm"]
    options = _place(correct, distractors, letter, rng)
    reasoning = [
        "A length on the image equals the number of pixels times the pixel spacing.",
        f"Diameter = {pixels} x {spacing} mm = {diameter:.1f} mm.",
        f"Check: {diameter:.1f} mm is {diameter / 10:.2f} cm; halving it would give the radius, and dividing by "
        "the spacing would confuse the units, so the other values come from mistakes.",
    ]
    return question, options, correct, reasoning


def text_anion_gap(rng, letter):
    elevated = bool(rng.integers(2))
    while True:
        sodium = int(rng.integers(134, 146))
        gap = int(rng.integers(17, 27)) if elevated else int(rng.integers(8, 13))
        bicarbonate = int(rng.integers(8, 20)) if elevated else int(rng.integers(21, 29))
        chloride = sodium - gap - bicarbonate
        if 95 <= chloride <= 112:
            break
    question = (
        f"A patient's serum sodium is {sodium} mmol/L, chloride {chloride} mmol/L and bicarbonate {bicarbonate} "
        "mmol/L. Using a reference range of 8 to 12 mmol/L, what is the anion gap?"
    )
    verdict = "elevated" if elevated else "normal"
    correct = f"{gap} mmol/L, {verdict}"
    distractors = [
        f"{gap} mmol/L, {'normal' if elevated else 'elevated'}",
        f"{sodium - chloride} mmol/L, elevated",
        f"{sodium + bicarbonate - chloride} mmol/L, elevated",
    ]
    options = _place(correct, distractors, letter, rng)
    reasoning = [
        "Anion gap = sodium - (chloride + bicarbonate).",
        f"= {sodium} - ({chloride} + {bicarbonate}) = {sodium} - {chloride + bicarbonate} = {gap} mmol/L.",
        f"{gap} is {'above' if elevated else 'within'} the 8 to 12 mmol/L range, so it is {verdict}.",
        "Check: leaving out bicarbonate or adding it instead of subtracting gives the other, larger values.",
    ]
    return question, options, correct, reasoning


def text_bmi(rng, letter):
    categories = [
        ("Underweight", 15.5, 17.8), ("Normal weight", 19.5, 24.0), ("Overweight", 25.8, 29.2), ("Obese", 31.0, 38.0)
    ]
    target = int(rng.integers(4))
    name, lo, hi = categories[target]
    height = round(float(rng.uniform(1.50, 1.95)), 2)
    weight = int(round(rng.uniform(lo, hi) * height * height))
    bmi = weight / (height * height)
    question = f"An adult weighs {weight} kg and is {height:.2f} m tall. Which WHO body-mass-index category applies?"
    labels = [c[0] for c in categories]
    options = _place(name, [l for l in labels if l != name], letter, rng)
    reasoning = [
        f"BMI = weight / height^2 = {weight} / ({height:.2f} x {height:.2f}) = {weight} / {height * height:.2f} "
        f"= {bmi:.1f} kg/m^2.",
        "WHO categories: under 18.5 underweight, 18.5 to 24.9 normal weight, 25 to 29.9 overweight, 30 or more obese.",
        f"Check: {bmi:.1f} is not near a category boundary, so the category is {name.lower()}.",
    ]
    return question, options, name, reasoning


TEXT_FAMILIES = {
    "hounsfield": text_hounsfield,
    "laterality": text_laterality,
    "measurement": text_measurement,
    "anion_gap": text_anion_gap,
    "bmi": text_bmi,
}


# ------------------------------------------------------------------------------------------------ writing


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _balanced(n: int, radices: tuple[int, ...], seed: int, stream: int) -> list[tuple[int, ...]]:
    """n index tuples (digit i < radices[i]) cycling through every combination equally often, seeded shuffle."""
    combos = []
    for k in range(n):
        digits = []
        for radix in radices:
            digits.append(k % radix)
            k //= radix
        combos.append(tuple(digits))
    order = np.random.default_rng([seed, stream, 7_777_777]).permutation(n)
    return [combos[i] for i in order]


def _text_records(n: int, seed: int, stream: int, split: str) -> tuple[list[dict], list[dict]]:
    sft, mcq = [], []
    names = list(TEXT_FAMILIES)
    for i, (family, letter) in enumerate(_balanced(n, (len(names), 4), seed, stream)):
        rng = _rng(seed, stream, i)
        question, options, correct, reasoning = TEXT_FAMILIES[names[family]](rng, letter)
        answer = LETTERS[options.index(correct)]
        prompt = "\n".join([question] + [f"{LETTERS[j]}. {o}" for j, o in enumerate(options)] + [INSTRUCTION])
        reasoning = reasoning + [f"So the answer is option {answer}."]
        response = "<think>\n" + "\n".join(reasoning) + f"\n</think>\nThe answer is {answer}"
        sft.append({"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": response}]})
        mcq.append(
            {"id": f"text-{split}-{i:05d}", "question": question, "options": dict(zip(LETTERS, options)),
             "answer": answer, "images": [], "subset": names[family]}
        )
    return sft, mcq


def _image_records(n, seed, stream, split, images_dir, image_size):
    pairs, mm_sft, mcq, findings = [], [], [], []
    lo, hi = image_size
    for i, (qt, cls, wording) in enumerate(_balanced(n, (len(QUESTION_TYPES), 4, 2), seed, stream)):
        rng = _rng(seed, stream, i)
        qtype = QUESTION_TYPES[qt]
        finding = finding_for(qtype, cls, rng)
        width = int(rng.integers(lo, hi + 1))
        height = max(lo, int(round(width * rng.uniform(0.9, 1.0))))
        pixels, geometry = render_scan(rng, height, width, finding)
        rel = f"images/{split}_{i:05d}.png"
        Image.fromarray(pixels, "L").save(images_dir / Path(rel).name, format="PNG", optimize=False)
        prompt = image_prompt(qtype, wording)
        chosen = chosen_response(qtype, finding, geometry, rng)
        rejected = rejected_response(qtype, finding, geometry, rng)
        answer = LETTERS[cls]
        human = {"from": "human", "value": prompt}
        pairs.append(
            {"conversations": [human], "chosen": {"from": "gpt", "value": chosen},
             "rejected": {"from": "gpt", "value": rejected}, "images": [rel]}
        )
        target = {"from": "gpt", "value": short_answer(qtype, finding, geometry)}
        mm_sft.append({"conversations": [human, target], "images": [rel]})
        questions, options = IMAGE_QUESTIONS[qtype]
        mcq.append(
            {"id": f"image-{split}-{i:05d}", "question": f"{SCAN_CONTEXT} {questions[wording]}",
             "options": dict(zip(LETTERS, options)), "answer": answer, "images": [rel], "subset": qtype}
        )
        findings.append(
            {"image": rel, "question_type": qtype, "answer": answer, "quadrant": QUADRANTS[finding.quadrant],
             "large": finding.large, "irregular": finding.irregular, "hyperdense": finding.hyperdense, **geometry}
        )
    return pairs, mm_sft, mcq, findings


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


FILES = (
    "sft_train", "sft_eval", "dpo_train", "dpo_eval", "mm_sft_train", "mm_sft_eval",
    "mcq_text_eval", "mcq_image_eval", "findings",
)


def demo_paths(out_dir: str | os.PathLike) -> dict[str, Path]:
    """The paths `generate_demo(out_dir)` writes, keyed by name (plus "root", "images" and "manifest")."""
    root = Path(out_dir)
    paths = {name: root / f"{name}.jsonl" for name in FILES}
    paths.update(root=root, images=root / "images", manifest=root / "manifest.json")
    return paths


def generate_demo(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    num_sft: int = 240,
    num_pairs: int = 240,
    num_eval: int = 60,
    image_size: tuple[int, int] = (128, 224),
) -> dict[str, Path]:
    """Write the synthetic demo set into `out_dir` (replacing it) and return `demo_paths(out_dir)`.

    num_sft text-only Stage-I records (+ num_eval held out), num_pairs image cases written as DPO pairs and as
    multimodal SFT (+ num_eval held out), images `image_size[0]`..`image_size[1]` px wide. Multiples of 60 (text)
    and 24 (images) keep every kind x answer letter (x wording) combination exactly balanced. Files are built in a
    temporary folder beside `out_dir` and moved into place, so an interrupted run leaves no half-written dataset.
    """
    if min(num_sft, num_pairs, num_eval) < 1:
        raise ValueError("num_sft, num_pairs and num_eval must be at least 1")
    if not 32 <= image_size[0] <= image_size[1]:
        raise ValueError(f"image_size must be (min, max) widths with 32 <= min <= max, got {image_size}")
    root = Path(out_dir)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        images = staging / "images"
        images.mkdir()
        sft_train, _ = _text_records(num_sft, seed, 1, "train")
        sft_eval, mcq_text = _text_records(num_eval, seed, 2, "eval")
        dpo_train, mm_train, _, found_train = _image_records(num_pairs, seed, 3, "train", images, image_size)
        dpo_eval, mm_eval, mcq_image, found_eval = _image_records(num_eval, seed, 4, "eval", images, image_size)
        outputs = {
            "sft_train": sft_train, "sft_eval": sft_eval, "dpo_train": dpo_train, "dpo_eval": dpo_eval,
            "mm_sft_train": mm_train, "mm_sft_eval": mm_eval, "mcq_text_eval": mcq_text,
            "mcq_image_eval": mcq_image, "findings": found_train + found_eval,
        }
        for name, records in outputs.items():
            _write_jsonl(staging / f"{name}.jsonl", records)
        manifest = {
            "format_version": FORMAT_VERSION, "seed": seed, "num_sft": num_sft, "num_pairs": num_pairs,
            "num_eval": num_eval, "image_size": list(image_size),
            "counts": {name: len(records) for name, records in outputs.items()},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return demo_paths(root)


def ensure_demo(out_dir: str | os.PathLike, **kwargs) -> dict[str, Path]:
    """`generate_demo(out_dir, **kwargs)` unless `out_dir` already holds a demo made with the same parameters."""
    paths = demo_paths(out_dir)
    try:
        manifest = json.loads(paths["manifest"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    defaults = dict(seed=0, num_sft=240, num_pairs=240, num_eval=60, image_size=(128, 224))
    wanted = {**defaults, **kwargs}
    wanted["image_size"] = list(wanted["image_size"])
    if manifest is not None and manifest.get("format_version") == FORMAT_VERSION and all(
        manifest.get(k) == v for k, v in wanted.items()
    ) and all(paths[name].exists() for name in FILES):
        return paths
    return generate_demo(out_dir, **kwargs)
