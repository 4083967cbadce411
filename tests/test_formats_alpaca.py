"""LLaMA-Factory alpaca records and dataset_info.json entries (columns, tags, ranking, file_name)."""

import json

import pytest

from medee_jax.data import errors
from medee_jax.data.dataset_files import open_dataset
from medee_jax.data.dataset_info import load_entry, spec_exists, split_spec
from medee_jax.data.errors import BadRecordError
from medee_jax.data.formats import Message, RecordRef, load_records, parse_record

SRC = RecordRef("alpaca.json", 2)


def parse(record, **kwargs):
    return parse_record(record, SRC, base_dir="/data", check_images=False, **kwargs)


def test_alpaca_sft_with_history_system_and_images():
    record = {"instruction": "<image>Describe the film.", "input": "Adult, cough.",
              "output": "Right lower lobe opacity.", "system": "You are a radiologist.", "history": [["Hello", "Hi."]],
              "images": ["a.png"]}
    conv = parse(record)
    assert conv.messages == (
        Message("system", "You are a radiologist."), Message("user", "Hello"), Message("assistant", "Hi."),
        Message("user", "<image>Describe the film.\nAdult, cough."), Message("assistant", "Right lower lobe opacity."),
    )
    assert conv.images == ("/data/a.png",)
    sharegpt = {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi."},
                                  {"from": "human", "value": "<image>Describe the film.\nAdult, cough."},
                                  {"from": "gpt", "value": "Right lower lobe opacity."}],
                "system": "You are a radiologist.", "images": ["a.png"]}
    assert parse(sharegpt) == conv
    assert parse(record, record_format="alpaca") == conv


def test_alpaca_empty_input_is_left_out_and_preference_form():
    pair = parse({"instruction": "<image>Which lobe?", "input": "", "chosen": "Right lower.", "rejected": "Left upper.",
                  "images": ["a.png"]})
    assert pair.prompt == (Message("user", "<image>Which lobe?"),)
    assert (pair.chosen, pair.rejected) == ("Right lower.", "Left upper.")


def test_alpaca_bad_records_name_the_reason():
    for record, reason, text in [
        ({"instruction": "Q"}, errors.MISSING_RESPONSE, "'output' is missing"),
        ({"instruction": "Q", "output": "A", "history": "x"}, errors.BAD_FIELD, "'history' must be a list"),
        ({"instruction": "Q", "output": "A", "history": [["only one"]]}, errors.BAD_FIELD, "entry 0"),
        ({"instruction": "<image>Q", "output": "A"}, errors.PLACEHOLDER_COUNT, "1 <image> placeholder(s)"),
        ({"instruction": "Q", "chosen": "A"}, errors.MISSING_RESPONSE, "'rejected' is missing"),
    ]:
        with pytest.raises(BadRecordError) as info:
            parse(record)
        assert info.value.reason == reason and text in str(info.value), (record, str(info.value))
        assert str(info.value).startswith("alpaca.json:2: bad record")


# ---------------------------------------------------------------------------------------------------------------
# dataset_info.json entries


def write(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.fixture
def lf_dir(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"x")
    write(tmp_path / "pairs.json", [
        {"dialog": [{"speaker": "doctor", "text": "Case notes."}, {"speaker": "patient", "text": "<image>Which lobe?"}],
         "better": {"speaker": "model", "text": "Right lower."}, "worse": {"speaker": "model", "text": "Left upper."},
         "pictures": ["img/a.png"]},
    ])
    write(tmp_path / "sft.json", [{"q": "<image>Describe.", "a": "Clear.", "sys": "Be brief.", "pics": ["img/a.png"]}])
    write(tmp_path / "dataset_info.json", {
        "my_med_pairs": {"file_name": "pairs.json", "formatting": "sharegpt", "ranking": True,
                         "columns": {"messages": "dialog", "chosen": "better", "rejected": "worse",
                                     "images": "pictures"},
                         "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "patient",
                                  "assistant_tag": "model", "system_tag": "doctor"}},
        "my_sft": {"file_name": "sft.json", "columns": {"prompt": "q", "response": "a", "system": "sys",
                                                         "images": "pics"}},
        "hub": {"hf_hub_url": "someone/data"},
        "sampled": {"file_name": "sft.json", "num_samples": 10},
    })
    return tmp_path


def read(spec, mode):
    source, record_format = open_dataset([spec], mode=mode)
    return [parse_record(source[i].data, RecordRef(source[i].file, source[i].line), record_format=record_format)
            for i in range(len(source))]


def test_sharegpt_entry_maps_columns_and_tags(lf_dir):
    spec = f"{lf_dir}/dataset_info.json:my_med_pairs"
    assert split_spec(spec) == (f"{lf_dir}/dataset_info.json", "my_med_pairs") and spec_exists(spec)
    (pair,) = read(spec, "dpo")
    assert pair.prompt == (Message("system", "Case notes."), Message("user", "<image>Which lobe?"))
    assert (pair.chosen, pair.rejected) == ("Right lower.", "Left upper.")
    assert pair.images == (str(lf_dir / "img" / "a.png"),)


def test_alpaca_entry_columns(lf_dir):
    (conv,) = read(f"{lf_dir}/dataset_info.json:my_sft", "sft")
    assert conv.messages == (Message("system", "Be brief."), Message("user", "<image>Describe."),
                             Message("assistant", "Clear."))
    assert conv.images == (str(lf_dir / "img" / "a.png"),)


def test_entry_without_columns_reads_no_images_like_llama_factory(lf_dir):
    write(lf_dir / "plain.json", [{"instruction": "Q", "input": "", "output": "A", "system": "S", "images": ["x"]}])
    write(lf_dir / "dataset_info.json", {"plain": {"file_name": "plain.json"}})
    _, fmt = load_entry(f"{lf_dir}/dataset_info.json:plain")
    assert (fmt.column("prompt"), fmt.column("system"), fmt.column("images")) == ("instruction", None, None)
    (conv,) = read(f"{lf_dir}/dataset_info.json:plain", "sft")  # no system, no images (no such columns)
    assert conv.messages == (Message("user", "Q"), Message("assistant", "A")) and conv.images == ()


def test_entry_errors_are_clear(lf_dir):
    info = f"{lf_dir}/dataset_info.json"
    for spec, mode, text in [
        (f"{info}:nope", "sft", "no entry 'nope'"),
        (f"{info}:hub", "sft", "nothing is downloaded"),
        (f"{info}:sampled", "sft", "num_samples"),
        (f"{info}:my_med_pairs", "sft", "SFT needs an SFT set"),
        (f"{info}:my_sft", "dpo", "DPO needs a preference set"),
    ]:
        with pytest.raises(ValueError, match=text):
            open_dataset([spec], mode=mode)


def test_entry_tags_unknown_role_and_tool_turns(lf_dir):
    write(lf_dir / "pairs.json", [
        {"dialog": [{"speaker": "tool", "text": "x"}], "better": {"speaker": "model", "text": "A"},
         "worse": {"speaker": "model", "text": "B"}},
    ])
    with pytest.raises(BadRecordError) as info:
        read(f"{lf_dir}/dataset_info.json:my_med_pairs", "dpo")
    assert info.value.reason == errors.UNKNOWN_ROLE and "'patient' or 'model'" in str(info.value)
    assert str(info.value).startswith(f"{lf_dir}/pairs.json:1: bad record (unknown_role)")


def test_auto_detects_alpaca_in_a_jsonl_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "Q", "output": "A"}) + "\n")
    (conv,) = load_records(path)
    assert conv.messages == (Message("user", "Q"), Message("assistant", "A"))
