"""medee_jax: MedE² post-training for vision-language models in JAX/Flax NNX."""

import os as _os

# transformers prints "PyTorch was not found. Models won't be available ..." when imported without torch. We use
# transformers for tokenizers and chat templates only (never its PyTorch models), so the banner is noise a user
# cannot act on; this variable silences exactly that one message (transformers' only advisory warning).
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
