"""InternVL3 against transformers on tiny random checkpoints (fp32, eager): logits for both InternViT styles,
position-embedding interpolation, dynamic NTK RoPE, export both ways, the original remote-code layout, bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from medee_jax.models import from_pretrained, hf, load_config, save_pretrained
from medee_jax.models.internvl.host import text_position_ids
from tests.internvl_reference import (IMG_CONTEXT, IMG_END, IMG_START, TEXT_VOCAB, TILE, VARIANTS, hf_logits,
                                      image_span, random_hf_model, tiny_hf_config, write_original_layout)
from tests.qwen_reference import assert_logits_close, pad_rows


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{variant: (transformers model, its directory, our fp32 model)} for both InternViT styles."""
    out = {}
    for seed, variant in enumerate(VARIANTS):
        path = tmp_path_factory.mktemp(f"internvl_{variant}")
        model = random_hf_model(tiny_hf_config(variant), seed=seed)
        model.save_pretrained(path)
        out[variant] = (model, str(path), from_pretrained(str(path), dtype=jnp.float32))
    return out


def text(rng, n):
    return list(rng.integers(3, TEXT_VOCAB, n))


def batch(rng, side):
    """Row 0: an image of 3 tiles (2 + thumbnail); row 1: text only; row 2: a one-tile image. Padded on ``side``."""
    rows = [text(rng, 5) + image_span(3) + text(rng, 7), text(rng, 26), text(rng, 3) + image_span(1) + text(rng, 9)]
    ids, mask = pad_rows(rows, side)
    return ids, mask, rng.standard_normal((4, 3, TILE, TILE)).astype(np.float32)


def flat_params(model) -> dict[str, np.ndarray]:
    return {path: np.asarray(hf.get_param(model, path)[...]) for _, path, _ in hf.model_params(model)}


def read_all(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in hf.checkpoint_files(str(path)):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(checkpoints, variant, side):
    hf_model, _, ours = checkpoints[variant]
    lambdas = [p for n, p in hf_model.named_parameters() if "lambda" in n]
    assert lambdas and all(float((p.detach() - 0.1).abs().max()) > 0.1 for p in lambdas)  # not the init value
    ids, mask, pixel_values = batch(np.random.default_rng(1), side)
    assert_logits_close(ours(ids, mask, pixel_values), hf_logits(hf_model, ids, mask, pixel_values), mask)


@pytest.mark.parametrize("size", [28, 84])
def test_other_tile_sizes_interpolate_position_embeddings_like_transformers(checkpoints, size):
    """Tiles whose patch grid differs from the checkpoint's (2x2 or 6x6 vs 4x4): bicubic position embeddings."""
    hf_model, _, ours = checkpoints["300m"]
    rng = np.random.default_rng(2)
    tokens = (size // 14 // 2) ** 2
    ids, mask = pad_rows([text(rng, 4) + [IMG_START] + [IMG_CONTEXT] * (2 * tokens) + [IMG_END] + text(rng, 5)],
                         "right")
    pixel_values = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    assert_logits_close(ours(ids, mask, pixel_values), hf_logits(hf_model, ids, mask, pixel_values), mask)


def test_dynamic_ntk_rope_matches_transformers_past_max_positions(tmp_path):
    """rope_type "dynamic" (InternVL3-1B) changes the frequencies only past max_position_embeddings (32 here)."""
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    cfg = tiny_hf_config(text=dict(max_position_embeddings=32, rope_parameters=dynamic))
    random_hf_model(cfg, seed=3).save_pretrained(tmp_path / "dynamic")
    ours = from_pretrained(str(tmp_path / "dynamic"), dtype=jnp.float32)
    assert (ours.config.text.rope_type, ours.config.text.rope_factor) == ("dynamic", 2.0)
    plain_dir = _edit_config(tmp_path / "dynamic", tmp_path / "plain", lambda c: c["text_config"].update(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    plain = from_pretrained(str(plain_dir), dtype=jnp.float32)  # the same weights with plain RoPE
    rng = np.random.default_rng(3)
    for length in (24, 90):  # within, then beyond max_position_embeddings; the longest row fills the batch
        ids, mask = pad_rows([text(rng, length), text(rng, length // 2)], "right")
        ref = hf_logits(random_hf_model(cfg, seed=3), ids, mask)  # a fresh model: transformers caches frequencies
        assert_logits_close(ours(ids, mask), ref, mask)
        differs = np.abs(np.asarray(plain(ids, mask)) - ref)[mask.astype(bool)].max() > 1e-2
        assert differs == (length > 32)


def test_positions_count_attended_tokens_and_restart_per_example():
    ids = np.array([[0, 0, 5, 6, 7], [5, 6, 7, 8, 0]])
    mask = (ids != 0).astype(np.int32)
    np.testing.assert_array_equal(text_position_ids(ids, mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 0]])
    segments = np.array([[1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(text_position_ids(ids[1:], mask[1:], segments), [[0, 1, 0, 1, 0]])


def test_image_token_count_mismatch_is_a_clear_error(checkpoints):
    _, _, ours = checkpoints["300m"]
    ids, mask, pixel_values = batch(np.random.default_rng(4), "right")
    with pytest.raises(ValueError, match="image tokens and image features do not match"):
        ours(ids, mask, pixel_values[:3])
    with pytest.raises(ValueError, match="no image_grid_thw"):
        ours(ids, mask, pixel_values, image_grid_thw=np.array([[1, 4, 4]]))


# ---- export ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_export_loads_in_transformers_with_our_logits(checkpoints, variant, tmp_path):
    from transformers import InternVLForConditionalGeneration

    _, path, _ = checkpoints[variant]
    model = from_pretrained(path, dtype=jnp.float32)
    rng = np.random.default_rng(5)
    for _, param_path, _ in hf.model_params(model):  # make the weights ours: no tensor equals the source file's
        p = hf.get_param(model, param_path)
        value = np.asarray(p[...])
        p.set_value(jnp.asarray(value * (1.0 + 0.1 * rng.standard_normal(value.shape, np.float32))))
    save_pretrained(model, tmp_path / "export", max_shard_size="60KB")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "internvl" and config["dtype"] == "float32"
    assert (tmp_path / "export" / "model.safetensors.index.json").is_file()
    reloaded = InternVLForConditionalGeneration.from_pretrained(tmp_path / "export", attn_implementation="eager")
    ids, mask, pixel_values = batch(np.random.default_rng(6), "left")
    assert_logits_close(model(ids, mask, pixel_values), hf_logits(reloaded.eval(), ids, mask, pixel_values), mask)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_to_ours_to_export_is_bit_identical(checkpoints, variant, tmp_path):
    _, path, ours = checkpoints[variant]
    save_pretrained(ours, tmp_path / "out")
    a, b = read_all(path), read_all(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def test_tied_embeddings(tmp_path):
    cfg = tiny_hf_config(tie_word_embeddings=True)
    model = random_hf_model(cfg, seed=7)
    model.save_pretrained(tmp_path / "tied")
    assert not any("lm_head" in k for k in read_all(tmp_path / "tied"))
    ours = from_pretrained(str(tmp_path / "tied"), dtype=jnp.float32)
    assert ours.lm_head is None
    ids, mask = pad_rows([text(np.random.default_rng(7), 12)], "right")
    assert_logits_close(ours(ids, mask), hf_logits(model, ids, mask), mask)
    save_pretrained(ours, tmp_path / "out")
    assert sorted(read_all(tmp_path / "out")) == sorted(read_all(tmp_path / "tied"))


# ---- the original remote-code layout -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_original_layout_imports_to_the_same_model(checkpoints, variant, tmp_path):
    _, path, ours = checkpoints[variant]
    original = write_original_layout(path, str(tmp_path / "original"))
    stored = read_all(original)
    assert any(k.endswith("attn.qkv.weight") for k in stored) and "mlp1.1.weight" in stored
    assert not any(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in stored)
    model = from_pretrained(original, dtype=jnp.float32)
    assert model.config == dataclasses.replace(ours.config, image_token_id=model.config.image_token_id)
    assert model.config.image_token_id == 151667  # <IMG_CONTEXT> of InternVL3's tokenizer (not in its config.json)
    a, b = flat_params(ours), flat_params(model)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    save_pretrained(model, tmp_path / "as_hf")  # exported in the "-hf" layout, bit for bit
    exported, source = read_all(tmp_path / "as_hf"), read_all(path)
    assert sorted(exported) == sorted(source) and all(np.array_equal(exported[k], source[k]) for k in source)


# ---- bad input -----------------------------------------------------------------------------------------------------

def _edit_config(src, dst, edit):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_internvl3_9b_is_refused_naming_its_decoder(checkpoints, tmp_path):
    _, path, _ = checkpoints["300m"]
    original = write_original_layout(path, str(tmp_path / "original"))

    def internlm3(config):
        config["llm_config"].update(architectures=["InternLM3ForCausalLM"], model_type="internlm3")

    bad = _edit_config(original, tmp_path / "9b", internlm3)
    with pytest.raises(ValueError, match="InternVL3-9B.*InternLM3.*Qwen2 decoder"):
        from_pretrained(bad)
    bad_hf = _edit_config(path, tmp_path / "9b_hf", lambda c: c["text_config"].update(model_type="llama"))
    with pytest.raises(ValueError, match="InternVL3-9B"):
        load_config(bad_hf)


def test_unknown_layout_and_tensors_listed_together(checkpoints, tmp_path):
    from safetensors.numpy import save_file

    _, path, _ = checkpoints["6b"]
    tensors = read_all(path)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(f"{path}/config.json", renamed)
    save_file({"encoder." + k: v for k, v in tensors.items()}, renamed / "model.safetensors")
    with pytest.raises(hf.CheckpointError, match='supported layouts: "-hf".*original remote-code'):
        from_pretrained(renamed)
    edited = dict(tensors)
    del edited["vision_tower.encoder.layer.1.lambda_2"]
    edited["vision_tower.encoder.layer.0.attention.q_proj.bias"] = np.zeros(32, np.float32)  # 6B style: no bias
    edited["multi_modal_projector.linear_1.weight"] = edited["multi_modal_projector.linear_1.weight"][:, :64].copy()
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(f"{path}/config.json", bad)
    save_file(edited, bad / "model.safetensors")
    with pytest.raises(hf.CheckpointError) as err:
        from_pretrained(bad)
    msg = str(err.value)
    for part in ("missing (1): vision_tower.encoder.layer.1.lambda_2",
                 "unexpected (1): vision_tower.encoder.layer.0.attention.q_proj.bias",
                 "multi_modal_projector.linear_1.weight [64, 64] (expected [64, 128])", '"-hf"'):
        assert part in msg, (part, msg)


def test_orbax_round_trip_from_both_layouts(checkpoints, tmp_path):
    """hf2orbax / orbax2hf (what tools/convert_checkpoint.py runs) ask the family: the "-hf" and the original layout
    convert to the same Orbax parameters, which load into the model and export bit-identically to the "-hf" file."""
    from medee_jax.models import orbax_io

    _, path, ours = checkpoints["6b"]
    original = write_original_layout(path, str(tmp_path / "original"))
    orbax_io.hf_to_orbax(path, str(tmp_path / "orbax_hf"))
    orbax_io.hf_to_orbax(original, str(tmp_path / "orbax_original"), dtype=np.float32)
    for name in ("orbax_hf", "orbax_original"):
        model = orbax_io.load_model(str(tmp_path / name), jnp.float32)
        a, b = flat_params(ours), flat_params(model)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
        orbax_io.orbax_to_hf(str(tmp_path / name), str(tmp_path / f"{name}_back"))
        exported, source = read_all(tmp_path / f"{name}_back"), read_all(path)
        assert sorted(exported) == sorted(source) and all(np.array_equal(exported[k], source[k]) for k in source)
