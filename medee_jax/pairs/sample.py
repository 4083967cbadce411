"""The sample stage: K responses per case from a policy model (an injected generator), written as candidates.

Cases (`cases` in the config):
- "" : the embedded demo's multimodal Stage-II cases (the prompts of `dpo_train.jsonl`; the reference letter is
  the one its chosen answer gives);
- "sharegpt:PATH": prompts in sharegpt JSONL (`conversations` up to the last user turn, `images`, optional
  `answer` and `options`, optional `id`);
- "FORMAT:PATH": any evaluation benchmark format (`medee_jax.evaluation.benchmarks`), prompted with the
  configured style and instruction.

Generations go through `generate_cached` (workdir/sample_generations.jsonl), one batch at a time, so an interrupted
stage resumes; the candidates file is written whole at the end (through a temporary file). Images that a
benchmark embeds (base64) are saved once under workdir/images/<sha256>.png so the candidates can point at them.
"""

from __future__ import annotations

import os

from medee_jax.data.formats import iter_raw_records
from medee_jax.evaluation import benchmarks, prompts
from medee_jax.evaluation.cache import JsonlCache
from medee_jax.evaluation.extract import extract_choice
from medee_jax.evaluation.generation import GenerationRequest, Sampling, generate_cached
from medee_jax.evaluation.items import LETTERS, ImageRef, MCItem

from .candidates import Case, case_record, options_from_prompt, parse_case, write_jsonl_atomic

_TO_SHAREGPT = {"user": "human", "assistant": "gpt", "system": "system"}


def _image_path(image: ImageRef, workdir: str) -> str:
    if image.path is not None:
        return os.path.abspath(image.path)
    path = os.path.join(workdir, "images", f"{image.sha256()}.png")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image.load().save(path + ".tmp", format="PNG")
        os.replace(path + ".tmp", path)
    return path


def case_from_item(item: MCItem, c, workdir: str) -> Case:
    messages = prompts.first_turn(item, c.sample.style, instruction=c.sample.instruction)
    turns = tuple({"from": _TO_SHAREGPT[m["role"]], "value": m["content"]} for m in messages)
    return Case(id=f"{item.benchmark}:{item.id}" if item.benchmark else item.id, conversations=turns,
                images=tuple(_image_path(im, workdir) for im in item.images), answer=item.answer,
                options=item.options, responses=(), source=item.source)


def read_prompt_cases(path: str) -> list[Case]:
    """Cases of a sharegpt prompts JSONL (assistant turns after the last user turn are dropped)."""
    cases = []
    for line, raw in iter_raw_records(path):
        if not isinstance(raw, dict):
            raise raw
        turns = list(raw.get("conversations") or [])
        while turns and turns[-1].get("from") in ("gpt", "assistant"):
            turns.pop()
        cases.append(parse_case({**raw, "id": raw.get("id", f"case-{line}"), "conversations": turns,
                                 "responses": []}, path, line))
    return cases


def demo_cases(demo_dir: str) -> list[Case]:
    """The demo's Stage-II image cases, with the reference letter taken from each chosen answer."""
    from medee_jax.data.demo import ensure_demo

    path = str(ensure_demo(demo_dir)["dpo_train"])
    cases = []
    for line, raw in iter_raw_records(path):
        turns = raw["conversations"]
        options = options_from_prompt(turns)
        answer = extract_choice(raw["chosen"]["value"], options)
        cases.append(parse_case({"id": f"demo-{line:05d}", "conversations": turns, "images": raw["images"],
                                 "answer": answer, "options": dict(zip(LETTERS, options)), "responses": []}, path, line))
    return cases


def load_cases(c, workdir: str) -> list[Case]:
    if not c.cases:
        return demo_cases(os.path.join(workdir, "demo"))
    if c.cases.startswith("sharegpt:"):
        return read_prompt_cases(c.cases.split(":", 1)[1])
    items, _ = benchmarks.load_items(benchmarks.parse_benchmark_specs(c.cases), on_bad_record="skip")
    return [case_from_item(item, c, workdir) for item in items]


def run_sample_stage(c, workdir: str, generate_fn, *, model_id: str) -> str:
    """Samples `c.sample.k` responses per case; writes and returns the candidates path."""
    cases = load_cases(c, workdir)
    if c.limit > 0:
        cases = cases[:c.limit]
    sampling = Sampling(n_samples=c.sample.k, temperature=c.sample.temperature, top_p=c.sample.top_p,
                        max_new_tokens=c.sample.max_new_tokens, seed=c.seed)
    requests = [GenerationRequest.make(case.prompt_turns, [ImageRef(path=p) for p in case.images], c.seed)
                for case in cases]
    outputs = generate_cached(requests, generate_fn, sampling, model_id=model_id,
                              cache=JsonlCache(os.path.join(workdir, "sample_generations.jsonl")),
                              batch_size=c.sample.batch_size, label="sample")
    path = c.candidates or os.path.join(workdir, "candidates.jsonl")
    out_dir = os.path.dirname(os.path.abspath(path))
    records = []
    for case, samples in zip(cases, outputs):
        record = case_record(case, out_dir)
        record["responses"] = [text for text, _ in samples]
        record["finish_reasons"] = [reason for _, reason in samples]
        records.append(record)
    write_jsonl_atomic(path, records)
    return path
