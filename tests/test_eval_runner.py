"""run_evaluation with an injected fake generator: metrics, blind controls, reports, resume after interruption."""

import json

import pytest
from PIL import Image

from medee_jax.data.demo import generate_demo
from medee_jax.evaluation.generation import Sampling
from medee_jax.evaluation.readers import read_mc_jsonl
from medee_jax.evaluation.runner import EvalSettings, run_evaluation
from tests.eval_fixtures import FakeGenerator


@pytest.fixture(scope="module")
def demo_items(tmp_path_factory):
    paths = generate_demo(tmp_path_factory.mktemp("demo") / "demo", num_sft=2, num_pairs=2, num_eval=12,
                          image_size=(48, 64))
    return read_mc_jsonl(paths["mcq_image_eval"]) + read_mc_jsonl(paths["mcq_text_eval"])


def image_reader(items):
    """A fake model that reads the answer off the image: right with the item's own image, "A" with a blank one,
    the donor's answer with a shuffled one; text items are answered right."""
    by_image = {item.images[0].sha256(): item.answer for item in items if item.images}
    by_question = {item.question: item.answer for item in items}

    def answer_of(request, k):
        if not request.images:
            return next(a for q, a in by_question.items() if q in request.messages[-1][1])
        return by_image.get(request.images[0].sha256(), "A")

    return answer_of


def test_standard_and_blind_accuracy(demo_items, tmp_path):
    image_items = [i for i in demo_items if i.images]
    settings = EvalSettings(style="cot", batch_size=5, show_progress=False)
    fake = FakeGenerator(image_reader(demo_items))
    results = run_evaluation(demo_items, fake, settings, str(tmp_path), model_id="fake")
    standard = results["conditions"]["standard"]
    assert standard["all"]["accuracy"] == 1.0 and standard["all"]["items"] == len(demo_items)
    assert standard["all"]["parse_failure_rate"] == 0.0
    blank_expected = sum(i.answer == "A" for i in image_items) / len(image_items)
    blank = results["blind"]["mc_jsonl"]["blank"]
    assert blank == {"items": len(image_items), "standard": 1.0, "accuracy": pytest.approx(blank_expected),
                     "drop": pytest.approx(1.0 - blank_expected)}
    shuffled = results["blind"]["mc_jsonl"]["shuffled"]
    assert shuffled["items"] == len(image_items) and shuffled["accuracy"] < 1.0
    assert set(results["conditions"]) == {"standard", "blank", "shuffled"}
    # samples: every item once, plus each image item blank and shuffled; identical requests are generated once
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(demo_items) + 2 * len(image_items)
    assert fake.requests == len({(s["prompt_sha256"], tuple(s["image_sha256"])) for s in samples})
    first = samples[0]
    assert set(first) >= {"condition", "id", "prompt_sha256", "image_sha256", "output", "parsed", "rule", "correct",
                          "finish_reason"}
    assert first["rule"] == "answer_is" and first["finish_reason"] == "stop" and len(first["image_sha256"]) == 1
    blank_rows = [s for s in samples if s["condition"] == "blank"]
    assert all(s["prompt_sha256"] == next(t["prompt_sha256"] for t in samples if t["id"] == s["id"]
                                          and t["condition"] == "standard") for s in blank_rows)
    table = (tmp_path / "results.md").read_text()
    assert "| all | fake | 24 | 100.0 | 0.0 |" in table
    with Image.open(tmp_path / "results.png") as chart:
        assert chart.size == (1040, 320)


def test_scaling_with_samples(demo_items, tmp_path):
    items = [i for i in demo_items if not i.images][:6]

    def two_of_four(request, k):  # samples 0 and 2 right, 1 and 3 wrong
        truth = next(i.answer for i in items if i.question in request.messages[-1][1])
        return truth if k % 2 == 0 else "ABCD"[("ABCD".index(truth) + 1) % 4]

    settings = EvalSettings(style="direct", sampling=Sampling(n_samples=4, temperature=0.7), show_progress=False)
    results = run_evaluation(items, FakeGenerator(two_of_four), settings, str(tmp_path), model_id="m")
    scaling = results["conditions"]["standard"]["all"]["scaling"]
    # per item answers [T, W, T, W]: maj@2 blocks [T,W] tie -> 1/2; pass@1 = 2/4; pass@2 = 1 - C(2,2)/C(4,2) = 5/6
    assert scaling["1"] == {"mean": 1.0, "maj": 0.5, "pass": 0.5}
    assert scaling["2"] == pytest.approx({"mean": 0.5, "maj": 0.5, "pass": 5 / 6})
    assert scaling["4"] == pytest.approx({"mean": 0.5, "maj": 0.5, "pass": 1.0})
    assert "blank" not in results["conditions"]  # text-only items: nothing to blind


def test_resume_after_interruption_gives_the_same_results(demo_items, tmp_path):
    settings = EvalSettings(style="cot", batch_size=4, show_progress=False, sampling=Sampling(n_samples=2,
                                                                                           temperature=0.5))
    whole = FakeGenerator()
    run_evaluation(demo_items, whole, settings, str(tmp_path / "whole"), model_id="m")

    with pytest.raises(KeyboardInterrupt):
        run_evaluation(demo_items, FakeGenerator(interrupt_after=3), settings, str(tmp_path / "resumed"), model_id="m")
    assert not (tmp_path / "resumed/results.json").exists()
    with open(tmp_path / "resumed/generations.jsonl", "a") as f:
        f.write('{"key": "cut short by the interruption')  # a half-written line
    rest = FakeGenerator()
    run_evaluation(demo_items, rest, settings, str(tmp_path / "resumed"), model_id="m")
    assert rest.requests == whole.requests - 3 * 4  # the three finished batches were not generated again
    assert (tmp_path / "resumed/results.json").read_bytes() == (tmp_path / "whole/results.json").read_bytes()
    assert (tmp_path / "resumed/samples.jsonl").read_bytes() == (tmp_path / "whole/samples.jsonl").read_bytes()

    again = FakeGenerator()
    run_evaluation(demo_items, again, settings, str(tmp_path / "resumed"), model_id="m")
    assert again.calls == 0
    other_model = FakeGenerator()
    run_evaluation(demo_items, other_model, settings, str(tmp_path / "resumed"), model_id="other")
    assert other_model.requests == whole.requests  # the model identity is part of the key


def test_medxpertqa_two_turn_protocol(demo_items, tmp_path):
    items = [i for i in demo_items if not i.images][:3]
    seen = []

    def generate(requests, *, n_samples, temperature, top_p, max_new_tokens, seed):
        out = []
        for r in requests:
            seen.append(r.messages)
            if r.messages[-1][1].startswith("Therefore"):
                out.append([("C.", "stop")] * n_samples)
            else:
                out.append([("Step 1 ... the evidence points one way.", "length")] * n_samples)
        return out

    settings = EvalSettings(style="medxpertqa_cot", blind_controls=False, show_progress=False)
    run_evaluation(items, generate, settings, str(tmp_path), model_id="m")
    first, second = seen[0], seen[len(items)]
    assert first[0] == ("system", "You are a helpful medical assistant.")
    assert first[1][1].startswith("Q: ") and first[1][1].endswith("\nA: Let's think step by step.")
    assert "\nAnswer Choices: (A) " in first[1][1]
    assert second[:2] == first and second[2] == ("assistant", "Step 1 ... the evidence points one way.")
    assert second[3] == ("user", "Therefore, among A through D, the answer is")
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["parsed"] for s in samples] == ["C"] * 3 and samples[0]["reasoning"].startswith("Step 1")
    assert samples[0]["finish_reason"] == "stop"
