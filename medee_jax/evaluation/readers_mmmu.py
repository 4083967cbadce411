"""Readers for MMMU, MMMU-Pro and VLMEvalKit TSV files.

MMMU / MMMU-Pro rows (the Hugging Face `MMMU/MMMU` and `MMMU/MMMU_Pro` columns): `id`
("validation_Clinical_Medicine_12"), `question` with `<image n>` references, `options` as a stringified Python
list ("['a', 'b']", up to 10 options in MMMU-Pro), `answer` ("B"), `image_1`..`image_7`, `question_type`
("multiple-choice" | "open", MMMU only), `subfield` / `subject`. MMMU-Pro's "vision" setting has one `image`
column (the question is inside the image) and no `question`. Rows come from a JSON/JSONL export (image columns as
paths or `{"bytes": <base64>, "path": ...}`) or straight from an iterable such as a `datasets.Dataset` (images as
PIL images) via `mmmu_items`. The subset is the subject ("Clinical_Medicine"); `HEALTH_AND_MEDICINE` lists the
subjects of MMMU's Health & Medicine discipline.

`<image n>` references become `<image>` placeholders, the images listed in the order the references appear
(question first, then options); images a row has but never references go before the question.

VLMEvalKit TSV (`index`, `question`, option columns `A`..`J`, `answer`, `image` = base64, or a stringified list of
base64 strings, or the `index` of another row whose image it shares; optional `image_path`, `hint`, `category`,
`l2-category`, `split`) -> items with the images embedded (no files written). MMMU TSVs keep `<image n>`.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterable

from medee_jax.data import errors
from medee_jax.data.errors import BadRecordCounter, OnBadRecord

from .items import IMAGE_PLACEHOLDER, LETTERS, NOT_MULTIPLE_CHOICE, UNSUPPORTED, ImageRef, MCItem, item_error, make_item
from .sources import (OutOfScope, collect, decode_base64, image_from_value, json_rows, rows_from_iterable, table_rows,
                      text_field)

HEALTH_AND_MEDICINE = (
    "Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health",
)
MMMU_PRO_VISION_QUESTION = "Answer the following multiple-choice question in the image."
_REF_RE = re.compile(r"<image\s*(\d+)>")
_MAX_MMMU_IMAGES = 7


def parse_option_list(value, where) -> list[str]:
    """MMMU's options: a list, or a stringified Python list ("['a', 'b']"), parsed without eval."""
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError) as e:
            raise item_error(where, "no_options", f"'options' is not a list literal: {value[:80]!r}") from e
        if isinstance(parsed, (list, tuple)):
            return [str(v) for v in parsed]
    raise item_error(where, "no_options", f"'options' must be a list, got {type(value).__name__}")


def resolve_image_refs(texts: list[str], images: dict[int, ImageRef], where) -> tuple[list[str], list[ImageRef]]:
    """Replaces `<image n>` in `texts` by `<image>`; returns the texts and the images in reference order, with
    unreferenced images first (their placeholders prepended to texts[0])."""
    ordered, referenced = [], set()

    def substitute(match: re.Match) -> str:
        n = int(match.group(1))
        if n not in images:
            raise item_error(where, errors.MISSING_IMAGE, f"the text refers to <image {n}> but the row has no image_{n}")
        ordered.append(images[n])
        referenced.add(n)
        return IMAGE_PLACEHOLDER

    texts = [_REF_RE.sub(substitute, t) for t in texts]
    extra = [n for n in sorted(images) if n not in referenced]
    if extra:
        texts[0] = IMAGE_PLACEHOLDER * len(extra) + texts[0]
        ordered = [images[n] for n in extra] + ordered
    return texts, ordered


def _subject(row: dict) -> str:
    if row.get("subject"):
        return str(row["subject"])
    match = re.match(r"^(?:dev|validation|test)_(.+)_\d+$", str(row.get("id", "")))
    return match.group(1) if match else str(row.get("subfield", ""))


def _mmmu_parser(base: str, media_root, benchmark: str, subjects, check_images: bool):
    def parse(row: dict, where) -> MCItem:
        subject = _subject(row)
        if subjects and subject not in subjects:
            raise OutOfScope("other_subject", f"subject {subject!r} not selected")
        if row.get("question_type", "multiple-choice") != "multiple-choice":
            raise OutOfScope(NOT_MULTIPLE_CHOICE, f"question_type {row.get('question_type')!r}")
        options = parse_option_list(row.get("options"), where)
        if any("<img=" in o for o in options):
            raise OutOfScope(UNSUPPORTED, "options given as image file references")
        if "question" not in row and row.get("image") is not None:  # MMMU-Pro vision: the question is the image
            question, images = IMAGE_PLACEHOLDER + MMMU_PRO_VISION_QUESTION, [
                image_from_value(row["image"], where, base, media_root)]
        else:
            found = {n: image_from_value(row[f"image_{n}"], where, base, media_root)
                     for n in range(1, _MAX_MMMU_IMAGES + 1) if row.get(f"image_{n}") not in (None, "")}
            texts, images = resolve_image_refs([text_field(row, "question", where)] + options, found, where)
            question, options = texts[0], texts[1:]
        return make_item(where, id=text_field(row, "id", where), question=question, options=options,
                         answer=row.get("answer"), images=images, subset=subject, benchmark=benchmark,
                         check_images=check_images)

    return parse


def mmmu_items(rows: Iterable[dict], *, name: str = "mmmu", pro: bool = False, subjects=None, media_root=None,
               on_bad_record: OnBadRecord = "raise", counter: BadRecordCounter | None = None) -> list[MCItem]:
    """Items of in-memory MMMU / MMMU-Pro rows (e.g. `datasets.load_dataset("MMMU/MMMU", ...)` rows)."""
    parse = _mmmu_parser(os.getcwd(), media_root, "mmmu_pro" if pro else "mmmu", subjects, True)
    return collect(rows_from_iterable(rows, name), parse, on_bad_record=on_bad_record, counter=counter)


def read_mmmu(path, *, pro: bool = False, subjects=None, media_root=None, on_bad_record: OnBadRecord = "raise",
              counter: BadRecordCounter | None = None, check_images: bool = True) -> list[MCItem]:
    """Items of MMMU (pro=False) or MMMU-Pro (pro=True) rows exported to JSON/JSONL; `subjects` filters."""
    base = os.path.dirname(os.path.abspath(os.fspath(path)))
    parse = _mmmu_parser(base, media_root, "mmmu_pro" if pro else "mmmu", subjects, check_images)
    return collect(json_rows(path), parse, on_bad_record=on_bad_record, counter=counter)


# -------------------------------------------------------------------------------------------- VLMEvalKit TSV


def _tsv_images(value: str, by_index: dict[str, str], where) -> list[ImageRef]:
    value = (value or "").strip()
    if not value:
        return []
    if len(value) <= 64:  # a reference to another row's image (VLMEvalKit saves space this way)
        if value not in by_index or len(by_index[value]) <= 64:
            raise item_error(where, errors.MISSING_IMAGE, f"image refers to row index {value!r}, which has no image")
        value = by_index[value]
    if value.startswith("[") and value.endswith("]"):
        try:
            encoded = [str(v) for v in ast.literal_eval(value)]
        except (ValueError, SyntaxError) as e:
            raise item_error(where, errors.CORRUPT_IMAGE, "image column is not a list of base64 strings") from e
    else:
        encoded = [value]
    return [ImageRef(data=decode_base64(e, where)) for e in encoded]


def read_vlmevalkit_tsv(path, *, media_root=None, on_bad_record: OnBadRecord = "raise",
                        counter: BadRecordCounter | None = None, check_images: bool = True) -> list[MCItem]:
    """Items of a VLMEvalKit multiple-choice TSV; subset = `category` (else `l2-category`, else "")."""
    path = os.fspath(path)
    rows = list(table_rows(path, delimiter="\t"))
    by_index = {str(row.get("index", "")).strip(): str(row.get("image") or "") for _, row in rows}
    base = os.path.dirname(os.path.abspath(path))

    def parse(row: dict, where) -> MCItem:
        options = []
        for letter in LETTERS:
            text = row.get(letter)
            if text is None or str(text).strip() in ("", "nan"):
                break
            options.append(str(text))
        images = _tsv_images(row.get("image", ""), by_index, where)
        if not images and row.get("image_path"):
            paths = row["image_path"].strip()
            paths = [str(p) for p in ast.literal_eval(paths)] if paths.startswith("[") else [paths]
            images = [image_from_value(p, where, base, media_root) for p in paths]
        question = text_field(row, "question", where)
        if row.get("hint") and str(row["hint"]).strip() not in ("", "nan"):
            question = f"Hint: {row['hint'].strip()}\n{question}"
        texts, ordered = resolve_image_refs([question] + options, dict(enumerate(images, start=1)), where) \
            if _REF_RE.search(question + "".join(options)) else ([question] + options, images)
        return make_item(where, id=text_field(row, "index", where), question=texts[0], options=texts[1:],
                         answer=row.get("answer") or None, images=ordered,
                         subset=row.get("category") or row.get("l2-category") or "", benchmark="vlmevalkit",
                         check_images=check_images)

    return collect(rows, parse, on_bad_record=on_bad_record, counter=counter)
