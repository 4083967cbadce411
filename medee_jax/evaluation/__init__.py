"""Evaluation: benchmark readers, prompts, answer extraction, metrics (maj@N, pass@N, image-blind control),
reports and the runner. Pure Python + numpy + Pillow; jax is imported only by `model_runner` when a model runs."""

from .extract import extract_choice, extract_choice_with_rule
from .items import ImageRef, MCItem

__all__ = ["ImageRef", "MCItem", "extract_choice", "extract_choice_with_rule"]
