"""Command line: ``python -m medee_jax.train --config configs/sft.py|dpo.py [--config.x.y=value ...] [--workdir DIR]``.

The resolved config is printed at start and saved as ``workdir/config.json``; a run restarted with the same
workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: the config's workdir).")


def main(argv) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = _CONFIG.value
    if config is None:
        print("error: --config is required (e.g. --config configs/dpo.py)", file=sys.stderr)
        return 2
    if _WORKDIR.value:
        with config.unlocked():
            config.workdir = _WORKDIR.value
    print(f"config:\n{config}", file=sys.stderr)
    from .training.loop import train

    try:
        result = train(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if result.stopped in ("done", "preempted") else 1


if __name__ == "__main__":
    app.run(main)
