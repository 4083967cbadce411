"""Images stored inside a dataset file rather than next to it.

Hugging Face datasets ship images in Parquet and Arrow files as `{"bytes": <encoded file>, "path": <original
name>}` structs (the `datasets.Image` feature), one per `image` column value or a list of them per `images` value.
`image_reference` turns one such value (or a plain path) into what a record carries: an `EmbeddedImage` when the
bytes are there, else the path. `medee_jax.data.images.load_image` decodes an `EmbeddedImage` with the same checks
as an image file (empty, corrupt, truncated, decompression bomb, extreme aspect ratio).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class EmbeddedImage:
    """An encoded image (PNG, JPEG, ...) held in memory.

    name: how messages refer to it, e.g. `train-00000-of-00002.parquet:18 image 0 (scan.png)`.
    data: the encoded file's bytes.
    """

    name: str
    data: bytes

    def __repr__(self) -> str:
        return f"EmbeddedImage({self.name!r}, {len(self.data)} bytes)"


def is_image_struct(value: Any) -> bool:
    """Whether `value` looks like a `datasets.Image` value: a dict with a "bytes" or "path" key and nothing else
    but those two."""
    return isinstance(value, dict) and bool(value) and set(value) <= {"bytes", "path"}


def image_reference(value: dict, name: str) -> EmbeddedImage | str | None:
    """An `EmbeddedImage` for `{"bytes": b"...", "path": ...}`, the path for `{"bytes": None, "path": "x.png"}`,
    None when the struct holds neither (the caller reports it). `name` locates the image in messages."""
    data = value.get("bytes")
    path = value.get("path")
    if isinstance(data, (bytes, bytearray, memoryview)):
        label = f"{name} ({path})" if isinstance(path, str) and path else name
        return EmbeddedImage(label, bytes(data))
    if isinstance(path, str) and path:
        return path
    return None
