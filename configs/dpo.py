"""Stage-II (Enhance): multimodal DPO with the Stage-I model as policy and frozen reference.

With no overrides: the embedded tiny model on the synthetic demo preference pairs (chosen answers reason from the
visible finding; rejected ones hallucinate or contradict it), a few minutes on CPU.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from base import base_config  # noqa: E402


def get_config():
    c = base_config("dpo")
    c.optimizer.lr = 5e-7
    c.optimizer.warmup_ratio = 0.1
    c.data.num_epochs = 1
    c.dpo.loss_type = "sigmoid"
    c.dpo.beta = 0.1
    _embedded_demo(c)
    return c


def _embedded_demo(c):
    """CPU-sized defaults for the embedded demo; real runs override model.checkpoint / model.init_from."""
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.optimizer.lr = 2e-4
    c.data.max_length = 384
    c.data.seq_buckets = (256, 384)
    c.data.patch_buckets = (256, 512, 1024)
    c.data.max_pixels = 224 * 224
    c.data.batch_size = 4
    c.train.checkpoint_every = 50
    c.train.eval_every = 50
