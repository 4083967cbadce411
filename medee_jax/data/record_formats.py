"""Which dataset format a record is in, and the dispatch to its reader (data.format).

- "sharegpt": `formats.parse_record`: LLaMA-Factory sharegpt, OpenAI-style `messages`, `<image>` placeholders.
- "alpaca": `formats_alpaca.alpaca_to_sharegpt`: LLaMA-Factory alpaca (`instruction`, `input`, `output`,
  `system`, `history`; `chosen`/`rejected`).
- "trl": `formats_trl.parse_trl`: every TRL SFT/DPO dataset type, with TRL's image placement.
- "auto": per record from its keys: `conversations` -> sharegpt; alpaca keys without `messages`/`prompt`/`text`
  -> alpaca; anything else -> the TRL rules, where a text that already holds `<image>` placeholders is taken as
  written.
- a `RecordFormat`: `dataset_info.to_sharegpt`: a LLaMA-Factory dataset_info.json entry (its `formatting`,
  `columns`, `tags`, `ranking`).

Every reader ends in the same record checks (`formats._Parser`), so errors read `file:row: bad record (reason): ...`
and count under the same reasons whatever the format.
"""

from __future__ import annotations

import dataclasses
import os

from medee_jax.data import errors
from medee_jax.data.formats import RecordRef, _Parser, parse_record

FORMAT_NAMES = ("auto", "sharegpt", "alpaca", "trl")
ALPACA_KEYS = ("instruction", "input", "output", "history")
CONVERSATION_KEYS = ("messages", "prompt", "text", "completion")


@dataclasses.dataclass(frozen=True)
class RecordFormat:
    """How a LLaMA-Factory dataset_info.json entry reads its records (its `DatasetAttr`).

    formatting: "alpaca" | "sharegpt" | "openai" (read like sharegpt, with the entry's tags).
    columns / tags: (attribute, dataset column or tag value) pairs, after LLaMA-Factory's defaults and overrides
      (an entry that gives `columns` sets every column it does not name to None, as LLaMA-Factory does).
    base_dir: the folder image paths are relative to (LLaMA-Factory's media_dir: the dataset_info.json folder).
    origin: "path/dataset_info.json:entry", for messages.
    """

    formatting: str
    ranking: bool
    columns: tuple[tuple[str, str | None], ...]
    tags: tuple[tuple[str, str | None], ...]
    base_dir: str
    origin: str

    def column(self, attribute: str) -> str | None:
        return dict(self.columns).get(attribute)

    def tag(self, name: str) -> str | None:
        return dict(self.tags).get(name)


def check_format(record_format) -> None:
    """Raises ValueError for a data.format that is neither a known name nor a RecordFormat."""
    if not isinstance(record_format, RecordFormat) and record_format not in FORMAT_NAMES:
        raise ValueError(f"data.format={record_format!r}: one of {', '.join(FORMAT_NAMES)}")


def detect_format(record: dict) -> str:
    """"sharegpt", "alpaca" or "trl" for data.format="auto", from the record's keys."""
    if "conversations" in record:
        return "sharegpt"
    if any(k in record for k in ALPACA_KEYS) and not any(k in record for k in CONVERSATION_KEYS):
        return "alpaca"
    return "trl"


def parse_formatted(
    record: dict,
    source: RecordRef,
    record_format,
    *,
    kind: str = "auto",
    base_dir: str | os.PathLike | None = None,
    media_root: str | os.PathLike | None = None,
    check_images: bool = True,
):
    """One record read by `record_format` (see the module docstring); a Conversation or a PreferencePair.
    Raises BadRecordError at `source`."""
    from medee_jax.data import formats_alpaca, formats_trl

    check_format(record_format)
    options = dict(kind=kind, media_root=media_root, check_images=check_images)
    p = _Parser(source)
    if isinstance(record_format, RecordFormat):
        from medee_jax.data import dataset_info

        canonical = dataset_info.to_sharegpt(record, record_format, p)
        return parse_record(canonical, source, base_dir=record_format.base_dir, record_format="sharegpt", **options)
    name = detect_format(record) if record_format == "auto" else record_format
    if name == "sharegpt":
        return parse_record(record, source, base_dir=base_dir, record_format="sharegpt", **options)
    if name == "alpaca":
        canonical = formats_alpaca.alpaca_to_sharegpt(record, formats_alpaca.ALPACA_COLUMNS, p)
        return parse_record(canonical, source, base_dir=base_dir, record_format="sharegpt", **options)
    if not any(k in record for k in formats_trl.TRL_KEYS):
        p.fail(errors.UNKNOWN_FORMAT, f"no known dataset format (keys: {sorted(record)}); expected sharegpt "
                                      "'conversations', OpenAI/TRL 'messages', TRL 'text'/'prompt'/'chosen', or "
                                      "alpaca 'instruction'/'output'")
    return formats_trl.parse_trl(record, source, base_dir=base_dir, strict=record_format == "trl", **options)
