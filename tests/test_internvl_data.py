"""InternVL3 through the input pipeline: jax-free host modules, tokens and tiles equal to transformers'
InternVLProcessor, tile buckets, and packed / paired batch rows that give the logits of each example alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from medee_jax.data import batching
from medee_jax.data.formats import RecordRef, parse_record
from medee_jax.data.pipeline import DataConfig, example_dataset, make_iterator
from medee_jax.data.tokenize import load_chat_tokenizer, tokenize_record
from medee_jax.models.internvl.config import tiny_config
from medee_jax.models.internvl.host import InternVLImageInputs
from medee_jax.models.internvl.model import InternVL
from tests.internvl_reference import TILE, TOKENS_PER_TILE, hf_processor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(112, 56), (56, 56), (168, 60), (70, 140)]  # (w, h): 2 tiles + thumbnail, 1, 3 + thumbnail, 2 + thumbnail
WORDS = "the scan shows a round nodule in the left upper lobe which is benign answer B".split()


def test_host_modules_import_without_jax_or_flax():
    """Data workers import the families' host modules, batch assembly and tokenization: no jax, no flax."""
    code = ("import sys\n"
            "import medee_jax.models.families, medee_jax.models.qwen2_5_vl.host, medee_jax.models.internvl.host\n"
            "import medee_jax.data.batching, medee_jax.data.tokenize, medee_jax.data.images, medee_jax.models\n"
            "from medee_jax.models.families import FAMILIES\n"
            "[f.host() and f.config() for f in FAMILIES]\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'jaxlib')))\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl_data")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    images = []
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        images.append(f"img/{i}.png")

    def words(lo, hi):
        return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))

    sft, dpo = [], []
    for i in range(12):
        imgs = [images[(i + j) % len(images)] for j in range(i % 3)]
        sft.append({"conversations": [{"from": "human", "value": "<image>" * len(imgs) + words(3, 9)},
                                      {"from": "gpt", "value": words(2, 12)}], "images": imgs})
        imgs = [images[i % len(images)]] if i % 4 else []
        dpo.append({"conversations": [{"from": "human", "value": "<image>" * len(imgs) + words(3, 9)}],
                    "chosen": {"from": "gpt", "value": words(2, 10)},
                    "rejected": {"from": "gpt", "value": "no " + words(2, 10)}, "images": imgs})
    for name, records in (("sft.jsonl", sft), ("dpo.jsonl", dpo)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture(scope="module")
def model_config(internvl_tokenizer_dir):
    tok = load_chat_tokenizer(internvl_tokenizer_dir, **InternVLImageInputs.chat_tokens).tokenizer
    return tiny_config(len(tok), image_size=TILE, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))


def config(data, tok_dir, name="sft.jsonl", **kw):
    base = dict(paths=str(data / name), tokenizer_dir=str(tok_dir), mode="sft", batch_size=2, max_length=192,
                length_buckets=(96, 192), patch_buckets=(8, 16), shuffle=False, shard_index=0, shard_count=1,
                read_threads=0)
    base.update(kw)
    return DataConfig(**base)


def test_examples_equal_transformers_processor(data, internvl_tokenizer_dir, model_config):
    """Every SFT example's ids and tiles are what InternVLProcessor gives for the chat-template rendering."""
    processor = hf_processor(internvl_tokenizer_dir)
    examples = list(example_dataset(config(data, internvl_tokenizer_dir), model_config))
    records = [json.loads(line) for line in (data / "sft.jsonl").read_text().splitlines()]
    assert len(examples) == len(records) and sum("pixel_values" in ex for ex in examples) == 8
    for ex, record in zip(examples, records):
        conv = parse_record(record, RecordRef(str(data / "sft.jsonl"), 1))
        messages = [{"role": m.role, "content": m.text.replace("<image>", "<IMG_CONTEXT>\n")}
                    for m in conv.messages]
        text = processor.tokenizer.apply_chat_template(messages, tokenize=False)
        images = [Image.open(data / p).convert("RGB") for p in record["images"]] or None
        ref = processor(images=images, text=[text], return_tensors="np")
        np.testing.assert_array_equal(ex["input_ids"], ref["input_ids"][0])
        if images:
            np.testing.assert_allclose(ex["pixel_values"], ref["pixel_values"], atol=1e-6, rtol=0)
            tiles = ex["image_num_patches"]
            assert int((ex["input_ids"] == model_config.image_token_id).sum()) == TOKENS_PER_TILE * tiles.sum()
        else:
            assert "pixel_values" not in ex


def test_batches_use_tile_buckets_and_1d_positions(data, internvl_tokenizer_dir, model_config):
    for mode, name in (("sft", "sft.jsonl"), ("dpo", "dpo.jsonl")):
        batches = list(make_iterator(config(data, internvl_tokenizer_dir, name, mode=mode,
                                            packing=mode == "sft"), model_config))
        assert any("pixel_values" in b for b in batches)
        for batch in batches:
            assert batch["position_ids"].shape == batch["input_ids"].shape  # 1-D RoPE
            if "pixel_values" not in batch:
                continue
            tiles = batch["pixel_values"].shape[0]
            assert tiles in (8, 16) and batch["pixel_values"].shape[1:] == (3, TILE, TILE)
            assert batch["vision"] == {}
            assert batch["image_token_index"].shape[-1] == tiles * TOKENS_PER_TILE
            real = batch["image_token_index"] < batch["input_ids"].size
            assert int(real.sum()) == int((batch["input_ids"] == model_config.image_token_id).sum())


@pytest.fixture(scope="module")
def tiny_model(model_config):
    model = nnx.eval_shape(lambda: InternVL(model_config, rngs=None))
    rng = np.random.default_rng(0)
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            shape = node.get_value().shape
            base = 1.0 if any("norm" in str(p) or "lambda" in str(p) for p in path) else 0.0
            node.set_value(jnp.asarray(base + 0.1 * rng.standard_normal(shape), jnp.float32))
    return model


@nnx.jit
def batch_logits(model, inputs):
    return model.forward(**inputs)


@pytest.mark.parametrize("mode", ["sft", "dpo"])
def test_batch_rows_match_examples_alone(data, internvl_tokenizer_dir, model_config, tiny_model, mode):
    """Packed SFT rows and DPO chosen/rejected rows (one encoding per pair) give each example's own logits."""
    name = f"{mode}.jsonl"
    cfg = config(data, internvl_tokenizer_dir, name, mode=mode, batch_size=3, packing=mode == "sft",
                 length_buckets=(192,), patch_buckets=(16,))
    batch = next(make_iterator(cfg, model_config))
    assert "pixel_values" in batch
    logits = np.asarray(batch_logits(tiny_model, batching.forward_inputs(batch)))
    tok = load_chat_tokenizer(internvl_tokenizer_dir, **InternVLImageInputs.chat_tokens)
    images = InternVLImageInputs(model_config.vision)
    candidates = {}
    for line, record in enumerate((data / name).read_text().splitlines(), start=1):
        record = json.loads(record)
        pixels, info = images.load([data / p for p in record["images"]]) if record["images"] else (None, None)
        parsed = parse_record(record, RecordRef(str(data / name), line),
                              kind="sft" if mode == "sft" else "preference")
        out = tokenize_record(parsed, tok, num_image_tokens=None if info is None else images.token_counts(info))
        for key in ("input_ids", "chosen_input_ids", "rejected_input_ids"):
            if key in out:
                candidates[tuple(out[key])] = pixels
    checked = 0
    for r in range(batch["input_ids"].shape[0]):
        for seg in range(1, int(batch["segment_ids"][r].max()) + 1):
            cols = np.flatnonzero(batch["segment_ids"][r] == seg)
            ids = batch["input_ids"][r, cols]
            pixels = candidates[tuple(ids)]
            alone = np.asarray(tiny_model(ids[None], None, pixels))[0]
            np.testing.assert_allclose(logits[r, cols], alone, atol=1e-5, rtol=0)
            assert np.abs(alone).max() > 0.1
            checked += 1
    assert checked >= 4


def test_shared_prompt_layout_gives_the_log_probs_of_separate_rows(data, internvl_tokenizer_dir, model_config,
                                                                     tiny_model):
    """dpo.share_prompt with InternVL's 1-D positions: one row per pair ([prompt | chosen | rejected], the tiles
    encoded once) gives the completion log-probs of separate chosen and rejected rows."""
    import jax

    from medee_jax.training import steps
    from medee_jax.training.batches import DEVICE_KEYS, add_target_arrays, target_width
    from medee_jax.training.mesh import stack_shards

    logps = {}
    for shared in (False, True):
        cfg = config(data, internvl_tokenizer_dir, "dpo.jsonl", mode="dpo", batch_size=3, length_buckets=(192,),
                     patch_buckets=(16,), share_prompt=shared)
        batch = next(make_iterator(cfg, model_config))
        assert "pixel_values" in batch and (batch["input_ids"].shape[0] == 3) == shared
        batch = add_target_arrays(batch, target_width([batch], (64, 192)))
        stacked = jax.tree.map(jnp.asarray, stack_shards([{k: v for k, v in batch.items() if k in DEVICE_KEYS}]))
        opts = steps.StepOptions(mode="dpo", reference="none", vocab_chunk=512, seq_chunk=32)
        logps[shared] = np.asarray(steps.dpo_logps(tiny_model, None, stacked, opts)[0])
    assert np.abs(logps[False]).min() > 1.0
    np.testing.assert_allclose(logps[True], logps[False], rtol=1e-5, atol=1e-4)
