"""Real-size structure of the InternVL3 presets: transformers' InternVLForConditionalGeneration (built on the meta
device, no memory) and ours (``nnx.eval_shape``) hold the same tensors, name for name and shape for shape, and the
same parameter count — the "-hf" key table and both InternViT styles at the released sizes, without weights."""

from __future__ import annotations

import numpy as np
import pytest

from medee_jax.models import abstract_model, config_from_hf_dict, hf
from medee_jax.models.internvl import keys
from medee_jax.models.internvl.config import PRESETS

# Released parameter counts (transformers' count of the "-hf" checkpoints' tensors).
RELEASED = {"internvl3_1b": 938_193_024, "internvl3_2b": 2_088_957_440, "internvl3_8b": 7_944_373_760,
            "internvl3_14b": 15_117_256_704, "internvl3_38b": 38_388_164_992, "internvl3_78b": 78_408_318_336}


def torch_meta_tensors(cfg) -> tuple[dict[str, tuple[int, ...]], int]:
    """Returns ({hub-layout name: shape}, parameter count) of transformers' model for ``cfg`` on the meta device."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(InternVLConfig.from_dict(cfg.to_hf_dict()))
    count = sum(p.numel() for p in model.parameters())
    return {keys.HF.normalise(name): tuple(p.shape) for name, p in model.named_parameters()}, count


def our_tensors(cfg) -> tuple[dict[str, tuple[int, ...]], int]:
    model = abstract_model(cfg)
    shapes = {key: tuple(shape) for key, _, _, _, shape, _ in hf.expected_tensors(model)}
    count = sum(int(np.prod(hf.get_param(model, path).get_value().shape)) for _, path, _ in hf.model_params(model))
    return shapes, count


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_matches_transformers_structure(name):
    cfg = PRESETS[name]
    assert config_from_hf_dict(cfg.to_hf_dict()) == cfg  # the config we export reads back the same
    theirs, their_count = torch_meta_tensors(cfg)
    ours, our_count = our_tensors(cfg)
    print(f"{name}: transformers {their_count:,} params, ours {our_count:,} params, {len(ours)} tensors")
    assert sorted(set(theirs) - set(ours)) == [] and sorted(set(ours) - set(theirs)) == []
    mismatched = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
    assert not mismatched, mismatched
    assert our_count == their_count == RELEASED[name]
    six_b = cfg.vision.hidden_size == 3200
    assert any("q_norm" in k for k in ours) == six_b and any("attention.q_proj.bias" in k for k in ours) != six_b
