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


def run(c, workdir: str, *, load_generator=None) -> dict | None:
    """Runs the configured stage(s); returns the judge stage's summary (None for stage=sample)."""
    from medee_jax.evaluation import model_runner
    from medee_jax.pairs.build import run_judge_stage
    from medee_jax.pairs.sample import run_sample_stage

    if c.stage not in ("sample", "judge", "all"):
        raise ValueError(f"stage must be sample, judge or all, got {c.stage!r}")
    os.makedirs(workdir, exist_ok=True)
    if c.stage in ("sample", "all"):
        (spec,) = model_runner.parse_model_specs(f"policy={c.model}", seed=c.seed)
        model_runner.check_model(spec)
        generate_fn = (load_generator or model_runner.load_generator)(spec)
        path = run_sample_stage(c, workdir, generate_fn, model_id=model_runner.model_identity(spec))
        print(f"candidates: {path}", file=sys.stderr)
    if c.stage in ("judge", "all"):
        return run_judge_stage(c, workdir, load_generator=load_generator)
    return None


def main(argv) -> int:
    del argv
    c = _CONFIG.value
    if c is None or not _WORKDIR.value:
        print("error: --config and --workdir are required", file=sys.stderr)
        return 2
    from medee_jax.data.errors import BadRecordError
    from medee_jax.evaluation.generation import GenerationUnavailable

    try:
        summary = run(c, _WORKDIR.value)
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
    app.run(main)
