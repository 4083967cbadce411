"""The evaluation/pairs generator on real models (``model_runner.load_generator``): Hugging Face checkpoint dirs of
both families through the registry, the prompt encoding per family, per-request seeds, and the pairs sample stage and
model judge on the embedded demo model."""

from __future__ import annotations

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medee_jax.data.demo_tokenizer import build_demo_tokenizer
from medee_jax.evaluation.generation import GenerationRequest
from medee_jax.evaluation.items import ImageRef
from medee_jax.evaluation.model_runner import encode_prompts, load_generator, parse_model_specs
from medee_jax.models import generate_with_info, save_pretrained
from medee_jax.models.families import family_named
from medee_jax.training.setup import embedded_model_config
from tests.eval_fixtures import write_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=["qwen2_5_vl", "internvl"])
def hf_dir(request, tmp_path_factory):
    """A Hugging Face checkpoint dir (weights, config.json, the demo tokenizer) of the family's tiny demo model."""
    family = family_named(request.param)
    tokenizer_dir = tmp_path_factory.mktemp(f"tok_{family.name}")
    build_demo_tokenizer(tokenizer_dir, family.demo_tokenizer)
    model = family.model()(embedded_model_config(str(tokenizer_dir), family), dtype=jnp.float32,
                           param_dtype=jnp.float32, rngs=nnx.Rngs(3))
    out = tmp_path_factory.mktemp(f"hf_{family.name}") / "ckpt"
    save_pretrained(model, str(out), source_dir=str(tokenizer_dir))
    return family.name, str(out)


def requests(tmp_path):
    a = ImageRef(path=write_png(tmp_path / "a.png", 90, (64, 56)))
    b = ImageRef(path=write_png(tmp_path / "b.png", 30, (40, 70)))
    return [GenerationRequest.make([{"role": "user", "content": "<image>Compare with <image>. Which side?"}],
                                   [a, b], 0),
            GenerationRequest.make([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "What is 2 + 2?"}], [], 0),
            GenerationRequest.make([{"role": "user", "content": "<image>Where is the lesion?"}], [a], 0)]


def test_generator_on_hf_checkpoints_of_each_family(hf_dir, tmp_path):
    name, path = hf_dir
    (spec,) = parse_model_specs(f"m={path}")
    assert spec.kind == "hf"
    generate_fn = load_generator(spec, max_pixels=64 * 64, max_tiles=2)
    batch = requests(tmp_path)
    arrays = encode_prompts(batch, generate_fn.chat_tokenizer, image_inputs=generate_fn.image_inputs,
                            pad_token_id=generate_fn.pad_token_id)
    tok = generate_fn.chat_tokenizer
    ids, mask = arrays["input_ids"], arrays["attention_mask"]
    assert mask[0].all() and not mask[1].all()  # left padding
    if name == "internvl":  # each image: <img> + <IMG_CONTEXT> x 64 per 224 px tile + </img>
        tiles = arrays["pixel_values"].shape[0]
        assert arrays["pixel_values"].shape[1:] == (3, 224, 224) and arrays["image_grid_thw"] is None
        assert (ids == tok.image_token_id).sum() == 64 * tiles
        assert (ids == tok.image_prefix_ids[0]).sum() == 3 and (ids == tok.image_suffix_ids[0]).sum() == 3
    else:
        grids = arrays["image_grid_thw"]
        assert grids.shape == (3, 3) and (ids == tok.image_token_id).sum() == grids.prod(1).sum() // 4

    outputs = generate_fn(batch, n_samples=2, temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0)
    direct = generate_with_info(generate_fn.model, ids, mask, pixel_values=arrays["pixel_values"],
                                image_grid_thw=arrays["image_grid_thw"], max_new_tokens=8,
                                eos_token_id=generate_fn.eos_ids, pad_token_id=generate_fn.pad_token_id)
    for samples, row, n, reason in zip(outputs, direct.tokens, direct.lengths, direct.finish_reasons):
        end = n - 1 if reason == "stop" else n  # the end token is not part of the text
        text = tok.tokenizer.decode(row[:end].tolist(), skip_special_tokens=False)
        assert samples[0] == samples[1] == (text, reason)

    sampled = generate_fn(batch, n_samples=2, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=0)
    alone = generate_fn(batch[2:], n_samples=2, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=0)
    assert alone[0] == sampled[2]  # a request samples the same way in whatever batch it lands
    assert sampled[2][0] != sampled[2][1]  # samples k differ


def _pairs_config():
    spec = importlib.util.spec_from_file_location("pairs_config", os.path.join(ROOT, "configs/pairs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_pairs_sample_stage_and_model_judge_on_the_embedded_model(tmp_path):
    from medee_jax.pairs.build import run_stages
    from medee_jax.pairs.candidates import read_candidates

    c = _pairs_config()
    c.model, c.limit, c.sample.k, c.sample.max_new_tokens, c.sample.batch_size = "embedded", 3, 2, 6, 4
    c.stage = "sample"
    run_stages(c, str(tmp_path / "w"))
    cases = read_candidates(str(tmp_path / "w/candidates.jsonl"))
    assert len(cases) == 3 and all(len(case.responses) == 2 for case in cases)
    assert all(case.responses[0] != case.responses[1] for case in cases)  # sampled at temperature 0.7
    c.stage, c.judge.kind, c.judge.model, c.judge.max_tokens, c.judge.max_retries = "judge", "model", "embedded", 6, 0
    summary = run_stages(c, str(tmp_path / "w"))
    # the untrained demo judge never writes the rubric's JSON: every reply is counted, none crashes the stage
    assert summary["responses"] == 6 and summary["judge_failures"] == {"malformed_scores": 6}
    assert summary["requests_sent"] == 6 and summary["pairs_written"] == 0
