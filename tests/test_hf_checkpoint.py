"""Hugging Face checkpoint import/export against transformers on tiny random checkpoints (fp32, eager).

Import: single file, sharded and in-memory key layouts load identically and equal transformers' tensors; tied
embeddings (lm_head absent, or present and ignored); bf16 loads exactly. Export: transformers loads what we write
and gives our logits; transformers -> ours -> export is bit-identical. Bad input: pickles refused unopened,
missing/unexpected/mis-shaped tensors listed in one error, unknown model_type, hub ids, truncated files, and a
failed export leaves nothing behind. Sharded loading on an 8-device CPU mesh runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import types

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from medee_jax.models import from_pretrained, hf, safetensors_io, save_pretrained
from medee_jax.models.qwen2_5_vl import keys as qwen_keys
from medee_jax.models.sharding import logical_to_mesh
from tests.qwen_reference import (IMAGE_TOKEN, TEXT_VOCAB, assert_logits_close, hf_logits_and_positions, image_span,
                                  pad_rows, random_hf_model, tiny_hf_config)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDECARS = {"tokenizer_config.json": '{"model_max_length": 128}', "chat_template.jinja": "{{ messages }}",
            "preprocessor_config.json": '{"min_pixels": 3136}'}


def read_all(path) -> dict[str, np.ndarray]:
    """Returns every tensor of a checkpoint directory (single or sharded) by stored name."""
    out = {}
    for f in hf.checkpoint_files(str(path)):
        infos, _ = safetensors_io.read_header(f)
        out.update({name: safetensors_io.read_tensor(info) for name, info in infos.items()})
    return out


def rewrite(src_dir, dst_dir, edit):
    """Copies a single-file checkpoint with its tensors dict passed through ``edit`` (safetensors' own writer)."""
    from safetensors.numpy import save_file

    os.makedirs(dst_dir, exist_ok=True)
    shutil.copy(os.path.join(src_dir, "config.json"), dst_dir)
    tensors = edit(read_all(src_dir))
    save_file(tensors, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})
    return str(dst_dir)


def flat_params(model) -> dict[str, np.ndarray]:
    return {path: np.asarray(hf.get_param(model, path)[...]) for _, path, _ in hf.model_params(model)}


def assert_same_params(a, b):
    fa, fb = flat_params(a), flat_params(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


def assert_same_tensors(dir_a, dir_b):
    ta, tb = read_all(dir_a), read_all(dir_b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and np.array_equal(ta[k], tb[k]), k


def batch_with_image(rng):
    grids = np.array([(1, 8, 12)])
    rows = [list(rng.integers(2, TEXT_VOCAB, 5)) + image_span(grids[0]) + list(rng.integers(2, TEXT_VOCAB, 6)),
            list(rng.integers(2, TEXT_VOCAB, 14))]
    ids, mask = pad_rows(rows, "left")
    pixel_values = rng.standard_normal((int(grids.prod(1).sum()), 1176)).astype(np.float32)
    return ids, mask, pixel_values, grids




@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny random checkpoints written by transformers (and rewritten variants), built once for the module."""
    import torch

    root = tmp_path_factory.mktemp("hf_ckpts")
    ns = types.SimpleNamespace(root=root)
    ns.torch_model = random_hf_model(tiny_hf_config(), seed=0)
    ns.single = str(root / "single")
    ns.torch_model.save_pretrained(ns.single)
    for name, text in SIDECARS.items():
        (root / "single" / name).write_text(text)
    ns.sharded = str(root / "sharded")
    ns.torch_model.save_pretrained(ns.sharded, max_shard_size="200KB")
    ns.in_memory = rewrite(ns.single, root / "in_memory", lambda t: {
        ("model.visual." + k[len("visual."):] if k.startswith("visual.") else
         "model.language_model." + k[len("model."):] if k.startswith("model.") else k): v for k, v in t.items()})
    ns.bf16 = str(root / "bf16")
    random_hf_model(tiny_hf_config(), seed=0).to(torch.bfloat16).save_pretrained(ns.bf16)
    ns.torch_tied = random_hf_model(tiny_hf_config(tie_word_embeddings=True), seed=1)
    ns.tied = str(root / "tied")
    ns.torch_tied.save_pretrained(ns.tied)
    rng = np.random.default_rng(5)
    ns.tied_with_head = rewrite(ns.tied, root / "tied_with_head", lambda t: {
        **t, "lm_head.weight": rng.standard_normal(t["model.embed_tokens.weight"].shape).astype(np.float32)})
    return ns


@pytest.fixture(scope="module")
def ours(ckpts):
    return from_pretrained(ckpts.single, dtype=jnp.float32)


# ---- import ----------------------------------------------------------------------------------------------------

def test_single_sharded_and_in_memory_layouts_load_identically(ckpts, ours):
    assert os.path.isfile(os.path.join(ckpts.sharded, "model.safetensors.index.json"))
    assert len(hf.checkpoint_files(ckpts.sharded)) > 1
    assert any(k.startswith("model.language_model.") for k in read_all(ckpts.in_memory))
    assert_same_params(ours, from_pretrained(ckpts.sharded, dtype=jnp.float32))
    assert_same_params(ours, from_pretrained(ckpts.in_memory, dtype=jnp.float32))


def test_params_equal_transformers_tensors(ckpts, ours):
    state = ckpts.torch_model.state_dict()
    seen = set()
    for key, tensor in state.items():
        hit = qwen_keys.match_key(qwen_keys.normalise_key(key))
        assert hit is not None, key
        path, layer, tf = hit
        ours_value = np.asarray(hf.get_param(ours, path)[...])
        ours_value = ours_value if layer is None else ours_value[layer]
        np.testing.assert_array_equal(ours_value, hf.to_ours(tensor.numpy(), tf), err_msg=key)
        seen.add((path, layer))
    assert len(seen) == len(hf.expected_tensors(ours))


def test_tied_embeddings(ckpts):
    assert "lm_head.weight" not in read_all(ckpts.tied)
    model = from_pretrained(ckpts.tied, dtype=jnp.float32)
    assert model.lm_head is None and model.config.tie_word_embeddings
    assert_same_params(model, from_pretrained(ckpts.tied_with_head, dtype=jnp.float32))  # present head ignored
    ids, mask = pad_rows([list(range(2, 12)), list(range(20, 27))], "right")
    ref, _ = hf_logits_and_positions(ckpts.torch_tied, ids, mask)
    assert_logits_close(model(ids, mask), ref, mask)


def test_bf16_checkpoint_loads_exactly(ckpts):
    import torch

    model = from_pretrained(ckpts.bf16, dtype=jnp.bfloat16)
    torch_bf16 = random_hf_model(tiny_hf_config(), seed=0).to(torch.bfloat16).state_dict()
    for key, tensor in torch_bf16.items():
        path, layer, tf = qwen_keys.match_key(qwen_keys.normalise_key(key))
        value = hf.get_param(model, path)[...]
        assert value.dtype == jnp.bfloat16
        value = np.asarray(value if layer is None else value[layer]).astype(np.float32)
        np.testing.assert_array_equal(value, hf.to_ours(tensor.float().numpy(), tf), err_msg=key)
    # and a bf16 file read into fp32 parameters is the exact widening
    wide = from_pretrained(ckpts.bf16, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(wide.language_model.embed_tokens[...]),
                                  np.asarray(model.language_model.embed_tokens[...]).astype(np.float32))


# ---- export ----------------------------------------------------------------------------------------------------

def test_export_loads_in_transformers_with_our_logits(ckpts, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = from_pretrained(ckpts.single, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    for _, path, _ in hf.model_params(model):  # make the weights ours: no tensor equals the source file's
        p = hf.get_param(model, path)
        value = np.asarray(p[...])
        p.set_value(jnp.asarray(value * (1.0 + 0.1 * rng.standard_normal(value.shape, np.float32))))
    out = tmp_path / "export"
    summary = save_pretrained(model, out, max_shard_size="150KB")
    assert len(summary["files"]) > 1 and (out / "model.safetensors.index.json").is_file()
    for name, text in SIDECARS.items():  # tokenizer/processor files follow from the source checkpoint
        assert (out / name).read_text() == text
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["model_type"] == "qwen2_5_vl"

    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask, pixel_values, grids = batch_with_image(np.random.default_rng(2))
    ref, _ = hf_logits_and_positions(reloaded, ids, mask, pixel_values, grids)
    assert_logits_close(model(ids, mask, pixel_values, grids), ref, mask)


def test_export_is_bit_identical(ckpts, ours, tmp_path):
    save_pretrained(ours, tmp_path / "untied")
    assert_same_tensors(ckpts.single, tmp_path / "untied")
    save_pretrained(ours, tmp_path / "untied_sharded", max_shard_size="100KB")
    assert_same_tensors(ckpts.single, tmp_path / "untied_sharded")
    save_pretrained(from_pretrained(ckpts.tied, dtype=jnp.float32), tmp_path / "tied")
    assert_same_tensors(ckpts.tied, tmp_path / "tied")
    save_pretrained(from_pretrained(ckpts.bf16, dtype=jnp.bfloat16), tmp_path / "bf16")
    assert_same_tensors(ckpts.bf16, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


# ---- bad input -------------------------------------------------------------------------------------------------

class _Boom:
    """Unpickling this writes a marker file: proof that nothing was unpickled if the marker is absent."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_checkpoint_refused_unopened(ckpts, tmp_path):
    marker = tmp_path / "unpickled"
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(os.path.join(ckpts.single, "config.json"), bad)
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(hf.CheckpointError, match="never unpickles") as err:
        from_pretrained(bad)
    assert "pytorch_model.bin" in str(err.value)
    assert not marker.exists()


def test_missing_unexpected_and_misshaped_listed_in_one_error(ckpts, tmp_path):
    def edit(t):
        del t["model.norm.weight"]
        del t["visual.blocks.2.mlp.up_proj.bias"]
        t["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
        t["model.layers.7.input_layernorm.weight"] = np.ones(64, np.float32)  # a layer the config lacks
        t["visual.blocks.1.attn.qkv.bias"] = np.zeros(95, np.float32)
        t["model.layers.1.self_attn.o_proj.weight"] = t["model.layers.1.self_attn.o_proj.weight"].T[:, :32].copy()
        return t

    bad = rewrite(ckpts.single, tmp_path / "bad", edit)
    with pytest.raises(hf.CheckpointError) as err:
        from_pretrained(bad)
    msg = str(err.value)
    for name in ("model.norm.weight", "visual.blocks.2.mlp.up_proj.bias", "model.layers.0.mlp.extra.weight",
                 "model.layers.7.input_layernorm.weight", "visual.blocks.1.attn.qkv.bias [95] (expected [96])",
                 "model.layers.1.self_attn.o_proj.weight [64, 32] (expected [64, 64])"):
        assert name in msg, (name, msg)
    assert bad in msg and "missing (2)" in msg and "unexpected (2)" in msg and "wrong shape (2)" in msg


def test_unknown_model_type(ckpts, tmp_path):
    bad = tmp_path / "llava"
    shutil.copytree(ckpts.single, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "llava"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported model_type 'llava'; supported: qwen2_5_vl"):
        from_pretrained(bad)


def test_hub_id_and_truncated_file(ckpts, tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads or runs remote code"):
        from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct")
    bad = tmp_path / "truncated"
    shutil.copytree(ckpts.single, bad)
    path = bad / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(hf.CheckpointError, match="outside the file"):
        from_pretrained(bad)


def test_failed_export_leaves_nothing(ours, tmp_path, monkeypatch):
    real_write = safetensors_io.write_file
    calls = []

    def failing_write(path, entries, fetch, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second shard dies half-way through its data
            entries = list(entries)
            real_write(path, entries[:1], fetch, metadata)
            raise OSError("disk full (injected)")
        return real_write(path, entries, fetch, metadata)

    monkeypatch.setattr(safetensors_io, "write_file", failing_write)
    with pytest.raises(OSError, match="injected"):
        save_pretrained(ours, tmp_path / "new", max_shard_size="100KB")
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)  # no out_dir, no staging directory

    monkeypatch.setattr(safetensors_io, "write_file", real_write)
    good = tmp_path / "good"
    save_pretrained(ours, good)
    before = {n: (good / n).read_bytes() for n in os.listdir(good)}
    calls.clear()
    monkeypatch.setattr(safetensors_io, "write_file", failing_write)
    with pytest.raises(OSError, match="injected"):
        save_pretrained(ours, good, max_shard_size="100KB")
    assert os.listdir(tmp_path) == ["good"]
    assert {n: (good / n).read_bytes() for n in os.listdir(good)} == before  # the good export is untouched

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="was not written by medee_jax"):
        save_pretrained(ours, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_export_replaces_only_what_it_wrote(ckpts, ours, tmp_path, caplog):
    """save_pretrained replaces its own earlier export; a README or eval files added since make it refuse unless
    overwrite=True, which then names what it removes; the source checkpoint (or a folder holding it) never."""
    out = tmp_path / "export"
    save_pretrained(ours, out)
    save_pretrained(ours, out)  # ours and unchanged
    (out / "README.md").write_text("model card")
    (out / "eval_results.json").write_text("{}")
    with pytest.raises(hf.DestinationError, match="README.md") as err:
        save_pretrained(ours, out)
    assert "overwrite=True" in str(err.value) and (out / "README.md").exists()
    with caplog.at_level("WARNING", logger="medee_jax.export"):
        save_pretrained(ours, out, overwrite=True)
    assert "removing 2 entries medee_jax did not write: README.md, eval_results.json" in caplog.text
    assert not (out / "README.md").exists()
    assert_same_tensors(ckpts.single, out)

    transformers_dir = tmp_path / "from_transformers"  # a config.json alone no longer makes a directory ours
    shutil.copytree(ckpts.single, transformers_dir)
    with pytest.raises(hf.DestinationError, match="was not written by medee_jax"):
        save_pretrained(ours, transformers_dir)
    model = from_pretrained(transformers_dir, dtype=jnp.float32)
    for target in (transformers_dir, tmp_path):  # the source itself, a folder holding it
        with pytest.raises(hf.DestinationError, match="the source"):
            save_pretrained(model, target, overwrite=True)
    assert_same_tensors(ckpts.single, transformers_dir)


# ---- sharding ----------------------------------------------------------------------------------------------------

def test_logical_to_mesh_rules():
    mesh = AbstractMesh((1, 4, 2), ("data", "fsdp", "tensor"))
    assert logical_to_mesh(("layers", "embed", "mlp"), (3, 64, 128), mesh) == PartitionSpec(None, "fsdp", "tensor")
    assert logical_to_mesh(("vocab", "embed"), (323, 64), mesh) == PartitionSpec(None, "fsdp")  # 323 % 2 != 0
    assert logical_to_mesh(("norm",), (64,), mesh) == PartitionSpec(None)
    no_tensor = AbstractMesh((8,), ("fsdp",))
    assert logical_to_mesh(("embed", "q_heads"), (64, 64), no_tensor) == PartitionSpec("fsdp", None)
    rules = {"embed": ("data", "fsdp"), "mlp": "fsdp"}  # a mesh axis is used once per array
    assert logical_to_mesh(("embed", "mlp"), (64, 128), AbstractMesh((2, 4), ("data", "fsdp")),
                           rules) == PartitionSpec(("data", "fsdp"), None)
    with pytest.raises(KeyError, match="no sharding rule for logical axis 'bogus'"):
        logical_to_mesh(("bogus",), (4,), mesh)


MESH_SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from medee_jax.models import from_pretrained, save_pretrained, hf
    from medee_jax.models.sharding import param_shardings
    src = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.asarray(jax.devices()).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
    sharded = from_pretrained(src, dtype=jnp.float32, mesh=mesh)
    plain = from_pretrained(src, dtype=jnp.float32)
    expected = {
        "language_model.layers.q_proj_kernel": P(None, "fsdp", "tensor"),
        "language_model.layers.k_proj_bias": P(None, "tensor"),
        "language_model.layers.down_proj_kernel": P(None, "tensor", "fsdp"),
        "language_model.embed_tokens": P("tensor", "fsdp"),
        "language_model.norm": P(None),
        "lm_head": P("fsdp", "tensor"),
        "visual.patch_embed": P(None, "fsdp"),
        "visual.blocks.qkv_kernel": P(None, "fsdp", "tensor"),
        "visual.merger.mlp0_kernel": P("fsdp", "tensor"),
    }
    rules = param_shardings(sharded, mesh)
    for _, path, _ in hf.model_params(sharded):
        a = hf.get_param(sharded, path)[...]
        rule = hf.get_param(rules, path).get_value()
        assert a.sharding.spec == rule.spec, (path, a.sharding.spec, rule.spec)
        if path in expected:
            assert a.sharding.spec == expected[path], (path, a.sharding.spec)
        assert np.array_equal(np.asarray(a), np.asarray(hf.get_param(plain, path)[...])), path
    shard = hf.get_param(sharded, "language_model.layers.q_proj_kernel")[...].addressable_shards[0].data.shape
    with tempfile.TemporaryDirectory() as out:
        save_pretrained(sharded, out + "/x")
        from safetensors.numpy import load_file
        a, b = load_file(src + "/model.safetensors"), load_file(out + "/x/model.safetensors")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    print(json.dumps({"ok": True, "q_shard": list(shard)}))
""")


def test_load_onto_8_device_mesh_in_subprocess(ckpts):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, ckpts.single], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"ok": True, "q_shard": [2, 16, 32]}


def test_error_for_a_config_with_far_too_many_layers_stays_short(ckpts, tmp_path):
    """num_hidden_layers typed with extra zeros: the error lists the first few missing tensors and a count
    (it used to list every one: 528 MB for 10**6 layers)."""
    bad = tmp_path / "many_layers"
    shutil.copytree(ckpts.single, bad)
    config = json.loads((bad / "config.json").read_text())
    text = config.get("text_config", config)
    text["num_hidden_layers"] = 20_000
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.CheckpointError) as err:
        from_pretrained(bad)
    msg = str(err.value)
    missing = (20_000 - 2) * 12  # 12 tensors per decoder layer, 2 layers present
    assert f"missing ({missing}): model.layers.2.input_layernorm.weight" in msg
    assert f"... and {missing - 20} more" in msg and len(msg) < 4000
