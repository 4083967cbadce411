"""Command line: ``python -m medee_jax.pipeline --config configs/pipeline.py [--config.x=...] [--workdir W]``.

The whole MedE² loop on the embedded demo, each stage through the project's own command line (one subprocess per
stage: a fresh JAX runtime each, and the exact command printed so any stage can be rerun by hand):

  data    W/data     the demo set (`data.demo.ensure_demo`) with `data.num_image_cases` image cases; writes
                     stage1_train.jsonl (the text chain-of-thought demonstrations + the first
                     `data.stage1_image_cases` image cases with their short grounded answers) and
                     stage2_cases.jsonl (the remaining image cases as prompts with their reference letter)
  stage1  W/sft      python -m medee_jax.train --config configs/sft.py  (vision tower and projector trained)
  pairs   W/pairs    python tools/build_pairs.py --config configs/pairs.py  (sample K, judge.kind=rules, pairs)
  stage2  W/dpo      python -m medee_jax.train --config configs/dpo.py --config.model.init_from=W/sft
  eval    W/eval     python -m medee_jax.evaluate --config configs/eval.py  (base, stage1, stage2; blind controls)

A stage whose output is complete is skipped; an interrupted one resumes (the trainer from its checkpoint, sampling
and evaluation from their generation caches). A stage folder holding a run the pipeline did not start (another
data file) is an error, never overwritten. Writes W/pipeline.json (per stage: seconds, CPU seconds, skipped) and
ends with the evaluation's markdown table (W/eval/results.md) and chart (W/eval/results.png).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shlex
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from .cli import parse_flags_or_exit
from .training.identity import read_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def define_flags() -> None:
    """Defines the command line's absl flags (at run time, not import: importing this module from a process that has
    its own ``--config`` flag, e.g. a test session, must not collide with it)."""
    config_flags.DEFINE_config_file("config", None, "Path to configs/pipeline.py.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Root of the stage folders (default: the config's workdir).")

# The CI variant (--config.short=True): the same stages on a few cases and steps; fields set on the command line
# keep their values.
SHORT = {
    "data.num_sft": 24, "data.num_image_cases": 96, "data.stage1_image_cases": 72,
    "stage1.steps": 80, "sample.k": 4, "sample.max_new_tokens": 48,
    "stage2.steps": 6, "stage2.batch_size": 2, "eval.limit": 6, "eval.max_new_tokens": 48,
}


class PipelineError(Exception):
    """A stage failed or found something it must not overwrite (the message says which and why)."""


def resolve(c, overridden=()) -> None:
    """Applies SHORT to `c` when `c.short` (except the dotted fields in `overridden`); checks the sizes."""
    if c.short:
        for field, value in SHORT.items():
            if field not in overridden:
                section, name = field.split(".")
                c[section][name] = value
    d = c.data
    if not 0 < d.stage1_image_cases < d.num_image_cases:
        raise PipelineError(f"data.stage1_image_cases={d.stage1_image_cases} must be in (0, data.num_image_cases="
                            f"{d.num_image_cases}): the rest are Stage-II's sampling cases")


def stage_dirs(workdir: str) -> dict[str, str]:
    """The folder of every stage under `workdir`."""
    return {name: os.path.join(workdir, sub) for name, sub in
            (("data", "data"), ("stage1", "sft"), ("pairs", "pairs"), ("stage2", "dpo"), ("eval", "eval"))}


# ------------------------------------------------------------------------------------------------ data


def _write_lines(path: str, lines: list[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def prepare_data(c, data_dir: str) -> dict[str, str]:
    """Generates the demo set in `data_dir` (if needed) and writes the Stage-I training file and the Stage-II cases;
    returns {"stage1_train", "stage2_cases", "stage1_eval"} paths."""
    from medee_jax.data.demo import ensure_demo
    from medee_jax.evaluation.extract import extract_choice
    from medee_jax.pairs.candidates import options_from_prompt

    paths = ensure_demo(data_dir, seed=c.seed, num_sft=c.data.num_sft, num_pairs=c.data.num_image_cases)
    n1 = c.data.stage1_image_cases
    with open(paths["mm_sft_train"], encoding="utf-8") as f:
        image_sft = f.readlines()
    with open(paths["sft_train"], encoding="utf-8") as f:
        text_sft = f.readlines()
    stage1 = text_sft + image_sft[:n1]
    random.Random(c.seed).shuffle(stage1)
    cases = []
    with open(paths["dpo_train"], encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < n1:
                continue
            raw = json.loads(line)
            options = options_from_prompt(raw["conversations"])
            cases.append(json.dumps({
                "id": f"stage2-{i:05d}", "conversations": raw["conversations"], "images": raw["images"],
                "answer": extract_choice(raw["chosen"]["value"], options),
                "options": dict(zip("ABCD", options))}) + "\n")
    out = {"stage1_train": os.path.join(data_dir, "stage1_train.jsonl"),
           "stage2_cases": os.path.join(data_dir, "stage2_cases.jsonl"), "stage1_eval": str(paths["mm_sft_eval"])}
    _write_lines(out["stage1_train"], stage1)
    _write_lines(out["stage2_cases"], cases)
    return out


# ------------------------------------------------------------------------------------------------ commands


def _flag(field: str, value) -> str:
    text = value if isinstance(value, str) else repr(value)
    return f"--config.{field}={text}"


def stage1_command(c, dirs, files) -> list[str]:
    """Stage-I SFT: text chain of thought + the image warm-up, packed, vision tower and projector trained."""
    s = c.stage1
    fields = {
        "data.train": files["stage1_train"], "data.eval": files["stage1_eval"], "seed": c.seed,
        "model.dtype": "float32", "model.remat": "none", "model.train_vision": True, "model.train_projector": True,
        "data.max_length": s.max_length, "data.length_buckets": (s.max_length,), "data.packing": True,
        "data.patch_buckets": (256, 512), "data.batch_size": s.batch_size, "data.max_pixels": c.data.max_pixels,
        "data.image_max_pixels": 0, "optimizer.lr": s.lr, "optimizer.b2": s.b2, "optimizer.warmup_ratio": 0.05,
        "train.steps": s.steps, "train.log_every": 25, "train.eval_every": 0, "train.eval_batches": 4,
        "train.checkpoint_every": 200, "train.keep_checkpoints": 1,
    }
    return [sys.executable, "-m", "medee_jax.train", "--config", os.path.join(ROOT, "configs/sft.py"),
            "--workdir", dirs["stage1"]] + [_flag(k, v) for k, v in fields.items()]


def pairs_command(c, dirs, files) -> list[str]:
    """Sample the Stage-I model on the Stage-II cases, judge with the offline rules, write the pairs."""
    s = c.sample
    fields = {
        "stage": "all", "seed": c.seed, "model": dirs["stage1"], "cases": f"sharegpt:{files['stage2_cases']}",
        "sample.k": s.k, "sample.temperature": s.temperature, "sample.top_p": s.top_p,
        "sample.max_new_tokens": s.max_new_tokens, "sample.batch_size": s.batch_size, "judge.kind": "rules",
        "pairs.min_margin": c.pairs.min_margin,
    }
    return [sys.executable, os.path.join(ROOT, "tools/build_pairs.py"), "--config",
            os.path.join(ROOT, "configs/pairs.py"), "--workdir", dirs["pairs"]] + [_flag(k, v) for k, v in
                                                                                     fields.items()]


def stage2_command(c, dirs, files) -> list[str]:
    """Stage-II DPO: the Stage-I model as policy and frozen reference, on the judged pairs (vision frozen)."""
    s = c.stage2
    fields = {
        "model.init_from": dirs["stage1"], "data.train": os.path.join(dirs["pairs"], "pairs.jsonl"), "seed": c.seed,
        "model.dtype": "float32", "model.remat": "none", "data.max_length": s.max_length,
        "data.length_buckets": (s.max_length,), "data.patch_buckets": (256, 512), "data.batch_size": s.batch_size,
        "data.max_pixels": c.data.max_pixels, "data.image_max_pixels": 0, "optimizer.lr": s.lr,
        "optimizer.warmup_ratio": 0.1, "dpo.beta": s.beta, "train.steps": s.steps, "train.log_every": 10,
        "train.checkpoint_every": 1000, "train.keep_checkpoints": 1,
    }
    return [sys.executable, "-m", "medee_jax.train", "--config", os.path.join(ROOT, "configs/dpo.py"),
            "--workdir", dirs["stage2"]] + [_flag(k, v) for k, v in fields.items()]


def eval_command(c, dirs) -> list[str]:
    """The evaluation of the untrained, Stage-I and Stage-II models with the image-blind controls."""
    fields = {"models": f"base=embedded,stage1={dirs['stage1']},stage2={dirs['stage2']}"}
    if c.eval.limit:
        fields["limit"] = c.eval.limit
    if c.eval.max_new_tokens:
        fields["sampling.max_new_tokens"] = c.eval.max_new_tokens
    return [sys.executable, "-m", "medee_jax.evaluate", "--config", os.path.join(ROOT, "configs/eval.py"),
            "--workdir", dirs["eval"]] + [_flag(k, v) for k, v in fields.items()]


# ------------------------------------------------------------------------------------------------ stage state


def training_done(workdir: str, train_file: str, steps: int) -> bool:
    """Whether `workdir` holds a finished run of `steps` steps on `train_file`; raises PipelineError when it holds
    a run on other data (never overwritten)."""
    config = read_json(os.path.join(workdir, "config.json"))
    if config is None:
        return False
    found = config.get("data", {}).get("train", "")
    if os.path.abspath(found or ".") != os.path.abspath(train_file):
        raise PipelineError(f"{workdir} holds another run (data.train={found!r}, not {train_file}): remove it or "
                            "pick another --workdir")
    result = read_json(os.path.join(workdir, "result.json"))
    return bool(result) and result.get("stopped") == "done" and result.get("steps") == steps


def pairs_done(pairs_dir: str) -> bool:
    summary = read_json(os.path.join(pairs_dir, "summary.json"))
    return bool(summary) and os.path.isfile(os.path.join(pairs_dir, "pairs.jsonl"))


def eval_done(eval_dir: str, dirs: dict) -> bool:
    """Whether every model's results exist and are newer than the models' last training results."""
    results = [os.path.join(eval_dir, name, "results.json") for name in ("base", "stage1", "stage2")]
    if not all(os.path.isfile(p) for p in results + [os.path.join(eval_dir, "results.md")]):
        return False
    trained = [os.path.join(dirs[s], "result.json") for s in ("stage1", "stage2")]
    newest = max(os.path.getmtime(p) for p in trained if os.path.isfile(p))
    return min(os.path.getmtime(p) for p in results) >= newest


# ------------------------------------------------------------------------------------------------ running


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_command(name: str, cmd: list[str], log_path: str) -> None:
    """Runs one stage's command (output shown and kept in `log_path`); raises PipelineError when it fails."""
    print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=os.getcwd(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        in_config = False  # the trainer's echoed config (kept in the log, not shown)
        for line in proc.stdout:
            log.write(line)
            if line.startswith("config:"):
                in_config = True
            elif in_config and line.startswith("run: "):  # the line after the config says what kind of run it is
                in_config = False
            if not in_config and not line.startswith(("I1", "W1")):  # absl INFO / WARNING lines
                sys.stdout.write(line)
        code = proc.wait()
    if code != 0:
        raise PipelineError(f"stage {name} failed (exit {code}); its output: {log_path}")


def run_pipeline(c, workdir: str) -> dict:
    """Runs every stage (module docstring) in `workdir`; returns the summary also written to W/pipeline.json."""
    dirs = stage_dirs(workdir)
    os.makedirs(workdir, exist_ok=True)
    logs = os.path.join(workdir, "logs")
    timings = {}

    def timed(name, fn):
        start, cpu = time.time(), _cpu_seconds()
        skipped = fn()
        timings[name] = {"seconds": round(time.time() - start, 1), "cpu_seconds": round(_cpu_seconds() - cpu, 1),
                         "skipped": bool(skipped)}
        state = "skipped (done)" if skipped else f"{timings[name]['seconds']:.0f} s"
        print(f"=== {name}: {state}", flush=True)

    files = {}

    def data():
        files.update(prepare_data(c, dirs["data"]))

    def stage1():
        if training_done(dirs["stage1"], files["stage1_train"], c.stage1.steps):
            return True
        run_command("stage1", stage1_command(c, dirs, files), os.path.join(logs, "stage1.log"))

    def pairs():
        if pairs_done(dirs["pairs"]) and os.path.getmtime(os.path.join(dirs["pairs"], "pairs.jsonl")) >= \
                os.path.getmtime(os.path.join(dirs["stage1"], "result.json")):
            return True
        run_command("pairs", pairs_command(c, dirs, files), os.path.join(logs, "pairs.log"))

    def stage2():
        summary = read_json(os.path.join(dirs["pairs"], "summary.json")) or {}
        if not summary.get("pairs_written"):
            raise PipelineError(f"no preference pairs in {dirs['pairs']} (summary: {summary.get('dropped')}): the "
                                "Stage-I model answered every case the same way; train Stage-I longer "
                                "(stage1.steps) or sample more (sample.k, sample.temperature)")
        if training_done(dirs["stage2"], os.path.join(dirs["pairs"], "pairs.jsonl"), c.stage2.steps):
            return True
        run_command("stage2", stage2_command(c, dirs, files), os.path.join(logs, "stage2.log"))

    def evaluate():
        if eval_done(dirs["eval"], dirs):
            return True
        run_command("eval", eval_command(c, dirs), os.path.join(logs, "eval.log"))

    for name, fn in (("data", data), ("stage1", stage1), ("pairs", pairs), ("stage2", stage2), ("eval", evaluate)):
        timed(name, fn)
    summary = {
        "workdir": os.path.abspath(workdir), "short": bool(c.short), "stages": timings,
        "seconds": round(sum(t["seconds"] for t in timings.values()), 1),
        "cpu_seconds": round(sum(t["cpu_seconds"] for t in timings.values()), 1),
        "pairs": read_json(os.path.join(dirs["pairs"], "summary.json")),
        "accuracy": accuracy_summary(dirs["eval"]),
        "table": os.path.join(dirs["eval"], "results.md"), "chart": os.path.join(dirs["eval"], "results.png"),
    }
    with open(os.path.join(workdir, "pipeline.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    with open(summary["table"], encoding="utf-8") as f:
        print("\n" + f.read())
    print(f"pipeline: {summary['seconds']:.0f} s ({summary['cpu_seconds']:.0f} CPU s); table {summary['table']}, "
          f"chart {summary['chart']}, summary {os.path.join(workdir, 'pipeline.json')}")
    return summary


def accuracy_summary(eval_dir: str) -> dict:
    """{model: {group: {"standard", "blank", "shuffled"}}} accuracies (fractions) for the groups "all" and
    "demo_image", read from each model's results.json."""
    out = {}
    for name in ("base", "stage1", "stage2"):
        results = read_json(os.path.join(eval_dir, name, "results.json"))
        if not results:
            continue
        out[name] = {}
        for group in ("all", "demo_image"):
            row = {cond: results["conditions"][cond][group]["accuracy"] for cond in ("standard", "blank", "shuffled")
                   if group in results["conditions"].get(cond, {})}
            if row:
                out[name][group] = row
    return out


def main(argv) -> int:
    del argv
    c = flags.FLAGS.config
    if c is None:
        print("error: --config is required (e.g. --config configs/pipeline.py)", file=sys.stderr)
        return 2
    overridden = set(config_flags.get_override_values(flags.FLAGS["config"]))
    workdir = flags.FLAGS.workdir or c.workdir
    try:
        with c.unlocked():
            resolve(c, overridden)
        run_pipeline(c, workdir)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
