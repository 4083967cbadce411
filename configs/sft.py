"""Stage-I (Elicit): supervised fine-tuning on text-only chain-of-thought demonstrations.

With no overrides: the embedded tiny Qwen2.5-VL-shaped model on the synthetic demo set, a few minutes on CPU.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from base import base_config  # noqa: E402


def get_config():
    c = base_config("sft")
    c.optimizer.lr = 1e-5
    c.optimizer.warmup_ratio = 0.1
    c.data.num_epochs = 3
    c.data.packing = True
    _embedded_demo(c)
    return c


def _embedded_demo(c):
    """CPU-sized defaults for the embedded demo; real runs override model.checkpoint and data.train."""
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.optimizer.lr = 2e-3
    c.data.max_length = 256
    c.data.seq_buckets = (128, 256)
    c.data.patch_buckets = (256, 512, 1024)
    c.data.max_pixels = 224 * 224
    c.data.batch_size = 8
    c.train.checkpoint_every = 50
    c.train.eval_every = 50
