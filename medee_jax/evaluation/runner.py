"""`run_evaluation(items, generate_fn, settings, out_dir, model_id=...)`: prompts, cached generation, answer
extraction, metrics and reports for one model.

Conditions: "standard", and with `settings.blind_controls` the image-blind controls "blank" and "shuffled"
(`blind.py`; items with images only). Every (condition, item) is one prompt sampled `n_samples` times; with the
two-turn "medxpertqa_cot" style each sample's reasoning gets its own answer turn (one sample each). Generations
live in `out_dir/generations.jsonl` (or `settings.cache_path`), so rerunning an interrupted evaluation with the
same out_dir generates only what is missing and writes the same results.

Writes into out_dir: `samples.jsonl` (one line per sample: condition, item id, subset, prompt and image SHA-256,
raw output, parsed letter, rule, correct, finish reason), `results.json` (figures only, no timings, so reruns
compare equal), `results.md` (tables) and `results.png` (chart). Returns the results dict.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections import defaultdict

from . import blind, prompts
from .cache import JsonlCache
from .extract import extract_choice_with_rule
from .generation import GenerateFn, GenerationRequest, Sampling, generate_cached
from .items import MCItem
from .metrics import summarize


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    style: str = "cot"  # prompts.STYLES
    instruction: str = ""  # replaces the style's instruction ("direct" / "cot")
    system: str = ""
    sampling: Sampling = Sampling()
    batch_size: int = 8
    blind_controls: bool = True
    shuffle_seed: int = 0
    cache_path: str = ""  # default: out_dir/generations.jsonl
    show_progress: bool = True


def group_names(item: MCItem) -> list[str]:
    """The result groups an item counts in: "all", its benchmark, and benchmark/subset."""
    names = ["all"]
    if item.benchmark:
        names.append(item.benchmark)
        if item.subset:
            names.append(f"{item.benchmark}/{item.subset}")
    elif item.subset:
        names.append(item.subset)
    return names


def _conditions(items: list[MCItem], settings: EvalSettings) -> tuple[dict[str, list[MCItem]], int]:
    conditions = {"standard": items}
    left_out = 0
    if settings.blind_controls and any(i.images for i in items):
        conditions["blank"] = blind.blank_images(items)
        conditions["shuffled"], left_out = blind.shuffled_images(items, settings.shuffle_seed)
    return conditions, left_out


def _sample_records(items, generate_fn, settings: EvalSettings, cache, model_id: str) -> list[dict]:
    """One record per (condition, item, sample), in a fixed order."""
    conditions, _ = _conditions(items, settings)
    s = settings.sampling
    jobs = []  # (condition, item, first-turn messages, request)
    for condition, cond_items in conditions.items():
        for item in cond_items:
            messages = prompts.first_turn(item, settings.style, instruction=settings.instruction,
                                          system=settings.system)
            jobs.append((condition, item, messages, GenerationRequest.make(messages, item.images, s.seed)))
    first = generate_cached([j[3] for j in jobs], generate_fn, s, model_id=model_id, cache=cache,
                            batch_size=settings.batch_size, label="eval", show_progress=settings.show_progress)
    second = None
    if prompts.needs_second_turn(settings.style):
        answer_sampling = dataclasses.replace(s, n_samples=1)
        follow = [GenerationRequest.make(prompts.second_turn(item, messages, text), item.images, s.seed)
                  for (_, item, messages, _), outs in zip(jobs, first) for text, _ in outs]
        answers = generate_cached(follow, generate_fn, answer_sampling, model_id=model_id, cache=cache,
                                  batch_size=settings.batch_size, label="eval (answer turn)",
                                  show_progress=settings.show_progress)
        second = iter(a[0] for a in answers)
    records = []
    for (condition, item, _, request), outs in zip(jobs, first):
        for k, (text, reason) in enumerate(outs):
            record = {"condition": condition, "id": item.id, "benchmark": item.benchmark, "subset": item.subset,
                      "sample": k, "prompt_sha256": request.prompt_sha256(), "image_sha256": list(request.image_hashes)}
            if second is not None:
                record["reasoning"] = text
                text, reason = next(second)
            letter, rule = extract_choice_with_rule(text, item.options)
            record.update(output=text, finish_reason=reason, parsed=letter, rule=rule, answer=item.answer,
                          correct=item.answer is not None and letter == item.answer)
            records.append(record)
    return records


def summarize_records(records: list[dict], items: list[MCItem], n_samples: int) -> dict:
    """Per condition and group: accuracy, parse failures, scaling. Per group, the blind control against the
    standard accuracy on the same items: {"blank"|"shuffled": {"items", "standard", "accuracy", "drop"}}."""
    by_key = {(i.benchmark, i.id): i for i in items}
    if len(by_key) != len(items):
        raise ValueError("item ids must be unique within each benchmark")
    answers: dict[tuple[str, str, str], list] = defaultdict(list)
    for r in records:
        answers[(r["condition"], r["benchmark"], r["id"])].append(r["parsed"])
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for (condition, benchmark, item_id), letters in answers.items():
        item = by_key[(benchmark, item_id)]
        if item.answer is None:
            continue
        for name in group_names(item):
            groups[condition][name].append({"id": (benchmark, item_id), "answers": letters, "truth": item.answer})
    results = {c: {g: summarize(rows, n_samples) for g, rows in sorted(gs.items())} for c, gs in groups.items()}
    drops = {}
    for name, standard_rows in sorted(groups["standard"].items()):
        row = {}
        for condition in ("blank", "shuffled"):
            rows = groups.get(condition, {}).get(name)
            if not rows:
                continue
            ids = {r["id"] for r in rows}
            standard = summarize([r for r in standard_rows if r["id"] in ids], 1)["accuracy"]
            accuracy = results[condition][name]["accuracy"]
            row[condition] = {"items": len(rows), "standard": standard, "accuracy": accuracy,
                              "drop": standard - accuracy}
        if row:
            drops[name] = row
    return {"conditions": results, "blind": drops}


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run_evaluation(items: list[MCItem], generate_fn: GenerateFn, settings: EvalSettings, out_dir: str, *,
                   model_id: str, skipped: dict | None = None, chart: bool = True) -> dict:
    """Evaluates `items` with `generate_fn`; writes the run directory (module docstring) and returns results."""
    if not items:
        raise ValueError("no items to evaluate")
    os.makedirs(out_dir, exist_ok=True)
    cache = JsonlCache(settings.cache_path or os.path.join(out_dir, "generations.jsonl"))
    records = _sample_records(items, generate_fn, settings, cache, model_id)
    _, left_out = _conditions(items, settings)
    results = {
        "model": model_id,
        "settings": {"style": settings.style, "instruction": settings.instruction, "system": settings.system,
                     **settings.sampling.as_dict(), "blind_controls": settings.blind_controls,
                     "shuffle_seed": settings.shuffle_seed},
        "items": len(items),
        "items_without_answer": sum(i.answer is None for i in items),
        "skipped_items": dict(sorted((skipped or {}).items())),
        "shuffle_left_out": left_out,
        **summarize_records(records, items, settings.sampling.n_samples),
    }
    _write_atomic(os.path.join(out_dir, "samples.jsonl"),
                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    _write_atomic(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1, sort_keys=True) + "\n")
    from .reports import markdown_report

    _write_atomic(os.path.join(out_dir, "results.md"), markdown_report({model_id: results}))
    if chart:
        from .chart import draw_chart

        draw_chart({model_id: results}, os.path.join(out_dir, "results.png"))
    return results
