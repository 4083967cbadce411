"""Command line: ``python -m medee_jax.evaluate --config configs/eval.py [--config.x=...] [--workdir DIR]``.

Evaluates every configured model on the configured benchmarks (default: the embedded demo's held-out cases) and
writes, per model, ``workdir/<name>/`` (samples.jsonl, results.json, results.md, results.png, generations.jsonl),
and for all models together ``workdir/results.md`` and ``workdir/results.png``; the table is printed at the end.
Rerunning with the same workdir reuses every generation already made.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: the config's workdir).")


def main(argv) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    c = _CONFIG.value
    if c is None:
        print("error: --config is required (e.g. --config configs/eval.py)", file=sys.stderr)
        return 2
    workdir = _WORKDIR.value or c.workdir
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(c.to_dict(), f, indent=1)
    from medee_jax.data.errors import BadRecordError
    from medee_jax.evaluation.generation import GenerationUnavailable

    from medee_jax.evaluation.suite import evaluate

    try:
        evaluate(c, workdir)
    except (GenerationUnavailable, FileNotFoundError, ValueError, BadRecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from medee_jax.cli import parse_flags_or_exit

    app.run(main, flags_parser=parse_flags_or_exit)
