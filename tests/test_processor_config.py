"""The checkpoint's image processor is the default: resize bounds and tile limits from its config, as transformers
reads them, and the image-token counts a run gets from a checkpoint whose processor caps images at 448²."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medee_jax.data.dataset_info import spec_exists
from medee_jax.data.processor_config import qwen_pixel_bounds, read_image_processor, resolve_image_bounds
from medee_jax.training.batches import BatchSource
from medee_jax.training.loop import label_smoothing_note
from medee_jax.training.mesh import make_mesh
from medee_jax.training.setup import DataSpec, validate_config
from tests.format_helpers import demo_model_config, write_jsonl

ROOT = Path(__file__).resolve().parents[1]

QWEN_CONFIGS = [
    {"min_pixels": 3136, "max_pixels": 12845056},  # the Qwen2.5-VL hub file
    {"size": {"shortest_edge": 100, "longest_edge": 200000}, "max_pixels": 448 * 448},
    {"size": {"shortest_edge": 100, "longest_edge": 200000}, "max_pixels": None},
    {"min_pixels": 1000},
    {},
]


def write_config(folder: Path, cfg: dict, name="preprocessor_config.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("cfg", QWEN_CONFIGS)
def test_qwen_bounds_follow_transformers_precedence(tmp_path, cfg):
    from transformers import Qwen2VLImageProcessorPil

    folder = write_config(tmp_path, dict(cfg, image_processor_type="Qwen2VLImageProcessor"))
    reference = Qwen2VLImageProcessorPil.from_pretrained(folder).size
    settings = read_image_processor(folder)
    assert settings.kind == "qwen2_vl" and settings.source == str(folder / "preprocessor_config.json")
    assert (settings.min_pixels, settings.max_pixels) == (reference.shortest_edge, reference.longest_edge)


def test_incomplete_size_is_an_error_naming_the_file(tmp_path):
    folder = write_config(tmp_path, {"image_processor_type": "Qwen2VLImageProcessor", "size": {"longest_edge": 9}})
    with pytest.raises(ValueError, match="preprocessor_config.json: .* needs size.shortest_edge"):
        read_image_processor(folder)
    with pytest.raises(ValueError, match="x.json"):
        qwen_pixel_bounds({"size": {"shortest_edge": 4}}, "x.json")


def test_nested_processor_config_comes_first_like_transformers(tmp_path):
    from transformers import Qwen2VLImageProcessorPil

    write_config(tmp_path, {"image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 1000000})
    write_config(tmp_path, {"image_processor": {"image_processor_type": "Qwen2VLImageProcessor",
                                                "max_pixels": 448 * 448}}, "processor_config.json")
    assert read_image_processor(tmp_path).max_pixels == 448 * 448
    assert Qwen2VLImageProcessorPil.from_pretrained(tmp_path).size.longest_edge == 448 * 448


def test_internvl_tile_limits(tmp_path):
    from transformers import GotOcr2ImageProcessorPil

    cfg = {"image_processor_type": "GotOcr2ImageProcessorFast", "crop_to_patches": False, "min_patches": 2,
           "max_patches": 6, "size": {"height": 448, "width": 448}}
    settings = read_image_processor(write_config(tmp_path, cfg))
    reference = GotOcr2ImageProcessorPil.from_pretrained(tmp_path)
    assert settings.kind == "internvl"
    assert (settings.min_tiles, settings.max_tiles, settings.tile_size, settings.crop_to_patches) == \
        (reference.min_patches, reference.max_patches, reference.size.height, reference.crop_to_patches)
    bounds = resolve_image_bounds([tmp_path], max_tiles=4)
    assert (bounds.min_tiles, bounds.max_tiles) == (2, 4) and "max_tiles=4 (data.max_tiles)" in bounds.description


def test_config_values_override_and_zero_means_the_processor(tmp_path):
    folder = write_config(tmp_path / "ckpt", {"image_processor_type": "Qwen2VLImageProcessor",
                                              "min_pixels": 3136, "max_pixels": 448 * 448})
    bounds = resolve_image_bounds([None, tmp_path / "missing", folder], 0, 0)
    assert (bounds.min_pixels, bounds.max_pixels) == (3136, 448 * 448)
    assert bounds.description.startswith("image sizes: min_pixels=3136 (processor), max_pixels=200704 (processor)")
    assert str(folder / "preprocessor_config.json") in bounds.description
    bounds = resolve_image_bounds([folder], 0, 224 * 224)
    assert bounds.max_pixels == 224 * 224 and "max_pixels=50176 (data.max_pixels)" in bounds.description
    bounds = resolve_image_bounds([tmp_path / "none"])
    assert (bounds.min_pixels, bounds.max_pixels) == (56 * 56, 28 * 28 * 1280)
    assert "class defaults" in bounds.description
    with pytest.raises(ValueError, match="min_pixels 500000 > max_pixels 200704"):
        resolve_image_bounds([folder], 500000, 0)


def load_base_config(mode):
    from medee_jax.recipes import base_config

    c = base_config(mode)
    c.data.image_max_pixels = 0  # no LLaMA-Factory pre-resize: the processor alone sizes the images
    return c


SIZES = [(160, 120), (1000, 800), (60, 90), (400, 600), (900, 900)]  # (width, height)


def test_checkpoint_processor_sets_the_image_token_counts(tmp_path, demo_tokenizer_dir, chat_tokenizer, caplog):
    """A checkpoint whose processor caps images at 448²: the run's image tokens per pair are the processor's."""
    from transformers import Qwen2VLImageProcessorPil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(demo_tokenizer_dir, ckpt)
    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=448 * 448).save_pretrained(ckpt)
    rng = np.random.default_rng(0)
    records = []
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        records.append({"prompt": [{"role": "user", "content": "What is shown?"}],
                        "chosen": [{"role": "assistant", "content": "A nodule."}],
                        "rejected": [{"role": "assistant", "content": "Nothing."}], "images": [f"{i}.png"]})
    data_path = write_jsonl(tmp_path / "pairs.jsonl", records)
    c = load_base_config("dpo")
    c.data.train, c.data.tokenizer, c.data.batch_size, c.data.shuffle = str(data_path), str(ckpt), 1, False
    c.data.max_length, c.data.length_buckets, c.data.patch_buckets = 2048, (2048,), (4096,)
    validate_config(c)
    data = DataSpec(str(data_path), "", str(ckpt), "", False)
    with caplog.at_level("INFO", logger="medee_jax.train"):
        source = BatchSource(data, "train", c, demo_model_config(chat_tokenizer), make_mesh({"data": 1}))
    assert "max_pixels=200704 (processor)" in caplog.text and str(ckpt / "preprocessor_config.json") in caplog.text
    ours = []
    for _ in SIZES:
        batch = next(source.iterator)
        ours.append(int((batch["input_ids"][0] == chat_tokenizer.image_token_id).sum()))
    processor = Qwen2VLImageProcessorPil.from_pretrained(ckpt)
    grids = processor(images=[Image.open(tmp_path / f"{i}.png") for i in range(len(SIZES))],
                      return_tensors="np")["image_grid_thw"]
    assert ours == [int(g.prod()) // 4 for g in grids]
    assert max(ours) <= 448 * 448 // (28 * 28) < int(np.prod([1, 1000 // 14, 800 // 14])) // 4  # the cap applied


def test_data_paths_in_validation_and_the_label_smoothing_note(tmp_path):
    c = load_base_config("dpo")
    (tmp_path / "dataset_info.json").write_text("{}")
    c.data.train = f"{tmp_path}/dataset_info.json:pairs"
    c.data.format = "trl"
    validate_config(c)
    assert spec_exists(str(tmp_path / "*.json")) and not spec_exists(str(tmp_path / "nope.parquet"))
    c.data.format = "yaml"
    with pytest.raises(ValueError, match="data.format='yaml'"):
        validate_config(c)
    assert label_smoothing_note(c) is None
    c.dpo.label_smoothing = 0.1
    assert "cDPO" in label_smoothing_note(c) and "TRL 1.16 ignores" in label_smoothing_note(c)
    c.dpo.loss_type = "robust"
    assert label_smoothing_note(c) is None


def test_a_tokenizer_without_chat_template_names_the_file_to_add(tmp_path, demo_tokenizer_dir):
    from medee_jax.data.tokenize import ChatTemplateError, load_chat_tokenizer

    folder = tmp_path / "tok"
    shutil.copytree(demo_tokenizer_dir, folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ChatTemplateError, match=f"add the checkpoint's chat_template.jinja to {folder}"):
        load_chat_tokenizer(folder)
