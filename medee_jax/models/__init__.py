"""Models: Qwen2.5-VL (and the shared Qwen2 decoder), configs, Hugging Face checkpoint import/export."""

from .config import PRESETS, Qwen25VLConfig, TextConfig, VisionConfig, config_from_hf_dict, load_config, tiny_config
from .qwen2_5_vl import Qwen25VL


def from_pretrained(hf_dir, dtype=None, mesh=None, *, param_dtype=None, remat="none"):
    """Returns a Flax NNX model for the checkpoint in ``hf_dir`` (``model_type`` qwen2_5_vl).

    ``dtype`` is the compute dtype (default bfloat16), ``param_dtype`` the storage dtype (default: ``dtype``).
    """
    import jax.numpy as jnp
    from flax import nnx

    from . import hf

    dtype = jnp.bfloat16 if dtype is None else dtype
    param_dtype = dtype if param_dtype is None else param_dtype
    cfg = load_config(hf_dir)
    model = nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=None))
    model = Qwen25VL(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=None)
    hf.load_weights(model, hf_dir)
    return model
