"""Runs one training job from a config file plus overrides and saves its final parameters (for trainer tests).

    python tests/run_training.py CONFIG_FILE OUT.npz key=value [key=value ...] [--then CONFIG_FILE OUT.npz ...]

Values are Python literals (``data.batch_size=2``, ``data.length_buckets=(64,)``, ``mesh.fsdp=4``). Run as a
subprocess so each job can have its own XLA device count and ``jax.distributed`` set-up. Every process gathers the
parameters; process 0 writes OUT.npz with the flattened params, the frozen params and the logged losses. Jobs
separated by ``--then`` run one after the other in the same process (one start-up for several runs).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys

import numpy as np


def load_config(path: str, overrides: list[str]):
    spec = importlib.util.spec_from_file_location("run_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        key, value = item.split("=", 1)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        out.update(flatten(v, name) if isinstance(v, dict) else {name: v})
    return out


def main(argv):
    jobs, current = [], []
    for arg in argv[1:]:
        if arg == "--then":
            jobs.append(current)
            current = []
        else:
            current.append(arg)
    jobs.append(current)
    for job in jobs:
        run_job(job[0], job[1], job[2:])


def run_job(config_file, out, overrides):
    config = load_config(config_file, overrides)
    import jax
    from jax.experimental import multihost_utils

    from medee_jax.training.loop import Trainer

    trainer = Trainer(config)
    result = trainer.run()

    def gather(x):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True)) if jax.process_count() > 1 \
            else np.asarray(x)

    params = {k: gather(v) for k, v in flatten(trainer.state.params).items()}
    frozen = {k: gather(v) for k, v in flatten(trainer.state.frozen).items()}
    if jax.process_index() == 0:
        losses = []
        with open(os.path.join(trainer.workdir, "metrics.jsonl")) as f:
            for line in f:
                record = json.loads(line)
                if "loss" in record:
                    losses.append(record["loss"])
        np.savez(out, **{f"params/{k}": v for k, v in params.items()},
                 **{f"frozen/{k}": v for k, v in frozen.items()}, losses=np.asarray(losses, np.float64),
                 steps=result.steps, stopped=result.stopped)


if __name__ == "__main__":
    main(sys.argv)
