"""No lost work, no surprises: the trainer's workdir lock, settings checks, bad-data accounting, configs per start,
resumes (changed settings, moved workdirs, new data), cached step counts, keyed reference files, per-split image
folders, and SIGTERM/SIGINT while data is loading."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.limits import alarm
from tests.run_training import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_CONFIG = os.path.join(ROOT, "configs", "sft.py")
DPO_CONFIG = os.path.join(ROOT, "configs", "dpo.py")
WORDS = "fever cough lesion nodule left right upper lower chest scan mass round dense small large normal".split()


def sft_lines(n, seed=0):
    rng = np.random.default_rng(seed)
    return [json.dumps({"conversations": [
        {"from": "human", "value": f"Case {i}: {' '.join(rng.choice(WORDS, size=4))}?"},
        {"from": "gpt", "value": f"The answer is {' '.join(rng.choice(WORDS, size=int(rng.integers(2, 8))))}."}]})
        for i in range(n)]


def write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


BAD = '{"conversations": [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "x"}]}'  # no image


def sft_config(train, tokenizer, workdir, **extra):
    overrides = {"data.train": str(train), "data.tokenizer": str(tokenizer), "data.max_length": 64,
                 "data.length_buckets": (64,), "data.packing": False, "data.shuffle": False, "data.batch_size": 4,
                 "model.dtype": "float32", "optimizer.lr": 1e-3, "optimizer.warmup_ratio": 0.0, "train.steps": 2,
                 "train.checkpoint_every": 100, "train.eval_every": 0, "train.async_checkpointing": False,
                 "workdir": str(workdir)}
    overrides.update(extra)
    return load_config(SFT_CONFIG, [f"{k}={v!r}" if not isinstance(v, str) else f"{k}={v}"
                                    for k, v in overrides.items()])


def trainer(config):
    from medee_jax.training.loop import Trainer

    return Trainer(config)


@pytest.fixture(scope="module")
def tok(demo_tokenizer_dir):
    return str(demo_tokenizer_dir)


# ---- settings that used to lose work silently --------------------------------------------------------------------

def test_zero_steps_epochs_and_kept_checkpoints_are_errors(tmp_path, tok):
    """keep_checkpoints=0 kept no weights, steps=0 trained a full epoch, num_epochs=0 trained nothing and said
    "finished"."""
    from medee_jax.training import checkpoint
    from medee_jax.training.setup import validate_config

    train = write(tmp_path / "d.jsonl", sft_lines(8))
    config = sft_config(train, tok, tmp_path / "w", **{"train.keep_checkpoints": 0, "train.steps": 0,
                                                         "data.num_epochs": 0, "data.max_bad_fraction": 1.5})
    with pytest.raises(ValueError) as err:
        validate_config(config)
    for field in ("train.keep_checkpoints=0", "train.steps=0", "data.num_epochs=0", "data.max_bad_fraction=1.5"):
        assert field in str(err.value)
    with pytest.raises(ValueError, match="keep_checkpoints"):
        checkpoint.RunCheckpointer(str(tmp_path / "w"), keep=0)
    assert not os.path.exists(tmp_path / "w")


# ---- one run per workdir -----------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from medee_jax.training.workdir import WorkdirLock
held = WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_second_run_on_a_workdir_is_refused_with_the_holders_pid_and_host(tmp_path, tok):
    from medee_jax.training.workdir import WorkdirBusyError

    workdir = tmp_path / "w"
    workdir.mkdir()
    train = write(tmp_path / "d.jsonl", sft_lines(8))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirBusyError) as err:
            trainer(sft_config(train, tok, workdir))
        assert f"pid {holder.pid}" in str(err.value) and socket.gethostname() in str(err.value)
        assert not (workdir / "config.json").exists()  # the refused start wrote nothing
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock, nothing stale is left
        holder.wait()
    first = trainer(sft_config(train, tok, workdir))
    with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()}"):
        trainer(sft_config(train, tok, workdir))
    result = first.run()  # releases the lock when it returns
    assert result.stopped == "done" and result.steps == 2
    trainer(sft_config(train, tok, workdir)).close()


# ---- bad data: errors that name counts, reports that show them ---------------------------------------------------

def test_all_bad_training_data_is_an_error_naming_counts(tmp_path, tok):
    """Skip mode on a file whose every record is bad used to loop forever (steps given) or say "too few records"."""
    train = write(tmp_path / "bad.jsonl", ["{not json"] * 4 + [BAD] * 3)
    with alarm(120), pytest.raises(ValueError) as err:
        trainer(sft_config(train, tok, tmp_path / "w1", **{"data.on_bad_record": "skip", "train.steps": -1}))
    assert "data.train" in str(err.value) and "malformed_json: 4" in str(err.value)
    assert "placeholder_count: 3" in str(err.value) and "too few" not in str(err.value)
    run = trainer(sft_config(train, tok, tmp_path / "w2", **{"data.on_bad_record": "skip", "train.steps": 3}))
    with alarm(120), pytest.raises(ValueError) as err:
        run.run()
    assert "no usable record" in str(err.value) and "malformed_json: 4" in str(err.value)
    run.close()


def test_skip_counts_are_reported_and_max_bad_fraction_stops_a_run(tmp_path, tok, capsys):
    from medee_jax.training.loop import train as run_training

    lines = sft_lines(10) + ["{not json"] * 20 + [BAD] * 10
    train = write(tmp_path / "mixed.jsonl", lines)
    eval_file = write(tmp_path / "eval" / "eval.jsonl", sft_lines(4, seed=1) + ["{not json"])
    workdir = tmp_path / "w"
    config = sft_config(train, tok, workdir, **{"data.on_bad_record": "skip", "data.eval": eval_file,
                                                "data.max_bad_fraction": 0.5, "train.steps": -1,
                                                "data.num_epochs": 1})
    with pytest.raises(ValueError) as err:
        trainer(config)
    msg = str(err.value)
    assert "30 of 40 records are bad (75.0%)" in msg and "malformed_json: 20, placeholder_count: 10" in msg
    assert not (workdir / "config.json").exists() and not (workdir / "configs").exists()

    with config.unlocked():
        config.data.max_bad_fraction = 1.0
    result = run_training(config)
    err = capsys.readouterr().err
    assert "train file (one epoch): 10 records used, 30 skipped (malformed_json: 20, placeholder_count: 10)" in err
    assert "eval file: 4 records used, 1 skipped (malformed_json: 1)" in err
    saved = json.load(open(workdir / "result.json"))
    assert saved["data"]["train_epoch"]["skipped"] == {"malformed_json": 20, "placeholder_count": 10}
    assert saved["data"]["train"]["skipped_total"] == 30 and saved["data"]["eval"]["skipped_total"] == 1
    assert result.data == saved["data"]


def test_all_bad_eval_data_is_an_error_not_empty_metrics(tmp_path, tok):
    train = write(tmp_path / "d.jsonl", sft_lines(8))
    eval_file = write(tmp_path / "e.jsonl", ["{not json"] * 3)
    with pytest.raises(ValueError) as err:
        trainer(sft_config(train, tok, tmp_path / "w", **{"data.on_bad_record": "skip", "data.eval": eval_file}))
    assert str(err.value).startswith("data.eval: ") and "malformed_json: 3" in str(err.value)


def test_truncations_reported(tmp_path, tok):
    long = json.dumps({"conversations": [{"from": "human", "value": "Q?"},
                                         {"from": "gpt", "value": " ".join(["lesion"] * 80)}]})
    train = write(tmp_path / "d.jsonl", sft_lines(6) + [long, long])
    run = trainer(sft_config(train, tok, tmp_path / "w", **{"train.steps": -1, "data.num_epochs": 1}))
    result = run.run()
    assert result.data["train_epoch"]["truncated_examples"] == 2 and result.data["train"]["truncated_examples"] == 2


# ---- configs, resumes --------------------------------------------------------------------------------------------

def test_config_per_start_and_a_resume_names_changed_settings(tmp_path, tok, caplog):
    train = write(tmp_path / "d.jsonl", sft_lines(24))
    workdir = tmp_path / "w"
    (tmp_path / "not_a_run").mkdir()  # passes the config check, fails when the model is built
    with pytest.raises(ValueError, match="not_a_run"):
        trainer(sft_config(train, tok, workdir, **{"model.init_from": str(tmp_path / "not_a_run")}))
    assert os.path.isdir(workdir) and not (workdir / "config.json").exists()

    trainer(sft_config(train, tok, workdir, **{"train.checkpoint_every": 2})).run()
    first = sorted(os.listdir(workdir / "configs"))
    assert len(first) == 1
    assert json.load(open(workdir / "config.json")) == json.load(open(workdir / "configs" / first[0]))
    with caplog.at_level(logging.WARNING, logger="medee_jax.train"):
        result = trainer(sft_config(train, tok, workdir, **{"train.steps": 4, "optimizer.lr": 2e-3})).run()
    assert result.steps == 4
    assert "optimizer.lr: 0.001 -> 0.002" in caplog.text and "train.steps: 2 -> 4" in caplog.text
    assert len(os.listdir(workdir / "configs")) == 2
    assert json.load(open(workdir / "config.json"))["optimizer"]["lr"] == 2e-3
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_moved_workdir_resumes_and_new_data_needs_reset_iterator(tmp_path, tok):
    workdir = tmp_path / "a"
    train = write(workdir / "data" / "train.jsonl", sft_lines(40))
    trainer(sft_config(train, tok, workdir, **{"data.shuffle": True})).run()
    moved = tmp_path / "b"
    shutil.move(workdir, moved)
    result = trainer(sft_config(moved / "data" / "train.jsonl", tok, moved,
                                **{"data.shuffle": True, "train.steps": 4})).run()
    assert result.steps == 4 and [json.loads(x)["step"] for x in open(moved / "metrics.jsonl")] == [1, 2, 3, 4]

    other = write(tmp_path / "new.jsonl", sft_lines(30, seed=5))
    with pytest.raises(ValueError, match="data.reset_iterator=True"):
        trainer(sft_config(other, tok, moved, **{"train.steps": 6})).run()
    result = trainer(sft_config(other, tok, moved, **{"train.steps": 6, "data.reset_iterator": True})).run()
    assert result.steps == 6 and result.data["train"]["examples"] == 8  # two steps of 4 from the new file's start


def test_step_count_is_cached_per_data_file(tmp_path, tok, monkeypatch):
    """Every start used to decode the whole epoch to count steps; the count is now kept per data file and
    settings, and recounted when the file changes."""
    from medee_jax.data import pipeline

    train = write(tmp_path / "d.jsonl", sft_lines(20))
    config = sft_config(train, tok, tmp_path / "w", **{"train.steps": -1, "data.num_epochs": 1})
    first = trainer(config)
    assert first.total_steps == 5
    first.close()
    real, counted = pipeline.make_iterator, []

    def spy(data_config, *args, **kwargs):
        if data_config.num_epochs == 1:
            counted.append(data_config.paths)
        return real(data_config, *args, **kwargs)

    monkeypatch.setattr(pipeline, "make_iterator", spy)
    again = trainer(config)
    assert again.total_steps == 5 and counted == []
    again.close()
    with open(train, "a") as f:
        f.write("\n".join(sft_lines(4, seed=3)) + "\n")
    changed = trainer(config)
    assert changed.total_steps == 6 and len(counted) == 1
    changed.close()


def test_export_destination_is_checked_before_training(tmp_path, tok):
    from medee_jax.models.export_dir import DestinationError

    workdir = tmp_path / "w"
    (workdir / "hf").mkdir(parents=True)
    (workdir / "hf" / "README.md").write_text("notes")
    train = write(tmp_path / "d.jsonl", sft_lines(8))
    with pytest.raises(DestinationError, match="README.md"):
        trainer(sft_config(train, tok, workdir, **{"train.export_hf": True}))
    assert not (workdir / "checkpoints").exists()


# ---- DPO reference files and per-split image folders ------------------------------------------------------------

def pair_lines(folder, n, seed):
    """DPO pairs whose images live in ``folder``/img, named relative to ``folder``."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder / "img", exist_ok=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
        lines.append(json.dumps({"conversations": [{"from": "human", "value": f"<image>Case {i}: findings?"}],
                                 "chosen": {"from": "gpt", "value": f"A {rng.choice(WORDS)} lesion."},
                                 "rejected": {"from": "gpt", "value": "Nothing at all."},
                                 "images": [f"img/{i}.png"]}))
    return lines


def dpo_config(train, eval_file, tok, workdir, **extra):
    overrides = {"data.train": str(train), "data.eval": str(eval_file), "data.tokenizer": tok,
                 "data.max_length": 96, "data.length_buckets": (96,), "data.patch_buckets": (64,),
                 "data.max_pixels": 56 * 56, "data.shuffle": False, "data.batch_size": 2, "model.dtype": "float32",
                 "optimizer.warmup_ratio": 0.0, "train.steps": 1, "train.async_checkpointing": False,
                 "dpo.reference": "precomputed", "workdir": str(workdir)}
    overrides.update(extra)
    return load_config(DPO_CONFIG, [f"{k}={v!r}" if not isinstance(v, str) else f"{k}={v}"
                                    for k, v in overrides.items()])


def test_precomputed_reference_is_keyed_and_eval_images_resolve_in_their_own_folder(tmp_path, tok):
    train = write(tmp_path / "train" / "pairs.jsonl", pair_lines(tmp_path / "train", 4, seed=0))
    eval_file = write(tmp_path / "eval" / "pairs.jsonl", pair_lines(tmp_path / "eval", 2, seed=1))
    workdir = tmp_path / "w"

    def reference_of(**extra):
        run = trainer(dpo_config(train, eval_file, tok, workdir, **extra))
        run.close()
        return {split: [json.loads(x) for x in open(workdir / "reference" / f"{split}.jsonl")]
                for split in ("train", "eval")}

    first = reference_of()  # the eval images are found beside the eval file, not the train file
    assert len(first["train"]) == 4 and len(first["eval"]) == 2
    assert all(r["ref_chosen_logps"] < 0 for r in first["train"] + first["eval"])
    assert reference_of() == first  # same data, model, settings: reused
    with open(train, "a") as f:  # new data: recomputed
        f.write(pair_lines(tmp_path / "train", 5, seed=0)[4] + "\n")
    assert len(reference_of()["train"]) == 5
    other_model = reference_of(seed=1)  # another (embedded) model: recomputed
    assert other_model["eval"][0]["ref_chosen_logps"] != first["eval"][0]["ref_chosen_logps"]


# ---- stop signals while data is loading ------------------------------------------------------------------------

STUCK_RUN = """
import os, sys, time
from medee_jax.data import pipeline
from tests.run_training import load_config
from medee_jax.training.loop import train

real, calls = pipeline.Tokenize.map, [0]
def stuck(self, example):
    calls[0] += 1
    if calls[0] > int(os.environ["STUCK_AFTER"]):  # storage that stops answering
        open(os.environ["STUCK_MARKER"], "w").close()
        time.sleep(600)
    return real(self, example)
pipeline.Tokenize.map = stuck
result = train(load_config(sys.argv[1], sys.argv[2:]))
sys.stderr.flush()
os._exit(0 if result.stopped in ("done", "preempted") else 1)  # the stuck reader thread would hold up exit
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_while_data_is_loading_saves_and_exits_cleanly(tmp_path, tok, sig):
    """SIGTERM was checked only between steps (a stuck data read ignored it) and SIGINT lost the progress since
    the last checkpoint; both now save the last finished step and exit 0."""
    train = write(tmp_path / "d.jsonl", sft_lines(64))
    workdir = tmp_path / "w"
    marker = tmp_path / "stuck"
    args = [f"data.train={train}", f"data.tokenizer={tok}", "data.max_length=64", "data.length_buckets=(64,)",
            "data.packing=False", "data.shuffle=False", "data.batch_size=4", "model.dtype='float32'",
            "train.steps=10", "train.checkpoint_every=100", "train.async_checkpointing=False", f"workdir={workdir}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", STUCK_AFTER="20", STUCK_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", STUCK_RUN, SFT_CONFIG, *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "never got stuck"
    time.sleep(0.5)
    t0 = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    result = json.load(open(workdir / "result.json"))
    assert result["stopped"] == "preempted" and 1 <= result["steps"] < 10
    saved = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
    assert saved == [result["steps"]]
    assert f"stopped on {sig.name}" in err and time.time() - t0 < 30
