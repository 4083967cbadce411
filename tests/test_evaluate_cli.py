"""The evaluation command: config, model lookup, the embedded demo model end to end, and the whole run with an
injected generator."""

import json
import os
import subprocess
import sys

import pytest

from medee_jax.evaluation import suite
from medee_jax.evaluation.model_runner import ModelSpec, load_generator, parse_model_specs
from tests.eval_fixtures import FakeGenerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_config", os.path.join(ROOT, "configs/eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    for key, value in overrides.items():
        setattr(c, key, value)
    return c


def test_cli_evaluates_the_embedded_demo_model(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "medee_jax.evaluate", "--config", os.path.join(ROOT, "configs/eval.py"),
           "--workdir", str(tmp_path / "out"), "--config.limit=3", "--config.sampling.max_new_tokens=6"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # the default demo workdirs do not exist here: each is skipped with the command that creates it
    assert "skipping model 'stage1'" in done.stderr and "python -m medee_jax.train --config configs/sft.py" in done.stderr
    assert "run first: python -m medee_jax.pipeline --config configs/pipeline.py" in done.stderr
    results = json.loads((tmp_path / "out/base/results.json").read_text())
    assert results["items"] == 3 and set(results["conditions"]) == {"standard", "blank", "shuffled"}
    samples = [json.loads(line) for line in (tmp_path / "out/base/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 9 and all(s["finish_reason"] in ("stop", "length") and s["output"] for s in samples)
    assert "| all | base | 3 |" in (tmp_path / "out/results.md").read_text()


def test_model_specs(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/config.json").write_text("{}")
    specs = parse_model_specs(f"base=embedded,{tmp_path / 'hf'},stage2=runs/dpo", seed=3)
    assert specs == [ModelSpec("base", "embedded", seed=3), ModelSpec("hf", "hf", str(tmp_path / "hf")),
                     ModelSpec("stage2", "workdir", "runs/dpo")]
    (tmp_path / "run/checkpoints").mkdir(parents=True)
    (tmp_path / "run/config.json").write_text("{}")  # a training run's config, not a Hugging Face one
    assert parse_model_specs(str(tmp_path / "run")) == [ModelSpec("run", "workdir", str(tmp_path / "run"))]
    with pytest.raises(TypeError, match="unknown settings batch"):
        load_generator(specs[0], batch=3)


def test_evaluate_demo_with_injected_generator(tmp_path):
    c = _config(models="base=embedded,other=embedded", limit=0)
    fakes = {}

    def load(spec, **settings):
        fakes[spec.name] = FakeGenerator()
        return fakes[spec.name]

    results = suite.evaluate(c, str(tmp_path), load_generator=load)
    assert set(results) == {"base", "other"}
    assert results["base"]["items"] == 120 and set(results["base"]["conditions"]) == {"standard", "blank", "shuffled"}
    assert results["base"]["settings"]["instruction"].startswith("Reason inside <think>")
    assert {"demo_image/location", "demo_text/bmi"} <= set(results["base"]["conditions"]["standard"])
    assert set(results["base"]["blind"]) == {"all", "demo_image", "demo_image/appearance", "demo_image/location",
                                             "demo_image/side_size"}
    table = (tmp_path / "results.md").read_text()
    assert "| all | base | 120 |" in table and "| all | other | 120 |" in table
    assert (tmp_path / "results.png").stat().st_size > 0
    assert json.loads((tmp_path / "base/results.json").read_text()) == results["base"]


def test_prompt_encoding_and_decoding_for_generate(chat_tokenizer, tmp_path):
    """The arrays the adapter will hand to medee_jax.models.generate, and reading its output rows back."""
    import numpy as np

    from medee_jax.data.images import qwen2_vl_preprocess
    from medee_jax.evaluation.generation import GenerationRequest
    from medee_jax.evaluation.items import ImageRef
    from medee_jax.evaluation.model_runner import decode_rows, encode_prompts
    from tests.eval_fixtures import write_png

    image = ImageRef(path=write_png(tmp_path / "a.png", 90, (64, 56)))
    with_image = GenerationRequest.make([{"role": "user", "content": "<image>Where is the lesion?"}], [image], 0)
    text_only = GenerationRequest.make([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "What is 2 + 2?"}], [], 0)
    arrays = encode_prompts([with_image, text_only], chat_tokenizer, min_pixels=3136, max_pixels=64 * 64,
                            pad_token_id=0)
    ids, mask = arrays["input_ids"], arrays["attention_mask"]
    _, grid = qwen2_vl_preprocess([image.load()], 3136, 64 * 64)
    n_image_tokens = int(grid.prod() // 4)
    assert (ids[0] == chat_tokenizer.image_token_id).sum() == n_image_tokens
    assert np.array_equal(arrays["image_grid_thw"], grid) and arrays["pixel_values"].shape == (int(grid.prod()), 1176)
    assert mask[0].all() and mask[1, 0] == 0 and ids[1, 0] == 0  # the shorter row is left-padded
    expected = chat_tokenizer.encode([chat_tokenizer.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
        add_generation_prompt=True)])[0]
    assert ids[1, mask[1] == 1].tolist() == expected

    tok = chat_tokenizer.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    words = chat_tokenizer.encode(["The answer is B"])[0]
    rows = np.array([words + [eos, 0, 0], words + [7, 7, 7]])
    assert decode_rows(rows, tok, [eos]) == [("The answer is B", "stop"), (tok.decode(words + [7, 7, 7]), "length")]
