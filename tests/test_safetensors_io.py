"""safetensors headers are checked as the safetensors library checks them (contiguous, non-overlapping offsets
covering the data block exactly), and an index's shard names cannot lead outside the checkpoint folder."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from medee_jax.models import hf, safetensors_io


def write_raw(path, header: dict, data: bytes) -> str:
    """Writes a safetensors file with exactly this header and data block (no checks: hostile files too)."""
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


def entry(begin, end, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


def test_well_formed_file_reads_and_matches_safetensors(tmp_path):
    from safetensors.numpy import save_file

    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(0, np.float32),
               "c": np.ones(4, np.float32)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    infos, _ = safetensors_io.read_header(str(tmp_path / "x.safetensors"))
    for name, value in tensors.items():
        np.testing.assert_array_equal(safetensors_io.read_tensor(infos[name]), value)


@pytest.mark.parametrize("case, header, data_bytes, match", [
    ("overlap", {"a": entry(0, 8), "b": entry(0, 8)}, 8, "overlap"),
    ("gap", {"a": entry(0, 8), "b": entry(16, 24)}, 24, "not contiguous"),
    ("not from zero", {"a": entry(8, 16)}, 16, "not contiguous"),
    ("trailing bytes", {"a": entry(0, 8)}, 16, "8 bytes after the last tensor"),
    ("past the end", {"a": entry(0, 8), "b": entry(8, 16)}, 12, "outside the file"),
    ("reversed", {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, 8, "outside the file"),
])
def test_bad_offsets_are_refused_like_the_safetensors_library(tmp_path, case, header, data_bytes, match):
    path = write_raw(tmp_path / "bad.safetensors", header, bytes(data_bytes))
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    with pytest.raises(SafetensorError):  # the reference library refuses each of these files
        load_file(path)
    with pytest.raises(ValueError, match=match) as err:
        safetensors_io.read_header(path)
    assert path in str(err.value)


def shard_dir(tmp_path, names: list[str]):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {f"t{i}": n for i, n in enumerate(names)}}))
    return ckpt


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors"])
def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path, name):
    write_raw(tmp_path / "outside.safetensors", {"t0": entry(0, 8)}, bytes(8))
    ckpt = shard_dir(tmp_path, [name])
    with pytest.raises(hf.CheckpointError, match="outside the checkpoint folder") as err:
        hf.checkpoint_files(str(ckpt))
    assert name in str(err.value)


def test_index_naming_an_absolute_path_is_refused(tmp_path):
    outside = write_raw(tmp_path / "outside.safetensors", {"t0": entry(0, 8)}, bytes(8))
    ckpt = shard_dir(tmp_path, [outside])
    with pytest.raises(hf.CheckpointError, match="outside the checkpoint folder"):
        hf.checkpoint_files(str(ckpt))


def test_shard_symlinked_out_of_the_folder_is_refused(tmp_path):
    write_raw(tmp_path / "outside.safetensors", {"t0": entry(0, 8)}, bytes(8))
    ckpt = shard_dir(tmp_path, ["model-00001-of-00001.safetensors"])
    os.symlink(tmp_path / "outside.safetensors", ckpt / "model-00001-of-00001.safetensors")
    with pytest.raises(hf.CheckpointError, match="symlink"):
        hf.checkpoint_files(str(ckpt))
    (ckpt / "sub").symlink_to(tmp_path)  # a directory link: the name looks inside, the file is not
    index = ckpt / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"t0": "sub/outside.safetensors"}}))
    with pytest.raises(hf.CheckpointError, match="outside the checkpoint folder|symlink"):
        hf.checkpoint_files(str(ckpt))


def test_hub_cache_layout_with_blob_symlinks_is_accepted(tmp_path):
    """huggingface_hub's cache links snapshots/<rev>/<file> to ../../blobs/<sha>: that stays allowed."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    write_raw(repo / "blobs" / "sha1", {"t0": entry(0, 8)}, bytes(8))
    (snap / "model-00001-of-00001.safetensors").symlink_to("../../blobs/sha1")
    (snap / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"t0": "model-00001-of-00001.safetensors"}}))
    files = hf.checkpoint_files(str(snap))
    assert files == [str(snap / "model-00001-of-00001.safetensors")]
