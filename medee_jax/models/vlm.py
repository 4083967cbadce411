"""What every vision-language family shares around its vision tower: the Qwen2 text decoder, the LM head, the
scatter of image features into image-token slots, fp32 logits, and the convenience call path outside jit.

A family's model subclasses ``VisionLanguageModel`` and adds its vision tower and projector (``encode_images``)
and the host-side ``prepare_inputs`` that turns transformers-processor-shaped inputs into ``forward``'s arrays.

Device entry points (shape-static, host-computed arrays):
  ``encode_images(pixel_values, **vision)``  -> image features [F, D] in image order (family-specific);
  ``embed(input_ids, image_features, image_token_index)`` -> [B, L, D] with features scattered into image tokens;
  ``hidden_states(...)`` -> final hidden [B, L, D];  ``logits(hidden)`` -> [B, L, V] fp32.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import BATCH_AXES, IMPLEMENTATIONS, implementation_without_mesh
from .decoder import Qwen2Decoder
from .layers import param


def vision_attention_implementation(implementation: str) -> str:
    """Returns the ``attention.attention`` implementation a vision tower runs for ``implementation``: "auto" on a TPU
    backend becomes "blockwise" (splash needs the mesh the training step is compiled for, which a tower does not
    see, and a Pallas kernel cannot be partitioned by the compiler), anything else is returned as it is ("auto"
    elsewhere: reference for short sequences on CPU, blockwise for long ones; cudnn on GPU where it applies)."""
    return implementation_without_mesh(implementation)


class VisionLanguageModel(nnx.Module):
    """The shared part: ``language_model`` (Qwen2Decoder) and ``lm_head`` (None when tied to the embedding).
    Subclasses set ``config`` (with ``text`` and ``tie_word_embeddings``) and call ``_init_language_model``."""

    def _init_language_model(self, cfg, *, dtype, param_dtype, remat: str, rngs: nnx.Rngs | None):
        self.config = cfg
        self.dtype = dtype
        self.language_model = Qwen2Decoder(cfg.text, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = param(rngs, (cfg.text.hidden_size, cfg.text.vocab_size), ("embed", "vocab"), param_dtype,
                                 "zeros" if rngs is None else "normal")

    def set_text_attention(self, implementation: str, *, interpret: bool = False) -> None:
        """Sets the text decoder's attention implementation (``attention.IMPLEMENTATIONS``; the decoder's default is
        "reference", the dense math). The trainer sets ``model.attention`` here once the model is built.
        ``interpret``: run Pallas kernels (splash) in interpret mode, for CPU tests of the TPU path."""
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"model.attention={implementation!r}: one of {', '.join(IMPLEMENTATIONS)}")
        self.language_model.attention_implementation = implementation
        self.language_model.attention_interpret = bool(interpret)

    # ---- device entry points (shape-static) ----

    def encode_images(self, pixel_values, **vision):
        """Returns image features [F, D] (one row per image token, in image order)."""
        raise NotImplementedError

    def embed(self, input_ids, image_features=None, image_token_index=None):
        """Returns input embeddings [B, L, D]; row f of image_features goes to flat position image_token_index[f].

        image_token_index [F] indexes the flattened [B*L] sequence; entries >= B*L (padding rows) are dropped.
        A [K, F] index places every feature K times (e.g. K=2 for DPO: the chosen and the rejected row share the
        prompt's images, so the tower runs once per pair).
        """
        embeds = self.language_model.embed(input_ids)  # [B, L, D]
        if image_features is None:
            return embeds
        b, length, d = embeds.shape
        copies = 1 if image_token_index.ndim == 1 else image_token_index.shape[0]
        features = jnp.tile(image_features.astype(embeds.dtype), (copies, 1))  # [K*F, D]
        flat = embeds.reshape(b * length, d).at[image_token_index.reshape(-1)].set(features, mode="drop")
        return flat.reshape(b, length, d)

    def hidden_states(self, embeds, position_ids, attention_mask, segment_ids=None, branch_ids=None, *, mesh=None,
                      batch_axes=BATCH_AXES):
        """Returns final normed hidden states [B, L, D] (``branch_ids``: see decoder.text_attention_mask; ``mesh``,
        ``batch_axes``: the text attention's, see ``attention.attention``)."""
        return self.language_model(embeds, position_ids, attention_mask, segment_ids, branch_ids, mesh=mesh,
                                   batch_axes=batch_axes)

    def lm_head_kernel(self):
        """Returns the LM-head kernel [D, V] (the embedding's transpose when tied)."""
        if self.lm_head is None:
            return self.language_model.embed_tokens[...].T
        return self.lm_head[...]

    def logits(self, hidden):
        """Returns fp32 logits [B, L, V] from hidden states [B, L, D]."""
        kernel = self.lm_head_kernel().astype(hidden.dtype)
        return jnp.einsum("bld,dv->blv", hidden, kernel, preferred_element_type=jnp.float32)

    def forward(self, input_ids, position_ids, attention_mask, segment_ids=None, pixel_values=None,
                vision=None, image_token_index=None):
        """Returns fp32 logits [B, L, V]; ``vision`` is the family's dict of layout arrays when images are given."""
        features = None
        if pixel_values is not None:
            features = self.encode_images(pixel_values, **(vision or {}))
        embeds = self.embed(input_ids, features, image_token_index)
        return self.logits(self.hidden_states(embeds, position_ids, attention_mask, segment_ids))

    # ---- host convenience path ----

    def prepare_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                       position_ids=None, segment_ids=None) -> dict:
        """Returns the numpy arrays ``forward`` takes, computed on the host from processor-shaped inputs."""
        raise NotImplementedError

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None,
                 segment_ids=None):
        """Returns fp32 logits [B, L, V] for transformers-processor-shaped inputs (numpy or jax), outside jit."""
        arrays = self.prepare_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, position_ids,
                                     segment_ids)
        return _jitted_forward(self, arrays)


def check_token_batch(input_ids, attention_mask):
    """Returns (input_ids int32 [B, L], attention_mask int32 [B, L]) as numpy, checking their shapes."""
    input_ids = np.asarray(input_ids, dtype=np.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
    return input_ids, mask


def scatter_index(input_ids, attention_mask, image_token_id: int, rows: int, features: int) -> np.ndarray:
    """Returns the flat [B*L] slot of each of ``rows`` feature rows (the first ``features`` real, in order; the
    rest point past the end and are dropped), checking the image-token count equals ``features``."""
    slots = np.flatnonzero((input_ids == image_token_id) & (attention_mask != 0))
    if slots.size != features:
        raise ValueError(f"image tokens and image features do not match: {slots.size} image tokens, {features} "
                         "features from the images")
    index = np.full(rows, input_ids.size, np.int32)
    index[: slots.size] = slots
    return index


@nnx.jit
def _jitted_forward(model: VisionLanguageModel, arrays: dict):
    return model.forward(**arrays)
