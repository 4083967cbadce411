"""Stage-II (Enhance): multimodal DPO with the Stage-I model as policy and frozen reference.

With no overrides: the embedded tiny model on the synthetic demo preference pairs (chosen answers reason from the
visible finding; rejected ones hallucinate or contradict it), a few minutes on CPU.
Recipe values for real runs: sigmoid loss, beta 0.1, lr 5e-7 to 5e-6, cosine, warmup 10%, 1 to 3 epochs,
vision tower and projector frozen, reference = frozen copy of the Stage-I model (model.init_from=<stage-1 workdir>).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from base import base_config, embedded_demo_sizes, internvl_demo  # noqa: E402


def get_config(arg: str | None = None):
    c = base_config("dpo")
    c.optimizer.lr = 5e-7
    c.optimizer.warmup_ratio = 0.1
    c.data.num_epochs = 1
    c.dpo.loss_type = "sigmoid"
    c.dpo.beta = 0.1
    embedded_demo_sizes(c, lr=2e-4, max_length=384, batch_size=4)
    if arg == "internvl_demo":  # --config configs/<this>.py:internvl_demo
        internvl_demo(c)
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: internvl_demo")
    return c
