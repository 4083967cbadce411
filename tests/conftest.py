"""Shared pytest fixtures."""

import os

import pytest

# The suite runs on the CPU. The test extra installs libtpu (for tools/aot_compile.py's TPU topologies); without
# this, jax would probe for a TPU in every test process and subprocess and log libtpu's warnings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory):
    """A directory holding the offline demo tokenizer (tokenizer.json + tokenizer_config.json), built once."""
    from medee_jax.data.demo_tokenizer import build_demo_tokenizer

    out = tmp_path_factory.mktemp("demo_tokenizer")
    build_demo_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def chat_tokenizer(demo_tokenizer_dir):
    """The demo tokenizer loaded as a `medee_jax.data.tokenize.ChatTokenizer`."""
    from medee_jax.data.tokenize import load_chat_tokenizer

    return load_chat_tokenizer(demo_tokenizer_dir)


@pytest.fixture(scope="session")
def internvl_tokenizer_dir(tmp_path_factory):
    """The offline demo tokenizer in its InternVL3 "-hf" flavour (InternVL's image tokens and chat template)."""
    from medee_jax.data.demo_tokenizer import build_demo_tokenizer

    out = tmp_path_factory.mktemp("internvl_tokenizer")
    build_demo_tokenizer(out, flavour="internvl")
    return out
