"""The whole MedE² loop on the embedded demo: ``python -m medee_jax.pipeline --config configs/pipeline.py``.

Stages (each skipped when its output is complete, resumed when interrupted; outputs under ``workdir``):
  data    W/data: the demo set with extra image cases; Stage-I training file and Stage-II sampling cases
  stage1  W/sft: Stage-I SFT (text chain of thought + the multimodal warm-up, vision tower trained)
  pairs   W/pairs: sample the Stage-I model K times per Stage-II case, judge (rules), preference pairs
  stage2  W/dpo: Stage-II DPO from the Stage-I model, which is also the frozen reference
  eval    W/eval: base (untrained), Stage-I and Stage-II on the held-out cases with the image-blind controls

The default workdir ("workdir") puts the models where ``python -m medee_jax.evaluate --config configs/eval.py``
looks for them (workdir/sft, workdir/dpo, workdir/eval). ``--config.short=True`` is the CI variant: the same
stages on a few cases and steps (about 3 minutes). Sizes below: 2 CPU cores, about 15 minutes in all.
"""

import ml_collections

from medee_jax.data.demo import DEMO_MAX_PIXELS


def get_config():
    c = ml_collections.ConfigDict()
    c.workdir = "workdir"  # --workdir overrides
    c.short = False  # the CI variant: medee_jax.pipeline.SHORT replaces the sizes not set on the command line
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.num_sft = 240  # text-only chain-of-thought demonstrations (Stage-I, as in the paper)
    c.data.num_image_cases = 960  # image cases generated: the first stage1_image_cases go to Stage-I, the rest
    c.data.stage1_image_cases = 720  # are Stage-II's sampling cases (unseen by Stage-I, as the paper's)
    c.data.max_pixels = DEMO_MAX_PIXELS  # images resized to at most this (training, sampling and evaluation)

    c.stage1 = ml_collections.ConfigDict()
    c.stage1.steps = 1500
    c.stage1.lr = 3e-3  # a randomly initialised tiny model needs large steps
    c.stage1.b2 = 0.95  # Adam forgets the format-learning gradients fast (tests/test_image_dependence.py)
    c.stage1.batch_size = 4  # packed rows
    c.stage1.max_length = 384  # packed rows: a text demonstration (< 300 tokens) or a few image cases

    c.sample = ml_collections.ConfigDict()
    c.sample.k = 4
    c.sample.temperature = 0.8
    c.sample.top_p = 1.0
    c.sample.max_new_tokens = 96  # the warm-up answers are ~40 tokens
    c.sample.batch_size = 16

    c.pairs = ml_collections.ConfigDict()
    c.pairs.min_margin = 1.0

    c.stage2 = ml_collections.ConfigDict()
    c.stage2.steps = 100
    c.stage2.lr = 5e-5
    c.stage2.beta = 0.1
    c.stage2.batch_size = 4  # pairs
    c.stage2.max_length = 256

    c.eval = ml_collections.ConfigDict()
    c.eval.limit = 0  # > 0: the first N held-out items (image items come first)
    c.eval.max_new_tokens = 0  # 0: configs/eval.py's default (so a later plain evaluate reuses the generations)

    return c
