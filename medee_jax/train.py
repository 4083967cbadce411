"""Command line: ``python -m medee_jax.train --config configs/sft.py|dpo.py[:PRESET] [--config.x.y=value ...]
[--workdir DIR] [--check]``.

The config is resolved once after the command-line overrides (`setup.resolve_config`: the embedded demo or a real
run), validated, printed at start and saved as ``workdir/config.json``; a run restarted with the same workdir
resumes from its latest checkpoint. ``--check`` runs the pre-flight (`training.preflight`) instead of training.
Mistakes in the command line or the config end with ``error: ...`` lines naming the field or path, exit code 2.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from .cli import EXIT_USAGE, flag_error
from .cli import error as _error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file, optionally "
                                          "followed by :PRESET (e.g. configs/dpo.py:qwen2_5_vl_7b).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: the config's workdir).")
_CHECK = flags.DEFINE_bool("check", False, "Pre-flight: validate the config, read every record through the input "
                           "pipeline, read the checkpoint's headers and compile the step for its memory; no "
                           "training, nothing written. Exits non-zero if anything would fail.")

def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that ends a bad command line with one ``error:`` line and exit code 2 (no traceback)."""
    try:
        rest = flags.FLAGS(argv)
        if _CONFIG.value is not None:
            _CONFIG.value.get("mode")  # a config file that failed to load raises only when first read
        return rest
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
        _error(flag_error(e, argv))
        sys.exit(EXIT_USAGE)


def main(argv) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = _CONFIG.value
    if config is None:
        _error("--config is required (e.g. --config configs/dpo.py)")
        return EXIT_USAGE
    overridden = set(config_flags.get_override_values(flags.FLAGS["config"]))
    if _WORKDIR.value:
        with config.unlocked():
            config.workdir = _WORKDIR.value
    from .training.setup import describe_run, resolve_config, validate_config

    try:
        config = resolve_config(config, overridden)
        validate_config(config, config.workdir, create_workdir=not _CHECK.value)
    except ValueError as e:
        problems = str(e).split("\n  - ")
        _error("\n".join(problems[1:]) if problems[0] == "invalid config:" else str(e))
        return EXIT_USAGE
    print(f"config:\n{config}", file=sys.stderr)
    print(describe_run(config), file=sys.stderr)
    if config.demo is True:
        from .recipes import DEMO_SIZES

        kept = sorted(overridden & set(DEMO_SIZES[config.mode]))
        if kept:
            print(f"run: kept from the command line over the demo sizes: {', '.join(kept)}", file=sys.stderr)
    if _CHECK.value:
        from .training.preflight import run_check

        return run_check(config)
    from .training.loop import train

    try:
        result = train(config)
    except (ValueError, OSError) as e:
        _error(str(e))
        return EXIT_USAGE
    return 0 if result.stopped in ("done", "preempted") else 1


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
