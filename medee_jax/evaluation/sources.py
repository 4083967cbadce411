"""Row sources for the benchmark readers: JSON/JSONL/CSV/TSV files as (line, row) pairs, image values, and the
skip-or-raise collection loop every reader shares.

A row parser raises `BadRecordError` for bad data (missing image, no options, answer not among the options, ...)
and `OutOfScope` for rows that are fine but not a multiple-choice item of this benchmark (open questions, other
languages). `collect` turns rows into `MCItem`s: bad rows raise (on_bad_record="raise") or are counted and
skipped ("skip"); out-of-scope rows are always counted and skipped, so every dropped row is accounted for.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from medee_jax.data import errors
from medee_jax.data.errors import BadRecordCounter, BadRecordError, OnBadRecord
from medee_jax.data.formats import iter_raw_records

from .items import ImageRef, MCItem, item_error, resolve_image_path


class OutOfScope(Exception):
    """A row that is valid but not a multiple-choice item here (counted under `reason`, never an error)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


RowParser = Callable[[dict, tuple[str, int | None]], MCItem]


def collect(
    rows: Iterable[tuple[tuple[str, int | None], dict | BadRecordError]],
    parse: RowParser,
    *,
    on_bad_record: OnBadRecord = "raise",
    counter: BadRecordCounter | None = None,
) -> list[MCItem]:
    """Parses every row; returns the items. Bad rows raise or are counted (on_bad_record); out-of-scope rows are
    counted into `counter` under their reason. Item ids must be unique within one source."""
    errors.check_on_bad_record(on_bad_record)
    counter = counter if counter is not None else BadRecordCounter()
    items, seen = [], {}
    for where, row in rows:
        try:
            if isinstance(row, BadRecordError):
                raise row
            item = parse(row, where)
            if item.id in seen:
                raise item_error(where, errors.BAD_FIELD, f"duplicate item id {item.id!r} (first at {seen[item.id]})")
            seen[item.id] = item.source
            items.append(item)
        except OutOfScope as skip:
            counter.counts[skip.reason] += 1
            counter.examples.setdefault(skip.reason, [])
            if len(counter.examples[skip.reason]) < counter.examples_per_reason:
                counter.examples[skip.reason].append(f"{where[0]}:{where[1]}: {skip.detail}")
        except BadRecordError as error:
            errors.handle_bad_record(error, on_bad_record, counter)
    return items


def json_rows(path: str | os.PathLike) -> Iterator[tuple[tuple[str, int], dict | BadRecordError]]:
    """((file, line), object) for each record of a JSONL file or JSON array file (line = record start)."""
    path = os.fspath(path)
    for line, raw in iter_raw_records(path):
        yield (path, line), raw


def table_rows(path: str | os.PathLike, *, delimiter: str) -> Iterator[tuple[tuple[str, int], dict]]:
    """((file, line), {column: value}) for each data row of a CSV (delimiter ",") or TSV ("\\t") file with a
    header row; line is the 1-based line the row starts on. Quoted fields may span lines and be very long
    (base64 images)."""
    path = os.fspath(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:  # reads the header row
            return
        start = reader.line_num + 1
        for row in reader:
            if row is not None and any(v not in (None, "") for v in row.values()):
                yield (path, start), row
            start = reader.line_num + 1


def rows_from_iterable(rows: Iterable[dict], name: str) -> Iterator[tuple[tuple[str, int], dict]]:
    """In-memory rows (e.g. a `datasets.Dataset`) as ((name, record number), row)."""
    for i, row in enumerate(rows, start=1):
        yield (name, i), dict(row)


def text_field(row: dict, key: str, where, *, required: bool = True) -> str:
    """row[key] as a stripped string; a missing/blank required field is a BadRecordError."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
        if required:
            raise item_error(where, errors.BAD_FIELD, f"missing field {key!r} (fields: {sorted(row)})")
        return ""
    return str(value).strip()


def image_from_value(value: Any, where, base_dir: str, media_root: str | None) -> ImageRef:
    """An image column's value as an `ImageRef`: a path (relative to media_root or the data file's folder), a
    `{"bytes": ..., "path": ...}` dict as Hugging Face datasets store images, raw bytes, or a PIL image."""
    if isinstance(value, str) and value.strip():
        return ImageRef(path=resolve_image_path(value.strip(), base_dir, media_root))
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value))
    if isinstance(value, dict):
        data = value.get("bytes")
        if isinstance(data, str) and data:
            data = decode_base64(data, where)
        if data:
            return ImageRef(data=bytes(data))
        if value.get("path"):
            return ImageRef(path=resolve_image_path(str(value["path"]), base_dir, media_root))
    if hasattr(value, "save") and hasattr(value, "size"):  # a PIL image (datasets decode images to PIL)
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return ImageRef(data=buffer.getvalue())
    raise item_error(where, errors.MISSING_IMAGE, f"no usable image in {type(value).__name__} value")


def decode_base64(text: str, where) -> bytes:
    """Strict base64 decoding; a bad string is a BadRecordError (corrupt_image)."""
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise item_error(where, errors.CORRUPT_IMAGE, f"image column is not valid base64 ({e})") from e
