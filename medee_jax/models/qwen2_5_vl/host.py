"""Qwen2.5-VL host-side (numpy) code: image loading for the input pipeline, image-token counts, M-RoPE position
ids (transformers' ``Qwen2_5_VLModel.get_rope_index``) and the vision layout of a batch.

Imports neither jax nor flax: Grain data workers and batch assembly run this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from .config import VisionConfig
from .vision_layout import extend_window_blocks, vision_layout

IMAGE_TOKEN = "<|image_pad|>"
VISION_BOUNDARY_TOKENS = ("<|vision_start|>", "<|vision_end|>")


def _image_positions(start: int, grid_thw, merge: int) -> np.ndarray:
    """Returns [3, t*h'*w'] M-RoPE positions of one image's merged tokens starting at ``start``."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start


def mrope_positions_for_sequence(token_ids, image_grid_thw, *, image_token_id: int, spatial_merge_size: int = 2):
    """Returns (positions [3, N] int64, images used) for one unpadded token sequence.

    Text tokens advance all three axes together; each run of image tokens consumes images from
    ``image_grid_thw`` in order (t*h*w/merge^2 tokens each) and places them on a (T, H, W) grid starting at the
    current position; text after an image continues at max(previous positions) + 1.
    """
    token_ids = np.asarray(token_ids)
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    n = token_ids.shape[0]
    out = np.zeros((3, n), dtype=np.int64)
    is_image = token_ids == image_token_id
    pos, i, img = 0, 0, 0
    while i < n:
        if not is_image[i]:
            j = i
            while j < n and not is_image[j]:
                j += 1
            out[:, i:j] = np.arange(pos, pos + j - i)
            pos += j - i
            i = j
            continue
        if img >= len(grids):
            raise ValueError(f"sequence has more image tokens than images in image_grid_thw ({len(grids)})")
        grid = grids[img]
        count = int(np.prod(grid)) // spatial_merge_size**2
        if i + count > n or not is_image[i:i + count].all():
            raise ValueError(f"image {img} with grid {grid.tolist()} needs {count} consecutive image tokens at {i}")
        out[:, i:i + count] = _image_positions(pos, grid, spatial_merge_size)
        pos += max(int(grid[1]), int(grid[2])) // spatial_merge_size
        img += 1
        i += count
    return out, img


def mrope_position_ids(input_ids, image_grid_thw=None, attention_mask=None, segment_ids=None, *,
                       image_token_id: int, spatial_merge_size: int = 2):
    """Returns M-RoPE position ids [3, B, L] int32 for a padded batch, equal to transformers' ``get_rope_index``.

    Positions are computed over attended tokens only (padding gets 0, left or right); images are taken from
    ``image_grid_thw`` [n, 3] in order across the rows. With ``segment_ids`` [B, L] (packed rows: one id per
    example, 0 for padding), positions restart at 0 for every example.
    """
    input_ids = np.asarray(input_ids)
    b, length = input_ids.shape
    mask = np.ones((b, length), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if segment_ids is not None:
        segment_ids = np.asarray(segment_ids)
        mask = mask & (segment_ids != 0)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    out = np.zeros((3, b, length), dtype=np.int64)
    used = 0
    for row in range(b):
        cols = np.nonzero(mask[row])[0]
        if segment_ids is None:
            pieces = [cols]
        else:
            seg = segment_ids[row, cols]
            cut = np.nonzero(np.diff(seg))[0] + 1
            pieces = np.split(cols, cut)
        for piece in pieces:
            if piece.size == 0:
                continue
            pos, n_img = mrope_positions_for_sequence(input_ids[row, piece], grids[used:], image_token_id=image_token_id,
                                                      spatial_merge_size=spatial_merge_size)
            out[:, row, piece] = pos
            used += n_img
    if used != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the batch's image tokens cover {used}")
    return out.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class QwenImageInputs:
    """Everything the input pipeline and batch assembly need to know about Qwen2.5-VL images (the family's
    ``ImageInputs``, see ``medee_jax.models.families``). Vision units are patches: pixel_values rows [P, 1176]
    (uint8 [P, 588] between the pipeline's workers and batch assembly), 4 patches per LLM token, per-image info
    ``image_grid_thw`` [k, 3]; the batch's family-specific arrays are the window layout of ``vision_layout``."""

    vision: VisionConfig
    image_token_id: int | None = None
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_max_pixels: int = 0  # > 0: LLaMA-Factory-style area clamp before the processor
    high_bit_depth: str = "min_max"  # how 16-bit / float images become 8-bit (`medee_jax.data.images.to_8bit`)
    normalize: bool = False  # load() gives float32 [p, 1176] instead of uint8 [p, 588]

    info_key: ClassVar[str] = "image_grid_thw"
    unit_name: ClassVar[str] = "patches"
    position_axes: ClassVar[tuple[int, ...]] = (3,)
    chat_tokens: ClassVar[dict[str, Any]] = {"image_token": IMAGE_TOKEN, "image_prefix": (), "image_suffix": (),
                                             "boundary_tokens": VISION_BOUNDARY_TOKENS}

    @property
    def unit_multiple(self) -> int:
        """Bucket sizes (patch counts) must be multiples of this: the 2x2 merge."""
        return self.vision.merge_unit

    # ---- input pipeline (worker side) ----

    def load(self, paths) -> tuple[np.ndarray, np.ndarray]:
        """Returns (patches uint8 [p, 588] or float32 [p, 1176], image_grid_thw [k, 3]) of image files."""
        from medee_jax.data.images import as_rgb_image, normalize_patches, prescale_image, qwen2_vl_patches

        images = [as_rgb_image(item, self.high_bit_depth) for item in paths]
        if self.image_max_pixels > 0:
            images = [prescale_image(image, self.image_max_pixels) for image in images]
        pixels, grid = qwen2_vl_patches(images, self.min_pixels, self.max_pixels, patch_size=self.vision.patch_size,
                                        merge_size=self.vision.spatial_merge_size)  # [p, 588] u8
        if self.normalize:
            pixels = normalize_patches(pixels, self.vision.temporal_patch_size)  # [p, 1176] f32
        return pixels, grid

    def token_counts(self, info) -> list[int]:
        """Returns the <|image_pad|> tokens of each image of one example (info: its image_grid_thw)."""
        from medee_jax.data.tokenize import image_token_counts

        return image_token_counts(info, self.vision.spatial_merge_size)

    # ---- batch assembly ----

    @staticmethod
    def concat_info(infos: list) -> np.ndarray:
        """Returns the image_grid_thw [n, 3] of several examples' images, in order."""
        if not infos:
            return np.zeros((0, 3), np.int64)
        return np.concatenate([np.asarray(i, np.int64).reshape(-1, 3) for i in infos], axis=0)

    def num_features(self, units: int) -> int:
        """Returns the LLM feature rows ``units`` patches give (one per 2x2 merge cell)."""
        return units // self.vision.merge_unit

    def pixel_batch(self, pixels: list[np.ndarray], bucket: int) -> np.ndarray:
        """Returns float32 [bucket, C*T*P*P]: the examples' pixel rows in order, then zero rows. float32 rows are
        copied as they are; uint8 patches (``load``) are normalised straight into the buffer, the same values
        ``qwen2_vl_preprocess`` gives."""
        width = self._pixel_width(pixels)
        out = np.empty((bucket, width), np.float32)  # [P, 1176]
        start = 0
        for rows in pixels:
            stop = start + int(rows.shape[0])
            if rows.dtype == np.uint8:
                from medee_jax.data.images import normalize_patches

                normalize_patches(rows, width // rows.shape[1], out=out[start:stop])
            else:
                out[start:stop] = rows
            start = stop
        out[start:] = 0.0
        return out

    def _pixel_width(self, pixels: list[np.ndarray]) -> int:
        for rows in pixels:
            if rows.dtype != np.uint8:
                return int(rows.shape[1])
        return int(pixels[0].shape[1]) * self.vision.temporal_patch_size

    def empty_pixels(self, units: int) -> np.ndarray:
        """Returns zero pixel_values for ``units`` padding patches."""
        return np.zeros((units, self.vision.patch_dim), np.float32)

    def layout(self, info: np.ndarray, pad_to: int) -> dict[str, np.ndarray]:
        """Returns the vision-tower arrays of a batch's images (``vision_layout``) padded to ``pad_to`` patches."""
        return vision_layout(info, self.vision, pad_to=pad_to).arrays()

    def extend_layout(self, vision: dict, units: int) -> dict:
        """Returns layout arrays padded from P0 to ``units`` patches with isolated padding cells."""
        p0 = vision["image_segments"].shape[0]
        if p0 == units:
            return vision
        unit = self.vision.merge_unit
        extra = np.arange(p0 // unit, units // unit, dtype=np.int32)
        return {
            "rot_pos": np.concatenate([vision["rot_pos"], np.zeros((units - p0, 2), np.int32)]),
            "window_index": np.concatenate([vision["window_index"], extra]),
            "reverse_index": np.concatenate([vision["reverse_index"], extra]),
            **extend_window_blocks(vision, units, self.vision),
            "image_segments": np.concatenate([vision["image_segments"],
                                              np.full(units - p0, vision["image_segments"].max() + 1, np.int32)]),
        }

    def positions(self, input_ids, info, attention_mask=None, segment_ids=None) -> np.ndarray:
        """Returns M-RoPE position ids [3, B, L] for a padded batch (info: image_grid_thw [n, 3] in token order)."""
        return mrope_position_ids(input_ids, info, attention_mask, segment_ids, image_token_id=self.image_token_id,
                                  spatial_merge_size=self.vision.spatial_merge_size)

    def sequence_positions(self, token_ids, info) -> np.ndarray:
        """Returns the positions [3, N] of one unpadded sequence (info: its images' image_grid_thw)."""
        positions, _ = mrope_positions_for_sequence(token_ids, info, image_token_id=self.image_token_id,
                                                    spatial_merge_size=self.vision.spatial_merge_size)
        return positions


def image_inputs(model_config, options=None, image_token_id: int | None = None) -> QwenImageInputs:
    """Returns the family's ``ImageInputs`` for a Qwen25VLConfig (or its VisionConfig) and the data options
    (an object with min_pixels, max_pixels, image_max_pixels, e.g. ``medee_jax.data.pipeline.DataConfig``)."""
    vision = getattr(model_config, "vision", model_config)
    if image_token_id is None:
        image_token_id = getattr(model_config, "image_token_id", None)
    kw = {}
    for name in ("min_pixels", "max_pixels", "image_max_pixels"):
        if options is not None and getattr(options, name, None) is not None:
            kw[name] = int(getattr(options, name))
    if options is not None and getattr(options, "high_bit_depth", None) is not None:
        kw["high_bit_depth"] = str(options.high_bit_depth)
    return QwenImageInputs(vision=vision, image_token_id=image_token_id, **kw)
