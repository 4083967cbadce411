"""The training command line: mistakes end with `error:` lines naming the field or path (exit code 2), never a
traceback; the resolved run kind is printed at start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DPO_CONFIG = os.path.join(ROOT, "configs", "dpo.py")
SFT_CONFIG = os.path.join(ROOT, "configs", "sft.py")


def run_cli(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "medee_jax.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def error_lines(proc) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def assert_one_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("override, fragments", [
    ("--config.optimizer.lrr=1", ("--config.optimizer.lrr", "no such config field", "optimizer.lr?")),
    ("--config.data.length_buckets=abc", ("data.length_buckets", "positive sizes")),
    ("--config.data.length_buckets=()", ("data.length_buckets=()", "non-empty")),
    ("--config.data.seq_buckets=(64,)", ("--config.data.seq_buckets", "renamed data.length_buckets")),
    ("--config.data.batch_size=abc", ("--config.data.batch_size", "abc")),
    # the DPO loss rules live in losses.dpo_settings_problems, which the trainer's validation reuses
    ("--config.dpo.loss_type=hinge --config.dpo.label_smoothing=0.1",
     ("dpo.loss_type 'hinge' has no label smoothing", "dpo.label_smoothing=0.1")),
])
def test_bad_overrides_give_one_error_line(override, fragments, tmp_path):
    proc = run_cli(f"--config={DPO_CONFIG}", *override.split(), f"--workdir={tmp_path / 'w'}")
    assert_one_error(proc, *fragments)
    assert not os.path.exists(tmp_path / "w" / "config.json")


def test_unknown_preset_and_missing_config_file(tmp_path):
    assert_one_error(run_cli(f"--config={DPO_CONFIG}:qwen9b"), "unknown preset 'qwen9b'", "qwen2_5_vl_7b")
    assert_one_error(run_cli(f"--config={tmp_path / 'nope.py'}"), "--config", "No such file")


@pytest.mark.parametrize("kind", ["file", "below_a_file", "unwritable"])
def test_unusable_workdir_is_one_error_line(kind, tmp_path):
    (tmp_path / "a_file").write_text("x")
    workdir = {"file": tmp_path / "a_file", "below_a_file": tmp_path / "a_file" / "run",
               # /sys refuses new directories even to root (a chmod-ed directory would not stop root)
               "unwritable": "/sys/medee_jax_test_workdir"}[kind]
    line = assert_one_error(run_cli(f"--config={DPO_CONFIG}", f"--workdir={workdir}"), "workdir=", str(workdir))
    assert "exists and is not a directory" in line if kind == "file" else "cannot write there" in line


def test_a_preset_needs_a_checkpoint(tmp_path):
    assert_one_error(run_cli(f"--config={DPO_CONFIG}:qwen2_5_vl_7b", f"--workdir={tmp_path}"),
                     "preset='qwen2_5_vl_7b' is for a real run", "model.checkpoint")


def test_sandboxed_chat_template_error_is_one_error_line(tmp_path, demo_tokenizer_dir):
    """A chat template that trips Jinja's sandbox gives one line naming the record and the template's error."""
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in os.listdir(demo_tokenizer_dir):
        (tok / name).write_bytes((demo_tokenizer_dir / name).read_bytes())
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m.content.__class__.__mro__ }}{% endfor %}"
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"conversations": [{"from": "human", "value": "Q?"},
                                                  {"from": "gpt", "value": "A."}]}) + "\n")
    proc = run_cli(f"--config={SFT_CONFIG}", f"--config.data.train={data}", f"--config.data.tokenizer={tok}",
                   "--config.model.dtype=float32", "--config.model.remat=none", "--config.train.steps=1",
                   f"--workdir={tmp_path / 'w'}")
    assert_one_error(proc, f"{data}:1", "chat template", "SecurityError")


def test_a_real_run_says_so_and_saves_its_resolved_config(tmp_path, demo_tokenizer_dir):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"Case {i}?"},
                                                           {"from": "gpt", "value": f"Answer {i}."}]}) + "\n"
                            for i in range(4)))
    workdir = tmp_path / "w"
    proc = run_cli(f"--config={SFT_CONFIG}", f"--config.data.train={data}", f"--config.data.tokenizer={demo_tokenizer_dir}",
                   "--config.model.dtype=float32", "--config.data.max_length=64", "--config.data.length_buckets=(64,)",
                   "--config.data.batch_size=2", "--config.train.steps=1", "--config.train.async_checkpointing=False",
                   f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run: a real sft run (no preset); recipe values, the demo sizes are not applied" in proc.stderr
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["demo"] is False and saved["model"]["remat"] == "full" and saved["optimizer"]["lr"] == 1e-5


@pytest.mark.parametrize("command", [
    ["-m", "medee_jax.evaluate", "--config", os.path.join(ROOT, "configs", "eval.py")],
    ["-m", "medee_jax.pipeline", "--config", os.path.join(ROOT, "configs", "pipeline.py")],
    [os.path.join(ROOT, "tools", "build_pairs.py"), "--config", os.path.join(ROOT, "configs", "pairs.py")],
], ids=["evaluate", "pipeline", "build_pairs"])
def test_other_command_lines_name_an_unknown_field(command, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, *command, "--workdir", str(tmp_path / "w"), "--config.sampling_nope=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert_one_error(proc, "--config.sampling_nope", "no such config field")
    assert not (tmp_path / "w").exists()  # nothing written before the command line is understood
