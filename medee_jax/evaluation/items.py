"""The multiple-choice item every benchmark reader produces, and the image reference it carries.

`MCItem`: one question with its option texts in letter order, the correct letter (None when unknown), the images
the question shows and where it came from (`file:line`). The question text may hold `<image>` placeholders; when
it holds none, the images go before the question when a prompt is built (see `prompts.py`).

`ImageRef` points at an image without loading it: a file path, encoded file bytes (images that datasets ship
inside the data file, e.g. VLMEvalKit's base64 column), or a blank (uniform grey) image of a given size, which the
image-blind control uses. `sha256()` identifies the content for caches and reports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import string
from typing import Any

from PIL import Image

from medee_jax.data import errors
from medee_jax.data.errors import BadRecordError

LETTERS = string.ascii_uppercase
MAX_OPTIONS = 26
IMAGE_PLACEHOLDER = "<image>"
BLANK_GREY = 128  # the blank control's pixel value (every channel)

# Reason codes of items that cannot be evaluated (bad data) or are out of a benchmark's multiple-choice scope.
NO_OPTIONS = "no_options"
ANSWER_NOT_IN_OPTIONS = "answer_not_in_options"
NOT_MULTIPLE_CHOICE = "not_multiple_choice"  # open questions (MMMU "open", VQA answers other than yes/no)
NOT_ENGLISH = "not_english"  # SLAKE's Chinese questions
UNSUPPORTED = "unsupported_item"  # e.g. MMMU items whose options are images


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An image by reference: exactly one of `path`, `data` (encoded image file bytes) or `blank_size`."""

    path: str | None = None
    data: bytes | None = dataclasses.field(default=None, repr=False)
    blank_size: tuple[int, int] | None = None  # (width, height) of a uniform grey image

    def __post_init__(self):
        given = sum(x is not None for x in (self.path, self.data, self.blank_size))
        if given != 1:
            raise ValueError("an ImageRef needs exactly one of path, data or blank_size")

    def load(self) -> Image.Image:
        """The image as an upright RGB PIL image (file images validated by `medee_jax.data.images.load_image`)."""
        from medee_jax.data.images import ImageError, load_image, to_rgb

        if self.path is not None:
            return load_image(self.path)
        if self.blank_size is not None:
            return Image.new("RGB", self.blank_size, (BLANK_GREY,) * 3)
        try:
            with Image.open(io.BytesIO(self.data)) as opened:
                opened.load()
                return to_rgb(opened)
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageError(None, errors.CORRUPT_IMAGE, f"embedded image is not decodable ({e})") from e

    def size(self) -> tuple[int, int]:
        """(width, height), read from the file header only."""
        if self.blank_size is not None:
            return self.blank_size
        source = self.path if self.path is not None else io.BytesIO(self.data)
        with Image.open(source) as opened:
            return opened.size

    def sha256(self) -> str:
        """Hex SHA-256 of the encoded bytes (files, embedded data) or of `blank:<w>x<h>:<grey>` (blank images)."""
        if self.blank_size is not None:
            w, h = self.blank_size
            return hashlib.sha256(f"blank:{w}x{h}:{BLANK_GREY}".encode()).hexdigest()
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest()
        return file_sha256(self.path)

    def describe(self) -> str:
        """A short human label: the path, `embedded:<sha12>` or `blank:<w>x<h>`."""
        if self.path is not None:
            return self.path
        if self.blank_size is not None:
            return f"blank:{self.blank_size[0]}x{self.blank_size[1]}"
        return f"embedded:{self.sha256()[:12]}"


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes, memoised by (path, size, mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


@dataclasses.dataclass(frozen=True)
class MCItem:
    """One multiple-choice question. `options[i]` is the text of letter `LETTERS[i]`."""

    id: str
    question: str
    options: tuple[str, ...]
    answer: str | None  # "A", "B", ... or None when the benchmark does not give it
    images: tuple[ImageRef, ...] = ()
    subset: str = ""
    benchmark: str = ""
    source: str = ""  # "file:line" (or "file:record N")

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]

    @property
    def answer_text(self) -> str | None:
        return None if self.answer is None else self.options[LETTERS.index(self.answer)]


def item_error(where: tuple[str, int | None], reason: str, detail: str, *, image: str | None = None) -> BadRecordError:
    """A `BadRecordError` at (file, line) with one of this module's (or `medee_jax.data.errors`') reasons."""
    return BadRecordError(where[0], where[1], reason, detail, image=image)


def make_item(
    where: tuple[str, int | None],
    *,
    id: Any,
    question: str,
    options: list[str] | tuple[str, ...],
    answer: str | None,
    images: list[ImageRef] | tuple[ImageRef, ...] = (),
    subset: str = "",
    benchmark: str = "",
    check_images: bool = True,
) -> MCItem:
    """Builds a checked `MCItem`; raises `BadRecordError` at `where` for no/too many options, an answer that is
    not one of the option letters, a placeholder count that differs from the image count, or a missing image."""
    options = tuple("" if o is None else str(o).strip() for o in options)
    if len(options) < 2 or any(not o for o in options):
        raise item_error(where, NO_OPTIONS, f"needs at least two non-empty options, got {list(options)!r}")
    if len(options) > MAX_OPTIONS:
        raise item_error(where, errors.BAD_FIELD, f"{len(options)} options (at most {MAX_OPTIONS})")
    if answer is not None:
        answer = str(answer).strip().upper()
        if answer not in LETTERS[: len(options)] or not answer:
            raise item_error(
                where, ANSWER_NOT_IN_OPTIONS,
                f"answer {answer!r} is not one of the option letters {LETTERS[: len(options)]}",
            )
    if not isinstance(question, str) or not question.strip():
        raise item_error(where, errors.EMPTY_MESSAGE, "the question is empty")
    placeholders = question.count(IMAGE_PLACEHOLDER) + sum(o.count(IMAGE_PLACEHOLDER) for o in options)
    if placeholders and placeholders != len(images):
        raise item_error(
            where, errors.PLACEHOLDER_COUNT, f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)"
        )
    if check_images:
        for image in images:
            if image.path is not None and not os.path.isfile(image.path):
                raise item_error(where, errors.MISSING_IMAGE, f"image not found: {image.path}", image=image.path)
    return MCItem(
        id=str(id), question=question, options=options, answer=answer, images=tuple(images), subset=str(subset or ""),
        benchmark=benchmark, source=f"{where[0]}:{where[1]}" if where[1] is not None else str(where[0]),
    )


def resolve_image_path(path: str, base_dir: str, media_root: str | None) -> str:
    """An image path from a data file, resolved against `media_root` (when given) or the data file's folder."""
    if os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(media_root or base_dir, path))
