"""The Grain pipeline end to end: sources, sharding, resumable state, bad records, workers, and the tiny model."""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from medee_jax.data import batching, errors
from medee_jax.data.errors import BadRecordError
from medee_jax.data.images import qwen2_vl_preprocess
from medee_jax.data.pipeline import DataConfig, build_dataset, example_dataset, make_iterator
from medee_jax.data.sources import ArrayRecordSource, JsonlSource, open_source
from medee_jax.data.tokenize import load_chat_tokenizer
from medee_jax.models.qwen2_5_vl.config import tiny_config
from medee_jax.models.qwen2_5_vl.host import QwenImageInputs
from medee_jax.models.qwen2_5_vl.model import Qwen25VL
from tests.limits import alarm

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(56, 56), (84, 56), (56, 112)]  # (w, h): grids (1,4,4), (1,4,6), (1,8,4)
WORDS = ("fever cough chest radiograph shows a nodule in the right lung consistent with pneumonia "
         "the answer is B because the opacity is lobar").split()


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sentence(rng, lo=3, hi=25):
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(lo, hi))))


def write_images(folder: Path, count: int, rng) -> list[str]:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
        names.append(f"img/{i}.png")
    return names


def write_jsonl(path: Path, records, bad_lines=()):
    lines = [json.dumps(r) for r in records]
    for pos, text in bad_lines:
        lines.insert(pos, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def sft_records(rng, images, n):
    out = []
    for i in range(n):
        k = i % 3  # 0, 1 or 2 images
        imgs = [images[(i + j) % len(images)] for j in range(k)]
        question = "".join("<image>" for _ in imgs) + sentence(rng)
        out.append({"conversations": [{"from": "human", "value": question},
                                      {"from": "gpt", "value": sentence(rng, 2, 40)}], "images": imgs})
    return out


def dpo_records(rng, images, n):
    out = []
    for i in range(n):
        imgs = [images[i % len(images)]] if i % 4 else []
        out.append({"conversations": [{"from": "human", "value": "<image>" * len(imgs) + sentence(rng)}],
                    "chosen": {"from": "gpt", "value": sentence(rng, 2, 30)},
                    "rejected": {"from": "gpt", "value": "no " + sentence(rng, 2, 30)}, "images": imgs})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_data")
    rng = np.random.default_rng(0)
    images = write_images(root, 6, rng)
    write_jsonl(root / "sft.jsonl", sft_records(rng, images, 30))
    write_jsonl(root / "dpo.jsonl", dpo_records(rng, images, 12))
    bad = [(3, "{not json"), (7, json.dumps({"conversations": [{"from": "human", "value": "<image>hi"},
                                                              {"from": "gpt", "value": "x"}]})),
           (9, json.dumps({"conversations": [{"from": "human", "value": "<image>hi"},
                                             {"from": "gpt", "value": "x"}], "images": ["img/missing.png"]}))]
    write_jsonl(root / "sft_bad.jsonl", sft_records(rng, images, 10), bad_lines=bad)
    return root


@pytest.fixture(scope="module")
def model_config(chat_tokenizer):
    tok = chat_tokenizer.tokenizer
    ids = {name: tok.convert_tokens_to_ids(text) for name, text in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return tiny_config(len(tok), **ids)


def config(data, tok_dir, name="sft.jsonl", **kw):
    base = dict(paths=str(data / name), tokenizer_dir=str(tok_dir), mode="sft", batch_size=2, max_length=256,
                length_buckets=(64, 128, 256), patch_buckets=(64, 128, 256), min_pixels=56 * 56, max_pixels=112 * 112,
                seed=3, shard_index=0, shard_count=1, read_threads=0)
    base.update(kw)
    return DataConfig(**base)


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            if key == "vision":
                for k in x[key]:
                    np.testing.assert_array_equal(x[key][k], y[key][k])
            else:
                np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ---------------------------------------------------------------------------------------------------------------
# Sources


def test_jsonl_source_index(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\r\n   \n  \t  \n' + b" " * 20 + b'\n{"a": 3}')
    src = JsonlSource(path)
    assert len(src) == 4  # short blank lines are not indexed; a long one is (the parse stage drops it silently)
    got = [(r.line, r.data) for r in (src[i] for i in range(len(src)))]
    assert got == [(1, b'{"a": 1}'), (3, b'{"a": 2}\r'), (6, b" " * 20), (7, b'{"a": 3}')]
    clone = pickle.loads(pickle.dumps(src))
    assert clone[3] == src[3]
    with pytest.raises(IndexError):
        src[4]
    # sidecar index: written once, reused, rebuilt when the file changes
    cached = JsonlSource(path, index_cache=True)
    assert Path(str(path) + ".index.npz").exists() and len(JsonlSource(path, index_cache=True)) == len(cached)
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n')
    assert len(JsonlSource(path, index_cache=True)) == 2


def test_array_record_matches_jsonl(data, demo_tokenizer_dir):
    src_path = data / "sft_bad.jsonl"
    text = src_path.read_bytes()
    jsonl = data / "with_blank.jsonl"
    jsonl.write_bytes(text.replace(b"\n", b"\n\n", 1))  # a blank line 2
    out = data / "with_blank.array_record"
    info = load_tool("build_array_record").convert(str(jsonl), str(out))
    assert info["records"] == len(jsonl.read_bytes().splitlines()) and info["blank_lines"] == 1
    ar, js = ArrayRecordSource(out), JsonlSource(jsonl)
    assert len(ar) == len(js) + 1 and ar[1].data == b""
    for i in range(len(js)):
        assert ar[js[i].line - 1].data == js[i].data.rstrip(b"\r")
    # the same batches and the same bad-record locations from either file
    runs = {}
    for path in (jsonl, out):
        it = make_iterator(config(data, demo_tokenizer_dir, path.name, on_bad_record="skip", shuffle=False),
                           tiny_config(3024).vision)
        runs[path.suffix] = (list(it), it.stats()["skipped"])
    assert_batches_equal(runs[".jsonl"][0], runs[".array_record"][0])
    assert runs[".jsonl"][1] == runs[".array_record"][1] == {
        errors.MALFORMED_JSON: 1, errors.PLACEHOLDER_COUNT: 1, errors.MISSING_IMAGE: 1}
    assert isinstance(open_source([jsonl, out]), object) and len(open_source([jsonl, out])) == len(ar) + len(js)


# ---------------------------------------------------------------------------------------------------------------
# Order, shards, state


def sources_of(cfg, vision):
    return [ex["source"] for ex in example_dataset(cfg, vision)]


def test_shards_are_disjoint_and_cover_each_epoch(data, demo_tokenizer_dir, model_config):
    base = config(data, demo_tokenizer_dir, num_epochs=2)
    everything = sources_of(base, model_config.vision)
    assert len(everything) == 60 and sorted(everything[:30]) == sorted(everything[30:])
    assert everything[:30] != everything[30:]  # reshuffled each epoch
    assert everything[:30] != sorted(everything[:30], key=lambda s: int(s.rsplit(":", 1)[1]))  # shuffled
    for drop in (False, True):
        shards = [sources_of(base.with_updates(shard_index=i, shard_count=4, drop_remainder=drop, num_epochs=1),
                             model_config.vision) for i in range(4)]
        flat = [s for shard in shards for s in shard]
        assert len(flat) == len(set(flat))  # disjoint
        assert set(flat) == set(everything) if not drop else len(flat) == 28 and {len(s) for s in shards} == {7}
        assert set(flat) <= set(everything)
    assert sources_of(base.with_updates(num_epochs=1), model_config.vision) == everything[:30]  # same seed, same order


@pytest.mark.parametrize("mode", ["sft", "dpo"])
def test_restored_state_gives_identical_batches(data, demo_tokenizer_dir, model_config, mode):
    cfg = config(data, demo_tokenizer_dir, f"{mode}.jsonl", mode=mode, num_epochs=2, read_threads=1)
    it = make_iterator(cfg, model_config)
    batches, states = [], []
    for batch in it:
        states.append(json.loads(json.dumps(it.get_state())))  # as grain.checkpoint stores it
        batches.append(batch)
    assert len(batches) >= 6
    for k in (1, len(batches) // 2, len(batches) - 1):
        resumed = make_iterator(cfg, model_config, state=states[k - 1])
        assert_batches_equal(list(resumed), batches[k:])
        assert resumed.stats() == it.stats()
    with pytest.raises(ValueError, match="num_workers: saved 0, now 2"):
        make_iterator(cfg.with_updates(num_workers=2), model_config, state=states[0])
    if mode == "sft":
        assert it.stats()["examples"] == 60 and it.stats()["examples_per_batch"] > 2  # packed
        assert 0.5 < it.stats()["packing_efficiency"] <= 1


def test_workers_give_the_same_batches_and_restore(data, demo_tokenizer_dir, model_config):
    cfg = config(data, demo_tokenizer_dir, "sft_bad.jsonl", on_bad_record="skip")
    reference = list(make_iterator(cfg, model_config))
    it = make_iterator(cfg.with_updates(num_workers=2, worker_buffer_size=2), model_config)
    try:
        first = [next(it) for _ in range(2)]
        state = json.loads(json.dumps(it.get_state()))
        rest = list(it)
        full = it.stats()
        assert full["skipped_total"] == 3 and full["examples"] == 10
        assert_batches_equal(first + rest, reference)  # the workers' output does not depend on their number
        it.set_state(state)  # rewind the same workers (a fresh iterator is covered in-process above)
        assert_batches_equal(list(it), rest)
        assert it.stats() == full
    finally:
        it.close()


# ---------------------------------------------------------------------------------------------------------------
# Bad records, config, shapes


def test_bad_records_skip_with_counts_or_raise_with_location(data, demo_tokenizer_dir, model_config):
    cfg = config(data, demo_tokenizer_dir, "sft_bad.jsonl", shuffle=False)
    it = make_iterator(cfg.with_updates(on_bad_record="skip"), model_config)
    assert sum(len(np.unique(b["segment_ids"][b["segment_ids"] > 0])) for b in it) > 0
    assert it.stats()["skipped"] == {errors.MALFORMED_JSON: 1, errors.PLACEHOLDER_COUNT: 1, errors.MISSING_IMAGE: 1}
    assert it.stats()["examples"] == 10
    with pytest.raises(BadRecordError) as info:
        list(make_iterator(cfg, model_config))
    assert info.value.reason == errors.MALFORMED_JSON and info.value.line == 4
    assert str(info.value).startswith(f"{data / 'sft_bad.jsonl'}:4: bad record (malformed_json)")


def test_parse_stage_reads_precomputed_reference_logps(tmp_path):
    from medee_jax.data.pipeline import Dropped, ParseRecord
    from medee_jax.data.sources import RawRecord

    pair = {"conversations": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": "b"}
    parse = ParseRecord("dpo")
    out = parse.map(RawRecord(str(tmp_path / "d.jsonl"), 1, json.dumps(
        {**pair, "ref_chosen_logps": -2.5, "ref_rejected_logps": -4}).encode()))
    assert out["ref_logps"].tolist() == [-2.5, -4.0]
    assert "ref_logps" not in parse.map(RawRecord("d.jsonl", 2, json.dumps(pair).encode()))
    bad = parse.map(RawRecord("d.jsonl", 3, json.dumps({**pair, "ref_chosen_logps": -2.5}).encode()))
    assert isinstance(bad, Dropped) and bad.error.reason == errors.BAD_FIELD and bad.error.line == 3
    assert isinstance(parse.map(RawRecord("d.jsonl", 4, b"   ")), Dropped)


def test_config_from_config_dict_and_errors(data, demo_tokenizer_dir, model_config):
    import ml_collections

    cd = ml_collections.ConfigDict(dict(paths=[str(data / "sft.jsonl")], tokenizer_dir=str(demo_tokenizer_dir),
                                        mode="dpo", length_buckets=[128, 256], max_length=256))
    cfg = DataConfig.from_dict(cd)
    assert cfg.paths == (str(data / "sft.jsonl"),) and cfg.length_buckets == (128, 256)
    with pytest.raises(ValueError, match="unknown data config keys"):
        DataConfig.from_dict({**cd.to_dict(), "batch": 3})
    with pytest.raises(ValueError, match="mode"):
        cfg.with_updates(mode="ppo")
    wrong = tiny_config(3024, image_token_id=5)
    with pytest.raises(ValueError, match="image token id"):
        build_dataset(config(data, demo_tokenizer_dir), wrong)


def test_pipeline_uses_only_configured_shapes(data, demo_tokenizer_dir, model_config):
    for packing in (True, False):
        cfg = config(data, demo_tokenizer_dir, packing=packing, batch_size=3)
        for batch in make_iterator(cfg, model_config):
            assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] in (64, 128, 256)
            assert batch["position_ids"].shape == (3, *batch["input_ids"].shape)
            if "pixel_values" in batch:
                assert batch["pixel_values"].shape in {(64, 1176), (128, 1176), (256, 1176)}
                assert batch["image_token_index"].shape == (batch["pixel_values"].shape[0] // 4,)
            else:
                assert not set(batching.VISION_KEYS) & set(batch)
            if not packing:
                assert batch["segment_ids"].max() <= 1


# ---------------------------------------------------------------------------------------------------------------
# The tiny model sees each row as it would alone

E2E = dict(length_buckets=(256,), patch_buckets=(128,), shuffle=False)  # one batch shape: few compiles


@pytest.fixture(scope="module")
def tiny_model(model_config):
    """The tiny Qwen25VL with random weights. Filled from numpy rather than `rngs=nnx.Rngs(0)`: random init compiles
    one XLA program per parameter shape (~20 s on a busy 2-core CPU); the module and forward are the same."""
    model = nnx.eval_shape(lambda: Qwen25VL(model_config, rngs=None))  # structure only; values set below
    rng = np.random.default_rng(0)
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            shape = node.get_value().shape
            norm = any("norm" in str(p) or str(p) == "ln_q" for p in path)
            node.set_value(jnp.asarray((1.0 if norm else 0.0) + 0.05 * rng.standard_normal(shape), jnp.float32))
    return model


@nnx.jit
def batch_logits(model, inputs):
    return model.forward(**inputs)


def logits_alone(model, ids, pixels=None, grid=None):
    """Logits [n, V] of one sequence run on its own through `model(...)` (right-padded to 256 tokens and 128
    patches, so every call has one of two shapes)."""
    n = len(ids)
    padded = np.zeros((1, 256), np.int32)
    padded[0, :n] = ids
    mask = (np.arange(256) < n).astype(np.int32)[None]
    kwargs = {}
    if pixels is not None:
        pv = np.zeros((128, pixels.shape[1]), np.float32)
        pv[: len(pixels)] = pixels
        kwargs = dict(pixel_values=pv, image_grid_thw=grid)
    return np.asarray(model(input_ids=padded, attention_mask=mask, **kwargs))[0, :n]


def record_images(data, record, cfg):
    if not record["images"]:
        return None, None
    return qwen2_vl_preprocess([str(data / p) for p in record["images"]], cfg.min_pixels, cfg.max_pixels)


def test_dpo_batch_rows_match_rows_alone(data, demo_tokenizer_dir, model_config, tiny_model):
    n = 2
    cfg = config(data, demo_tokenizer_dir, "dpo.jsonl", mode="dpo", batch_size=n, **E2E)
    batch = next(make_iterator(cfg, model_config))
    records = [json.loads(line) for line in (data / "dpo.jsonl").read_text().splitlines()[:n]]
    assert "pixel_values" in batch and batch["image_token_index"].shape == (2, 32)
    logits = np.asarray(batch_logits(tiny_model, batching.forward_inputs(batch)))  # [2n, L, V]
    for i, record in enumerate(records):
        pixels, grid = record_images(data, record, cfg)
        for row in (i, n + i):
            k = int(batch["attention_mask"][row].sum())
            alone = logits_alone(tiny_model, batch["input_ids"][row, :k], pixels, grid)
            np.testing.assert_allclose(logits[row, :k], alone, atol=1e-5, rtol=0)
            assert np.abs(alone).max() > 0.1


def test_packed_sft_rows_match_examples_alone(data, demo_tokenizer_dir, model_config, tiny_model):
    from medee_jax.data.formats import RecordRef, parse_record
    from medee_jax.data.tokenize import tokenize_record

    cfg = config(data, demo_tokenizer_dir, batch_size=4, **E2E)
    batch = next(make_iterator(cfg, model_config))
    assert batch["segment_ids"].max() >= 2 and "pixel_values" in batch
    logits = np.asarray(batch_logits(tiny_model, batching.forward_inputs(batch)))  # [B, L, V]
    # The first batch holds the first records of the file (no shuffle); find each segment's record by its tokens.
    tok = load_chat_tokenizer(demo_tokenizer_dir)
    candidates = []
    for line, record in enumerate((data / "sft.jsonl").read_text().splitlines()[:8], start=1):
        record = json.loads(record)
        pixels, grid = record_images(data, record, cfg)
        conv = parse_record(record, RecordRef(str(data / "sft.jsonl"), line))
        candidates.append((tokenize_record(conv, tok, grid, max_length=cfg.max_length)["input_ids"], pixels, grid))
    checked = 0
    for r in range(batch["input_ids"].shape[0]):
        for seg in range(1, int(batch["segment_ids"][r].max()) + 1):
            cols = np.flatnonzero(batch["segment_ids"][r] == seg)
            ids = batch["input_ids"][r, cols]
            match = [c for c in candidates if np.array_equal(c[0], ids)]
            assert len(match) == 1, f"segment {seg} of row {r} matches {len(match)} records"
            _, pixels, grid = match[0]
            np.testing.assert_allclose(logits[r, cols], logits_alone(tiny_model, ids, pixels, grid), atol=1e-5, rtol=0)
            checked += 1
    assert checked == int(batch["segment_ids"].max(axis=1).sum()) >= 4


def test_image_max_pixels_shrinks_before_the_processor(tmp_path):
    """data.image_max_pixels clamps an image's area first (LLaMA-Factory style), so it yields fewer patches."""
    from PIL import Image

    from medee_jax.data.formats import Conversation, Message, RecordRef
    from medee_jax.data.pipeline import LoadImages

    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8)).save(path)
    record = Conversation(messages=(Message("user", "<image>What is shown?"), Message("assistant", "A scan.")),
                          images=(str(path),), source=RecordRef(str(tmp_path / "d.jsonl"), 1))
    vision = tiny_config().vision
    plain = LoadImages(QwenImageInputs(vision, min_pixels=3136, max_pixels=10**7), max_patches=10**6).map(
        {"record": record})
    small = LoadImages(QwenImageInputs(vision, min_pixels=3136, max_pixels=10**7, image_max_pixels=224 * 224),
                       max_patches=10**6).map(
        {"record": record})
    assert plain["image_grid_thw"].tolist() == [[1, 32, 32]]
    assert small["image_grid_thw"].tolist() == [[1, 16, 16]]


def test_load_images_passes_uint8_patches_or_normalized_pixels(tmp_path):
    """LoadImages gives uint8 patches [p, 588] by default (normalised at batch time), with normalize=True exactly
    qwen2_vl_preprocess's float32 [p, 1176]."""
    from PIL import Image

    from medee_jax.data.formats import Conversation, Message, RecordRef
    from medee_jax.data.images import normalize_patches
    from medee_jax.data.pipeline import LoadImages

    paths = [tmp_path / "a.png", tmp_path / "b.jpg"]
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (100, 150, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8)).save(paths[1])
    record = Conversation(messages=(Message("user", "<image><image>Compare."), Message("assistant", "Same.")),
                          images=tuple(map(str, paths)), source=RecordRef(str(tmp_path / "d.jsonl"), 1))
    kwargs = dict(min_pixels=3136, max_pixels=448 * 448)
    vision = tiny_config().vision
    compact = LoadImages(QwenImageInputs(vision, **kwargs), max_patches=10**6).map({"record": record})
    floats = LoadImages(QwenImageInputs(vision, **kwargs, normalize=True), max_patches=10**6).map({"record": record})
    ref_pixels, ref_grid = qwen2_vl_preprocess([str(p) for p in paths], 3136, 448 * 448)
    assert compact["pixel_values"].dtype == np.uint8 and compact["pixel_values"].shape == (ref_pixels.shape[0], 588)
    assert np.array_equal(floats["pixel_values"], ref_pixels) and floats["pixel_values"].dtype == np.float32
    assert np.array_equal(normalize_patches(compact["pixel_values"]), ref_pixels)
    assert compact["image_grid_thw"].tolist() == floats["image_grid_thw"].tolist() == ref_grid.tolist()


def test_load_images_rescales_or_refuses_16_bit_images(tmp_path):
    """The pipeline's image stage passes data.high_bit_depth on: a 16-bit greyscale scan is stretched to 8 bits
    (not saturated), or the record is dropped with reason high_bit_depth under "refuse"."""
    from medee_jax.data.formats import Conversation, Message, RecordRef
    from medee_jax.data.images import load_image, qwen2_vl_patches
    from medee_jax.data.pipeline import Dropped, LoadImages

    path = tmp_path / "xray16.png"
    Image.fromarray(np.linspace(0, 4095, 56 * 84).reshape(56, 84).astype(np.uint16)).save(path)
    record = Conversation(messages=(Message("user", "<image>Findings?"), Message("assistant", "Clear.")),
                          images=(str(path),), source=RecordRef(str(tmp_path / "d.jsonl"), 5))
    vision = tiny_config().vision
    kwargs = dict(min_pixels=3136, max_pixels=448 * 448)
    out = LoadImages(QwenImageInputs(vision, **kwargs), max_patches=10**6).map({"record": record})
    expected, _ = qwen2_vl_patches([load_image(path, high_bit_depth="min_max")], 3136, 448 * 448)
    np.testing.assert_array_equal(out["pixel_values"], expected)
    assert (out["pixel_values"] == 255).mean() < 0.01  # Pillow's convert("RGB") made 97% of these 255
    refused = LoadImages(QwenImageInputs(vision, **kwargs, high_bit_depth="refuse"), max_patches=10**6).map(
        {"record": record})
    assert isinstance(refused, Dropped) and refused.error.reason == errors.HIGH_BIT_DEPTH
    assert refused.error.line == 5 and str(path) in str(refused.error)
    with pytest.raises(ValueError, match="high_bit_depth"):
        DataConfig(paths="x.jsonl", tokenizer_dir="t", high_bit_depth="clip")


# ---------------------------------------------------------------------------------------------------------------
# No endless reads, counted truncation, movable states


def test_an_all_bad_file_is_an_error_naming_the_counts_not_an_endless_read(tmp_path, demo_tokenizer_dir,
                                                                           model_config):
    lines = ["{not json"] * 3 + [json.dumps({"conversations": [{"from": "human", "value": "<image>hi"},
                                                              {"from": "gpt", "value": "x"}]})] * 2 + ["", "  "]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for epochs in (None, 1):
        cfg = DataConfig(paths=str(path), tokenizer_dir=str(demo_tokenizer_dir), mode="sft", batch_size=2,
                         max_length=64, length_buckets=(64,), on_bad_record="skip", num_epochs=epochs, read_threads=0,
                         shard_index=0, shard_count=1)
        with alarm(60), pytest.raises(errors.NoUsableRecordsError) as info:
            next(make_iterator(cfg, model_config))
        msg = str(info.value)
        assert str(path) in msg and "no usable record in a whole epoch" in msg
        assert "malformed_json: 3" in msg and "placeholder_count: 2" in msg
        assert info.value.counts == {errors.MALFORMED_JSON: 3, errors.PLACEHOLDER_COUNT: 2}


def test_one_good_record_among_bad_ones_keeps_epochs_going(tmp_path, demo_tokenizer_dir, model_config):
    """Reshuffled epochs can put long runs of bad records back to back; that is not an unusable epoch."""
    good = json.dumps({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]})
    path = tmp_path / "mostly_bad.jsonl"
    path.write_text("\n".join([good] + ["{not json"] * 5) + "\n")
    cfg = DataConfig(paths=str(path), tokenizer_dir=str(demo_tokenizer_dir), mode="sft", batch_size=1,
                     max_length=64, length_buckets=(64,), on_bad_record="skip", num_epochs=None, read_threads=0,
                     shard_index=0, shard_count=1, seed=7)
    it = make_iterator(cfg, model_config)
    with alarm(60):
        batches = [next(it) for _ in range(30)]
    assert len(batches) == 30 and it.stats()["skipped"] == {errors.MALFORMED_JSON: it.stats()["skipped_total"]}


def test_truncations_are_counted(tmp_path, demo_tokenizer_dir, model_config):
    rng = np.random.default_rng(4)
    records = [{"conversations": [{"from": "human", "value": "Q?"},
                                  {"from": "gpt", "value": sentence(rng, 60, 61) if i % 3 == 0 else "Short."}]}
               for i in range(9)]
    write_jsonl(tmp_path / "long.jsonl", records)
    cfg = DataConfig(paths=str(tmp_path / "long.jsonl"), tokenizer_dir=str(demo_tokenizer_dir), mode="sft",
                     batch_size=2, max_length=64, length_buckets=(64,), packing=False, shuffle=False, read_threads=0,
                     shard_index=0, shard_count=1)
    it = make_iterator(cfg, model_config)
    list(it)
    stats = it.stats()
    assert stats["examples"] == 9 and stats["truncated_examples"] == 3 and stats["truncated_tokens"] > 3
    dpo = [{"conversations": [{"from": "human", "value": "Q?"}], "chosen": sentence(rng, 60, 61) + " yes",
            "rejected": "No."}, {"conversations": [{"from": "human", "value": "Q?"}], "chosen": "A.", "rejected": "B."}]
    write_jsonl(tmp_path / "long_dpo.jsonl", dpo)
    it = make_iterator(cfg.with_updates(paths=str(tmp_path / "long_dpo.jsonl"), mode="dpo"), model_config)
    list(it)
    assert it.stats()["truncated_examples"] == 1


def test_state_follows_a_moved_data_file_but_not_another_file(data, demo_tokenizer_dir, model_config, tmp_path):
    import shutil

    cfg = config(data, demo_tokenizer_dir, "dpo.jsonl", mode="dpo", num_epochs=None)
    it = make_iterator(cfg, model_config)
    next(it)
    state = it.get_state()
    expected = next(it)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(data / "dpo.jsonl", moved / "dpo.jsonl")
    shutil.copytree(data / "img", moved / "img")
    resumed = next(make_iterator(cfg.with_updates(paths=str(moved / "dpo.jsonl")), model_config, state=state))
    assert [s.replace(str(moved), str(data)) for s in resumed.pop("sources")] == list(expected.pop("sources"))
    assert_batches_equal([resumed], [expected])
    with pytest.raises(ValueError, match="different input pipeline"):
        make_iterator(cfg.with_updates(paths=str(data / "sft.jsonl")), model_config, state=state)


def test_deeply_nested_json_is_a_bad_record_not_a_crash(tmp_path, demo_tokenizer_dir, model_config):
    """json.loads raises RecursionError on thousands of nested brackets; that used to abort skip mode too."""
    from medee_jax.data.formats import read_records

    deep = '{"conversations": ' + "[" * 100_000 + "]" * 100_000 + "}"
    good = json.dumps({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]})
    path = tmp_path / "deep.jsonl"
    path.write_text("\n".join([good, deep, good]) + "\n")
    cfg = DataConfig(paths=str(path), tokenizer_dir=str(demo_tokenizer_dir), mode="sft", batch_size=2,
                     max_length=64, length_buckets=(64,), on_bad_record="skip", shuffle=False, read_threads=0,
                     shard_index=0, shard_count=1)
    it = make_iterator(cfg, model_config)
    list(it)
    assert it.stats()["skipped"] == {errors.MALFORMED_JSON: 1} and it.stats()["examples"] == 2
    with pytest.raises(BadRecordError, match="deep.jsonl:2: bad record \\(malformed_json\\).*nested too deeply"):
        list(make_iterator(cfg.with_updates(on_bad_record="raise"), model_config))
    counter = errors.BadRecordCounter()
    assert len(list(read_records(path, kind="sft", on_bad_record="skip", counter=counter))) == 2
    assert counter.counts == {errors.MALFORMED_JSON: 1}
