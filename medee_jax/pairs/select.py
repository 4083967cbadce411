"""The pair rule: which response of a case is chosen and which rejected, or why the case gives no pair.

Among the responses the judge scored (failures are left out), each with its mean score over the criteria that
count (`rubric.mean_score`):
- chosen: the highest mean among the responses whose final answer is correct when the case has an answer
  (`require_correct`), else among all; several at the top: the first of them (response order).
- rejected: the lowest mean among the other responses; several at the bottom: the first of them. With length
  balancing (`length_ratio` > 0) only responses whose length (characters) is within that ratio of the chosen
  one's count, and the lowest of those is taken.
- dropped, with a reason: `too_few_judged` (fewer than two scored responses), `no_correct_response`, `tie`
  (chosen and rejected means equal), `margin_below_min` (apart by less than `min_margin`),
  `length_unbalanced` (no rejected candidate within the length ratio).
"""

from __future__ import annotations

import dataclasses

DROP_REASONS = ("too_few_judged", "no_correct_response", "tie", "margin_below_min", "length_unbalanced")


@dataclasses.dataclass(frozen=True)
class Scored:
    index: int  # the response's position in the case
    mean: float
    correct: bool | None
    length: int


def select_pair(scored: list[Scored], *, min_margin: float = 1.0, require_correct: bool = True,
                length_ratio: float = 0.0) -> tuple[int, int] | str:
    """(chosen index, rejected index), or the drop reason."""
    if len(scored) < 2:
        return "too_few_judged"
    has_answer = any(s.correct is not None for s in scored)
    pool = [s for s in scored if s.correct] if require_correct and has_answer else list(scored)
    if not pool:
        return "no_correct_response"
    chosen = max(pool, key=lambda s: (s.mean, -s.index))
    others = [s for s in scored if s.index != chosen.index]
    if length_ratio > 0:
        others = [s for s in others if max(s.length, chosen.length) <= length_ratio * max(1, min(s.length, chosen.length))]
        if not others:
            return "length_unbalanced"
    rejected = min(others, key=lambda s: (s.mean, s.index))
    if rejected.mean == chosen.mean:
        return "tie"
    if chosen.mean - rejected.mean < min_margin:
        return "margin_below_min"
    return chosen.index, rejected.index
