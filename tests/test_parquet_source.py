"""Hugging Face datasets as they ship: Parquet shards with embedded images, save_to_disk Arrow folders."""

import io
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medee_jax.data import errors
from medee_jax.data.dataset_files import expand_paths, open_dataset
from medee_jax.data.embedded_images import EmbeddedImage
from medee_jax.data.errors import BadRecordError
from medee_jax.data.images import load_image
from medee_jax.data.parquet_source import ArrowSource, ParquetSource
from medee_jax.data.pipeline import make_iterator
from tests.format_helpers import (HF_FIXTURES, TRL_FIXTURES, assert_batches_equal, data_config,
                                  demo_model_config, read_jsonl)

SHARDS = HF_FIXTURES / "pairs_parquet"


@pytest.fixture(scope="module")
def model_config(chat_tokenizer):
    return demo_model_config(chat_tokenizer)


def png_bytes(size, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def message(role, text):
    return [{"role": role, "content": text}]


def write_pairs_parquet(path, n, *, row_group_size=2, bad_image_row=None, drop=()):
    """n TRL preference rows with one embedded image each (written with pyarrow, as `datasets` lays them out)."""
    rows = []
    for i in range(n):
        data = b"not an image at all" if i == bad_image_row else png_bytes((56 + 28 * (i % 3), 56), i)
        rows.append({"prompt": message("user", f"Case {i}: what is shown?"),
                     "chosen": message("assistant", f"finding {i} in the right lung"),
                     "rejected": message("assistant", f"no finding {i}"),
                     "images": [{"bytes": data, "path": f"case{i}.png"}]})
    table = pa.Table.from_pylist(rows)
    table = table.drop_columns(list(drop))
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_source_rows_files_and_row_groups():
    files = expand_paths(SHARDS)
    assert [f.rsplit("/", 1)[1] for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    source = ParquetSource(files)
    assert len(source) == 5 and source.column_names == ["prompt", "chosen", "rejected", "images"]
    expected = read_jsonl(TRL_FIXTURES / "dpo_vision.jsonl")
    locations = []
    for i in range(len(source)):
        raw = source[i]
        locations.append((raw.file.rsplit("/", 1)[1][6:11], raw.line))
        for key in ("prompt", "chosen", "rejected"):
            assert raw.data[key] == expected[i][key]
        stored = [(TRL_FIXTURES / p).read_bytes() for p in expected[i]["images"]]
        assert [im["bytes"] for im in raw.data["images"]] == stored
    assert locations == [("00000", 1), ("00000", 2), ("00000", 3), ("00001", 1), ("00001", 2)]
    assert source[-1] == source[4]
    clone = pickle.loads(pickle.dumps(source))  # no open files travel; the clone reopens them
    assert clone[3] == source[3] and clone[0] == source[0]
    with pytest.raises(IndexError):
        source[5]


def test_save_to_disk_folder_reads_the_same_rows():
    arrow, fmt = open_dataset([HF_FIXTURES / "pairs_saved"], mode="dpo")
    parquet, _ = open_dataset([SHARDS], mode="dpo")
    assert isinstance(arrow, ArrowSource) and fmt == "auto" and len(arrow) == len(parquet)
    assert [arrow[i].data for i in range(len(arrow))] == [parquet[i].data for i in range(len(parquet))]
    assert pickle.loads(pickle.dumps(arrow))[2].data == arrow[2].data


def test_parquet_pipeline_equals_jsonl_with_image_files(demo_tokenizer_dir, model_config):
    """Embedded bytes and image files give the same batches (tokens, masks, pixels, layout)."""
    runs = []
    for paths in ([str(TRL_FIXTURES / "dpo_vision.jsonl")], [str(SHARDS)], [str(SHARDS / "train-*.parquet")],
                  [str(HF_FIXTURES / "pairs_saved")]):
        runs.append(list(make_iterator(data_config(paths, demo_tokenizer_dir, "dpo"), model_config)))
    for run in runs[1:]:
        assert_batches_equal(runs[0], run)
    assert sum(int(b["pixel_values"].shape[0] > 0) for b in runs[0]) == 3


def test_embedded_image_gets_the_image_checks():
    good = EmbeddedImage("d.parquet:3 image 0 (a.png)", png_bytes((30, 20), 0))
    assert load_image(good).size == (30, 20)
    for data, reason in ((b"", errors.EMPTY_IMAGE), (b"garbage", errors.CORRUPT_IMAGE),
                         (png_bytes((30, 20), 0)[:60], errors.TRUNCATED_IMAGE)):
        with pytest.raises(BadRecordError) as info:
            load_image(EmbeddedImage("d.parquet:3 image 0 (a.png)", data))
        assert info.value.reason == reason and "d.parquet:3 image 0 (a.png)" in str(info.value)
    with pytest.raises(BadRecordError) as info:
        load_image(good, max_pixels=100)
    assert info.value.reason == errors.DECOMPRESSION_BOMB


def test_corrupt_embedded_image_is_a_located_bad_record(tmp_path, demo_tokenizer_dir, model_config):
    path = write_pairs_parquet(tmp_path / "pairs.parquet", 6, bad_image_row=4)
    config = data_config([str(path)], demo_tokenizer_dir, "dpo")
    with pytest.raises(BadRecordError) as info:
        list(make_iterator(config, model_config))
    assert info.value.reason == errors.CORRUPT_IMAGE
    assert str(info.value).startswith(f"{path}:5: bad record (corrupt_image)") and "case4.png" in str(info.value)
    it = make_iterator(config.with_updates(on_bad_record="skip"), model_config)
    batches = list(it)
    assert sum(b["pair_mask"].sum() for b in batches) == 5 and it.stats()["skipped"] == {errors.CORRUPT_IMAGE: 1}


def test_missing_column_fails_before_reading(tmp_path, demo_tokenizer_dir, model_config):
    path = write_pairs_parquet(tmp_path / "pairs.parquet", 3, drop=["rejected"])
    with pytest.raises(ValueError, match=r"pairs.parquet: no column 'rejected' for preference data \(columns: "
                                         r"prompt, chosen, images\)"):
        make_iterator(data_config([str(path)], demo_tokenizer_dir, "dpo"), model_config)
    with pytest.raises(ValueError, match="holds conversations"):
        pq.write_table(pa.table({"x": [1]}), tmp_path / "x.parquet")
        open_dataset([tmp_path / "x.parquet"], mode="sft")


def test_unreadable_or_mismatched_files_are_named(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(ValueError, match="bad.parquet: not a readable Parquet file"):
        ParquetSource([tmp_path / "bad.parquet"])
    write_pairs_parquet(tmp_path / "a.parquet", 2)
    write_pairs_parquet(tmp_path / "b.parquet", 2, drop=["images"])
    with pytest.raises(ValueError, match="b.parquet: its columns"):
        ParquetSource([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    (tmp_path / "x.arrow").write_bytes(b"nope")
    with pytest.raises(ValueError, match="x.arrow: not a readable Arrow file"):
        ArrowSource(tmp_path / "x.arrow")


def test_folder_of_several_splits_is_refused(tmp_path):
    for name in ("train-00000-of-00001.parquet", "test-00000-of-00001.parquet"):
        write_pairs_parquet(tmp_path / name, 2)
    with pytest.raises(ValueError, match="holds the splits test, train"):
        open_dataset([tmp_path], mode="dpo")
    source, _ = open_dataset([tmp_path / "train-*.parquet"], mode="dpo")
    assert len(source) == 2


def test_resume_mid_shard_gives_the_same_batches(tmp_path, demo_tokenizer_dir, model_config):
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(2):
        write_pairs_parquet(folder / f"train-{k:05d}-of-00002.parquet", 7, row_group_size=3)
    config = data_config([str(folder)], demo_tokenizer_dir, "dpo", shuffle=True, num_epochs=2)
    it = make_iterator(config, model_config)
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = list(it)
    resumed = make_iterator(config, model_config, state=state)
    assert_batches_equal(rest, list(resumed))
    assert len(rest) >= 4
