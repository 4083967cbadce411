"""The MMRP judging rubric (four criteria, 1-10 each), the judge prompt, and parsing the judge's reply.

Criteria (MedE², Multimodal Medical Reasoning Preference): logical_consistency, image_grounding (the reasoning
uses visible findings: location, named signs, measurements), no_hallucination (no invented findings or facts),
reflection (re-examines the evidence, rules out alternatives). The judge must answer with exactly one JSON object
`{"logical_consistency": n, "image_grounding": n, "no_hallucination": n, "reflection": n, "rationale": "..."}`,
bare or inside a ```json fence; anything else is a malformed reply (`MalformedReply`), never a made-up score.

The judge is always asked for all four criteria, so one judging pass serves every per-criterion ablation:
`judge.criteria` chooses which of them count in a response's mean score (`mean_score`).
"""

from __future__ import annotations

import json
import re

CRITERIA = ("logical_consistency", "image_grounding", "no_hallucination", "reflection")
RUBRIC_VERSION = "mmrp-v1"

RUBRIC = """You are an expert physician grading one answer to a medical case that may include images.
Score the answer from 1 (worst) to 10 (best) on each criterion:
- logical_consistency: every step follows from the previous ones and from the evidence; the final answer agrees with the reasoning; no step contradicts another.
- image_grounding: the reasoning rests on specific findings visible in the image(s) (location, named signs, sizes, densities) rather than on priors; score 1 if the image is ignored.
- no_hallucination: no invented findings, measurements or facts; nothing is claimed that the image(s) or the case do not show.
- reflection: the answer re-examines its evidence, checks itself and rules out the alternatives before concluding.
{reference}Reply with exactly one JSON object and nothing else:
{{"logical_consistency": n, "image_grounding": n, "no_hallucination": n, "reflection": n, "rationale": "one or two sentences"}}"""


class MalformedReply(ValueError):
    """The judge's reply is not exactly one rubric JSON object with four integer scores in 1..10."""


def rubric_text(reference_answer: str | None) -> str:
    reference = (f"The reference (correct) final answer is: {reference_answer}. An answer whose final answer "
                 "differs cannot score above 3 on logical_consistency.\n") if reference_answer else ""
    return RUBRIC.format(reference=reference)


def case_text(prompt_turns: list[dict], response: str) -> str:
    """The case and the answer to grade, as plain text (`<image>` marks where the case's images are)."""
    lines = ["# Case"]
    for turn in prompt_turns:
        lines.append(f"[{turn['role']}] {turn['content']}")
    lines += ["", "# Answer to grade", response]
    return "\n".join(lines)


_FENCE_RE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL | re.IGNORECASE)


def parse_scores(text: str) -> dict:
    """{"scores": {criterion: int}, "rationale": str} from a reply; raises MalformedReply."""
    if not isinstance(text, str):
        raise MalformedReply("the reply has no text")
    body = text.strip()
    fenced = _FENCE_RE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise MalformedReply(f"not a JSON object ({e.msg}): {text[:80]!r}") from e
    if not isinstance(obj, dict):
        raise MalformedReply(f"expected a JSON object, got {type(obj).__name__}")
    scores = {}
    for criterion in CRITERIA:
        value = obj.get(criterion)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or not 1 <= value <= 10:
            raise MalformedReply(f"{criterion} must be an integer from 1 to 10, got {value!r}")
        scores[criterion] = int(value)
    rationale = obj.get("rationale", "")
    if not isinstance(rationale, str):
        raise MalformedReply("rationale must be a string")
    return {"scores": scores, "rationale": rationale}


def parse_criteria(text: str) -> tuple[str, ...]:
    """judge.criteria ("a,b" or "all") -> the criteria that count; raises ValueError for unknown names."""
    names = CRITERIA if text.strip() in ("", "all") else tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in CRITERIA]
    if unknown or not names:
        raise ValueError(f"judge.criteria: unknown {unknown}; choose from {CRITERIA}")
    return names


def mean_score(scores: dict[str, int], criteria: tuple[str, ...]) -> float:
    return sum(scores[c] for c in criteria) / len(criteria)
