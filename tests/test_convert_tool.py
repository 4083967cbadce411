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


# ---- destinations: replace only what we wrote ------------------------------------------------------------------

def run_tool(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=300, env=env)


def tree(path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to prove a directory was left untouched)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


def fake_workdir(path):
    """What a training run leaves in its workdir: a config.json (the run config), checkpoints, metrics."""
    os.makedirs(path / "checkpoints" / "100" / "state")
    (path / "checkpoints" / "100" / "state" / "data.bin").write_bytes(b"weights")
    (path / "config.json").write_text('{"mode": "sft"}')
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    os.makedirs(path / "tensorboard")
    (path / "tensorboard" / "events.out.tfevents.1").write_bytes(b"ev")
    return path


def test_conversion_into_a_directory_we_did_not_write_is_refused(src, tmp_path):
    """hf2orbax SRC <a training workdir> used to delete its checkpoints and metrics (it has a config.json)."""
    workdir = fake_workdir(tmp_path / "run")
    before = tree(workdir)
    proc = run_tool("hf2orbax", src, str(workdir))
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error:") and "was not written by medee_jax" in err and "--overwrite" in err
    assert "checkpoints" in err and "metrics.jsonl" in err
    assert tree(workdir) == before
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no staging directory either

    proc = run_tool("hf2orbax", src, str(workdir), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "removing 4 entries medee_jax did not write: checkpoints, config.json, metrics.jsonl, tensorboard" \
        in proc.stderr
    assert os.path.isdir(workdir / "params") and not os.path.exists(workdir / "checkpoints")


def test_destination_containing_the_source_is_refused_even_with_overwrite(src, tmp_path):
    parent = tmp_path / "models"
    copy = parent / "hf"
    shutil.copytree(src, copy)
    before = tree(parent)
    for extra in ((), ("--overwrite",)):
        proc = run_tool("hf2orbax", str(copy), str(parent), *extra)
        assert proc.returncode == 2 and "contains the source" in proc.stderr, proc.stderr[-2000:]
    assert tree(parent) == before
    orb = tmp_path / "orb"
    orbax_io.hf_to_orbax(str(copy), orb)
    with pytest.raises(hf.DestinationError, match="is the source"):
        orbax_io.orbax_to_hf(orb, orb, overwrite=True)


def test_rewriting_our_own_output_needs_no_flag_but_added_files_do(src, tmp_path):
    orb, back = tmp_path / "orbax", tmp_path / "back"
    run_cli("hf2orbax", src, str(orb))
    run_cli("hf2orbax", src, str(orb))  # ours, unchanged: replaced
    run_cli("orbax2hf", str(orb), str(back))
    assert json.loads((back / ".medee_jax_export.json").read_text())["kind"] == "hf"
    (back / "README.md").write_text("# my model card")
    os.makedirs(back / "eval")
    (back / "eval" / "results.json").write_text("{}")
    proc = run_tool("orbax2hf", str(orb), str(back))
    assert proc.returncode == 2 and "README.md, eval" in proc.stderr and "--overwrite" in proc.stderr
    assert (back / "README.md").read_text() == "# my model card"
    proc = run_tool("orbax2hf", str(orb), str(back), "--overwrite")
    assert proc.returncode == 0 and "removing 2 entries medee_jax did not write: README.md, eval" in proc.stderr
    assert not (back / "README.md").exists()


KILL_SCRIPT = """
import sys, time
from medee_jax.models import hf, orbax_io
real = hf.read_into
def slow(*args, **kwargs):
    real(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(600)
hf.read_into = slow
orbax_io.hf_to_orbax(sys.argv[1], sys.argv[2])
"""


def test_killed_conversion_leaves_no_staging_directory_behind(src, tmp_path):
    """SIGKILL mid-conversion leaves a hidden staging directory; the next conversion to that DST removes it."""
    dst = tmp_path / "orbax"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, src, str(dst)], env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    left = [n for n in os.listdir(tmp_path) if n.startswith(".orbax.staging-")]
    assert len(left) == 1 and not dst.exists()
    run_cli("hf2orbax", src, str(dst))
    assert os.listdir(tmp_path) == ["orbax"]


def test_interrupted_replacement_is_rolled_back(src, tmp_path):
    """Killed between moving the old DST aside and moving the new one in: the next write restores the old one
    first, so the rule (it was ours) still applies to it."""
    import socket

    from medee_jax.models import export_dir

    dst = tmp_path / "orbax"
    orbax_io.hf_to_orbax(src, dst)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # a pid that no longer runs
    stage_root = tmp_path / f".orbax.staging-{socket.gethostname()}-{finished.pid}-abcd1234"
    stage_root.mkdir()
    os.rename(dst, stage_root / "orbax.old")
    assert export_dir.clean_stale_staging(dst) == [str(stage_root)]
    assert sorted(os.listdir(tmp_path)) == ["orbax"] and (dst / "params").is_dir()
