"""Stage-II (Enhance): multimodal DPO with the Stage-I model as policy and frozen reference.

    python -m medee_jax.train --config configs/dpo.py                  # the embedded demo (CPU, ~1.5 minutes)
    python -m medee_jax.train --config configs/dpo.py:qwen2_5_vl_7b \\
        --config.model.init_from=runs/stage1 --config.data.train=/data/pairs.jsonl

With no checkpoint and no data: the embedded tiny model on the synthetic demo preference pairs (chosen answers
reason from the visible finding; rejected ones hallucinate or contradict it). Recipe for real runs: sigmoid loss,
beta 0.1, lr 5e-7 to 5e-6, cosine, warmup 10%, 1 to 3 epochs, vision tower and projector frozen, reference = frozen
copy of the Stage-I model (model.init_from=<stage-1 workdir>). A preset sets the size-dependent values.
"""

from medee_jax import recipes


def get_config(preset: str | None = None):
    c = recipes.base_config("dpo")
    c.optimizer.lr = 5e-7  # the low end of the recipe's 5e-7..5e-6: DPO from a fine-tuned policy drifts fast
    c.optimizer.warmup_ratio = 0.1
    c.data.num_epochs = 1
    c.dpo.loss_type = "sigmoid"
    c.dpo.beta = 0.1
    return recipes.apply_preset(c, preset)
