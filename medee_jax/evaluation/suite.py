"""Evaluating several models on the configured benchmarks (the work behind ``python -m medee_jax.evaluate``).

`evaluate(config, workdir)` -> {model name: results}; per model ``workdir/<name>/`` (samples.jsonl, results.json,
results.md, results.png, generations.jsonl), for all models ``workdir/results.md`` and ``workdir/results.png``.
"""

from __future__ import annotations

import os
import sys


def settings_from_config(c):
    """The runner's EvalSettings from the config (the demo instruction when evaluating the demo data)."""
    from medee_jax.evaluation.generation import Sampling
    from medee_jax.evaluation.runner import EvalSettings

    instruction = c.prompt.instruction or ("" if c.benchmarks else c.demo_instruction)
    sampling = Sampling(n_samples=c.sampling.n_samples, temperature=c.sampling.temperature, top_p=c.sampling.top_p,
                        max_new_tokens=c.sampling.max_new_tokens, seed=c.sampling.seed)
    return EvalSettings(style=c.prompt.style, instruction=instruction, system=c.prompt.system, sampling=sampling,
                        batch_size=c.batch_size, blind_controls=c.blind_controls, shuffle_seed=c.shuffle_seed)


def evaluate(c, workdir: str, load_generator=None) -> dict[str, dict]:
    """Runs every model; returns {model name: results}. `load_generator(spec, **settings)` defaults to
    `model_runner.load_generator`."""
    from medee_jax.evaluation import benchmarks, model_runner
    from medee_jax.evaluation.chart import draw_chart
    from medee_jax.evaluation.reports import markdown_report
    from medee_jax.evaluation.runner import run_evaluation

    load_generator = load_generator or model_runner.load_generator
    specs = model_runner.parse_model_specs(c.models, seed=c.sampling.seed)
    if not specs:
        raise ValueError("no models configured (config.models)")
    found = []
    for spec in specs:
        try:
            model_runner.check_model(spec)
            found.append(spec)
        except FileNotFoundError as e:
            if spec.path.replace(os.sep, "/").rstrip("/") not in model_runner.DEMO_COMMANDS:
                raise
            print(f"skipping {e}", file=sys.stderr)  # a demo workdir not trained yet: the message says how
    if not found:
        raise FileNotFoundError("none of the configured models exists")
    specs = found
    if c.benchmarks:
        items, skipped = benchmarks.load_items(benchmarks.parse_benchmark_specs(c.benchmarks),
                                               media_root=c.media_root, on_bad_record=c.on_bad_record,
                                               limit=c.limit, mmmu_subjects=c.mmmu_subjects)
    else:
        items, skipped = benchmarks.demo_items(os.path.join(workdir, "demo")), {}
        items = items[:c.limit] if c.limit > 0 else items
    print(f"{len(items)} items ({sum(bool(i.images) for i in items)} with images); skipped: {skipped or 'none'}",
          file=sys.stderr)
    settings = settings_from_config(c)
    all_results = {}
    for spec in specs:
        generate_fn = load_generator(spec, dtype=c.model_dtype, min_pixels=c.min_pixels or None,
                                       max_pixels=c.max_pixels or None)
        all_results[spec.name] = run_evaluation(items, generate_fn, settings, os.path.join(workdir, spec.name),
                                                model_id=model_runner.model_identity(spec), skipped=skipped)
    report = markdown_report(all_results)
    with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(report)
    draw_chart(all_results, os.path.join(workdir, "results.png"))
    print(report)
    return all_results
