"""Accuracy and inference-time-scaling metrics over sampled answers.

For one item with n sampled answers (letters, or None where nothing could be parsed) and its correct letter:

- mean accuracy: the fraction of the n samples that are correct (with n = 1 and greedy decoding, the accuracy).
- pass@k (k <= n): the unbiased estimator of Chen et al. (2021), 1 - C(n - c, k) / C(n, k) with c correct
  samples: the probability that at least one of k samples drawn without replacement from the n is correct.
- maj@k (k <= n): majority vote over k samples, on the n // k disjoint blocks of consecutive samples
  [0, k), [k, 2k), ... averaged (so maj@n is the single vote over all n, and maj@1 equals mean accuracy over the
  first n // 1 = n samples). Unparsed samples do not vote; a block with no vote is wrong. A tie between the top
  answers scores 1 / (number tied) when the correct letter is among them: the expected score of a uniformly
  random tie-break, computed exactly rather than drawn.

Benchmark figures average these over items; the curve is reported at k = 1, 2, 4, ... up to n (and n itself).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (1 - C(n-c, k) / C(n, k))."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_score(answers: Sequence[str | None], truth: str) -> float:
    """1 if `truth` wins the vote, 1/t if it ties with t-1 others at the top, else 0; unparsed answers abstain."""
    votes = collections.Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    leaders = [a for a, v in votes.items() if v == top]
    return 1.0 / len(leaders) if truth in leaders else 0.0


def maj_at_k(answers: Sequence[str | None], truth: str, k: int) -> float:
    """maj@k averaged over the n // k disjoint blocks of k consecutive samples."""
    n = len(answers)
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k} n={n}")
    blocks = [answers[i:i + k] for i in range(0, n - k + 1, k)]
    return sum(majority_score(b, truth) for b in blocks) / len(blocks)


def scaling_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, with n itself last."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def scaling_curve(samples: Sequence[tuple[Sequence[str | None], str]], n: int) -> dict[int, dict[str, float]]:
    """{k: {"mean": ..., "maj": ..., "pass": ...}} averaged over items; each item is (its n answers, truth)."""
    if not samples:
        return {}
    curve = {}
    for k in scaling_ks(n):
        mean = sum(sum(a == t for a in answers[:k]) / k for answers, t in samples) / len(samples)
        maj = sum(maj_at_k(answers, t, k) for answers, t in samples) / len(samples)
        passed = sum(pass_at_k(n, sum(a == t for a in answers), k) for answers, t in samples) / len(samples)
        curve[k] = {"mean": mean, "maj": maj, "pass": passed}
    return curve


def summarize(rows: Sequence[dict], n: int) -> dict:
    """Figures of one group of items: `rows` = [{"answers": [n letters/None], "truth": letter}].

    Returns {"items", "samples", "accuracy" (mean over all samples), "parse_failure_rate", and with n > 1
    "scaling": {k: {"mean", "maj", "pass"}}}.
    """
    answers = [a for r in rows for a in r["answers"]]
    out = {
        "items": len(rows),
        "samples": len(answers),
        "accuracy": sum(a == r["truth"] for r in rows for a in r["answers"]) / len(answers) if answers else 0.0,
        "parse_failure_rate": sum(a is None for a in answers) / len(answers) if answers else 0.0,
    }
    if n > 1:
        out["scaling"] = {str(k): v for k, v in scaling_curve([(r["answers"], r["truth"]) for r in rows], n).items()}
    return out
