"""An offline judge for when no endpoint exists: text signals mapped to the four MMRP criteria (1-10 each).

Signals of one response (reasoning = inside `<think>...</think>`; answer = after it, see `extract.answer_region`):
- correct: the final answer equals the case's reference answer (None when the case has none);
- well_formed: a non-empty `<think>` block followed by a readable final answer;
- findings: which kinds of image findings the reasoning names: location (quadrant, left/right, upper/lower,
  lobe, anterior/posterior, ...), measurement (a number with cm/mm/%/HU), appearance (hyper-/hypodense,
  -intense, -echoic, round/irregular/lobulated, opacity, lesion/mass/nodule, ...);
- ungrounded: phrases that answer from priors instead of the image ("do not need to inspect the image",
  "usually", "typically", "most typical");
- reflection: kinds of self-check (check/verify/re-examine, rule out/other options/alternatives, however/but/wait);
- contradiction: two different final answers (the reasoning concludes one letter, the answer states another, or
  the answer region states two).

Mapping (each clamped to 1..10):
- logical_consistency = 10 - 6·contradiction - 3·(correct is False) - 3·(no final answer) - 2·(not well_formed)
- image_grounding     = 2 + 2·(finding kinds named) + 2·(all three kinds) - 4·ungrounded; 5 for text-only cases
- no_hallucination    = 9 when correct, 3 when wrong (its findings then contradict the truth), 6 when unknown;
                        - 3·contradiction
- reflection          = 2 + 3·(reflection kinds)
"""

from __future__ import annotations

import re

from medee_jax.evaluation.extract import answer_region

from .candidates import Case

FINDINGS = {
    "location": r"\b(quadrant|upper|lower|left|right|midline|lobe|anterior|posterior|medial|lateral|apical|basal|"
                r"proximal|distal|superior|inferior)\b",
    "measurement": r"\b\d+(?:\.\d+)?\s?(?:cm|mm|%|hu)\b",
    "appearance": r"\b(hyper|hypo|iso)(dense|intense|echoic|attenuating)\b|\b(round|irregular|lobulated|"
                  r"well-circumscribed|spiculated|opacity|opacities|lesion|mass|nodule|effusion|enhancement|"
                  r"calcifi\w*|consolidation)\b",
}
UNGROUNDED = r"\b(do not need to inspect|without looking|usually|typically|most typical|in general)\b"
REFLECTION = {
    "check": r"\b(check(?:ing)?|verif\w*|re-?examin\w*|double-check\w*|confirm\w*)\b",
    "alternatives": r"\b(rule[sd]? out|other options?|alternatives?|each other option|differential)\b",
    "doubt": r"\b(however|wait|on (?:second thought|reflection)|reconsider\w*)\b",
}
_STATED = re.compile(r"(?i:answer\s+is|answer:|matches\s+option|option)\s*\(?([A-Z])\b")


def _clamp(x: float) -> int:
    return int(max(1, min(10, round(x))))


def signals(case: Case, response: str) -> dict:
    """The text signals of one response (see the module docstring)."""
    has_think = "<think>" in response and "</think>" in response
    reasoning = response.split("<think>", 1)[1].split("</think>", 1)[0] if has_think else ""
    region = answer_region(response)
    final = case.final_answer(response) if case.options else None
    low = reasoning.lower() if has_think else response.lower()
    n = len(case.options)
    stated_reasoning = [m for m in _STATED.findall(reasoning) if m < chr(65 + n)] if n else []
    stated_answer = {m for m in _STATED.findall(region) if m < chr(65 + n)} if n else set()
    contradiction = len(stated_answer) > 1 or bool(final and stated_reasoning and stated_reasoning[-1] != final)
    return {
        "correct": case.is_correct(response),
        "well_formed": has_think and bool(reasoning.strip()) and bool(region.strip()),
        "has_final_answer": final is not None if case.options else bool(region.strip()),
        "findings": sorted(k for k, p in FINDINGS.items() if re.search(p, low)),
        "ungrounded": bool(re.search(UNGROUNDED, low)),
        "reflection": sorted(k for k, p in REFLECTION.items() if re.search(p, low)),
        "contradiction": contradiction,
        "has_images": bool(case.images),
    }


def judge_response(case: Case, response: str) -> dict:
    """{"scores": {criterion: 1..10}, "rationale": "..."} for one response."""
    s = signals(case, response)
    logic = 10 - 6 * s["contradiction"] - 3 * (s["correct"] is False) - 3 * (not s["has_final_answer"]) \
        - 2 * (not s["well_formed"])
    if s["has_images"]:
        grounding = 2 + 2 * len(s["findings"]) + 2 * (len(s["findings"]) == len(FINDINGS)) - 4 * s["ungrounded"]
    else:
        grounding = 5
    hallucination = {True: 9, False: 3, None: 6}[s["correct"]] - 3 * s["contradiction"]
    reflection = 2 + 3 * len(s["reflection"])
    scores = {"logical_consistency": _clamp(logic), "image_grounding": _clamp(grounding),
              "no_hallucination": _clamp(hallucination), "reflection": _clamp(reflection)}
    rationale = (f"correct={s['correct']}, well_formed={s['well_formed']}, findings={s['findings']}, "
                 f"ungrounded={s['ungrounded']}, reflection={s['reflection']}, contradiction={s['contradiction']}")
    return {"scores": scores, "rationale": rationale}

