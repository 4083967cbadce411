"""Benchmark readers that turn the files benchmarks ship into `MCItem`s.

Every reader: `read_x(path, *, media_root=None, on_bad_record="raise", counter=None, check_images=True)` ->
list of `MCItem`. Image paths resolve against `media_root`, else the data file's folder (or the benchmark's own
image folder beside it, named below). Bad items raise a `BadRecordError` naming `file:line` and the reason, or with
on_bad_record="skip" are counted; rows outside the multiple-choice scope are always counted and skipped.

Layouts (as the benchmarks publish them):
- `read_mc_jsonl`: this project's evaluation format, `{"id", "question", "options": {"A": ...}, "answer": "C",
  "images": [...], "subset"}` (options may also be a list).
- `read_medxpertqa`: MedXpertQA MM/Text JSONL. The question text ends with "Answer Choices: (A) ... (B) ...";
  `options` is `{"A": ...}` (Hugging Face release) or `[{"letter": "A", "content": ...}]` (GitHub eval inputs) or
  absent (then parsed from the question); `label` is "C" or ["C"]; `images` are file names (or
  `{"image_path": ...}`) under `images/` beside the file; `question_type` (Reasoning/Understanding) is the subset.
  The stored question is the stem without the choices; `prompts.medxpertqa_question` writes them back verbatim.
- `read_text_mc`: MedQA (`question`, `options` {"A": ...}, `answer_idx`, `meta_info`) and Medbullets
  (`question`, `opa`..`ope`, `answer_idx`) as JSONL/JSON or CSV.
- `read_pmc_vqa`: PMC-VQA CSV (`Figure_path`, `Question`, `Choice A`..`Choice D` written "A:text",
  `Answer_label` or `Answer`/`Anwser`); images under `images/` beside the file.
- `read_omnimedvqa`: OmniMedVQA QA_information JSON files (a file or a folder of them): `question_id`,
  `question`, `option_A`..`option_D` (some items have fewer), `gt_answer` given as the option's text,
  `image_path` relative to the dataset root (the folder above QA_information), `question_type` as subset.
MMMU, MMMU-Pro and VLMEvalKit TSV are in `readers_mmmu.py`; closed VQA-RAD/SLAKE/PathVQA in `readers_vqa.py`.
"""

from __future__ import annotations

import os
import re

from medee_jax.data import errors
from medee_jax.data.errors import BadRecordCounter, OnBadRecord

from .items import LETTERS, ImageRef, MCItem, item_error, make_item, resolve_image_path
from .sources import collect, image_from_value, json_rows, table_rows, text_field


def _base(path) -> str:
    return os.path.dirname(os.path.abspath(os.fspath(path)))


def _letter_options(options, where) -> list[str]:
    """Options given as {"A": text, ...} (letters in order from A, no gaps) or as a list of texts."""
    if isinstance(options, dict):
        letters = [str(k).strip().upper() for k in options]
        if letters != list(LETTERS[: len(letters)]):
            raise item_error(where, errors.BAD_FIELD, f"option keys must be A, B, ... in order, got {list(options)}")
        return [options[k] for k in options]
    if isinstance(options, list):
        return list(options)
    raise item_error(where, "no_options", f"'options' must be an object or a list, got {type(options).__name__}")


def _answer_letter(value, options: list[str], where) -> str:
    """A letter answer as given; a text answer (e.g. "B:text" or the option's text) mapped to its letter."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    text = str(value).strip() if value is not None else ""
    if len(text) == 1 and text.upper() in LETTERS:
        return text.upper()
    stripped = re.sub(r"^[A-Z]\s*[:.]\s*", "", text)
    matches = [i for i, o in enumerate(options) if str(o).strip().lower() in (text.lower(), stripped.lower())]
    if len(matches) != 1:
        raise item_error(where, "answer_not_in_options", f"answer {text!r} matches {len(matches)} options")
    return LETTERS[matches[0]]


# -------------------------------------------------------------------------------------------- MC JSONL


def read_mc_jsonl(path, *, media_root=None, on_bad_record: OnBadRecord = "raise",
                  counter: BadRecordCounter | None = None, check_images: bool = True) -> list[MCItem]:
    """Items of this project's multiple-choice JSONL (data_formats.md)."""
    base = _base(path)

    def parse(row: dict, where) -> MCItem:
        if "options" not in row:
            raise item_error(where, "no_options", "no 'options' field")
        options = _letter_options(row["options"], where)
        images = [image_from_value(v, where, base, media_root) for v in row.get("images") or []]
        answer = row.get("answer")
        return make_item(where, id=row.get("id", f"{os.path.basename(where[0])}:{where[1]}"),
                         question=text_field(row, "question", where), options=options,
                         answer=None if answer in (None, "") else answer, images=images,
                         subset=row.get("subset", ""), benchmark="mc_jsonl", check_images=check_images)

    return collect(json_rows(path), parse, on_bad_record=on_bad_record, counter=counter)


# -------------------------------------------------------------------------------------------- MedXpertQA

_CHOICES_MARK = "\nAnswer Choices:"
_CHOICE_RE = re.compile(r"\(([A-Z])\)\s*")


def split_answer_choices(question: str, where) -> tuple[str, list[str]]:
    """MedXpertQA's "stem\\nAnswer Choices: (A) x (B) y" -> (stem, [x, y])."""
    cut = question.rfind(_CHOICES_MARK)
    if cut < 0:
        raise item_error(where, "no_options", "the question has no 'Answer Choices:' part")
    stem, tail = question[:cut], question[cut + len(_CHOICES_MARK):]
    parts = _CHOICE_RE.split(tail)  # ["", "A", "text ", "B", "text", ...]
    letters, texts = parts[1::2], [p.strip() for p in parts[2::2]]
    if parts[0].strip() or letters != list(LETTERS[: len(letters)]):
        raise item_error(where, "no_options", f"cannot read the answer choices {tail[:80]!r}")
    return stem, texts


def read_medxpertqa(path, *, media_root=None, on_bad_record: OnBadRecord = "raise",
                    counter: BadRecordCounter | None = None, check_images: bool = True) -> list[MCItem]:
    """Items of MedXpertQA MM (or Text) JSONL; subset = question_type (Reasoning / Understanding)."""
    base = _base(path)
    image_dir = media_root or (os.path.join(base, "images") if os.path.isdir(os.path.join(base, "images")) else base)

    def parse(row: dict, where) -> MCItem:
        stem, parsed = split_answer_choices(text_field(row, "question", where), where)
        options = row.get("options")
        if isinstance(options, list) and options and isinstance(options[0], dict):
            options = {o.get("letter"): o.get("content") for o in options}
        options = _letter_options(options, where) if options else parsed
        if [str(o).strip() for o in options] != parsed:
            raise item_error(where, errors.BAD_FIELD, "'options' differ from the choices written in the question")
        images = []
        for value in row.get("images") or []:
            value = value.get("image_path") if isinstance(value, dict) else value
            images.append(ImageRef(path=resolve_image_path(str(value), image_dir, None)))
        label = row.get("label", row.get("answer"))
        if isinstance(label, list):
            if len(label) != 1:
                raise item_error(where, errors.BAD_FIELD, f"expected one label, got {label}")
            label = label[0]
        return make_item(where, id=text_field(row, "id", where), question=stem, options=options, answer=label,
                         images=images, subset=row.get("question_type", ""), benchmark="medxpertqa",
                         check_images=check_images)

    return collect(json_rows(path), parse, on_bad_record=on_bad_record, counter=counter)


# -------------------------------------------------------------------------------------------- MedQA / Medbullets

_OP_COLUMNS = ("opa", "opb", "opc", "opd", "ope")


def read_text_mc(path, *, media_root=None, on_bad_record: OnBadRecord = "raise",
                 counter: BadRecordCounter | None = None, check_images: bool = True) -> list[MCItem]:
    """Text-only items of MedQA (JSONL) or Medbullets (CSV or JSONL)."""
    del media_root, check_images
    path = os.fspath(path)
    rows = table_rows(path, delimiter=",") if path.lower().endswith(".csv") else json_rows(path)
    stem = os.path.splitext(os.path.basename(path))[0]

    def parse(row: dict, where) -> MCItem:
        if isinstance(row.get("options"), dict):
            options, benchmark = _letter_options(row["options"], where), "medqa"
        elif "opa" in row:
            options = [row[c] for c in _OP_COLUMNS if row.get(c) not in (None, "")]
            benchmark = "medbullets"
        else:
            raise item_error(where, "no_options", f"no 'options' or 'opa'.. fields (fields: {sorted(row)})")
        answer = row.get("answer_idx")
        if answer in (None, ""):
            answer = _answer_letter(row.get("answer"), options, where)
        return make_item(where, id=row.get("id", f"{stem}-{where[1]}"), question=text_field(row, "question", where),
                         options=options, answer=answer, subset=row.get("meta_info", ""), benchmark=benchmark)

    return collect(rows, parse, on_bad_record=on_bad_record, counter=counter)


# -------------------------------------------------------------------------------------------- PMC-VQA


def read_pmc_vqa(path, *, media_root=None, on_bad_record: OnBadRecord = "raise",
                 counter: BadRecordCounter | None = None, check_images: bool = True) -> list[MCItem]:
    """Items of a PMC-VQA CSV (test.csv / test_clean.csv / test_2.csv)."""
    base = _base(path)
    image_dir = media_root or next(
        (d for d in (os.path.join(base, "images"), os.path.join(base, "figures")) if os.path.isdir(d)), base)

    def parse(row: dict, where) -> MCItem:
        options = []
        for letter in "ABCD":
            text = text_field(row, f"Choice {letter}", where)
            options.append(re.sub(rf"^\s*{letter}\s*:\s*", "", text))
        answer = row.get("Answer_label") or row.get("Answer") or row.get("Anwser")
        answer = _answer_letter(answer, options, where)
        figure = text_field(row, "Figure_path", where)
        return make_item(where, id=row.get("index") or f"pmc-vqa-{where[1]}", question=text_field(row, "Question", where),
                         options=options, answer=answer, images=[ImageRef(path=resolve_image_path(figure, image_dir, None))],
                         benchmark="pmc_vqa", check_images=check_images)

    return collect(table_rows(path, delimiter=","), parse, on_bad_record=on_bad_record, counter=counter)


# -------------------------------------------------------------------------------------------- OmniMedVQA


def read_omnimedvqa(path, *, media_root=None, on_bad_record: OnBadRecord = "raise",
                    counter: BadRecordCounter | None = None, check_images: bool = True) -> list[MCItem]:
    """Items of OmniMedVQA QA_information JSON (one file, or every .json in a folder, sorted by name)."""
    path = os.fspath(path)
    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".json")] \
        if os.path.isdir(path) else [path]
    items = []
    for file in files:
        # Image paths are relative to the dataset root: .../OmniMedVQA/QA_information/Open-access/x.json
        root = media_root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(file))))

        def parse(row: dict, where, root=root) -> MCItem:
            options = [row[f"option_{c}"] for c in "ABCDEFGH" if row.get(f"option_{c}") not in (None, "")]
            answer = _answer_letter(row.get("gt_answer"), options, where)
            image = ImageRef(path=resolve_image_path(text_field(row, "image_path", where), root, None))
            return make_item(where, id=text_field(row, "question_id", where), question=text_field(row, "question", where),
                             options=options, answer=answer, images=[image], subset=row.get("question_type", ""),
                             benchmark="omnimedvqa", check_images=check_images)

        items += collect(json_rows(file), parse, on_bad_record=on_bad_record, counter=counter)
    return items
