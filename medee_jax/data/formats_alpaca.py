"""LLaMA-Factory's alpaca format, read as LLaMA-Factory's `AlpacaDatasetConverter` reads it (0.9.x).

    {"instruction": "...", "input": "...", "output": "...", "system": "...", "history": [["q1", "a1"], ...],
     "images": ["scan.png"]}                                             SFT
    {"instruction": "...", "input": "...", "chosen": "...", "rejected": "...", "images": [...]}   preference

The user turn is the non-empty ones of `instruction` and `input` joined by a line break; each `history` pair comes
first as a user and an assistant turn (LLaMA-Factory trains on those answers too); `output` is the answer.
`<image>` placeholders mark the images, as in sharegpt. The record becomes a sharegpt-shaped dict that
`formats.parse_record` checks like any other. Column names come from a dataset_info.json entry
(`dataset_info.RecordFormat`) or, without one, are the names above (`ALPACA_COLUMNS`). KTO tags, tools, videos and
audios are not supported.
"""

from __future__ import annotations

from collections.abc import Mapping

from medee_jax.data import errors
from medee_jax.data.formats import _Parser

# LLaMA-Factory attribute -> column, for alpaca records read without a dataset_info.json entry.
ALPACA_COLUMNS = {
    "prompt": "instruction", "query": "input", "response": "output", "history": "history", "system": "system",
    "images": "images", "videos": "videos", "chosen": "chosen", "rejected": "rejected", "tools": "tools",
}


def alpaca_to_sharegpt(record: dict, columns: Mapping[str, str | None], p: _Parser, *,
                       ranking: bool | None = None) -> dict:
    """The sharegpt-shaped dict of an alpaca record. ranking: read `chosen`/`rejected` (None: when present)."""

    def value(attribute: str):
        column = columns.get(attribute)
        return record.get(column) if column else None

    for attribute in ("tools", "audios"):
        if value(attribute):
            p.fail(errors.BAD_FIELD, f"'{columns[attribute]}' ({attribute}) is not supported")
    turns = []
    history = value("history")
    if history is not None and not isinstance(history, list):
        p.fail(errors.BAD_FIELD, f"'{columns['history']}' must be a list of [prompt, response] pairs")
    for i, pair in enumerate(history or []):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            p.fail(errors.BAD_FIELD, f"'{columns['history']}' entry {i} must be a [prompt, response] pair")
        turns += [{"from": "human", "value": pair[0]}, {"from": "gpt", "value": pair[1]}]
    query = []
    for attribute in ("prompt", "query"):
        text = value(attribute)
        if text:
            query.append(p.text(text, f"'{columns[attribute]}'"))
    turns.append({"from": "human", "value": "\n".join(query)})
    out = {"conversations": turns, "system": value("system"), "images": value("images"), "videos": value("videos")}
    chosen_column, rejected_column = columns.get("chosen"), columns.get("rejected")
    if ranking is None:
        ranking = bool(chosen_column and rejected_column) and (chosen_column in record or rejected_column in record)
    if ranking:
        for key, column in (("chosen", chosen_column), ("rejected", rejected_column)):
            answer = record.get(column) if column else None
            if answer is None:
                p.fail(errors.MISSING_RESPONSE, f"'{column or key}' is missing")
            out[key] = {"from": "gpt", "value": p.text(answer, f"'{column}'")}
        return out
    response_column = columns.get("response")
    response = value("response")
    if response is None:
        p.fail(errors.MISSING_RESPONSE, f"'{response_column or 'output'}' is missing")
    turns.append({"from": "gpt", "value": p.text(response, f"'{response_column}'")})
    return out
