"""Stage-II pairs: ``python tools/build_pairs.py --config configs/pairs.py [--config.x=...] --workdir W``.

``--config.stage=sample|judge|all``; each stage resumes from what W already holds (cached generations and judge
replies). Prints the summary (also W/summary.json). Exit status: 0 done, 1 the judge was refused the API key,
2 a configuration or data error (message on stderr).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to configs/pairs.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Working directory (caches, candidates, pairs, summary).")


def main(argv) -> int:
    del argv
    c = _CONFIG.value
    if c is None or not _WORKDIR.value:
        print("error: --config and --workdir are required", file=sys.stderr)
        return 2
    from medee_jax.data.errors import BadRecordError
    from medee_jax.evaluation.generation import GenerationUnavailable

    from medee_jax.pairs.build import run_stages

    try:
        summary = run_stages(c, _WORKDIR.value)
    except (GenerationUnavailable, FileNotFoundError, ValueError, BadRecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary is not None:
        print(json.dumps(summary, indent=1))
        if summary["judge_failures"].get("auth"):
            print("error: the judge endpoint refused the API key (HTTP 401/403); check OPENAI_API_KEY",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    from medee_jax.cli import parse_flags_or_exit

    app.run(main, flags_parser=parse_flags_or_exit)
