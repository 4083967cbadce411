"""The train step's text attention (`model.attention`): the config reaches the compiled step, blockwise keeps the
step's temporaries O(L) where the dense reference holds [rows, heads, L, L] scores, and bad values are one error."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 2048


def _step_temporaries(tokenizer_dir, attention: str, length: int = LENGTH) -> tuple[int, int]:
    """Returns (the DPO step's largest compiled temporaries in bytes, rows x heads) at ``length`` tokens a row."""
    from medee_jax.training import setup
    from medee_jax.training.batches import run_batch_spec
    from medee_jax.training.mesh import make_mesh
    from medee_jax.training.step_memory import compile_step, memory_report, synthetic_batch
    from tests.run_training import load_config

    c = load_config(os.path.join(ROOT, "configs", "dpo.py"), [
        f"model.attention={attention!r}", "model.dtype='float32'", "model.remat='full'",
        f"data.max_length={length}", f"data.length_buckets=({length},)", f"data.target_buckets=({length},)",
        "data.batch_size=1", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    cfg = setup.embedded_model_config(str(tokenizer_dir))
    data = setup.DataSpec("synthetic", "", str(tokenizer_dir), "", False)
    spec = run_batch_spec(c, data, cfg)
    compiled = compile_step(c, cfg, make_mesh(dict(c.mesh)), synthetic_batch(c, spec, cfg), spec, with_images=False)
    report = memory_report(compiled)
    temporaries = max(v["temporaries"] for v in report.values() if isinstance(v, dict) and "temporaries" in v)
    return temporaries, compiled.batch_shape["rows"] * cfg.text.num_attention_heads


def test_blockwise_step_has_no_quadratic_temporaries(demo_tokenizer_dir):
    dense, heads_rows = _step_temporaries(demo_tokenizer_dir, "reference")
    blockwise, _ = _step_temporaries(demo_tokenizer_dir, "blockwise")
    blockwise_twice, _ = _step_temporaries(demo_tokenizer_dir, "blockwise", 2 * LENGTH)
    auto, _ = _step_temporaries(demo_tokenizer_dir, "auto")
    scores = heads_rows * LENGTH * LENGTH * 4  # one layer's fp32 [rows, heads, L, L] score matrix
    assert dense - blockwise > scores, (dense, blockwise, scores)  # the reference path holds the scores ...
    assert blockwise_twice < 2.5 * blockwise, (blockwise, blockwise_twice)  # ... blockwise grows linearly in L
    assert auto == blockwise  # auto on CPU at 2048 tokens runs blockwise


def test_bad_attention_value_is_one_config_error(demo_tokenizer_dir):
    from medee_jax.training import setup
    from tests.run_training import load_config

    c = load_config(os.path.join(ROOT, "configs", "dpo.py"), ["model.attention='splash'"])
    with pytest.raises(ValueError, match=r"model.attention='splash'.*shard_map"):
        setup.validate_config(c, create_workdir=False)


def test_build_model_sets_the_decoders_attention(demo_tokenizer_dir):
    from medee_jax.training import setup
    from medee_jax.training.mesh import make_mesh
    from tests.run_training import load_config

    c = load_config(os.path.join(ROOT, "configs", "dpo.py"), ["model.attention='blockwise'", "model.dtype='float32'"])
    data = setup.DataSpec("", "", str(demo_tokenizer_dir), "", True)
    model = setup.build_model(c, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}), data)
    assert model.language_model.attention_implementation == "blockwise"
    with pytest.raises(ValueError, match="model.attention='nope'"):
        model.set_text_attention("nope")
