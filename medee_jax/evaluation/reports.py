"""Markdown tables of one or more models' evaluation results (`runner.run_evaluation`'s dicts)."""

from __future__ import annotations


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def accuracy_rows(all_results: dict[str, dict]) -> list[list[str]]:
    """[group, model, items, accuracy %, unparsed %, blank %, shuffled %, drop blank, drop shuffled] rows."""
    rows = []
    groups = sorted({g for r in all_results.values() for g in r["conditions"].get("standard", {})},
                    key=lambda g: (g != "all", g))
    for group in groups:
        for model, results in all_results.items():
            standard = results["conditions"].get("standard", {}).get(group)
            if standard is None:
                continue
            blind = results.get("blind", {}).get(group, {})
            rows.append([group, model, str(standard["items"]), _pct(standard["accuracy"]),
                         _pct(standard["parse_failure_rate"]),
                         _pct(blind.get("blank", {}).get("accuracy")), _pct(blind.get("shuffled", {}).get("accuracy")),
                         _pct(blind.get("blank", {}).get("drop")), _pct(blind.get("shuffled", {}).get("drop"))])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(all_results: dict[str, dict]) -> str:
    """Accuracy per group and model with the image-blind controls, then the scaling curves (n_samples > 1)."""
    parts = ["# Evaluation results", "",
             "Accuracy in %, mean over samples. Blank / shuffled: the same items with blank images or with another "
             "item's images; drop = standard minus blind accuracy on those same items (percentage points).", "",
             _table(["group", "model", "items", "accuracy", "unparsed", "blank", "shuffled", "drop blank",
                     "drop shuffled"], accuracy_rows(all_results))]
    scaling = []
    for model, results in all_results.items():
        for group, figures in results["conditions"].get("standard", {}).items():
            for k, v in figures.get("scaling", {}).items():
                scaling.append([group, model, k, _pct(v["mean"]), _pct(v["maj"]), _pct(v["pass"])])
    if scaling:
        parts += ["", "## Inference-time scaling", "",
                  "mean = accuracy of the first N samples; maj@N = majority vote over blocks of N samples; "
                  "pass@N = unbiased estimate from all samples.", "",
                  _table(["group", "model", "N", "mean", "maj@N", "pass@N"], scaling)]
    return "\n".join(parts) + "\n"
