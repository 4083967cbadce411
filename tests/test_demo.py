"""The synthetic demo set: determinism, counts, format, no answer leakage, and findings really in the pixels."""

import collections
import json
import re

import numpy as np
import pytest
from PIL import Image

from medee_jax.data.demo import FIELD_OF_VIEW_CM, QUADRANTS, ensure_demo, generate_demo
from medee_jax.data.images import load_image, qwen2_vl_preprocess

SMALL = dict(num_sft=20, num_pairs=24, num_eval=12)
ANSWER = re.compile(r"\nThe answer is ([A-D])$")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def file_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def final_letter(text):
    match = ANSWER.search(text)
    assert match, text[-80:]
    return match.group(1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default-size demo, generated once."""
    return generate_demo(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture(scope="module")
def image_cases(demo):
    """(pair record, mcq record, findings row) for every image case, train then eval."""
    pairs = read_jsonl(demo["dpo_train"]) + read_jsonl(demo["dpo_eval"])
    findings = read_jsonl(demo["findings"])
    mcq = {r["images"][0]: r for r in read_jsonl(demo["mcq_image_eval"])}
    assert [p["images"] for p in pairs] == [[f["image"]] for f in findings]
    return [(p, mcq.get(f["image"]), f) for p, f in zip(pairs, findings)]


def test_same_seed_same_bytes(tmp_path):
    a = file_bytes(generate_demo(tmp_path / "a", seed=3, **SMALL)["root"])
    b = file_bytes(generate_demo(tmp_path / "b", seed=3, **SMALL)["root"])
    assert a.keys() == b.keys() and a == b
    c = file_bytes(generate_demo(tmp_path / "c", seed=4, **SMALL)["root"])
    assert c["dpo_train.jsonl"] != a["dpo_train.jsonl"] and c["images/train_00000.png"] != a["images/train_00000.png"]


def test_counts(demo):
    expected = {
        "sft_train": 240, "sft_eval": 60, "dpo_train": 240, "dpo_eval": 60, "mm_sft_train": 240,
        "mm_sft_eval": 60, "mcq_text_eval": 60, "mcq_image_eval": 60, "findings": 300,
    }
    for name, count in expected.items():
        assert len(read_jsonl(demo[name])) == count, name
    assert len(list(demo["images"].glob("*.png"))) == 300
    assert json.loads(demo["manifest"].read_text())["counts"] == expected


def test_placeholders_match_images(demo):
    for name in ("sft_train", "sft_eval"):
        for record in read_jsonl(demo[name]):
            assert "images" not in record
            assert all("<image>" not in turn["value"] for turn in record["conversations"])
            assert [t["from"] for t in record["conversations"]] == ["human", "gpt"]
    for name in ("dpo_train", "dpo_eval", "mm_sft_train", "mm_sft_eval"):
        for record in read_jsonl(demo[name]):
            text = "".join(turn["value"] for turn in record["conversations"])
            assert text.count("<image>") == len(record["images"]) == 1
            assert (demo["root"] / record["images"][0]).is_file()
            for key in ("chosen", "rejected"):
                if key in record:
                    assert record[key]["from"] == "gpt" and "<image>" not in record[key]["value"]


def test_chosen_correct_rejected_wrong(image_cases):
    for pair, mcq, finding in image_cases:
        chosen, rejected = pair["chosen"]["value"], pair["rejected"]["value"]
        assert chosen != rejected
        for text in (chosen, rejected):
            assert text.startswith("<think>\n") and "\n</think>\n" in text
        assert final_letter(chosen) == finding["answer"]
        assert final_letter(rejected) != finding["answer"]
        if mcq is not None:
            assert mcq["answer"] == finding["answer"] and mcq["subset"] == finding["question_type"]
        # chosen cites every attribute of the visible finding and checks itself
        assert f"{finding['quadrant']} quadrant" in chosen and "Check:" in chosen
        assert ("hyperdense" if finding["hyperdense"] else "hypodense") in chosen
        assert ("irregular" if finding["irregular"] else "round") in chosen
        assert f"about {finding['diameter_cm']:.1f} cm" in chosen


def test_answer_not_recoverable_from_prompt(demo):
    for split in ("train", "eval"):
        prompts = [r["conversations"][0]["value"] for r in read_jsonl(demo[f"dpo_{split}"])]
        answers = [final_letter(r["conversations"][1]["value"]) for r in read_jsonl(demo[f"mm_sft_{split}"])]
        by_prompt = collections.defaultdict(collections.Counter)
        for prompt, answer in zip(prompts, answers):
            by_prompt[prompt][answer] += 1
        # 3 question types x 2 fixed wordings; each prompt string is shared by all four answers
        assert len(by_prompt) == 6
        assert all(len(counter) == 4 for counter in by_prompt.values())
        # the best text-only guesser (majority answer per prompt) is at chance
        best = sum(max(counter.values()) for counter in by_prompt.values()) / len(prompts)
        assert best <= 0.35, best
        assert set(collections.Counter(answers).values()) == {len(answers) // 4}
    text_records = read_jsonl(demo["sft_train"])
    text_letters = collections.Counter(final_letter(r["conversations"][1]["value"]) for r in text_records)
    assert set(text_letters.values()) == {60}


def test_finding_is_in_the_pixels_where_stated(demo, image_cases):
    """Pixels that differ strongly from the tissue lie in the quadrant the chosen answer names, and nowhere else."""
    for pair, _, finding in image_cases:
        chosen = pair["chosen"]["value"]
        stated_quadrant = re.search(r"in the (\S+) quadrant", chosen).group(1)
        hyper = "(hyperdense)" in chosen
        stated_cm = float(re.search(r"about ([\d.]+) cm across", chosen).group(1))
        pixels = np.asarray(Image.open(demo["root"] / pair["images"][0]), np.float32)  # [H, W]
        height, width = pixels.shape
        (cx, cy), (ax, ay) = finding["body_center"], finding["body_axes"]
        yy, xx = np.mgrid[0:height, 0:width] + 0.5
        interior = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 0.88**2
        baseline = np.median(pixels[interior])
        abnormal = interior & ((pixels > baseline + 35) if hyper else (pixels < baseline - 35))
        counts = {}
        for q, name in enumerate(QUADRANTS):
            rows = yy >= height / 2 if q >= 2 else yy < height / 2
            cols = xx >= width / 2 if q % 2 else xx < width / 2
            counts[name] = int((abnormal & rows & cols).sum())
        stated_px_area = np.pi * (stated_cm / 2 * width / FIELD_OF_VIEW_CM) ** 2
        assert 0.5 * stated_px_area <= counts[stated_quadrant] <= 1.5 * stated_px_area, (counts, stated_px_area)
        assert all(count == 0 for name, count in counts.items() if name != stated_quadrant), counts
        # the opposite density is absent everywhere
        opposite = interior & ((pixels < baseline - 35) if hyper else (pixels > baseline + 35))
        assert opposite.sum() == 0


def test_text_questions_answerable_from_text(demo):
    """Recompute every Stage-I answer from the question text alone."""
    for record in read_jsonl(demo["mcq_text_eval"]):
        q, options, family = record["question"], record["options"], record["subset"]
        numbers = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", q)]
        if family == "bmi":
            bmi = numbers[0] / numbers[1] ** 2
            category = int(np.searchsorted([18.5, 25, 30], bmi))
            expected = ["Underweight", "Normal weight", "Overweight", "Obese"][category]
        elif family == "anion_gap":
            sodium, chloride, bicarbonate = numbers[:3]
            gap = int(sodium - chloride - bicarbonate)
            expected = f"{gap} mmol/L, {'elevated' if gap > 12 else 'normal'}"
        elif family == "measurement":
            expected = f"{numbers[0] * numbers[1]:.1f} mm"
        elif family == "hounsfield":
            hu = numbers[0]
            expected = ["Fat", "Simple fluid", "Soft tissue", "Calcification"][int(np.searchsorted([-50, 20, 80], hu))]
        else:
            assert family == "laterality"
            side = "Right" if "viewer's left" in q else "Left"
            expected = f"{side} side, {'anterior' if 'upper half' in q else 'posterior'}"
        assert options[record["answer"]] == expected, (q, options, record["answer"])
    for record in read_jsonl(demo["sft_train"]):
        prompt, response = (turn["value"] for turn in record["conversations"])
        assert "So the answer is option " + final_letter(response) in response


def test_images_load_and_preprocess(demo):
    paths = sorted(demo["images"].glob("*.png"))[:4]
    images = [load_image(p) for p in paths]
    assert all(im.mode == "RGB" for im in images)
    pixels, grid = qwen2_vl_preprocess(images, 56 * 56, 224 * 224)
    assert pixels.shape == (int(grid.prod(axis=1).sum()), 1176)


def test_ensure_demo_reuses_and_regenerates(tmp_path):
    first = ensure_demo(tmp_path / "d", **SMALL)
    stamp = first["dpo_train"].stat().st_mtime_ns
    again = ensure_demo(tmp_path / "d", **SMALL)
    assert again["dpo_train"].stat().st_mtime_ns == stamp
    changed = ensure_demo(tmp_path / "d", seed=1, **SMALL)
    assert json.loads(changed["manifest"].read_text())["seed"] == 1
