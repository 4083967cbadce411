"""One error type for bad data records, and a counter for the records skipped because of them.

Every problem with a single training record — a line that is not JSON, a wrong number of `<image>` placeholders,
an unreadable image — is a `BadRecordError` naming the file, the line (or record number) and a short reason code.
Readers take `on_bad_record="raise" | "skip"`: "raise" stops at the first bad record with that message; "skip"
drops the record, counts it by reason in a `BadRecordCounter` and logs it, so nothing is dropped silently.

Image checks live in `medee_jax.data.images`; they can raise this error before the record is known
(`BadRecordError(None, None, "corrupt_image", "...", image=path)`) and the caller attaches the location with
`err.at(file, line)`.
"""

from __future__ import annotations

import collections
import logging
from typing import Literal

logger = logging.getLogger("medee_jax.data")

OnBadRecord = Literal["raise", "skip"]

# Reason codes. Stable strings: counters, logs and tests key on them.
# Record structure (formats.py)
MALFORMED_JSON = "malformed_json"
NOT_UTF8 = "not_utf8"
UNKNOWN_FORMAT = "unknown_format"
BAD_FIELD = "bad_field"
UNKNOWN_ROLE = "unknown_role"
BAD_TURN_ORDER = "bad_turn_order"
EMPTY_MESSAGE = "empty_message"
PLACEHOLDER_COUNT = "placeholder_count"
IMAGE_IN_RESPONSE = "image_in_response"
MISSING_RESPONSE = "missing_response"
EMPTY_RESPONSE = "empty_response"
IDENTICAL_RESPONSES = "identical_responses"
MISSING_IMAGE = "missing_image"
# Tokenization (tokenize.py)
CONTROL_TOKEN_IN_TEXT = "control_token_in_text"
PROMPT_TOO_LONG = "prompt_too_long"
IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"
CHAT_TEMPLATE_ERROR = "chat_template_error"
# Image content (images.py)
CORRUPT_IMAGE = "corrupt_image"
TRUNCATED_IMAGE = "truncated_image"
DECOMPRESSION_BOMB = "decompression_bomb"
EMPTY_IMAGE = "empty_image"
EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"
HIGH_BIT_DEPTH = "high_bit_depth"  # a 16-bit / float image under data.high_bit_depth="refuse"


class BadRecordError(ValueError):
    """A data record that cannot be used, with where it is and why.

    Attributes:
      file: the dataset file (str) or None when not yet known.
      line: 1-based line number in a JSONL file, or 1-based record number in a JSON array file; None if unknown.
      reason: a short reason code (the constants in this module), used for counting.
      detail: the human explanation, without the location.
      image: the image path concerned, if any.
    """

    def __init__(
        self,
        file: str | None,
        line: int | None,
        reason: str,
        detail: str,
        *,
        image: str | None = None,
    ):
        self.file = None if file is None else str(file)
        self.line = line
        self.reason = reason
        self.detail = detail
        self.image = image
        super().__init__(self._format())

    def _format(self) -> str:
        if self.file is None:
            where = "<unknown file>"
        else:
            where = self.file
        if self.line is not None:
            where = f"{where}:{self.line}"
        message = f"{where}: bad record ({self.reason}): {self.detail}"
        if self.image is not None and self.image not in self.detail:
            message += f" [image: {self.image}]"
        return message

    @property
    def message(self) -> str:
        return self._format()

    def at(self, file: str | None, line: int | None) -> "BadRecordError":
        """A copy of this error located at `file:line` (keeps the original location where that is unknown)."""
        return BadRecordError(
            file if file is not None else self.file,
            line if line is not None else self.line,
            self.reason,
            self.detail,
            image=self.image,
        )

    def __reduce__(self):  # picklable across Grain worker processes
        return (_rebuild_bad_record_error, (self.file, self.line, self.reason, self.detail, self.image))


def _rebuild_bad_record_error(file, line, reason, detail, image):
    return BadRecordError(file, line, reason, detail, image=image)


class BadRecordCounter:
    """Counts skipped records by reason and keeps the first few messages of each reason for the summary."""

    def __init__(self, examples_per_reason: int = 3, log_first: int = 5):
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = {}
        self.examples_per_reason = examples_per_reason
        self.log_first = log_first

    def add(self, error: BadRecordError) -> None:
        self.counts[error.reason] += 1
        examples = self.examples.setdefault(error.reason, [])
        if len(examples) < self.examples_per_reason:
            examples.append(error.message)
        if self.counts[error.reason] <= self.log_first:
            logger.warning("skipping %s", error.message)

    def merge(self, other: "BadRecordCounter") -> None:
        self.counts.update(other.counts)
        for reason, messages in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(messages[: max(0, self.examples_per_reason - len(mine))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, reason: str) -> int:
        return self.counts[reason]

    def summary(self) -> str:
        """One line per reason, most frequent first, with an example message; "" when nothing was skipped."""
        if not self.counts:
            return ""
        lines = [f"skipped {self.total} bad record(s):"]
        for reason, count in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            example = self.examples.get(reason, [""])[0]
            lines.append(f"  {reason}: {count}  (e.g. {example})")
        return "\n".join(lines)

    def log_summary(self, log: logging.Logger | None = None) -> None:
        if self.counts:
            (log or logger).warning("%s", self.summary())

    def __repr__(self) -> str:
        return f"BadRecordCounter({dict(self.counts)})"


class NoUsableRecordsError(ValueError):
    """A whole epoch of a data file (this shard's share) gave no usable record: every record was bad (and skipped)
    or blank. Raised instead of reading on forever; the message names the file(s) and the skip counts by reason."""

    def __init__(self, where: str, records: int, counter: BadRecordCounter, blank: int = 0):
        self.where, self.records, self.counts, self.blank = where, records, dict(counter.counts), blank
        summary = counter.summary() or "skipped 0 bad record(s)"
        blank_note = f"; {blank} blank line(s)" if blank else ""
        super().__init__(f"{where}: no usable record in a whole epoch ({records} record(s) read in a row, none "
                         f"usable{blank_note}) — {summary}")


def handle_bad_record(
    error: BadRecordError, on_bad_record: OnBadRecord, counter: BadRecordCounter | None
) -> None:
    """Raise `error` (on_bad_record="raise") or count and log it (on_bad_record="skip")."""
    if on_bad_record == "raise":
        raise error
    if on_bad_record != "skip":
        raise ValueError(f"on_bad_record must be 'raise' or 'skip', got {on_bad_record!r}")
    if counter is None:
        logger.warning("skipping %s", error.message)
    else:
        counter.add(error)


def check_on_bad_record(on_bad_record: str) -> None:
    if on_bad_record not in ("raise", "skip"):
        raise ValueError(f"on_bad_record must be 'raise' or 'skip', got {on_bad_record!r}")
