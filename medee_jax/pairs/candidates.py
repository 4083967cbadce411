"""The candidates file between the sample and judge stages: one case a line,

    {"id", "conversations": [prompt turns, sharegpt], "images": [...], "answer": "C" (optional),
     "options": {"A": ...} (optional), "responses": ["...", ...]}

Image paths are relative to the file's folder (or absolute). The options let the judge read each response's final
answer with `extract_choice`; when absent they are read from "A. text" lines of the last user turn. A case's
`answer` is a letter (multiple choice) or free text (then a response is correct when its answer region contains
it, case-insensitively).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from medee_jax.data import errors
from medee_jax.data.errors import BadRecordError
from medee_jax.data.formats import iter_raw_records
from medee_jax.evaluation.extract import answer_region, extract_choice
from medee_jax.evaluation.items import LETTERS

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.+?)\s*$")


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    conversations: tuple[dict, ...]  # sharegpt turns {"from", "value"} (the prompt)
    images: tuple[str, ...]  # resolved paths
    answer: str | None
    options: tuple[str, ...]  # option texts in letter order (may be empty)
    responses: tuple[str, ...]
    source: str = ""

    @property
    def prompt_turns(self) -> list[dict]:
        """The prompt as chat messages {"role", "content"}."""
        return [{"role": _ROLES[t["from"]], "content": t["value"]} for t in self.conversations]

    def final_answer(self, response: str) -> str | None:
        """The response's chosen letter (multiple choice) or None."""
        return extract_choice(response, self.options) if self.options else None

    def is_correct(self, response: str) -> bool | None:
        """None when the case has no answer; else whether the response's final answer is it."""
        if self.answer is None:
            return None
        if self.options and len(self.answer) == 1 and self.answer in LETTERS:
            return self.final_answer(response) == self.answer
        return self.answer.strip().lower() in answer_region(response).lower()


def options_from_prompt(turns) -> tuple[str, ...]:
    """Option texts from consecutive "A. text" lines (from A on) of the last user turn, else ()."""
    users = [t["value"] for t in turns if _ROLES.get(t.get("from")) == "user"]
    if not users:
        return ()
    found: dict[str, str] = {}
    for line in users[-1].splitlines():
        match = _OPTION_LINE.match(line)
        if match and match.group(1) == LETTERS[len(found)]:
            found[match.group(1)] = match.group(2)
    return tuple(found.values()) if len(found) >= 2 else ()


def _fail(path, line, detail):
    raise BadRecordError(path, line, errors.BAD_FIELD, detail)


def parse_case(obj: dict, path: str, line: int) -> Case:
    base = os.path.dirname(os.path.abspath(path))
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns or any(
            not isinstance(t, dict) or t.get("from") not in _ROLES or not isinstance(t.get("value"), str) for t in turns):
        _fail(path, line, "'conversations' must be a non-empty list of {\"from\", \"value\"} turns")
    responses = obj.get("responses")
    if not isinstance(responses, list) or any(not isinstance(r, str) for r in responses):
        _fail(path, line, "'responses' must be a list of strings")
    images = tuple(p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)) for p in obj.get("images") or [])
    placeholders = sum(t["value"].count("<image>") for t in turns)
    if placeholders != len(images):
        raise BadRecordError(path, line, errors.PLACEHOLDER_COUNT, f"{placeholders} <image> placeholders but "
                             f"{len(images)} images")
    options = obj.get("options")
    options = tuple(options.values()) if isinstance(options, dict) else tuple(options or ()) or options_from_prompt(turns)
    answer = obj.get("answer")
    answer = None if answer in (None, "") else str(answer).strip()
    if answer is not None and options and len(answer) == 1 and answer.upper() not in LETTERS[: len(options)]:
        raise BadRecordError(path, line, "answer_not_in_options", f"answer {answer!r} is not among the options")
    return Case(id=str(obj.get("id", f"case-{line}")), conversations=tuple(turns), images=images,
                answer=answer.upper() if answer and len(answer) == 1 else answer, options=options,
                responses=tuple(responses), source=f"{path}:{line}")


def read_candidates(path: str) -> list[Case]:
    """Cases of a candidates JSONL; a bad line raises BadRecordError naming file:line."""
    cases, seen = [], set()
    for line, raw in iter_raw_records(path):
        if isinstance(raw, BadRecordError):
            raise raw
        case = parse_case(raw, path, line)
        if case.id in seen:
            _fail(path, line, f"duplicate case id {case.id!r}")
        seen.add(case.id)
        cases.append(case)
    return cases


def case_record(case: Case, out_dir: str) -> dict:
    """The JSON line of a case (image paths relative to `out_dir` where possible)."""
    record = {"id": case.id, "conversations": list(case.conversations),
              "images": [os.path.relpath(p, out_dir) for p in case.images]}
    if case.answer is not None:
        record["answer"] = case.answer
    if case.options:
        record["options"] = dict(zip(LETTERS, case.options))
    record["responses"] = list(case.responses)
    return record


def write_jsonl_atomic(path: str, records) -> None:
    """Writes JSON lines to `path` through a temporary file renamed into place (no half-written file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
