"""Image loading with validation, and the two VLM image preprocessors, in numpy + PIL.

- `load_image(path, high_bit_depth="min_max")`: open and fully decode an image file, or raise `ImageError` (a
  `BadRecordError`) naming the file and a reason code: missing_image, empty_image, corrupt_image, truncated_image,
  decompression_bomb, extreme_aspect_ratio, high_bit_depth. Returns an upright (EXIF-rotated) 8-bit RGB image;
  transparency is composited onto white, the same conversion transformers' image processors apply to a PIL image.
  High-bit-depth images (see `to_8bit`) are rescaled to 8 bits first instead of being clipped.
- `qwen2_vl_preprocess(images, min_pixels, max_pixels)` -> `(pixel_values [P, 1176] f32, image_grid_thw [n, 3]
  i64)`, equal to transformers' `Qwen2VLImageProcessorPil` with the same min/max pixels; in two steps,
  `qwen2_vl_patches` (uint8 patches [P, 588], before rescaling) and `normalize_patches` (-> float32 [P, 1176]).
- `internvl_preprocess(images, crop_to_patches, min_patches, max_patches)` -> `(pixel_values [tiles, 3, 448, 448]
  f32, num_patches [n] i64)`, equal to transformers' `GotOcr2ImageProcessorPil` configured as InternVL3's "-hf"
  processor (448 px tiles, ImageNet mean/std, bicubic, a thumbnail tile when an image has more than one tile).
- `prescale_image(image, image_max_pixels, image_min_pixels)`: LLaMA-Factory's optional area clamp applied
  before a processor (separate from, and in addition to, the processors' own resizing).

The pixel pipeline mirrors transformers' PIL backend step by step so results agree to float32 rounding:
convert to RGB (alpha composited onto white) -> uint8 -> PIL resize (bicubic) -> uint8 -> x * (1/255) in float64
cast to float32 -> (x - mean) / std in float32.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from collections.abc import Sequence
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medee_jax.data import errors
from medee_jax.data.embedded_images import EmbeddedImage

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Pillow's own warning threshold (about 9459 x 9459). Larger images are refused as possible decompression bombs.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
MAX_ASPECT_RATIO = 200.0

# Qwen2-VL image processor class defaults. The Qwen2.5-VL hub preprocessor_config.json uses max_pixels 12845056.
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike, EmbeddedImage]

# How images with more than 8 bits per sample become 8-bit (`to_8bit`); data.high_bit_depth in the configs.
HIGH_BIT_DEPTH_MODES = ("min_max", "bit_depth", "refuse")
# Single-channel Pillow modes holding more than 8 bits: 16-bit PNG/TIFF greyscale, 32-bit int, 32-bit float.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageError(errors.BadRecordError):
    """An unusable image. `path` is the image file (None for in-memory images), `reason` a reason code."""

    def __init__(self, path: str | os.PathLike | None, reason: str, detail: str):
        self.path = None if path is None else os.fspath(path)
        super().__init__(None, None, reason, detail, image=self.path)

    def __reduce__(self):
        return (ImageError, (self.path, self.reason, self.detail))


# ----------------------------------------------------------------------------------------------- loading


def load_image(
    path: str | os.PathLike | EmbeddedImage,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
    high_bit_depth: str = "min_max",
) -> Image.Image:
    """Open, fully decode and validate an image file; return it upright and in 8-bit RGB.

    Raises `ImageError` with reason missing_image (no such file, or not a file), empty_image (0-byte file or zero
    width/height), corrupt_image (not a decodable image), truncated_image (decoding ran out of data),
    decompression_bomb (more than `max_pixels` pixels, or Pillow's own bomb check fired), extreme_aspect_ratio
    (long side / short side > `max_aspect_ratio`, which Qwen2-VL's resize rejects) or high_bit_depth (a 16-bit or
    float image while `high_bit_depth="refuse"`). `high_bit_depth`: how such images become 8-bit (`to_8bit`).

    Truncation is detected only while Pillow's global `ImageFile.LOAD_TRUNCATED_IMAGES` is False (its default).
    An `EmbeddedImage` (image bytes from a Parquet/Arrow dataset) gets the same checks; messages use its name.
    """
    check_high_bit_depth(high_bit_depth)
    embedded = path if isinstance(path, EmbeddedImage) else None
    path = embedded.name if embedded is not None else os.fspath(path)
    if embedded is None and not os.path.exists(path):
        raise ImageError(path, errors.MISSING_IMAGE, f"image file not found: {path}")
    if embedded is None and not os.path.isfile(path):
        raise ImageError(path, errors.MISSING_IMAGE, f"image path is not a file: {path}")
    try:
        if (len(embedded.data) if embedded is not None else os.path.getsize(path)) == 0:
            raise ImageError(path, errors.EMPTY_IMAGE, f"image file is empty (0 bytes): {path}")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(embedded.data) if embedded is not None else path) as opened:
                _check_size(path, opened.size, max_pixels, max_aspect_ratio)
                wide_color = _has_16_bit_color_samples(opened)
                opened.load()
                if wide_color and high_bit_depth == "refuse":
                    raise ImageError(path, errors.HIGH_BIT_DEPTH, _refusal(path, "16 bits per channel colour"))
                image = to_rgb(to_8bit(ImageOps.exif_transpose(opened), high_bit_depth, path=path))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        detail = f"image too large, refused as a decompression bomb: {path} ({e})"
        raise ImageError(path, errors.DECOMPRESSION_BOMB, detail) from e
    except UnidentifiedImageError as e:
        if _png_header_has_zero_size(embedded.data if embedded is not None else path):
            raise ImageError(path, errors.EMPTY_IMAGE, f"image has zero width or height: {path}") from e
        raise ImageError(path, errors.CORRUPT_IMAGE, f"not a readable image file: {path}") from e
    except PermissionError as e:
        raise ImageError(path, errors.MISSING_IMAGE, f"image file is not readable (permission denied): {path}") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        if isinstance(e, EOFError) or "truncated" in str(e).lower():
            raise ImageError(path, errors.TRUNCATED_IMAGE, f"image file is truncated: {path} ({e})") from e
        raise ImageError(path, errors.CORRUPT_IMAGE, f"image file is corrupt: {path} ({e})") from e
    return image


def _check_size(path, size: tuple[int, int], max_pixels: int, max_aspect_ratio: float) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(path, errors.EMPTY_IMAGE, f"image has zero width or height ({width}x{height}): {path}")
    if width * height > max_pixels:
        raise ImageError(
            path,
            errors.DECOMPRESSION_BOMB,
            f"image has {width}x{height} = {width * height} pixels, over the cap of {max_pixels}: {path}",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise ImageError(
            path,
            errors.EXTREME_ASPECT_RATIO,
            f"image aspect ratio {ratio:.1f} ({width}x{height}) exceeds {max_aspect_ratio:g}: {path}",
        )


def _png_header_has_zero_size(path: str | bytes) -> bool:
    """Pillow refuses a PNG whose header says 0 x N without saying why; tell that case apart from corruption."""
    if isinstance(path, bytes):
        head = path[:24]
    else:
        with open(path, "rb") as f:
            head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return False
    width = int.from_bytes(head[16:20], "big")
    height = int.from_bytes(head[20:24], "big")
    return width == 0 or height == 0


def check_high_bit_depth(high_bit_depth: str) -> None:
    if high_bit_depth not in HIGH_BIT_DEPTH_MODES:
        raise ValueError(f"high_bit_depth={high_bit_depth!r}: one of {', '.join(HIGH_BIT_DEPTH_MODES)}")


def _has_16_bit_color_samples(opened: Image.Image) -> bool:
    """Whether Pillow will decode this (not yet loaded) file from 16-bit colour samples (48-bit RGB, 64-bit RGBA,
    16-bit grey + alpha): it keeps each sample's high byte, and its mode says RGB/RGBA as for an 8-bit file."""
    return opened.mode not in _WIDE_GREY_MODES and any(
        ";16" in str(getattr(tile, "args", tile[3] if len(tile) > 3 else "")) for tile in (opened.tile or ()))


def _refusal(path, what: str) -> str:
    return (f"{what} image, refused by data.high_bit_depth='refuse': {path}; convert it to 8 bits, or set "
            "data.high_bit_depth='min_max' (stretch each image's own range) or 'bit_depth' (scale by the format's "
            "range)")


def to_8bit(image: Image.Image, high_bit_depth: str = "min_max", *, path=None) -> Image.Image:
    """Returns a single-channel image of more than 8 bits (Pillow modes I;16*, I, F) as an 8-bit "L" image;
    any other image unchanged. Pillow's own conversion clips every value above 255 to white, which saturates a
    16-bit scan.

    high_bit_depth:
      "min_max" (default): the image's own minimum..maximum maps linearly onto 0..255 (rounded) — a 12-bit
        X-ray stored in 16 bits uses the full 8-bit range. A constant image falls back to "bit_depth".
      "bit_depth": the format's range maps onto 0..255: 16-bit and 32-bit-int values x -> round(x / 257)
        (0..65535, clipped), floats x -> round(255 x) (0..1, clipped).
      "refuse": raise ImageError (reason high_bit_depth).
    Colour images with 16 bits per channel are decoded by Pillow keeping each sample's high byte (a bit-depth
    scaling, whatever this option says except "refuse", which `load_image` applies to them). Images with
    non-finite float values are refused as corrupt_image.
    """
    check_high_bit_depth(high_bit_depth)
    if image.mode not in _WIDE_GREY_MODES:
        return image
    if high_bit_depth == "refuse":
        raise ImageError(path, errors.HIGH_BIT_DEPTH, _refusal(path, f"high-bit-depth (mode {image.mode})"))
    values = np.asarray(image, dtype=np.float64)  # [H, W]
    if not np.isfinite(values).all():
        raise ImageError(path, errors.CORRUPT_IMAGE,
                         f"image holds non-finite values (mode {image.mode}): {path if path else '<in memory>'}")
    low, high = float(values.min()), float(values.max())
    if high_bit_depth == "min_max" and high > low:
        scaled = (values - low) * (255.0 / (high - low))
    elif image.mode == "F":
        scaled = values * 255.0
    else:
        scaled = values / 257.0
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way transformers' processors convert a PIL image: transparency is composited onto white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def as_rgb_image(image: ImageLike, high_bit_depth: str = "min_max") -> Image.Image:
    """Returns an 8-bit RGB PIL image of a path / embedded bytes (loaded and validated by `load_image`), a PIL image
    or a uint8 numpy array; images of more than 8 bits per sample become 8-bit by ``high_bit_depth`` (`to_8bit`)."""
    if isinstance(image, (str, os.PathLike, EmbeddedImage)):
        return load_image(image, high_bit_depth=high_bit_depth)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 [H, W] or [H, W, C]; got dtype {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, a uint8 numpy array or a path; got {type(image).__name__}")
    if image.width <= 0 or image.height <= 0:
        raise ImageError(None, errors.EMPTY_IMAGE, f"image has zero width or height ({image.width}x{image.height})")
    return to_rgb(to_8bit(image, high_bit_depth))


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike, EmbeddedImage)):
        return [images]
    return list(images)


def _normalize_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 [C, 256]: ((v * (1/255) in float64, cast to float32) - mean) / std in float32, for every uint8 v."""
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)  # [256]
    return (levels[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]


def _rescale_normalize(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [..., 3] -> float32 [..., 3]: x/255 computed in float64 then cast, then (x - mean) / std in float32."""
    # Every uint8 value maps to one float per channel: a 256-entry table per channel gives the same bits as the
    # arithmetic on every pixel, about 3x faster on 448x448 images.
    table = _normalize_table(mean, std)  # [3, 256]
    out = np.empty(rgb.shape, np.float32)
    for c in range(rgb.shape[-1]):
        out[..., c] = table[c][rgb[..., c]]
    return out


# ----------------------------------------------------------------------------------------------- Qwen2-VL


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2-VL's target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Each side is rounded to the nearest multiple; if the area is then too large both sides are scaled by
    sqrt(area / max_pixels) and floored to multiples (at least one factor), if too small scaled up and ceiled.
    Aspect ratios over 200 are refused (ImageError, reason extreme_aspect_ratio).
    """
    if height <= 0 or width <= 0:
        raise ImageError(None, errors.EMPTY_IMAGE, f"image has zero width or height ({width}x{height})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            None, errors.EXTREME_ASPECT_RATIO, f"image aspect ratio {ratio:.1f} ({width}x{height}) exceeds 200"
        )
    out_h = round(height / factor) * factor
    out_w = round(width / factor) * factor
    if out_h * out_w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        out_h = max(factor, math.floor(height / shrink / factor) * factor)
        out_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif out_h * out_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        out_h = math.ceil(height * grow / factor) * factor
        out_w = math.ceil(width * grow / factor) * factor
    return out_h, out_w


def qwen2_vl_preprocess(
    images: ImageLike | Sequence[ImageLike],
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (pixel_values float32 [sum(t*h*w), C*T*P*P], image_grid_thw int64 [n, 3]), as Qwen2VLImageProcessorPil.

    Each image is resized (bicubic) to `smart_resize` of its size, rescaled and normalised with CLIP mean/std,
    repeated `temporal_patch_size` times along time (a still image is one frame), and cut into patches. Rows are
    ordered by merge cell: the merge_size x merge_size patches of one cell are consecutive (row-major within the
    cell, cells row-major over the image); each row holds features in (C, T, ph, pw) order. With the defaults a
    row is 3 * 2 * 14 * 14 = 1176 values, grid_thw is (1, H/14, W/14) and the image takes t*h*w / 4 LLM tokens.

    `images`: PIL images (any mode; alpha composited onto white), uint8 arrays, or file paths (`load_image`).
    The defaults are the processor class defaults; pass the checkpoint's preprocessor_config.json values
    (Qwen2.5-VL hub: min_pixels 3136, max_pixels 12845056).
    It is `normalize_patches(*qwen2_vl_patches(...))`: the input pipeline moves the 8x smaller uint8 patches
    between processes and normalises them straight into the batch.
    """
    patches, grid = qwen2_vl_patches(images, min_pixels, max_pixels, patch_size=patch_size, merge_size=merge_size)
    return normalize_patches(patches, temporal_patch_size, image_mean, image_std), grid


def qwen2_vl_patches(
    images: ImageLike | Sequence[ImageLike],
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (patches uint8 [sum(h*w), C*P*P], image_grid_thw int64 [n, 3]): `qwen2_vl_preprocess` before
    rescaling, normalisation and the temporal repeat (rows in the same merge-cell order, features (C, ph, pw))."""
    factor = patch_size * merge_size
    all_rows, grids = [], []
    for item in _as_list(images):
        image = as_rgb_image(item)
        out_h, out_w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
        if (out_w, out_h) != image.size:  # Pillow's resize to the same size is a plain copy: skip it
            image = image.resize((out_w, out_h), resample=Image.Resampling.BICUBIC)
        all_rows.append(_patchify(np.asarray(image), patch_size, merge_size))  # [h*w, C*P*P] u8
        grids.append((1, out_h // patch_size, out_w // patch_size))
    if not all_rows:
        raise ValueError("qwen2_vl_preprocess needs at least one image")
    rows = all_rows[0] if len(all_rows) == 1 else np.concatenate(all_rows, axis=0)
    return rows, np.asarray(grids, dtype=np.int64)


def _patchify(rgb: np.ndarray, patch_size: int, merge_size: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [H/p * W/p, C*p*p]: patches in merge-cell order, features (C, ph, pw)."""
    height, width, channels = rgb.shape
    gh, gw = height // patch_size, width // patch_size
    cells = rgb.reshape(gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size, channels)
    # [gh/m, m, p, gw/m, m, p, C] -> [gh/m, gw/m, m(row), m(col), C, p, p]
    cells = cells.transpose(0, 3, 1, 4, 6, 2, 5)
    return np.ascontiguousarray(cells).reshape(gh * gw, channels * patch_size * patch_size)


def normalize_patches(
    patches: np.ndarray,
    temporal_patch_size: int = 2,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 patches [p, C*P*P] (`qwen2_vl_patches`) -> float32 [p, C*T*P*P] pixel_values (written into `out`
    when given): rescaled and normalised as transformers does, each frame repeated T times."""
    rows, channels = patches.shape[0], len(image_mean)
    area = patches.shape[1] // channels
    if out is None:
        out = np.empty((rows, channels * temporal_patch_size * area), np.float32)
    frames = out.reshape(rows, channels, temporal_patch_size, area)  # a view: [p, C, T, P*P]
    values = patches.reshape(rows, channels, area)  # [p, C, P*P] u8
    table = _normalize_table(image_mean, image_std)  # [C, 256]
    for c in range(channels):
        normalized = np.take(table[c], values[:, c])  # [p, P*P] f32
        for t in range(temporal_patch_size):
            frames[:, c, t] = normalized
    return out


def prescale_image(
    image: Image.Image,
    image_max_pixels: int = 768 * 768,
    image_min_pixels: int = 32 * 32,
) -> Image.Image:
    """LLaMA-Factory's pre-processor area clamp (its `image_max_pixels` / `image_min_pixels` options).

    If width * height exceeds `image_max_pixels`, scale both sides by sqrt(image_max_pixels / area) and truncate
    to integers; then, if the area is below `image_min_pixels`, scale up the same way. Aspect ratio is kept
    (up to the truncation). Resizing is bicubic (Pillow's default filter for `Image.resize`). The result is
    then converted to RGB with `to_rgb`. Apply it before `qwen2_vl_preprocess` to reproduce a LLaMA-Factory
    run; the processor still applies its own min/max pixel rules afterwards.
    """
    area = image.width * image.height
    if area > image_max_pixels:
        scale = math.sqrt(image_max_pixels / area)
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
    area = image.width * image.height
    if area < image_min_pixels:
        scale = math.sqrt(image_min_pixels / area)
        size = (int(image.width * scale), int(image.height * scale))
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
    return to_rgb(image)


# ----------------------------------------------------------------------------------------------- InternVL


def tile_grids(min_patches: int, max_patches: int) -> list[tuple[int, int]]:
    """All (columns, rows) with min_patches <= columns * rows <= max_patches, ordered by tile count (stable)."""
    grids = [
        (cols, rows)
        for cols in range(1, max_patches + 1)
        for rows in range(1, max_patches + 1)
        if min_patches <= cols * rows <= max_patches
    ]
    return sorted(grids, key=lambda g: g[0] * g[1])


def best_tile_grid(
    height: int, width: int, min_patches: int, max_patches: int, tile_size: int = 448
) -> tuple[int, int]:
    """The (columns, rows) grid whose aspect ratio is closest to the image's.

    Candidates are visited in `tile_grids` order; on an exact tie the later (larger) grid wins only while the
    image area exceeds half the grid's pixel area, so small images are not blown up into many tiles.
    """
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in tile_grids(min_patches, max_patches):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def internvl_preprocess(
    images: ImageLike | Sequence[ImageLike],
    crop_to_patches: bool = True,
    min_patches: int = 1,
    max_patches: int = 12,
    *,
    image_size: int = 448,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (pixel_values float32 [tiles, 3, S, S], num_patches int64 [n]), as GotOcr2ImageProcessorPil.

    With `crop_to_patches` (and max_patches > 1) each image is resized (bicubic) to the best grid of
    `image_size` tiles (`best_tile_grid`) and cut into row-major tiles; when that gives more than one tile, a
    thumbnail (the whole original image resized to S x S) is appended. Otherwise the image becomes one S x S
    tile. Tiles are rescaled by 1/255 and normalised with ImageNet mean/std (InternVL3 "-hf" settings).
    """
    tiles, counts = [], []
    for item in _as_list(images):
        image = as_rgb_image(item)
        if crop_to_patches and max_patches > 1:
            cols, rows = best_tile_grid(image.height, image.width, min_patches, max_patches, image_size)
            canvas = np.asarray(
                image.resize((image_size * cols, image_size * rows), resample=Image.Resampling.BICUBIC)
            )  # [rows*S, cols*S, 3] u8
            image_tiles = [
                canvas[r * image_size : (r + 1) * image_size, c * image_size : (c + 1) * image_size]
                for r in range(rows)
                for c in range(cols)
            ]
            if len(image_tiles) > 1:
                image_tiles.append(
                    np.asarray(image.resize((image_size, image_size), resample=Image.Resampling.BICUBIC))
                )
        else:
            image_tiles = [np.asarray(image.resize((image_size, image_size), resample=Image.Resampling.BICUBIC))]
        counts.append(len(image_tiles))
        for tile in image_tiles:
            tiles.append(_rescale_normalize(tile, image_mean, image_std).transpose(2, 0, 1))  # [3, S, S]
    if not tiles:
        raise ValueError("internvl_preprocess needs at least one image")
    return np.ascontiguousarray(np.stack(tiles), dtype=np.float32), np.asarray(counts, dtype=np.int64)
