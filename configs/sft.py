"""Stage-I (Elicit): supervised fine-tuning on text-only chain-of-thought demonstrations.

With no overrides: the embedded tiny Qwen2.5-VL-shaped model on the synthetic demo set, a few minutes on CPU.
Recipe values for real runs (the paper is silent; closest public recipes): lr 1e-5, cosine, warmup 10%, 3 epochs,
vision tower and projector frozen, bf16 compute with fp32 master weights, remat "full".
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from base import base_config, embedded_demo_sizes, internvl_demo  # noqa: E402


def get_config(arg: str | None = None):
    c = base_config("sft")
    c.optimizer.lr = 1e-5
    c.optimizer.warmup_ratio = 0.1
    c.data.num_epochs = 3
    c.data.packing = True
    embedded_demo_sizes(c, lr=2e-3, max_length=256, batch_size=8)
    if arg == "internvl_demo":  # --config configs/<this>.py:internvl_demo
        internvl_demo(c)
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; known: internvl_demo")
    return c
