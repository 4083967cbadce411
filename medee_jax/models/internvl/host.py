"""InternVL3 host-side (numpy) code: tiling images for the input pipeline (``images.internvl_preprocess``, as
transformers' GotOcr2 processor), image-token counts (``<img>`` + ``<IMG_CONTEXT>`` x tokens_per_tile·tiles +
``</img>``), 1-D position ids, and the batch's vision part (tiles only: InternViT needs no layout arrays).

Imports neither jax nor flax: Grain data workers and batch assembly run this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from .config import InternVisionConfig

IMAGE_TOKEN = "<IMG_CONTEXT>"
IMAGE_START, IMAGE_END = "<img>", "</img>"


def text_position_ids(input_ids, attention_mask=None, segment_ids=None) -> np.ndarray:
    """Returns 1-D position ids [B, L] int32: 0, 1, 2, ... over each row's attended tokens, restarting for every
    packed example (``segment_ids`` [B, L], 0 on padding); 0 on padding. (transformers counts left padding into
    the positions; RoPE depends only on position differences within a row, so the logits are the same.)"""
    input_ids = np.asarray(input_ids)
    mask = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if segment_ids is not None:
        mask = mask & (np.asarray(segment_ids) != 0)
        starts = np.asarray(segment_ids)
    else:
        starts = mask.astype(np.int64)  # one segment per row
    out = np.zeros(input_ids.shape, np.int64)
    for row in range(input_ids.shape[0]):
        cols = np.flatnonzero(mask[row])
        seg = starts[row, cols]
        first = np.concatenate([[True], seg[1:] != seg[:-1]]) if cols.size else np.zeros(0, bool)
        begin = np.maximum.accumulate(np.where(first, np.arange(cols.size), 0))  # index of its segment's start
        out[row, cols] = np.arange(cols.size) - begin
    return out.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class InternVLImageInputs:
    """Everything the input pipeline and batch assembly need to know about InternVL3 images (the family's
    ``ImageInputs``, see ``medee_jax.models.families``). Vision units are tiles: pixel_values [T, 3, S, S] float32
    (S = the vision config's image_size), ``tokens_per_tile`` LLM tokens each; per-image info
    ``image_num_patches`` [k] (tiles per image, thumbnail included); no layout arrays (the ``vision`` dict is
    empty)."""

    vision: InternVisionConfig
    image_token_id: int | None = None
    downsample_ratio: float = 0.5
    min_tiles: int = 1
    max_tiles: int = 12
    image_max_pixels: int = 0  # > 0: LLaMA-Factory-style area clamp before the processor
    high_bit_depth: str = "min_max"  # how 16-bit / float images become 8-bit (`medee_jax.data.images.to_8bit`)

    info_key: ClassVar[str] = "image_num_patches"
    unit_name: ClassVar[str] = "tiles"
    position_axes: ClassVar[tuple[int, ...]] = ()
    unit_multiple: ClassVar[int] = 1
    chat_tokens: ClassVar[dict[str, Any]] = {"image_token": IMAGE_TOKEN, "image_prefix": (IMAGE_START,),
                                             "image_suffix": (IMAGE_END,), "boundary_tokens": ()}

    def __post_init__(self):
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"tiles per image: need 1 <= min_tiles <= max_tiles, got {self.min_tiles}, "
                             f"{self.max_tiles}")

    @property
    def tokens_per_tile(self) -> int:
        """LLM image tokens per tile (256 for 448 px tiles of 14 px patches, 2x2 pixel shuffle)."""
        return (self.vision.grid // round(1 / self.downsample_ratio)) ** 2

    # ---- input pipeline (worker side) ----

    def load(self, paths) -> tuple[np.ndarray, np.ndarray]:
        """Returns (tiles float32 [t, 3, S, S], image_num_patches int64 [k]) of image files: each image tiled into
        min_tiles..max_tiles tiles of S px (plus a thumbnail when more than one), as transformers' processor."""
        from medee_jax.data.images import as_rgb_image, internvl_preprocess, prescale_image

        images = [as_rgb_image(item, self.high_bit_depth) for item in paths]
        if self.image_max_pixels > 0:
            images = [prescale_image(image, self.image_max_pixels) for image in images]
        return internvl_preprocess(images, crop_to_patches=True, min_patches=self.min_tiles,
                                   max_patches=self.max_tiles, image_size=self.vision.image_size)

    def token_counts(self, info) -> list[int]:
        """Returns the <IMG_CONTEXT> tokens of each image of one example (info: its tiles per image)."""
        return [int(n) * self.tokens_per_tile for n in np.asarray(info).reshape(-1)]

    # ---- batch assembly ----

    @staticmethod
    def concat_info(infos: list) -> np.ndarray:
        """Returns the tiles per image [n] of several examples' images, in order."""
        if not infos:
            return np.zeros((0,), np.int64)
        return np.concatenate([np.asarray(i, np.int64).reshape(-1) for i in infos])

    def num_features(self, units: int) -> int:
        """Returns the LLM feature rows ``units`` tiles give."""
        return units * self.tokens_per_tile

    def empty_pixels(self, units: int) -> np.ndarray:
        """Returns zero pixel_values for ``units`` padding tiles."""
        v = self.vision
        return np.zeros((units, v.num_channels, v.image_size, v.image_size), np.float32)

    def pixel_batch(self, pixels: list[np.ndarray], bucket: int) -> np.ndarray:
        """Returns float32 [bucket, 3, S, S]: the examples' tiles in order, then zero tiles."""
        out = self.empty_pixels(bucket)
        start = 0
        for tiles in pixels:
            out[start:start + tiles.shape[0]] = tiles
            start += tiles.shape[0]
        return out

    def layout(self, info: np.ndarray, pad_to: int) -> dict[str, np.ndarray]:
        """InternViT encodes every tile on its own: no layout arrays."""
        return {}

    def extend_layout(self, vision: dict, units: int) -> dict:
        return {}

    def positions(self, input_ids, info=None, attention_mask=None, segment_ids=None) -> np.ndarray:
        """Returns 1-D position ids [B, L] (``text_position_ids``; images take one position per token)."""
        return text_position_ids(input_ids, attention_mask, segment_ids)

    def sequence_positions(self, token_ids, info=None) -> np.ndarray:
        """Returns the positions [N] of one unpadded sequence."""
        return np.arange(len(token_ids), dtype=np.int64)


def image_inputs(model_config, options=None, image_token_id: int | None = None) -> InternVLImageInputs:
    """Returns the family's ``ImageInputs`` for an InternVLConfig (or its InternVisionConfig) and the data options
    (an object with min_tiles, max_tiles, image_max_pixels, e.g. ``medee_jax.data.pipeline.DataConfig``)."""
    vision = getattr(model_config, "vision", model_config)
    if image_token_id is None:
        image_token_id = getattr(model_config, "image_token_id", None)
    kw = {"downsample_ratio": float(getattr(model_config, "downsample_ratio", 0.5))}
    for name in ("min_tiles", "max_tiles", "image_max_pixels"):
        if options is not None and getattr(options, name, None) is not None:
            kw[name] = int(getattr(options, name))
    if options is not None and getattr(options, "high_bit_depth", None) is not None:
        kw["high_bit_depth"] = str(options.high_bit_depth)
    return InternVLImageInputs(vision=vision, image_token_id=image_token_id, **kw)
