"""Closed (yes/no) questions of VQA-RAD, SLAKE and PathVQA as two-option items: A. Yes, B. No.

Layouts:
- VQA-RAD public release (`VQA_RAD Dataset Public.json`, a JSON array): `qid`, `image_name`, `question`, `answer`,
  `answer_type` ("CLOSED" / "OPEN"), `image_organ` (the subset); images in `VQA_RAD Image Folder/` beside it.
- SLAKE (`test.json`, a JSON array): `qid`, `img_name` ("xmlab102/source.jpg"), `question`, `answer`,
  `answer_type`, `q_lang` ("en" / "zh"), `modality` (the subset); images under `imgs/` beside it.
- Hugging Face rows of `flaviagiammarino/vqa-rad` and `flaviagiammarino/path-vqa` exported to JSON/JSONL
  (`image` as a path or `{"bytes": <base64>, "path": ...}`, `question`, `answer`); no answer type, so a yes/no
  answer marks a closed question. PathVQA's original pickles are not read (never unpickle data).

Only yes/no answers become items; open questions, closed questions with other answers ("Heart", "left") and
non-English questions are counted and skipped.
"""

from __future__ import annotations

import os

from medee_jax.data.errors import BadRecordCounter, OnBadRecord

from .items import NOT_ENGLISH, NOT_MULTIPLE_CHOICE, ImageRef, MCItem, make_item, resolve_image_path
from .sources import OutOfScope, collect, image_from_value, json_rows, text_field

YES_NO_OPTIONS = ("Yes", "No")
_IMAGE_FOLDERS = {"vqa_rad": "VQA_RAD Image Folder", "slake": "imgs"}


def detect_layout(row: dict) -> str:
    """"slake", "vqa_rad" or "hf_rows" from a row's fields."""
    if "img_name" in row and "q_lang" in row:
        return "slake"
    if "image_name" in row:
        return "vqa_rad"
    return "hf_rows"


def read_closed_vqa(path, *, dataset: str = "", media_root=None, on_bad_record: OnBadRecord = "raise",
                    counter: BadRecordCounter | None = None, check_images: bool = True) -> list[MCItem]:
    """Yes/no items of a VQA-RAD / SLAKE / PathVQA file; `dataset` names the benchmark in the items (default:
    the detected layout)."""
    base = os.path.dirname(os.path.abspath(os.fspath(path)))

    def parse(row: dict, where) -> MCItem:
        layout = detect_layout(row)
        answer = str(row.get("answer", "")).strip().lower()
        if str(row.get("answer_type", "CLOSED")).upper() != "CLOSED" or answer not in ("yes", "no"):
            raise OutOfScope(NOT_MULTIPLE_CHOICE, f"not a yes/no question (answer {row.get('answer')!r})")
        if layout == "slake" and row.get("q_lang", "en") != "en":
            raise OutOfScope(NOT_ENGLISH, f"q_lang {row.get('q_lang')!r}")
        if layout in _IMAGE_FOLDERS:
            key = "img_name" if layout == "slake" else "image_name"
            folder = media_root or os.path.join(base, _IMAGE_FOLDERS[layout])
            image = ImageRef(path=resolve_image_path(text_field(row, key, where), folder, None))
            subset = row.get("modality" if layout == "slake" else "image_organ", "")
        else:
            image = image_from_value(row.get("image"), where, base, media_root)
            subset = ""
        item_id = row.get("qid", row.get("id", f"{os.path.basename(where[0])}-{where[1]}"))
        return make_item(where, id=item_id, question=text_field(row, "question", where), options=YES_NO_OPTIONS,
                         answer="A" if answer == "yes" else "B", images=[image], subset=subset,
                         benchmark=dataset or layout, check_images=check_images)

    return collect(json_rows(path), parse, on_bad_record=on_bad_record, counter=counter)
