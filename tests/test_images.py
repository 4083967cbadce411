"""Image loading errors, and pixel parity of both preprocessors with transformers' PIL image processors."""

import io
import os
import pickle
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from medee_jax.data import errors
from medee_jax.data.images import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageError,
    best_tile_grid,
    internvl_preprocess,
    load_image,
    normalize_patches,
    prescale_image,
    qwen2_vl_patches,
    qwen2_vl_preprocess,
    smart_resize,
)

transformers = pytest.importorskip("transformers")
from transformers import GotOcr2ImageProcessorPil, Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.got_ocr2 import image_processing_pil_got_ocr2 as hf_got  # noqa: E402
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen  # noqa: E402

TOL = 1e-4
MODES = ["RGB", "RGBA", "L", "P"]


def make_image(height, width, mode, seed=0):
    """Random content in the given mode; RGBA has varied alpha and P carries a transparent palette index."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    if mode == "RGB":
        return image.convert("RGB")
    if mode == "L":
        return image.convert("L")
    if mode == "P":
        paletted = image.convert("RGB").quantize(32)
        paletted.info["transparency"] = 3
        return paletted
    return image


def hf_qwen_ref(images, min_pixels, max_pixels):
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = processor(images=images, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def hf_internvl_ref(images, crop_to_patches=True, min_patches=1, max_patches=12):
    # InternVL3 "-hf" preprocessor_config.json settings.
    processor = GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448},
        crop_to_patches=crop_to_patches,
        min_patches=min_patches,
        max_patches=max_patches,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        resample=3,
    )
    out = processor(images=images, return_tensors="np")
    return out["pixel_values"], out["num_patches"]


# ------------------------------------------------------------------------------------------- Qwen2-VL parity

# (37, 53): not multiples of 28 and below min_pixels; (300, 500) and (1000, 60): not multiples of 28;
# (1200, 1000): above the default max_pixels (1003520).
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(37, 53), (300, 500), (1000, 60), (1200, 1000)])
def test_qwen2_vl_matches_transformers(size, mode):
    image = make_image(*size, mode)
    ref_pixels, ref_grid = hf_qwen_ref([image], 56 * 56, 28 * 28 * 1280)
    pixels, grid = qwen2_vl_preprocess([image], 56 * 56, 28 * 28 * 1280)
    assert pixels.dtype == np.float32 and pixels.shape == ref_pixels.shape and pixels.shape[1] == 1176
    assert grid.dtype == np.int64 and np.array_equal(grid, ref_grid)
    assert np.abs(pixels - ref_pixels).max() <= TOL


@pytest.mark.parametrize(
    "min_pixels,max_pixels",
    [(3136, 12845056), (100 * 28 * 28, 200 * 28 * 28), (4 * 28 * 28, 16 * 28 * 28), (256 * 28 * 28, 256 * 28 * 28)],
)
def test_qwen2_vl_min_max_pixels_and_batches(min_pixels, max_pixels):
    images = [make_image(37, 53, "RGB", 1), make_image(300, 500, "L", 2), make_image(700, 420, "RGBA", 3)]
    ref_pixels, ref_grid = hf_qwen_ref(images, min_pixels, max_pixels)
    pixels, grid = qwen2_vl_preprocess(images, min_pixels, max_pixels)
    assert np.array_equal(grid, ref_grid)
    assert pixels.shape == ref_pixels.shape and np.abs(pixels - ref_pixels).max() <= TOL
    assert pixels.shape[0] == int(np.prod(grid, axis=1).sum())


def test_qwen2_vl_grid_values():
    _, grid = qwen2_vl_preprocess(
        [make_image(300, 500, "RGB"), make_image(28, 28, "RGB"), make_image(224, 224, "RGB")], 3136, 12845056
    )
    # 300x500 -> 308x504 (round to 28) -> 22x36 patches, 198 LLM tokens; 28x28 -> min_pixels -> 56x56.
    assert grid.tolist() == [[1, 22, 36], [1, 4, 4], [1, 16, 16]]
    assert smart_resize(300, 500, 28, 3136, 12845056) == (308, 504)
    assert smart_resize(10, 10, 28, 3136, 12845056) == (56, 56)
    assert smart_resize(2000, 3000, 28, 3136, 28 * 28 * 1280) == (812, 1204)


def test_smart_resize_matches_transformers_on_many_sizes():
    rng = random.Random(0)
    for _ in range(2000):
        h, w = rng.randint(1, 5000), rng.randint(1, 5000)
        if max(h, w) / min(h, w) > 200:
            continue
        lo = rng.choice([56 * 56, 3136, 128 * 28 * 28])
        hi = rng.choice([28 * 28 * 1280, 12845056, 256 * 28 * 28, 64 * 28 * 28])
        assert smart_resize(h, w, 28, lo, hi) == hf_qwen.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
    with pytest.raises(ImageError) as info:
        smart_resize(1, 201)
    assert info.value.reason == errors.EXTREME_ASPECT_RATIO


def test_qwen2_vl_patch_layout():
    """Rows are grouped by 2x2 merge cell; features are (C, T, ph, pw) with T a repeat of the single frame."""
    image = make_image(56, 84, "RGB", 5)
    pixels, grid = qwen2_vl_preprocess(image, 56 * 56, 56 * 84)
    assert grid.tolist() == [[1, 4, 6]]
    full = (np.asarray(image, np.float64) / 255).astype(np.float32)
    full = (full - np.float32([0.48145466, 0.4578275, 0.40821073])) / np.float32([0.26862954, 0.26130258, 0.27577711])
    rows = pixels.reshape(-1, 3, 2, 14, 14)
    assert np.array_equal(rows[:, :, 0], rows[:, :, 1])
    # row 6 = merge cell 1 (cells row-major, 3 per row), patch (1, 0) inside the cell -> patch row 1, col 2
    np.testing.assert_allclose(rows[6, :, 0], full[14:28, 28:42].transpose(2, 0, 1), atol=1e-6)


def float_reference(image, min_pixels, max_pixels):
    """float32 [P, 1176] by plain arithmetic on the resized float image: x/255 in float64 -> float32, (x - mean) /
    std in float32, frame repeated twice, patches in merge-cell order (no tables, no uint8 patches)."""
    rgb = image.convert("RGB")
    out_h, out_w = smart_resize(rgb.height, rgb.width, 28, min_pixels, max_pixels)
    x = np.asarray(rgb.resize((out_w, out_h), resample=Image.Resampling.BICUBIC), np.float64)  # [H, W, 3]
    x = (x * (1 / 255)).astype(np.float32)
    x = (x - np.float32(OPENAI_CLIP_MEAN)) / np.float32(OPENAI_CLIP_STD)
    x = x.transpose(2, 0, 1).reshape(3, out_h // 28, 2, 14, out_w // 28, 2, 14).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.repeat(x[:, :, :, :, :, None], 2, axis=5)  # [h/2, w/2, 2, 2, C, T, 14, 14]
    return x.reshape(-1, 1176)


@pytest.mark.parametrize("size", [(37, 53), (448, 448), (300, 500), (1000, 60)])
def test_uint8_patches_then_normalize_is_bit_identical(size):
    """qwen2_vl_patches -> normalize_patches (also into a slice of a larger buffer) == the float arithmetic."""
    image = make_image(*size, "RGB", seed=size[0])
    patches, grid = qwen2_vl_patches([image, image], 56 * 56, 448 * 448)
    ref = float_reference(image, 56 * 56, 448 * 448)
    assert patches.dtype == np.uint8 and patches.shape == (2 * ref.shape[0], 588)
    height, width = smart_resize(*size, 28, 56 * 56, 448 * 448)
    assert grid.tolist() == 2 * [[1, height // 14, width // 14]]
    pixels = normalize_patches(patches)
    assert pixels.dtype == np.float32 and np.array_equal(pixels, np.concatenate([ref, ref]))
    assert np.array_equal(qwen2_vl_preprocess([image, image], 56 * 56, 448 * 448)[0], pixels)
    buffer = np.full((pixels.shape[0] + 8, 1176), np.nan, np.float32)
    normalize_patches(patches[: ref.shape[0]], out=buffer[4 : 4 + ref.shape[0]])
    assert np.array_equal(buffer[4 : 4 + ref.shape[0]], ref) and np.isnan(buffer[:4]).all()
    assert np.isnan(buffer[4 + ref.shape[0]:]).all()


# ------------------------------------------------------------------------------------------- InternVL parity


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(37, 53), (300, 500), (1000, 60), (448, 896), (900, 1400)])
def test_internvl_matches_transformers(size, mode):
    image = make_image(*size, mode)
    ref_pixels, ref_counts = hf_internvl_ref([image])
    pixels, counts = internvl_preprocess([image])
    assert pixels.dtype == np.float32 and pixels.shape == ref_pixels.shape
    assert np.array_equal(counts, ref_counts)
    assert np.abs(pixels - ref_pixels).max() <= TOL


@pytest.mark.parametrize(
    "crop,min_patches,max_patches", [(False, 1, 12), (True, 1, 1), (True, 2, 6), (True, 1, 4)]
)
def test_internvl_options_and_batches(crop, min_patches, max_patches):
    images = [make_image(37, 53, "RGB", 1), make_image(300, 900, "L", 2), make_image(500, 500, "RGBA", 3)]
    ref_pixels, ref_counts = hf_internvl_ref(images, crop, min_patches, max_patches)
    pixels, counts = internvl_preprocess(images, crop, min_patches, max_patches)
    assert np.array_equal(counts, ref_counts) and pixels.shape == ref_pixels.shape
    assert np.abs(pixels - ref_pixels).max() <= TOL


def test_internvl_tile_counts():
    sizes = [(300, 500), (448, 448), (448, 896)]
    _, counts = internvl_preprocess([make_image(h, w, "RGB") for h, w in sizes])
    # 300x500 -> 3x2 grid + thumbnail; 448x448 -> a single tile, no thumbnail; 448x896 -> 2x1 + thumbnail
    assert counts.tolist() == [7, 1, 3]
    rng = random.Random(0)
    for _ in range(500):
        h, w = rng.randint(1, 4000), rng.randint(1, 4000)
        lo, hi = rng.choice([(1, 12), (1, 6), (2, 9), (1, 40)])
        assert best_tile_grid(h, w, lo, hi) == hf_got.get_optimal_tiled_canvas((h, w), (448, 448), lo, hi)


# ------------------------------------------------------------------------------------------- pre-resize


def test_prescale_image_llamafactory_rules():
    big = make_image(1000, 2000, "RGBA")
    out = prescale_image(big, image_max_pixels=768 * 768)
    assert out.mode == "RGB" and out.width * out.height <= 768 * 768
    assert abs(out.width / out.height - 2.0) < 0.01 and out.size == (int(2000 * 0.543058), int(1000 * 0.543058))
    small = prescale_image(make_image(10, 20, "L"), image_min_pixels=32 * 32)
    assert small.size == (45, 22)
    same = make_image(100, 120, "RGB")
    assert prescale_image(same).size == (120, 100)


# ------------------------------------------------------------------------------------------- loading and errors


def png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def encoded(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def expect_error(path, reason, **kwargs):
    with pytest.raises(ImageError) as info:
        load_image(path, **kwargs)
    err = info.value
    assert isinstance(err, errors.BadRecordError) and isinstance(err, ValueError)
    assert err.reason == reason and err.path == os.fspath(path)
    assert os.fspath(path) in str(err) and reason in str(err)
    return err


def test_load_good_image_rgb_alpha_on_white_and_exif(tmp_path):
    rgba = Image.new("RGBA", (8, 6), (10, 20, 30, 0))
    image = load_image(write(tmp_path, "a.png", encoded(rgba, "PNG")))
    assert image.mode == "RGB" and image.size == (8, 6) and image.getpixel((0, 0)) == (255, 255, 255)
    gray = load_image(write(tmp_path, "g.png", encoded(Image.new("L", (5, 4), 77), "PNG")))
    assert gray.mode == "RGB" and gray.getpixel((1, 1)) == (77, 77, 77)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = load_image(write(tmp_path, "r.jpg", encoded(Image.new("RGB", (40, 20)), "JPEG", exif=exif)))
    assert rotated.size == (20, 40)


def test_missing_image(tmp_path):
    expect_error(tmp_path / "nope.png", errors.MISSING_IMAGE)
    expect_error(tmp_path, errors.MISSING_IMAGE)  # a directory


def test_empty_file(tmp_path):
    expect_error(write(tmp_path, "empty.png", b""), errors.EMPTY_IMAGE)


def test_zero_size_image(tmp_path):
    expect_error(write(tmp_path, "zero.png", png_header(0, 10)), errors.EMPTY_IMAGE)


def test_corrupt_image(tmp_path):
    expect_error(write(tmp_path, "text.png", b"this is not an image at all"), errors.CORRUPT_IMAGE)
    data = bytearray(encoded(make_image(64, 64, "RGB"), "PNG"))
    data[100:200] = b"x" * 100  # damaged compressed stream
    expect_error(write(tmp_path, "damaged.png", bytes(data)), errors.CORRUPT_IMAGE)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, fmt):
    data = encoded(make_image(64, 64, "RGB"), fmt)
    err = expect_error(write(tmp_path, f"cut.{fmt.lower()}", data[: len(data) // 2]), errors.TRUNCATED_IMAGE)
    assert "truncated" in str(err)


def test_decompression_bomb(tmp_path):
    # Header claims 30000 x 30000: Pillow's own DecompressionBombError, before any pixel is decoded.
    expect_error(write(tmp_path, "bomb.png", png_header(30000, 30000)), errors.DECOMPRESSION_BOMB)
    # 10000 x 10000 is over Pillow's warning threshold: the warning is an error even with a larger own cap.
    expect_error(write(tmp_path, "warn.png", png_header(10000, 10000)), errors.DECOMPRESSION_BOMB, max_pixels=10**9)
    # A small image over an explicit cap.
    path = write(tmp_path, "capped.png", encoded(make_image(40, 40, "RGB"), "PNG"))
    expect_error(path, errors.DECOMPRESSION_BOMB, max_pixels=1000)


def test_extreme_aspect_ratio(tmp_path):
    expect_error(write(tmp_path, "strip.png", encoded(Image.new("L", (201, 1)), "PNG")), errors.EXTREME_ASPECT_RATIO)
    assert load_image(write(tmp_path, "ok.png", encoded(Image.new("L", (200, 1)), "PNG"))).size == (200, 1)


def test_error_locates_and_pickles(tmp_path):
    err = expect_error(tmp_path / "gone.jpg", errors.MISSING_IMAGE)
    located = err.at("data/train.jsonl", 7)
    assert "data/train.jsonl:7" in str(located) and "gone.jpg" in str(located)
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, ImageError) and again.reason == err.reason and str(again) == str(err)


def test_preprocess_accepts_paths_and_rejects_empty(tmp_path):
    path = write(tmp_path, "p.png", encoded(make_image(60, 90, "RGB"), "PNG"))
    from_path, grid = qwen2_vl_preprocess([path], 3136, 12845056)
    from_image, _ = qwen2_vl_preprocess([Image.open(path)], 3136, 12845056)
    assert np.array_equal(from_path, from_image) and grid.tolist() == [[1, 4, 6]]
    with pytest.raises(ImageError) as info:
        internvl_preprocess([Image.new("RGB", (0, 5))])
    assert info.value.reason == errors.EMPTY_IMAGE


# ------------------------------------------------------------------------------------------- high bit depth


def raw_png(width, height, samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written byte by byte (Pillow cannot write 48-bit RGB): ``samples`` [H, W, C] uint16."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    big = samples.astype(">u2")
    raw = b"".join(b"\x00" + big[row].tobytes() for row in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def twelve_bit_gradient():
    """A 12-bit scan stored in 16 bits (values 100..4000), as X-ray PNG exports hold them: uint16 [32, 48]."""
    return np.linspace(100, 4000, 32 * 48).reshape(32, 48).round().astype(np.uint16)


def test_16_bit_greyscale_png_is_stretched_not_saturated(tmp_path):
    """Default "min_max": the image's own range maps linearly onto 0..255 (Pillow's convert("RGB") would clip
    every value above 255 to white)."""
    values = twelve_bit_gradient()
    path = write(tmp_path, "xray16.png", encoded(Image.fromarray(values), "PNG"))
    assert Image.open(path).mode == "I;16"
    pixels = np.asarray(load_image(path))  # [H, W, 3] u8
    expected = np.round((values.astype(np.float64) - 100) / 3900 * 255).astype(np.uint8)
    assert pixels.dtype == np.uint8 and (pixels == expected[..., None]).all()
    assert (pixels == 255).mean() < 0.01 and pixels.min() == 0 and pixels.max() == 255


def test_16_bit_greyscale_bit_depth_scaling_and_refuse(tmp_path):
    values = twelve_bit_gradient()
    path = write(tmp_path, "xray16.png", encoded(Image.fromarray(values), "PNG"))
    pixels = np.asarray(load_image(path, high_bit_depth="bit_depth"))
    np.testing.assert_array_equal(pixels[..., 0], np.round(values / 257.0).astype(np.uint8))
    err = expect_error(path, errors.HIGH_BIT_DEPTH, high_bit_depth="refuse")
    assert "I;16" in str(err) and "data.high_bit_depth" in str(err)


def test_other_high_bit_depth_modes(tmp_path):
    values = twelve_bit_gradient()
    stretched = np.round((values.astype(np.float64) - 100) / 3900 * 255).astype(np.uint8)
    as_int = write(tmp_path, "i32.tiff", encoded(Image.fromarray(values.astype(np.int32)), "TIFF"))
    floats = values.astype(np.float32) / np.float32(4095)  # [H, W] in 0..1
    as_float = write(tmp_path, "f32.tiff", encoded(Image.fromarray(floats), "TIFF"))
    assert Image.open(as_int).mode == "I" and Image.open(as_float).mode == "F"
    f64 = floats.astype(np.float64)
    stretched_floats = np.round((f64 - f64.min()) / (f64.max() - f64.min()) * 255).astype(np.uint8)
    for path, expected in ((as_int, stretched), (as_float, stretched_floats)):
        np.testing.assert_array_equal(np.asarray(load_image(path))[..., 1], expected)
        expect_error(path, errors.HIGH_BIT_DEPTH, high_bit_depth="refuse")
    assert np.abs(stretched_floats.astype(int) - stretched).max() <= 1
    unit = np.asarray(load_image(as_float, high_bit_depth="bit_depth"))[..., 2]  # floats: 0..1 -> 0..255
    np.testing.assert_array_equal(unit, np.round(f64 * 255).astype(np.uint8))
    flat = write(tmp_path, "flat16.png", encoded(Image.fromarray(np.full((8, 8), 3000, np.uint16)), "PNG"))
    assert (np.asarray(load_image(flat)) == round(3000 / 257)).all()  # no range to stretch: bit-depth scaled
    nan = write(tmp_path, "nan.tiff", encoded(Image.fromarray(np.full((8, 8), np.nan, np.float32)), "TIFF"))
    expect_error(nan, errors.CORRUPT_IMAGE)


def test_48_bit_rgb_png(tmp_path):
    """Pillow decodes 16-bit-per-channel colour to 8 bits by keeping each sample's high byte (bit-depth scaling,
    whatever the option); "refuse" refuses it."""
    values = twelve_bit_gradient()
    rgb = np.stack([values, values // 2, values * 16], -1)  # [H, W, 3] u16
    path = write(tmp_path, "rgb48.png", raw_png(48, 32, rgb, color_type=2))
    np.testing.assert_array_equal(np.asarray(load_image(path)), (rgb >> 8).astype(np.uint8))
    err = expect_error(path, errors.HIGH_BIT_DEPTH, high_bit_depth="refuse")
    assert "16 bits per channel" in str(err)


def test_high_bit_depth_option_is_checked():
    with pytest.raises(ValueError, match="high_bit_depth"):
        load_image("x.png", high_bit_depth="clip")
