"""The pair rule on hand-computed scores, the rules judge on hand-written responses, and the rubric parser."""

import pytest

from medee_jax.pairs.candidates import Case, options_from_prompt
from medee_jax.pairs.rubric import MalformedReply, mean_score, parse_criteria, parse_scores
from medee_jax.pairs.rules_judge import judge_response, signals
from medee_jax.pairs.select import Scored, select_pair


def s(index, mean, correct=True, length=100):
    return Scored(index, mean, correct, length)


def test_pair_rule_hand_computed():
    # chosen: best mean among the correct ones (index 1: 7.5, not the wrong index 2 with 9.0); rejected: lowest
    assert select_pair([s(0, 6.0), s(1, 7.5), s(2, 9.0, False), s(3, 2.25, False)]) == (1, 3)
    assert select_pair([s(0, 9.0, False), s(1, 2.0, False)]) == "no_correct_response"
    assert select_pair([s(0, 9.0, None), s(1, 2.0, None)]) == (0, 1)  # no reference answer: no correctness gate
    assert select_pair([s(0, 9.0, False), s(1, 2.0, False)], require_correct=False) == (0, 1)
    assert select_pair([s(0, 7.0), s(1, 7.0, False)]) == "tie"
    assert select_pair([s(0, 7.0), s(1, 6.25, False)]) == "margin_below_min"  # 0.75 < 1.0
    assert select_pair([s(0, 7.0), s(1, 6.0, False)]) == (0, 1)  # exactly the margin
    assert select_pair([s(0, 7.0), s(1, 6.25, False)], min_margin=0.5) == (0, 1)
    assert select_pair([s(0, 5.0), s(1, 8.0, False)]) == "margin_below_min"  # a wrong answer scored higher
    assert select_pair([s(0, 8.0)]) == "too_few_judged"
    # ties at the top / bottom: the first in response order
    assert select_pair([s(0, 3.0, False), s(1, 8.0), s(2, 8.0), s(3, 3.0, False)]) == (1, 0)
    # length balancing: the 1000-char response is too long next to a 100-char chosen one at ratio 2
    pool = [s(0, 9.0, True, 100), s(1, 1.0, False, 1000), s(2, 4.0, False, 150)]
    assert select_pair(pool) == (0, 1)
    assert select_pair(pool, length_ratio=2.0) == (0, 2)
    assert select_pair([s(0, 9.0, True, 100), s(1, 1.0, False, 1000)], length_ratio=2.0) == "length_unbalanced"


OPTIONS = ("The upper-left quadrant of the image", "The upper-right quadrant of the image",
           "The lower-left quadrant of the image", "The lower-right quadrant of the image")
PROMPT = ("<image>This is an axial grayscale scan. Where is the focal lesion in this scan?\n"
          + "\n".join(f"{L}. {o}" for L, o in zip("ABCD", OPTIONS)) + "\nReason step by step.")
CASE = Case(id="c", conversations=({"from": "human", "value": PROMPT},), images=("/x.png",), answer="B",
            options=OPTIONS, responses=())

GROUNDED = ("<think>\nLooking at the image, there is a round, well-circumscribed hyperdense lesion above the "
            "horizontal midline and to the right of the vertical midline, in the upper-right quadrant. It measures "
            "about 2.4 cm across.\nChecking again: the other quadrants show only homogeneous tissue, which rules out "
            "the other options.\nOption B agrees with every observation.\n</think>\nThe answer is B")
HALLUCINATED = ("<think>\nThe scan shows an irregular, lobulated lesion that is darker than the surrounding tissue "
                "(hypodense). It is located in the lower-left quadrant and measures about 6.1 cm. There is also a "
                "second, smaller nodule in the upper-left quadrant.\nThis matches option C.\n</think>\nThe answer is C")
CONTRADICTING = ("<think>\nThe lesion is hyperdense and in the upper-right quadrant, about 2 cm. This matches option B."
                 "\n</think>\nThe answer is D")
UNGROUNDED = ("<think>\nFocal lesions in questions like this are usually described this way, so I do not need to "
              "inspect the image in detail.\n</think>\nThe answer is B")


def test_rules_judge_orders_the_hand_written_responses():
    grounded, hallucinated = judge_response(CASE, GROUNDED), judge_response(CASE, HALLUCINATED)
    contradicting, ungrounded = judge_response(CASE, CONTRADICTING), judge_response(CASE, UNGROUNDED)
    assert grounded["scores"] == {"logical_consistency": 10, "image_grounding": 10, "no_hallucination": 9,
                                  "reflection": 8}
    assert hallucinated["scores"] == {"logical_consistency": 7, "image_grounding": 10, "no_hallucination": 3,
                                      "reflection": 2}
    assert signals(CASE, CONTRADICTING)["contradiction"] is True
    assert contradicting["scores"] == {"logical_consistency": 1, "image_grounding": 10, "no_hallucination": 1,
                                       "reflection": 2}
    assert ungrounded["scores"]["image_grounding"] == 1 and ungrounded["scores"]["no_hallucination"] == 9
    everything = parse_criteria("all")
    means = [mean_score(r["scores"], everything) for r in (grounded, hallucinated, contradicting, ungrounded)]
    assert means == [9.25, 5.5, 3.5, 5.5]  # ungrounded: (10 + 1 + 9 + 2) / 4
    assert "contradiction=True" in contradicting["rationale"]
    assert signals(CASE, "The answer is B")["well_formed"] is False


def test_per_criterion_ablation_changes_the_mean_only():
    scores = {"logical_consistency": 10, "image_grounding": 2, "no_hallucination": 6, "reflection": 4}
    assert mean_score(scores, parse_criteria("all")) == 5.5
    assert mean_score(scores, parse_criteria("image_grounding,reflection")) == 3.0
    with pytest.raises(ValueError, match="unknown"):
        parse_criteria("grounding")


def test_rubric_reply_parsing():
    good = '{"logical_consistency": 8, "image_grounding": 7, "no_hallucination": 9, "reflection": 5, "rationale": "ok"}'
    assert parse_scores(good)["scores"]["image_grounding"] == 7
    assert parse_scores(f"```json\n{good}\n```")["rationale"] == "ok"
    for bad in ("The answer looks fine.", good[:-5], good.replace("7", "11"), good.replace("7", '"7"'),
                good.replace("7", "7.5"), "[1, 2]", f"Here you go: {good}"):
        with pytest.raises(MalformedReply):
            parse_scores(bad)


def test_options_from_prompt():
    assert options_from_prompt([{"from": "human", "value": PROMPT}]) == OPTIONS
    assert options_from_prompt([{"from": "human", "value": "No options here."}]) == ()


def test_model_judge_retries_a_malformed_reply(tmp_path):
    from medee_jax.evaluation.cache import JsonlCache
    from medee_jax.pairs.model_judge import ModelJudge

    good = '{"logical_consistency": 8, "image_grounding": 7, "no_hallucination": 9, "reflection": 5, "rationale": "ok"}'
    calls = []

    def generate(requests, *, n_samples, temperature, top_p, max_new_tokens, seed):
        calls.append((len(requests), temperature))
        # greedy: prose for the second response; the retry (another seed, temperature 0.7) answers properly
        return [[(good if temperature > 0 or "[ok]" in r.messages[-1][1] else "Looks fine to me.", "stop")]
                for r in requests]

    case = Case(id="c", conversations=({"from": "human", "value": PROMPT},), images=(), answer="B", options=OPTIONS,
                responses=())
    judge = ModelJudge(generate, "m", JsonlCache(tmp_path / "judge.jsonl"), max_retries=1)
    results = judge.judge([(case, "[ok] The answer is B"), (case, "The answer is C")])
    assert [r["scores"]["reflection"] for r in results] == [5, 5]
    assert calls == [(2, 0.0), (1, 0.7)]
    system, user = judge.request(case, "x", 0).messages
    assert system[0] == "system" and "The reference (correct) final answer is: B. The upper-right" in system[1]

    def never(requests, **kw):
        return [[("no JSON here", "stop")] for _ in requests]

    failed = ModelJudge(never, "m2", JsonlCache(tmp_path / "judge2.jsonl"), max_retries=2).judge([(case, "x")])
    assert failed[0]["failure"] == "malformed_scores"
