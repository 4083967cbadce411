"""LLaMA-Factory dataset_info.json entries: `--config.data.train=path/dataset_info.json:my_med_pairs`.

An entry names its data (`file_name`: a file or a folder of files, relative to the dataset_info.json folder) and
how to read it, with LLaMA-Factory's meaning and defaults (`llamafactory.data.parser.DatasetAttr`):

    "my_med_pairs": {"file_name": "pairs.json", "formatting": "sharegpt", "ranking": true,
                     "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                 "images": "images", "system": "system"},
                     "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                              "assistant_tag": "gpt", "system_tag": "system"}}

- formatting: "alpaca" (default) | "sharegpt" | "openai" (sharegpt with the entry's tags; LLaMA-Factory's extra
  system line "detailed thinking off" for that formatting is not added).
- columns: prompt/query/response/history (alpaca), messages (sharegpt), system, images, chosen, rejected. Without
  `columns` the defaults are instruction/input/output/conversations and no system, history or images column;
  an entry that gives `columns` leaves every column it does not name unset (LLaMA-Factory's `join`).
- tags (sharegpt): role_tag, content_tag, user_tag, assistant_tag, system_tag (+ observation/function tags, whose
  tool turns are refused); the same all-or-defaults rule.
- ranking: a preference set (`chosen`/`rejected`); DPO needs it, SFT refuses it.
Image paths are relative to the dataset_info.json folder (LLaMA-Factory's media_dir) unless data.media_root is set.
Hub downloads (`hf_hub_url`, `ms_hub_url`, `om_hub_url`, `script_url`, `cloud_file_name`), `num_samples`, splits
other than "train" and KTO tags are refused with a message; nothing is downloaded.
"""

from __future__ import annotations

import json
import os

from medee_jax.data import errors
from medee_jax.data.formats import _Parser
from medee_jax.data.formats_alpaca import alpaca_to_sharegpt
from medee_jax.data.record_formats import RecordFormat

COLUMN_DEFAULTS = {
    "prompt": "instruction", "query": "input", "response": "output", "history": None, "messages": "conversations",
    "system": None, "tools": None, "images": None, "videos": None, "audios": None, "chosen": None,
    "rejected": None, "kto_tag": None,
}
TAG_DEFAULTS = {
    "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
    "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system",
}
FORMATTINGS = ("alpaca", "sharegpt", "openai")
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


def split_spec(spec: str) -> tuple[str, str] | None:
    """(dataset_info.json path, entry name) of "path/dataset_info.json:entry", else None."""
    path, sep, entry = str(spec).rpartition(":")
    if sep and entry and os.path.basename(path) == "dataset_info.json":
        return path, entry
    return None


def spec_exists(spec: str) -> bool:
    """Whether a data path exists: a file, a folder, a glob that matches, or a dataset_info.json entry's file."""
    import glob

    parts = split_spec(spec)
    if parts is not None:
        return os.path.isfile(parts[0])
    return os.path.exists(spec) or bool(glob.glob(spec))


def load_entry(spec: str) -> tuple[list[str], RecordFormat]:
    """(data paths, RecordFormat) of a "dataset_info.json:entry" spec. Raises ValueError naming the problem."""
    info_path, name = split_spec(spec)
    where = f"{info_path}:{name}"
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{info_path}: cannot read dataset_info.json ({e})") from None
    if not isinstance(info, dict) or name not in info:
        known = ", ".join(sorted(info)) if isinstance(info, dict) else "none"
        raise ValueError(f"{where}: no entry {name!r} in {info_path} (entries: {known})")
    attr = info[name]
    if not isinstance(attr, dict):
        raise ValueError(f"{where}: the entry must be an object")
    hub = [k for k in HUB_KEYS if k in attr]
    if hub:
        raise ValueError(f"{where}: '{hub[0]}' datasets are downloaded by LLaMA-Factory; nothing is downloaded here: "
                         "download the files and give their 'file_name'")
    if "file_name" not in attr:
        raise ValueError(f"{where}: no 'file_name'")
    if attr.get("num_samples") is not None:
        raise ValueError(f"{where}: 'num_samples' (LLaMA-Factory's random subset) is not supported; trim the file")
    if attr.get("split", "train") != "train":
        raise ValueError(f"{where}: split {attr['split']!r}: a local file has only the 'train' split")
    formatting = attr.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise ValueError(f"{where}: formatting {formatting!r}: one of {', '.join(FORMATTINGS)}")
    columns, tags = dict(COLUMN_DEFAULTS), dict(TAG_DEFAULTS)
    for table, key in ((columns, "columns"), (tags, "tags")):
        given = attr.get(key)
        if given is not None:
            if not isinstance(given, dict):
                raise ValueError(f"{where}: '{key}' must be an object")
            unknown = sorted(set(given) - set(table))
            if unknown:
                raise ValueError(f"{where}: unknown {key} {unknown}; known: {sorted(table)}")
            table.update({k: given.get(k) for k in table})  # LLaMA-Factory: unnamed ones become None
    if columns["kto_tag"]:
        raise ValueError(f"{where}: KTO data ('kto_tag') is not supported")
    ranking = bool(attr.get("ranking", False))
    if ranking and not (columns["chosen"] and columns["rejected"]):
        raise ValueError(f"{where}: 'ranking' is true but 'columns' names no 'chosen' and 'rejected' columns")
    base_dir = os.path.dirname(os.path.abspath(info_path))
    paths = [os.path.join(base_dir, attr["file_name"])]
    record_format = RecordFormat(formatting, ranking, tuple(columns.items()), tuple(tags.items()), base_dir, where)
    return paths, record_format


def required_columns(record_format: RecordFormat) -> list[str]:
    """The columns every record of the entry must have."""
    if record_format.formatting == "alpaca":
        names = ["chosen", "rejected"] if record_format.ranking else ["response"]
    else:
        names = ["messages"] + (["chosen", "rejected"] if record_format.ranking else [])
    return [record_format.column(n) for n in names if record_format.column(n)]


def to_sharegpt(record: dict, record_format: RecordFormat, p: _Parser) -> dict:
    """The sharegpt-shaped dict (`formats.parse_record`'s input) of a record read by a dataset_info.json entry."""
    columns = dict(record_format.columns)
    if record_format.formatting == "alpaca":
        return alpaca_to_sharegpt(record, columns, p, ranking=record_format.ranking)
    tag = record_format.tag
    for attribute in ("tools", "audios"):
        if columns.get(attribute) and record.get(columns[attribute]):
            p.fail(errors.BAD_FIELD, f"'{columns[attribute]}' ({attribute}) is not supported")
    messages = record.get(columns["messages"]) if columns["messages"] else None
    if messages is None:
        p.fail(errors.UNKNOWN_FORMAT, f"no '{columns['messages']}' column (keys: {sorted(record)}); "
                                      f"{record_format.origin} reads messages from it")
    if not isinstance(messages, list):
        p.fail(errors.BAD_FIELD, f"'{columns['messages']}' must be a list of messages")
    role_tag, content_tag = tag("role_tag"), tag("content_tag")
    system = record.get(columns["system"]) if columns["system"] else None
    if (tag("system_tag") and messages and isinstance(messages[0], dict)
            and messages[0].get(role_tag) == tag("system_tag")):
        system, messages = messages[0].get(content_tag), messages[1:]
    roles = {tag("user_tag"): "human", tag("assistant_tag"): "gpt"}

    def turn(message, what: str) -> dict:
        if not isinstance(message, dict):
            p.fail(errors.BAD_FIELD, f"{what} must be an object, got {type(message).__name__}")
        role = message.get(role_tag)
        if role not in roles:
            tools = role is not None and role in (tag("observation_tag"), tag("function_tag"))
            detail = "tool turns are not supported" if tools else (
                f"expected '{role_tag}' to be {tag('user_tag')!r} or {tag('assistant_tag')!r} "
                f"({record_format.origin} tags)")
            p.fail(errors.UNKNOWN_ROLE, f"{what} has role {role!r}: {detail}")
        return {"from": roles[role], "value": message.get(content_tag)}

    out = {"conversations": [turn(m, f"turn {i}") for i, m in enumerate(messages)], "system": system,
           "images": record.get(columns["images"]) if columns["images"] else None,
           "videos": record.get(columns["videos"]) if columns["videos"] else None}
    if record_format.ranking:
        for key in ("chosen", "rejected"):
            answer = record.get(columns[key])
            if answer is None:
                p.fail(errors.MISSING_RESPONSE, f"'{columns[key]}' is missing")
            out[key] = turn(answer, f"'{columns[key]}'")
    return out
