"""tools/convert_checkpoint.py: hf2orbax then orbax2hf is bit-identical (run as a user would), the Orbax layout
restores with plain Orbax calls and into a model, --dtype casts, and bad sources give one error line, status 2."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from medee_jax.models import from_pretrained, hf, orbax_io
from tests.qwen_reference import random_hf_model, tiny_hf_config
from tests.test_hf_checkpoint import assert_same_params, assert_same_tensors, read_all

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "convert_checkpoint.py")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny random checkpoint saved by transformers (sharded), with a tokenizer file beside it."""
    path = tmp_path_factory.mktemp("convert") / "hf"
    random_hf_model(tiny_hf_config(), seed=3).save_pretrained(path, max_shard_size="300KB")
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return str(path)


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_round_trip_is_bit_identical(src, tmp_path):
    orb, back = str(tmp_path / "orbax"), str(tmp_path / "back")
    out = run_cli("hf2orbax", src, orb)
    assert out["params"] == 33 and out["bytes"] > 0
    out = run_cli("orbax2hf", orb, back)
    assert out["files"] == ["model.safetensors"]
    assert_same_tensors(src, back)
    assert json.loads(open(os.path.join(back, "config.json")).read())["dtype"] == "float32"
    assert open(os.path.join(back, "tokenizer_config.json")).read() == '{"model_max_length": 64}'

    # The layout: a composite checkpoint with one PyTree item "params" + config.json, readable by plain Orbax.
    import orbax.checkpoint as ocp

    meta = json.loads(open(os.path.join(orb, "_CHECKPOINT_METADATA")).read())
    assert list(meta["item_handlers"]) == ["params"]
    restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
        orb, args=ocp.args.Composite(params=ocp.args.PyTreeRestore()))["params"]
    model = from_pretrained(src, dtype=jnp.float32)
    np.testing.assert_array_equal(restored["language_model"]["layers"]["q_proj_kernel"],
                                  np.asarray(model.language_model.layers.q_proj_kernel[...]))
    assert_same_params(model, orbax_io.load_model(orb, dtype=jnp.float32))


def test_streamed_and_whole_saves_agree(src, tmp_path):
    """One partial save per parameter (batch_bytes=1), the default batching and save_model give the same params."""
    model = from_pretrained(src, dtype=jnp.float32)
    orbax_io.hf_to_orbax(src, tmp_path / "streamed", batch_bytes=1)
    orbax_io.save_model(model, tmp_path / "whole")
    for name in ("streamed", "whole"):
        assert_same_params(model, orbax_io.load_model(tmp_path / name, dtype=jnp.float32))
    assert os.path.isfile(tmp_path / "whole" / "tokenizer_config.json")  # carried from the source checkpoint
    assert sorted(os.listdir(tmp_path)) == ["streamed", "whole"]  # no staging directories left


def test_dtype_option(src, tmp_path, tool, capsys):
    orb, back, wide = tmp_path / "orbax_bf16", tmp_path / "back_bf16", tmp_path / "back_fp32"
    assert tool.main(["hf2orbax", src, str(orb), "--dtype", "bf16"]) == 0
    assert tool.main(["orbax2hf", str(orb), str(back)]) == 0
    assert tool.main(["orbax2hf", str(orb), str(wide), "--dtype", "fp32"]) == 0
    original, narrow, widened = read_all(src), read_all(back), read_all(wide)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    for k, v in original.items():
        expected = v.astype(ml_dtypes.bfloat16)  # round-to-nearest-even, as torch's .to(torch.bfloat16)
        assert narrow[k].dtype == ml_dtypes.bfloat16 and np.array_equal(narrow[k], expected), k
        assert widened[k].dtype == np.float32 and np.array_equal(widened[k], expected.astype(np.float32)), k
    capsys.readouterr()


def test_bad_sources_give_one_error_line(src, tmp_path, tool, capsys):
    def fails(*argv, match):
        assert tool.main(list(argv)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and match in err, err

    dst = str(tmp_path / "dst")
    fails("hf2orbax", str(tmp_path / "nowhere"), dst, match="not a local checkpoint directory")
    fails("orbax2hf", src, dst, match="use hf2orbax")
    fails("orbax2hf", str(tmp_path / "nowhere"), dst, match="not a directory")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(os.path.join(src, "config.json"), pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    fails("hf2orbax", str(pickled), dst, match="never unpickles")
    fails("hf2orbax", src, src, match="same directory")

    orb = tmp_path / "orbax"
    orbax_io.hf_to_orbax(src, orb)
    no_config = tmp_path / "no_config"
    shutil.copytree(orb, no_config)
    os.remove(no_config / "config.json")
    fails("orbax2hf", str(no_config), dst, match="no config.json")
    other = tmp_path / "other_config"  # an Orbax dir whose params do not fit its config.json
    shutil.copytree(orb, other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    config["text_config"]["intermediate_size"] = 96
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(orbax_io.OrbaxCheckpointError) as err:
        orbax_io.orbax_to_hf(other, dst)
    assert "language_model.layers.gate_proj_kernel [2, 64, 128] (expected [3, 64, 96])" in str(err.value)
    assert not os.path.exists(dst)
