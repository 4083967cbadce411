"""Real-size structure: for every preset, transformers' model (built on the meta device, no memory) and ours
(``nnx.eval_shape``) hold the same tensors, name for name and shape for shape, and the same parameter count.

This proves the key table and the stacked layout at the released sizes without any weights.
"""

from __future__ import annotations

import numpy as np
import pytest

from medee_jax.models import abstract_model, config_from_hf_dict, hf
from medee_jax.models.qwen2_5_vl import keys as qwen_keys
from medee_jax.models.qwen2_5_vl.config import PRESETS

# Every preset: on the meta device even 72B builds in well under a second once torch is imported.
CASES = list(PRESETS)


def torch_meta_tensors(cfg) -> tuple[dict[str, tuple[int, ...]], int]:
    """Returns ({hub-layout name: shape}, parameter count) of transformers' model for ``cfg`` on the meta device."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hf_config = Qwen2_5_VLConfig.from_dict(cfg.to_hf_dict())
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(hf_config)
    # named_parameters() lists a tied lm_head once (as the embedding): the count of distinct tensors.
    count = sum(p.numel() for p in model.parameters())
    shapes = {qwen_keys.normalise_key(name): tuple(p.shape) for name, p in model.named_parameters()}
    return shapes, count


def our_tensors(cfg) -> tuple[dict[str, tuple[int, ...]], int]:
    """Returns ({hub-layout name: shape}, parameter count) of our abstract model, unstacked through the key table."""
    model = abstract_model(cfg)
    shapes = {key: tuple(shape) for key, _, _, _, shape, _ in hf.expected_tensors(model)}
    count = sum(int(np.prod(hf.get_param(model, path).get_value().shape)) for _, path, _ in hf.model_params(model))
    return shapes, count


@pytest.mark.parametrize("name", CASES)
def test_preset_matches_transformers_structure(name):
    cfg = PRESETS[name]
    assert config_from_hf_dict(cfg.to_hf_dict()) == cfg  # the config we would export reads back the same
    theirs, their_count = torch_meta_tensors(cfg)
    ours, our_count = our_tensors(cfg)
    print(f"{name}: transformers {their_count:,} params, ours {our_count:,} params, {len(ours)} tensors")
    assert sorted(set(theirs) - set(ours)) == [] and sorted(set(ours) - set(theirs)) == []
    mismatched = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
    assert not mismatched, mismatched
    assert our_count == their_count
    for key in ours:  # every tensor name maps back through the key table (what the loader relies on)
        assert qwen_keys.match_key(key) is not None, key


def test_7b_parameter_count_is_as_released():
    _, count = our_tensors(PRESETS["qwen2_5_vl_7b"])
    assert 8.28e9 < count < 8.30e9, count  # Qwen2.5-VL-7B-Instruct: 8,292,166,656 parameters
