"""Reading the dataset formats users bring into one normalized form.

Accepted records (one JSON object per line in .jsonl, or a JSON array in .json):

- LLaMA-Factory sharegpt SFT: `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "system": ...,
  "images": [...]}`; OpenAI-style `{"messages": [{"role": ..., "content": ...}], "images": [...]}`.
- Preference, sharegpt/OpenAI: the prompt turns in `conversations`/`messages`, and `chosen`/`rejected` each one
  assistant message (`{"from": "gpt", "value": ...}`, `{"role": "assistant", "content": ...}`) or a string.
- Preference, TRL conversational: `{"prompt": [messages], "chosen": [one assistant message], "rejected": [...],
  "images": [...]}`; message content may be a string or a list of `{"type": "image"}` / `{"type": "text"}` parts.

Output: `Conversation` (SFT) and `PreferencePair` (DPO) with roles normalized to system/user/assistant and images
marked by `<image>` placeholders at their positions in the text (TRL `{"type": "image"}` parts become `<image>`).
The placeholder count always equals the number of images. Image paths are resolved against the media root, or the
dataset file's folder when none is configured, and must exist. Anything else is a `BadRecordError` naming the
file, the line and the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any, Literal

from medee_jax.data import errors
from medee_jax.data.embedded_images import EmbeddedImage, image_reference
from medee_jax.data.errors import BadRecordCounter, BadRecordError, OnBadRecord

IMAGE_PLACEHOLDER = "<image>"

RecordKind = Literal["auto", "sft", "preference"]

_ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


@dataclasses.dataclass(frozen=True)
class RecordRef:
    """Where a record came from: the dataset file and the 1-based line its JSON object starts on."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    text: str  # `<image>` marks where each image goes


@dataclasses.dataclass(frozen=True)
class Conversation:
    """An SFT example: every assistant turn from message `target_from` on is a training target.

    plain: TRL's standard (non-conversational) form: the texts are joined as they are, without the chat template,
    and the tokenizer's EOS ends the target (`medee_jax.data.tokenize_plain`).
    """

    messages: tuple[Message, ...]
    images: tuple[str | EmbeddedImage, ...]  # resolved paths (or embedded images), in placeholder order
    source: RecordRef
    target_from: int = 0  # TRL prompt-completion: the prompt's own assistant turns are context, not targets
    plain: bool = False

    @property
    def num_images(self) -> int:
        return len(self.images)


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A DPO example: a prompt (ending with a user turn) and two assistant answers to it."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    images: tuple[str | EmbeddedImage, ...]  # the prompt's images, resolved paths in placeholder order
    source: RecordRef
    plain: bool = False  # TRL's standard form: prompt + answer as plain text (see Conversation)

    @property
    def num_images(self) -> int:
        return len(self.images)


Record = Conversation | PreferencePair


# --------------------------------------------------------------------------------------------------------------
# Reading files


def read_records(
    path: str | os.PathLike,
    *,
    kind: RecordKind = "auto",
    media_root: str | os.PathLike | None = None,
    check_images: bool = True,
    on_bad_record: OnBadRecord = "raise",
    counter: BadRecordCounter | None = None,
    record_format="auto",
) -> Iterator[Record]:
    """Yields the records of a .jsonl (one object per line) or .json (an array, or JSON lines) file.

    kind: "sft" → `Conversation`s, "preference" → `PreferencePair`s, "auto" → decided per record by whether it
    has `chosen`/`rejected`. record_format: see `parse_record`. Bad records raise `BadRecordError`, or with
    on_bad_record="skip" are counted into `counter` (and logged, with a summary for the file at the end).
    """
    errors.check_on_bad_record(on_bad_record)
    path = os.fspath(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    file_counter = BadRecordCounter()
    try:
        for line, raw in iter_raw_records(path):
            try:
                if isinstance(raw, BadRecordError):
                    raise raw
                yield parse_record(
                    raw,
                    RecordRef(path, line),
                    kind=kind,
                    base_dir=base_dir,
                    media_root=media_root,
                    check_images=check_images,
                    record_format=record_format,
                )
            except BadRecordError as error:
                errors.handle_bad_record(error, on_bad_record, file_counter)
    finally:
        if file_counter.total:
            file_counter.log_summary()
            if counter is not None:
                counter.merge(file_counter)


def load_records(path: str | os.PathLike, **kwargs) -> list[Record]:
    """`list(read_records(path, **kwargs))`."""
    return list(read_records(path, **kwargs))


def iter_raw_records(path: str | os.PathLike) -> Iterator[tuple[int, dict | BadRecordError]]:
    """(line, parsed JSON object) for each record of a file, or (line, BadRecordError) for an unreadable one.

    JSON lines are streamed; a file whose first non-space character is `[` is read whole as a JSON array.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        first = b""
        while not first:
            chunk = f.read(4096)
            if not chunk:
                break
            if f.tell() == len(chunk) and chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
            first = chunk.lstrip()[:1]
        f.seek(0)
        if first == b"[":
            yield from _iter_json_array(path, f.read())
        else:
            yield from _iter_json_lines(path, f)


def _iter_json_lines(path: str, lines) -> Iterator[tuple[int, Any]]:
    for line_no, raw_line in enumerate(lines, start=1):
        if line_no == 1 and raw_line.startswith(b"\xef\xbb\xbf"):
            raw_line = raw_line[3:]
        if not raw_line.strip():
            continue
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield line_no, BadRecordError(
                path, line_no, errors.NOT_UTF8,
                f"the line is not valid UTF-8 (byte {raw_line[e.start:e.start + 1]!r} at column {e.start + 1})",
            )
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield line_no, BadRecordError(
                path, line_no, errors.MALFORMED_JSON, f"not valid JSON: {e.msg} at column {e.colno}"
            )
            continue
        except RecursionError:
            yield line_no, BadRecordError(path, line_no, errors.MALFORMED_JSON, "JSON nested too deeply to parse")
            continue
        if not isinstance(obj, dict):
            yield line_no, BadRecordError(
                path, line_no, errors.MALFORMED_JSON, f"expected a JSON object, got {type(obj).__name__}"
            )
            continue
        yield line_no, obj


def _iter_json_array(path: str, data: bytes) -> Iterator[tuple[int, Any]]:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    # Undecodable bytes become lone surrogates, reported per record by the text checks in `parse_record`.
    text = data.decode("utf-8", errors="surrogateescape")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1

    def skip_space(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    counted = [0, 1]  # (position, line there): count newlines incrementally, not from the start each time

    def line_of(i: int) -> int:
        counted[1] += text.count("\n", counted[0], i)
        counted[0] = i
        return counted[1]

    pos = skip_space(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        pos = skip_space(pos)
        line_no = line_of(pos)
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # The rest of the array cannot be located reliably: stop here, whatever on_bad_record says.
            raise BadRecordError(
                path, e.lineno, errors.MALFORMED_JSON,
                f"not valid JSON: {e.msg} at column {e.colno}; the rest of the array cannot be read",
            ) from None
        except RecursionError:
            raise BadRecordError(path, line_no, errors.MALFORMED_JSON, "JSON nested too deeply to parse; the rest "
                                 "of the array cannot be read") from None
        if isinstance(obj, dict):
            yield line_no, obj
        else:
            yield line_no, BadRecordError(
                path, line_no, errors.MALFORMED_JSON, f"expected a JSON object, got {type(obj).__name__}"
            )
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            return
        raise BadRecordError(
            path, line_of(pos), errors.MALFORMED_JSON,
            "not valid JSON: expected ',' or ']' after a record; the rest of the array cannot be read",
        )


# --------------------------------------------------------------------------------------------------------------
# Parsing one record


def parse_record(
    record: dict,
    source: RecordRef,
    *,
    kind: RecordKind = "auto",
    base_dir: str | os.PathLike | None = None,
    media_root: str | os.PathLike | None = None,
    check_images: bool = True,
    record_format="auto",
) -> Record:
    """Normalizes one parsed JSON object. Image paths resolve against media_root, else base_dir (default: the
    folder of source.file). Raises BadRecordError.

    record_format: "auto" (decided per record from its keys), "sharegpt", "alpaca", "trl", or a
    `record_formats.RecordFormat` (a LLaMA-Factory dataset_info.json entry); see `medee_jax.data.record_formats`.
    """
    p = _Parser(source)
    if not isinstance(record, dict):
        p.fail(errors.MALFORMED_JSON, f"expected a JSON object, got {type(record).__name__}")
    if record_format != "sharegpt":
        from medee_jax.data.record_formats import parse_formatted

        return parse_formatted(record, source, record_format, kind=kind, base_dir=base_dir, media_root=media_root,
                               check_images=check_images)
    is_preference = "chosen" in record or "rejected" in record
    if kind == "auto":
        kind = "preference" if is_preference else "sft"
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(source.file))
    image_args = dict(base_dir=base_dir, media_root=media_root)
    if kind == "sft":
        if is_preference:
            p.fail(
                errors.UNKNOWN_FORMAT, "expected an SFT record but it has 'chosen'/'rejected' (a preference record)"
            )
        messages = p.sft_messages(record)
        images = p.images(record, **image_args)
        p.check_placeholders(messages, images)
        if check_images:
            p.check_images_exist(images)
        return Conversation(messages=tuple(messages), images=tuple(images), source=source)
    if kind == "preference":
        prompt, chosen, rejected = p.preference(record)
        images = p.images(record, **image_args)
        p.check_placeholders(prompt + [Message("assistant", chosen), Message("assistant", rejected)], images)
        if check_images:
            p.check_images_exist(images)
        return PreferencePair(
            prompt=tuple(prompt), chosen=chosen, rejected=rejected, images=tuple(images), source=source
        )
    raise ValueError(f"kind must be 'auto', 'sft' or 'preference', got {kind!r}")


class _Parser:
    """The checks of one record; every failure is a BadRecordError at `source`."""

    def __init__(self, source: RecordRef):
        self.source = source

    def fail(self, reason: str, detail: str, *, image: str | None = None):
        raise BadRecordError(self.source.file, self.source.line, reason, detail, image=image)

    # ---- text

    def text(self, value: Any, what: str) -> str:
        if not isinstance(value, str):
            self.fail(errors.BAD_FIELD, f"{what} must be a string, got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            self.fail(errors.NOT_UTF8, f"{what} is not valid UTF-8 text (character {e.start + 1})")
        return value

    def content(self, value: Any, what: str) -> str:
        """A message content: a string, or a list of text/image parts (image parts become `<image>`)."""
        if isinstance(value, str):
            return self.text(value, what)
        if not isinstance(value, list):
            self.fail(errors.BAD_FIELD, f"{what} must be a string or a list of parts, got {type(value).__name__}")
        pieces = []
        for i, part in enumerate(value):
            if isinstance(part, str):
                pieces.append(self.text(part, f"{what} part {i}"))
                continue
            if not isinstance(part, dict):
                self.fail(errors.BAD_FIELD, f"{what} part {i} must be an object, got {type(part).__name__}")
            kind = part.get("type")
            if kind == "text" or (kind is None and "text" in part):
                pieces.append(self.text(part.get("text", ""), f"{what} part {i} text"))
            elif kind in ("image", "image_url") or (kind is None and ("image" in part or "image_url" in part)):
                pieces.append(IMAGE_PLACEHOLDER)
            else:
                self.fail(errors.BAD_FIELD, f"{what} part {i} has unsupported type {kind!r} (expected text or image)")
        return "".join(pieces)

    # ---- messages

    def message(self, turn: Any, what: str) -> Message:
        if not isinstance(turn, dict):
            self.fail(errors.BAD_FIELD, f"{what} must be an object, got {type(turn).__name__}")
        if "from" in turn or "value" in turn:
            role_value, content = turn.get("from"), turn.get("value")
        else:
            role_value, content = turn.get("role"), turn.get("content")
        if role_value is None:
            self.fail(errors.BAD_FIELD, f"{what} has no role ('from' or 'role')")
        role = _ROLE_ALIASES.get(role_value) if isinstance(role_value, str) else None
        if role is None:
            self.fail(
                errors.UNKNOWN_ROLE,
                f"{what} has unknown role {role_value!r} (expected one of {sorted(_ROLE_ALIASES)})",
            )
        if content is None:
            self.fail(errors.BAD_FIELD, f"{what} has no content ('value' or 'content')")
        return Message(role, self.content(content, f"{what} content"))

    def turns(self, record: dict, key: str) -> list[Message]:
        value = record[key]
        if isinstance(value, str):  # TRL "standard" prompt: a plain string
            return [Message("user", self.text(value, f"'{key}'"))]
        if not isinstance(value, list) or not value:
            self.fail(errors.BAD_FIELD, f"'{key}' must be a non-empty list of messages")
        return [self.message(turn, f"'{key}' turn {i}") for i, turn in enumerate(value)]

    def with_system(self, record: dict, messages: list[Message]) -> list[Message]:
        system = record.get("system")
        if system is None or system == "":
            return messages
        system = self.text(system, "'system'")
        if messages and messages[0].role == "system":
            self.fail(errors.BAD_TURN_ORDER, "the record has both a 'system' field and a system turn")
        return [Message("system", system)] + messages

    def check_order(self, messages: list[Message], last_role: str, what: str) -> None:
        body = messages[1:] if messages and messages[0].role == "system" else messages
        for i, m in enumerate(body):
            if m.role == "system":
                self.fail(errors.BAD_TURN_ORDER, f"{what}: a system turn is only allowed first")
            expected = "user" if i % 2 == 0 else "assistant"
            if m.role != expected:
                self.fail(
                    errors.BAD_TURN_ORDER,
                    f"{what}: turns must alternate user/assistant starting with user; turn {i} is {m.role}",
                )
        if not body or body[-1].role != last_role:
            got = body[-1].role if body else "nothing"
            self.fail(errors.BAD_TURN_ORDER, f"{what} must end with a {last_role} turn, ends with {got}")

    def check_nonempty(self, messages: list[Message]) -> None:
        for i, m in enumerate(messages):
            if m.role == "assistant" and not m.text.strip():
                self.fail(errors.EMPTY_RESPONSE, f"assistant turn {i} is empty")
            if m.role == "user" and not m.text.strip():
                self.fail(errors.EMPTY_MESSAGE, f"user turn {i} is empty")

    def sft_messages(self, record: dict) -> list[Message]:
        key = "conversations" if "conversations" in record else "messages" if "messages" in record else None
        if key is None:
            self.fail(
                errors.UNKNOWN_FORMAT,
                f"no 'conversations' or 'messages' list (keys: {sorted(record)}); not an SFT record",
            )
        messages = self.with_system(record, self.turns(record, key))
        self.check_order(messages, "assistant", "the conversation")
        self.check_nonempty(messages)
        return messages

    def response(self, record: dict, key: str) -> str:
        if key not in record or record[key] is None:
            self.fail(errors.MISSING_RESPONSE, f"'{key}' is missing")
        value = record[key]
        if isinstance(value, list):
            if len(value) != 1:
                self.fail(errors.BAD_FIELD, f"'{key}' must hold exactly one assistant message, got {len(value)}")
            value = value[0]
        if isinstance(value, str):
            text = self.text(value, f"'{key}'")
        else:
            message = self.message(value, f"'{key}'")
            if message.role != "assistant":
                self.fail(errors.BAD_TURN_ORDER, f"'{key}' must be an assistant message, got role {message.role}")
            text = message.text
        if not text.strip():
            self.fail(errors.EMPTY_RESPONSE, f"'{key}' is empty")
        return text

    def preference(self, record: dict) -> tuple[list[Message], str, str]:
        if "chosen" not in record and "rejected" not in record:
            self.fail(errors.UNKNOWN_FORMAT, "expected a preference record but it has no 'chosen'/'rejected'")
        key = next((k for k in ("prompt", "conversations", "messages") if k in record), None)
        if key is None:
            self.fail(
                errors.UNKNOWN_FORMAT,
                f"no 'prompt', 'conversations' or 'messages' (keys: {sorted(record)}); not a preference record",
            )
        prompt = self.with_system(record, self.turns(record, key))
        self.check_order(prompt, "user", "the prompt")
        self.check_nonempty(prompt)
        chosen = self.response(record, "chosen")
        rejected = self.response(record, "rejected")
        if chosen.strip() == rejected.strip():
            self.fail(errors.IDENTICAL_RESPONSES, "'chosen' and 'rejected' are identical")
        return prompt, chosen, rejected

    # ---- images

    def check_placeholders(self, messages: list[Message], images: list[str]) -> None:
        for m in messages:
            if m.role == "assistant" and IMAGE_PLACEHOLDER in m.text:
                self.fail(errors.IMAGE_IN_RESPONSE, f"an assistant answer contains {IMAGE_PLACEHOLDER}")
        count = sum(m.text.count(IMAGE_PLACEHOLDER) for m in messages)
        if count != len(images):
            self.fail(
                errors.PLACEHOLDER_COUNT,
                f"{count} {IMAGE_PLACEHOLDER} placeholder(s) in the text but {len(images)} image(s) in 'images'",
            )

    def check_images_exist(self, images: list[str | EmbeddedImage]) -> None:
        for i, path in enumerate(images):
            if not isinstance(path, EmbeddedImage) and not os.path.isfile(path):
                self.fail(errors.MISSING_IMAGE, f"image {i} not found: {path}", image=path)

    def images(self, record: dict, *, base_dir, media_root) -> list[str | EmbeddedImage]:
        if "videos" in record and record["videos"]:
            self.fail(errors.BAD_FIELD, "videos are not supported")
        value = record.get("images")
        if value is None:
            return []
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, list):
            self.fail(errors.BAD_FIELD, f"'images' must be a list of paths, got {type(value).__name__}")
        root = os.fspath(media_root) if media_root is not None else os.fspath(base_dir)
        resolved = []
        for i, item in enumerate(value):
            if isinstance(item, dict):  # a `datasets.Image` struct: embedded bytes, or a path
                item = image_reference(item, f"{self.source} image {i}")
                if item is None:
                    self.fail(errors.MISSING_IMAGE, f"image {i} has neither bytes nor a path")
                if isinstance(item, EmbeddedImage):
                    resolved.append(item)
                    continue
            item = self.text(item, f"'images' entry {i}")
            if "://" in item:
                self.fail(
                    errors.MISSING_IMAGE,
                    f"image {i} is a URL ({item}); download the images and set the media root to their folder",
                    image=item,
                )
            resolved.append(os.path.normpath(os.path.join(root, os.path.expanduser(item))))
        return resolved
