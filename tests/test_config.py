"""Config parsing from config.json in both layouts, with transformers' own parse as the reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medee_jax.models import config_from_hf_dict, load_config
from medee_jax.models.qwen2_5_vl.config import PRESETS, tiny_config
from medee_jax.models.qwen2_5_vl.host import mrope_position_ids

# A hub-style (flat) config.json as the released 7B ships it, with a partial vision_config.
HUB_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 128000, "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}


def reference_fields(d: dict) -> dict:
    """Returns the fields we read, as transformers parses the same dict."""
    from transformers import Qwen2_5_VLConfig

    c = Qwen2_5_VLConfig.from_dict(dict(d))
    t, v = c.text_config, c.vision_config
    return {
        "vocab": t.vocab_size, "hidden": t.hidden_size, "inter": t.intermediate_size, "layers": t.num_hidden_layers,
        "heads": t.num_attention_heads, "kv": t.num_key_value_heads, "eps": t.rms_norm_eps,
        "theta": t.rope_parameters["rope_theta"], "mrope": tuple(t.rope_parameters["mrope_section"]),
        "v_depth": v.depth, "v_hidden": v.hidden_size, "v_inter": v.intermediate_size, "v_heads": v.num_heads,
        "v_out": v.out_hidden_size, "v_full": tuple(v.fullatt_block_indexes), "v_window": v.window_size,
        "v_patch": v.patch_size, "v_merge": v.spatial_merge_size, "tie": c.tie_word_embeddings,
        "image_token": c.image_token_id,
    }


def our_fields(d: dict) -> dict:
    c = config_from_hf_dict(d)
    t, v = c.text, c.vision
    return {
        "vocab": t.vocab_size, "hidden": t.hidden_size, "inter": t.intermediate_size, "layers": t.num_hidden_layers,
        "heads": t.num_attention_heads, "kv": t.num_key_value_heads, "eps": t.rms_norm_eps, "theta": t.rope_theta,
        "mrope": t.mrope_section, "v_depth": v.depth, "v_hidden": v.hidden_size, "v_inter": v.intermediate_size,
        "v_heads": v.num_heads, "v_out": v.out_hidden_size, "v_full": v.fullatt_block_indexes,
        "v_window": v.window_size, "v_patch": v.patch_size, "v_merge": v.spatial_merge_size,
        "tie": c.tie_word_embeddings, "image_token": c.image_token_id,
    }


def test_flat_hub_config_parses_like_transformers():
    assert our_fields(HUB_7B) == reference_fields(HUB_7B)


def test_nested_transformers5_config_parses_like_transformers():
    nested = PRESETS["qwen2_5_vl_3b"].to_hf_dict()
    assert our_fields(nested) == reference_fields(nested)
    assert config_from_hf_dict(nested) == PRESETS["qwen2_5_vl_3b"]


def test_partial_vision_config_takes_transformers_class_defaults():
    d = dict(HUB_7B, vision_config={"depth": 4, "out_hidden_size": 3584})
    assert our_fields(d) == reference_fields(d)


def test_presets_round_trip_through_hf_dict():
    for name, cfg in PRESETS.items():
        assert config_from_hf_dict(cfg.to_hf_dict()) == cfg, name
    assert PRESETS["qwen2_5_vl_3b"].tie_word_embeddings and not PRESETS["qwen2_5_vl_7b"].tie_word_embeddings


def test_unknown_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'llava'.*qwen2_5_vl"):
        load_config(str(tmp_path))


def test_missing_config_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_config(str(tmp_path))


def test_packed_positions_restart_per_example():
    """Packed rows (segment ids): every example's positions equal those it would have alone."""
    cfg = tiny_config(image_token_id=9)
    merge = cfg.vision.spatial_merge_size
    a = [1, 2, 9, 9, 9, 9, 3]  # one image of grid (1, 4, 4) -> 4 tokens
    b = [4, 5, 6]
    ids = np.array([a + b + [0, 0]])
    seg = np.array([[1] * len(a) + [2] * len(b) + [0, 0]])
    pos = mrope_position_ids(ids, np.array([[1, 4, 4]]), segment_ids=seg, image_token_id=9,
                             spatial_merge_size=merge)
    alone_a = mrope_position_ids(np.array([a]), np.array([[1, 4, 4]]), image_token_id=9, spatial_merge_size=merge)
    alone_b = mrope_position_ids(np.array([b]), None, image_token_id=9, spatial_merge_size=merge)
    np.testing.assert_array_equal(pos[:, 0, : len(a)], alone_a[:, 0])
    np.testing.assert_array_equal(pos[:, 0, len(a): len(a) + len(b)], alone_b[:, 0])
    np.testing.assert_array_equal(pos[:, 0, -2:], 0)
    np.testing.assert_array_equal(alone_a[:, 0], [[0, 1, 2, 2, 2, 2, 4], [0, 1, 2, 2, 3, 3, 4], [0, 1, 2, 3, 2, 3, 4]])
