"""The judge stage: score every candidate response, pick a pair per case, write the preference JSONL and a summary.

Output (`output`, LLaMA-Factory preference format the trainer reads as is): one pair a line,
`{"id", "conversations": [prompt turns], "chosen": {"from": "gpt", "value"}, "rejected": {...}, "images": [...],
"scores": {"chosen": {criteria..., "mean"}, "rejected": {...}}, "rationale": {"chosen", "rejected"},
"judgements": [one per response: {"response", "scores", "mean", "rationale", "correct"} or {"response",
"failure", "detail"}], "criteria": [...]}` with image paths relative to the output file's folder.

`summary.json` in the workdir (also printed): cases, responses, responses judged, judge failures by kind, pairs
written, drops by reason, requests sent, cache hits, retries, and the judge's settings.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

from medee_jax.evaluation.cache import JsonlCache

from .candidates import Case, read_candidates, write_jsonl_atomic
from .rubric import CRITERIA, mean_score, parse_criteria
from .rules_judge import judge_response
from .select import Scored, select_pair


class RulesJudge:
    """`judge(jobs)` with the offline rules (`rules_judge.py`)."""

    def __init__(self):
        self.stats = Counter()

    def judge(self, jobs: list[tuple[Case, str]]) -> list[dict]:
        return [judge_response(case, response) for case, response in jobs]


def make_judge(c, workdir: str, *, load_generator=None):
    """The judge `c.judge.kind` names (rules | openai | model)."""
    kind = c.judge.kind
    if kind == "rules":
        return RulesJudge()
    if kind == "openai":
        from .openai_judge import HttpJudgeSettings, OpenAIJudge

        settings = HttpJudgeSettings(
            base_url=c.judge.base_url, model=c.judge.model, concurrency=c.judge.concurrency,
            timeout_s=c.judge.timeout_s, max_retries=c.judge.max_retries, backoff_s=c.judge.backoff_s,
            max_backoff_s=c.judge.max_backoff_s, max_requests=c.judge.max_requests,
            temperature=c.judge.temperature, max_tokens=c.judge.max_tokens)
        return OpenAIJudge(settings, os.environ.get("OPENAI_API_KEY", ""),
                           JsonlCache(os.path.join(workdir, "judge_cache.jsonl")), seed=c.seed)
    if kind == "model":
        from medee_jax.evaluation import model_runner

        from .model_judge import ModelJudge

        (spec,) = model_runner.parse_model_specs(f"judge={c.judge.model}", seed=c.seed)
        model_runner.check_model(spec)
        load_generator = load_generator or model_runner.load_generator
        return ModelJudge(load_generator(spec), model_runner.model_identity(spec),
                          JsonlCache(os.path.join(workdir, "judge_generations.jsonl")),
                          max_retries=c.judge.max_retries, batch_size=c.judge.concurrency,
                          max_new_tokens=c.judge.max_tokens, temperature=c.judge.temperature, seed=c.seed)
    raise ValueError(f"judge.kind must be rules, openai or model, got {kind!r}")


def _scores_with_mean(judgement: dict, criteria) -> dict:
    return {**judgement["scores"], "mean": mean_score(judgement["scores"], criteria)}


def build_pairs(cases: list[Case], results: list[dict], c, out_path: str) -> tuple[list[dict], Counter]:
    """The pair records and the drop reasons, from the judge's results in (case, response) order."""
    criteria = parse_criteria(c.judge.criteria)
    out_dir = os.path.dirname(os.path.abspath(out_path))
    pairs, drops = [], Counter()
    it = iter(results)
    for case in cases:
        judgements, scored = [], []
        for i, response in enumerate(case.responses):
            result = next(it)
            if "scores" in result:
                correct = case.is_correct(response)
                mean = mean_score(result["scores"], criteria)
                judgements.append({"response": i, "scores": result["scores"], "mean": mean,
                                   "rationale": result.get("rationale", ""), "correct": correct})
                scored.append(Scored(i, mean, correct, len(response)))
            else:
                judgements.append({"response": i, "failure": result["failure"], "detail": result.get("detail", "")})
        choice = select_pair(scored, min_margin=c.pairs.min_margin, require_correct=c.pairs.require_correct,
                             length_ratio=c.pairs.length_ratio)
        if isinstance(choice, str):
            drops[choice] += 1
            continue
        best, worst = (next(j for j in judgements if j["response"] == k) for k in choice)
        pairs.append({
            "id": case.id, "conversations": list(case.conversations),
            "chosen": {"from": "gpt", "value": case.responses[choice[0]]},
            "rejected": {"from": "gpt", "value": case.responses[choice[1]]},
            "images": [os.path.relpath(p, out_dir) for p in case.images],
            "scores": {"chosen": _scores_with_mean(best, criteria), "rejected": _scores_with_mean(worst, criteria)},
            "rationale": {"chosen": best["rationale"], "rejected": worst["rationale"]},
            "judgements": judgements, "criteria": list(criteria),
        })
    return pairs, drops


def run_judge_stage(c, workdir: str, *, judge=None, load_generator=None) -> dict:
    """Judges `c.candidates` (default workdir/candidates.jsonl), writes `c.output` (default workdir/pairs.jsonl)
    and workdir/summary.json; returns the summary."""
    candidates = c.candidates or os.path.join(workdir, "candidates.jsonl")
    output = c.output or os.path.join(workdir, "pairs.jsonl")
    if not os.path.isfile(candidates):
        raise FileNotFoundError(f"candidates file {candidates} not found (run the sample stage first, or set "
                                "--config.candidates)")
    parse_criteria(c.judge.criteria)
    cases = read_candidates(candidates)
    judge = judge or make_judge(c, workdir, load_generator=load_generator)
    jobs = [(case, response) for case in cases for response in case.responses]
    results = judge.judge(jobs)
    pairs, drops = build_pairs(cases, results, c, output)
    write_jsonl_atomic(output, pairs)
    failures = Counter(r["failure"] for r in results if "failure" in r)
    summary = {
        "cases": len(cases), "responses": len(jobs), "responses_judged": len(jobs) - sum(failures.values()),
        "judge_failures": dict(sorted(failures.items())), "pairs_written": len(pairs),
        "dropped": dict(sorted(drops.items())), "requests_sent": int(judge.stats.get("requests_sent", 0)),
        "cache_hits": int(judge.stats.get("cache_hits", 0)), "retries": int(judge.stats.get("retries", 0)),
        "judge": {"kind": c.judge.kind, "model": c.judge.model if c.judge.kind != "rules" else "",
                  "criteria": list(parse_criteria(c.judge.criteria)), "all_criteria": list(CRITERIA)},
        "candidates": os.path.abspath(candidates), "output": os.path.abspath(output),
    }
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    return summary


def run_stages(c, workdir: str, *, load_generator=None) -> dict | None:
    """Runs `c.stage` (sample | judge | all) in `workdir`; returns the judge stage's summary (None for sample).
    `load_generator(spec)` defaults to `model_runner.load_generator`."""
    from medee_jax.evaluation import model_runner

    from .sample import run_sample_stage

    if c.stage not in ("sample", "judge", "all"):
        raise ValueError(f"stage must be sample, judge or all, got {c.stage!r}")
    os.makedirs(workdir, exist_ok=True)
    if c.stage in ("sample", "all"):
        (spec,) = model_runner.parse_model_specs(f"policy={c.model}", seed=c.seed)
        model_runner.check_model(spec)
        generate_fn = (load_generator or model_runner.load_generator)(spec)
        path = run_sample_stage(c, workdir, generate_fn, model_id=model_runner.model_identity(spec))
        print(f"candidates: {path}", file=sys.stderr)
    if c.stage in ("judge", "all"):
        return run_judge_stage(c, workdir, load_generator=load_generator)
    return None
