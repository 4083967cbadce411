"""The whole MedE² loop on the embedded demo (`python -m medee_jax.pipeline`), in its short CI variant: every stage
runs end to end through the real command lines and leaves well-formed artefacts; a second run skips every stage.
"""

import json
import os
import subprocess
import sys

import pytest

from medee_jax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, *extra, timeout=900):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "medee_jax.pipeline", "--config", os.path.join(ROOT, "configs/pipeline.py"),
           "--workdir", str(workdir), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline") / "w"
    done = _run(workdir, "--config.short=True")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return workdir, done


def test_short_pipeline_artefacts(short_run):
    workdir, done = short_run
    summary = json.loads((workdir / "pipeline.json").read_text())
    assert summary["short"] is True
    assert list(summary["stages"]) == ["data", "stage1", "pairs", "stage2", "eval"]
    assert not any(stage["skipped"] for stage in summary["stages"].values())

    # Stage-I: the text demonstrations and the image warm-up, trained to the configured step
    stage1 = json.loads((workdir / "sft/result.json").read_text())
    assert stage1["stopped"] == "done" and stage1["steps"] == pipeline.SHORT["stage1.steps"]
    assert stage1["data"]["train"]["truncated_examples"] == 0
    config = json.loads((workdir / "sft/config.json").read_text())
    assert config["model"]["train_vision"] and config["data"]["train"].endswith("stage1_train.jsonl")
    records = _jsonl(workdir / "data/stage1_train.jsonl")
    with_images = sum(bool(r.get("images")) for r in records)
    assert with_images == pipeline.SHORT["data.stage1_image_cases"]
    assert len(records) - with_images == pipeline.SHORT["data.num_sft"]

    # sampling on the held-back image cases, K responses each; pairs judged by the rules judge
    cases = _jsonl(workdir / "data/stage2_cases.jsonl")
    n_cases = pipeline.SHORT["data.num_image_cases"] - pipeline.SHORT["data.stage1_image_cases"]
    assert len(cases) == n_cases and all(c["answer"] in "ABCD" for c in cases)
    candidates = _jsonl(workdir / "pairs/candidates.jsonl")
    assert len(candidates) == n_cases and all(len(c["responses"]) == pipeline.SHORT["sample.k"] for c in candidates)
    pairs = _jsonl(workdir / "pairs/pairs.jsonl")
    assert pairs, "no preference pairs"
    for pair in pairs:
        assert pair["chosen"]["value"] != pair["rejected"]["value"]
        assert pair["scores"]["chosen"]["mean"] - pair["scores"]["rejected"]["mean"] >= 1.0
        assert os.path.isfile(workdir / "pairs" / pair["images"][0])
    judged = json.loads((workdir / "pairs/summary.json").read_text())
    assert judged["judge"]["kind"] == "rules" and judged["pairs_written"] == len(pairs)
    assert judged["responses_judged"] == n_cases * pipeline.SHORT["sample.k"]

    # Stage-II: DPO on exactly those pairs, from the Stage-I model
    stage2 = json.loads((workdir / "dpo/result.json").read_text())
    assert stage2["stopped"] == "done" and stage2["steps"] == pipeline.SHORT["stage2.steps"]
    assert stage2["data"]["train"]["examples"] >= len(pairs) and stage2["data"]["train"]["skipped_total"] == 0
    assert stage2["data"]["train"]["truncated_examples"] == 0
    config2 = json.loads((workdir / "dpo/config.json").read_text())
    assert config2["model"]["init_from"] == str(workdir / "sft") and config2["dpo"]["reference"] == "frozen"

    # evaluation: three models, the standard condition and both image-blind controls, table and chart
    for name in ("base", "stage1", "stage2"):
        results = json.loads((workdir / "eval" / name / "results.json").read_text())
        assert results["items"] == pipeline.SHORT["eval.limit"]
        assert set(results["conditions"]) == {"standard", "blank", "shuffled"}
        assert set(results["blind"]["demo_image"]) == {"blank", "shuffled"}
        assert 0.0 <= results["conditions"]["standard"]["all"]["accuracy"] <= 1.0
    table = (workdir / "eval/results.md").read_text()
    for name in ("base", "stage1", "stage2"):
        assert f"| all | {name} |" in table
    assert (workdir / "eval/results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["accuracy"]) == {"base", "stage1", "stage2"}
    assert "| group | model |" in done.stdout  # the table ends the run's output


def test_rerun_skips_finished_stages(short_run):
    workdir, _ = short_run
    done = _run(workdir, "--config.short=True", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((workdir / "pipeline.json").read_text())
    assert all(stage["skipped"] for name, stage in summary["stages"].items() if name != "data")


def test_foreign_run_in_a_stage_folder_is_refused(tmp_path):
    (tmp_path / "w/sft").mkdir(parents=True)
    (tmp_path / "w/sft/config.json").write_text(json.dumps({"data": {"train": "/elsewhere/train.jsonl"}}))
    with pytest.raises(pipeline.PipelineError, match="holds another run"):
        pipeline.training_done(str(tmp_path / "w/sft"), str(tmp_path / "w/data/stage1_train.jsonl"), 10)


def test_short_values_apply_except_overrides():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipeline_config", os.path.join(ROOT, "configs/pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.short = True
    c.stage1.steps = 7
    pipeline.resolve(c, {"stage1.steps"})
    assert c.stage1.steps == 7 and c.stage2.steps == pipeline.SHORT["stage2.steps"]
    c.data.stage1_image_cases = c.data.num_image_cases
    with pytest.raises(pipeline.PipelineError, match="stage1_image_cases"):
        pipeline.resolve(c, {"data.stage1_image_cases"})
