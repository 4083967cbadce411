"""Stage-I (Elicit): supervised fine-tuning on text-only chain-of-thought demonstrations.

    python -m medee_jax.train --config configs/sft.py                  # the embedded demo (CPU, a few minutes)
    python -m medee_jax.train --config configs/sft.py:qwen2_5_vl_7b \\
        --config.model.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.train=/data/cot.jsonl

Recipe for real runs (the paper is silent; closest public recipes): full fine-tune of the language model, vision
tower and projector frozen, lr 1e-5, cosine, warmup 10%, 3 epochs, bf16 compute with fp32 master weights, remat
"full". A preset (`medee_jax.recipes.PRESETS`) sets the mesh, per-device batch, buckets, image limits and lr for
a model size. Without a checkpoint and data the run is the embedded demo, with its own CPU sizes.
"""

from medee_jax import recipes


def get_config(preset: str | None = None):
    c = recipes.base_config("sft")
    c.optimizer.lr = 1e-5  # LLaMA-Factory's Qwen2.5-VL full SFT example and the MedE2-adjacent recipes
    c.optimizer.warmup_ratio = 0.1
    c.data.num_epochs = 3  # a few thousand demonstrations: 3 passes, as the closest public recipes
    c.data.packing = True  # short text-only demonstrations: several per row
    return recipes.apply_preset(c, preset)
