"""Record parsing: every accepted format normalizes to the same form; every bad record names file, line, reason."""

import json
import logging
import pickle

import pytest

from medee_jax.data import errors
from medee_jax.data.errors import BadRecordCounter, BadRecordError
from medee_jax.data.formats import (
    Conversation,
    Message,
    PreferencePair,
    RecordRef,
    load_records,
    parse_record,
    read_records,
)


def write_jsonl(path, records):
    lines = [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in records]
    data = b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8") for x in lines) + b"\n"
    path.write_bytes(data)
    return path


@pytest.fixture
def images_dir(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "img" / name).write_bytes(b"not decoded here")
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# Accepted formats


def test_sharegpt_sft_with_system_and_images(images_dir):
    path = write_jsonl(
        images_dir / "train.jsonl",
        [
            {
                "conversations": [
                    {"from": "human", "value": "<image>Compare with <image>. Findings?"},
                    {"from": "gpt", "value": "Both show a nodule."},
                ],
                "system": "You are a radiologist.",
                "images": ["img/a.png", "img/b.png"],
            }
        ],
    )
    (conv,) = load_records(path)
    assert isinstance(conv, Conversation)
    assert conv.messages == (
        Message("system", "You are a radiologist."),
        Message("user", "<image>Compare with <image>. Findings?"),
        Message("assistant", "Both show a nodule."),
    )
    assert conv.images == (str(images_dir / "img" / "a.png"), str(images_dir / "img" / "b.png"))
    assert conv.source == RecordRef(str(path), 1)


def test_openai_messages_multi_turn_text_only(tmp_path):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"},
        ]
    }
    (conv,) = load_records(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert [m.role for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conv.images == ()


def test_media_root_resolves_images(images_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("elsewhere")
    record = {"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "ok"}],
              "images": ["a.png"]}
    path = write_jsonl(data_dir / "d.jsonl", [record])
    (conv,) = load_records(path, media_root=images_dir / "img")
    assert conv.images == (str(images_dir / "img" / "a.png"),)


def test_sharegpt_preference(images_dir):
    record = {
        "conversations": [{"from": "human", "value": "<image>What is it?"}],
        "chosen": {"from": "gpt", "value": "A cyst."},
        "rejected": {"from": "gpt", "value": "A tumour."},
        "images": ["img/a.png"],
    }
    (pair,) = load_records(write_jsonl(images_dir / "p.jsonl", [record]))
    assert isinstance(pair, PreferencePair)
    assert pair.prompt == (Message("user", "<image>What is it?"),)
    assert (pair.chosen, pair.rejected) == ("A cyst.", "A tumour.")
    assert pair.images == (str(images_dir / "img" / "a.png"),)


def test_trl_conversational_preference_image_parts_become_placeholders(images_dir):
    record = {
        "prompt": [
            {"role": "system", "content": "Answer with a letter."},
            {"role": "user", "content": [{"type": "text", "text": "Left:"}, {"type": "image"},
                                         {"type": "text", "text": " right:"}, {"type": "image"},
                                         {"type": "text", "text": " Which is abnormal?"}]},
        ],
        "chosen": [{"role": "assistant", "content": "B"}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A"}]}],
        "images": ["img/a.png", "img/b.png"],
    }
    (pair,) = load_records(write_jsonl(images_dir / "trl.jsonl", [record]))
    assert pair.prompt[1] == Message("user", "Left:<image> right:<image> Which is abnormal?")
    assert (pair.chosen, pair.rejected) == ("B", "A")
    assert len(pair.images) == 2


def test_trl_standard_string_prompt(tmp_path):
    record = {"prompt": "What causes croup?", "chosen": "Parainfluenza virus.", "rejected": "Bacteria."}
    (pair,) = load_records(write_jsonl(tmp_path / "s.jsonl", [record]))
    assert pair.prompt == (Message("user", "What causes croup?"),)


def test_json_array_file_reports_real_line_numbers(tmp_path):
    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    bad = {"messages": [{"role": "doctor", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    path = tmp_path / "d.json"
    path.write_text("[\n" + json.dumps(good, indent=2) + ",\n" + json.dumps(bad) + "\n]\n")
    with pytest.raises(BadRecordError) as info:
        load_records(path)
    assert info.value.line == 2 + json.dumps(good, indent=2).count("\n") + 1
    counter = BadRecordCounter()
    records = load_records(path, on_bad_record="skip", counter=counter)
    assert len(records) == 1 and records[0].source.line == 2
    assert counter.counts == {errors.UNKNOWN_ROLE: 1}


def test_kind_forces_record_type(tmp_path):
    sft = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [sft])
    with pytest.raises(BadRecordError) as info:
        load_records(path, kind="preference")
    assert info.value.reason == errors.UNKNOWN_FORMAT


# ---------------------------------------------------------------------------------------------------------------
# Bad records: one test per kind, each asserting file, line and reason


def expect_bad(path, line, reason, *, contains=None, **kwargs):
    with pytest.raises(BadRecordError) as info:
        load_records(path, **kwargs)
    err = info.value
    assert (err.file, err.line, err.reason) == (str(path), line, reason)
    assert f"{path}:{line}" in str(err) and reason in str(err)
    if contains:
        assert contains in str(err)
    # Skipping drops exactly that record and counts it.
    counter = BadRecordCounter()
    kept = load_records(path, on_bad_record="skip", counter=counter, **kwargs)
    assert counter.counts == {reason: 1}
    return kept


GOOD = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}


def test_bad_malformed_json(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, '{"conversations": [', GOOD])
    kept = expect_bad(path, 2, errors.MALFORMED_JSON, contains="not valid JSON")
    assert [r.source.line for r in kept] == [1, 3]


def test_bad_not_an_object(tmp_path):
    expect_bad(write_jsonl(tmp_path / "d.jsonl", [GOOD, "[1, 2]"]), 2, errors.MALFORMED_JSON,
               contains="expected a JSON object")


def test_bad_placeholder_count(images_dir):
    record = dict(GOOD, images=["img/a.png", "img/b.png"])
    record["conversations"] = [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]
    expect_bad(write_jsonl(images_dir / "d.jsonl", [GOOD, GOOD, record]), 3, errors.PLACEHOLDER_COUNT,
               contains="1 <image> placeholder(s) in the text but 2 image(s)")


def test_bad_placeholder_without_images(tmp_path):
    record = {"conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]}
    expect_bad(write_jsonl(tmp_path / "d.jsonl", [record]), 1, errors.PLACEHOLDER_COUNT)


def test_bad_empty_chosen(tmp_path):
    record = {"prompt": "Q", "chosen": "   ", "rejected": "B"}
    expect_bad(write_jsonl(tmp_path / "d.jsonl", [record]), 1, errors.EMPTY_RESPONSE, contains="'chosen' is empty")


def test_bad_missing_rejected(tmp_path):
    record = {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "A"}}
    expect_bad(write_jsonl(tmp_path / "d.jsonl", [record]), 1, errors.MISSING_RESPONSE,
               contains="'rejected' is missing")


def test_bad_chosen_identical_to_rejected(tmp_path):
    record = {"prompt": [{"role": "user", "content": "Q"}],
              "chosen": [{"role": "assistant", "content": "Same."}],
              "rejected": [{"role": "assistant", "content": "Same. "}]}
    expect_bad(write_jsonl(tmp_path / "d.jsonl", [record]), 1, errors.IDENTICAL_RESPONSES)


def test_bad_unknown_role(tmp_path):
    record = {"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]}
    expect_bad(write_jsonl(tmp_path / "d.jsonl", [record]), 1, errors.UNKNOWN_ROLE, contains="'bot'")


def test_bad_non_utf8_line(tmp_path):
    raw = json.dumps(GOOD).replace('"A"', '"caf\\u00e9"').encode().replace(b"caf\\u00e9", b"caf\xe9")
    kept = expect_bad(write_jsonl(tmp_path / "d.jsonl", [GOOD, raw]), 2, errors.NOT_UTF8, contains="UTF-8")
    assert len(kept) == 1


def test_bad_lone_surrogate_text(tmp_path):
    record = '{"conversations": [{"from": "human", "value": "Q\\ud800"}, {"from": "gpt", "value": "A"}]}'
    expect_bad(write_jsonl(tmp_path / "d.jsonl", [record]), 1, errors.NOT_UTF8)


def test_bad_non_utf8_in_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(
        b'[\n{"messages": [{"role": "user", "content": "Q\xff"}, {"role": "assistant", "content": "A"}]}\n]'
    )
    expect_bad(path, 2, errors.NOT_UTF8)


def test_bad_missing_image(images_dir):
    record = {"conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}],
              "images": ["img/nope.png"]}
    expect_bad(write_jsonl(images_dir / "d.jsonl", [record]), 1, errors.MISSING_IMAGE,
               contains=str(images_dir / "img" / "nope.png"))


def test_bad_image_in_response(images_dir):
    record = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "<image>A"}],
              "images": ["img/a.png"]}
    expect_bad(write_jsonl(images_dir / "d.jsonl", [record]), 1, errors.IMAGE_IN_RESPONSE)


def test_bad_turn_order(tmp_path):
    record = {"conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "Q2"},
                                {"from": "gpt", "value": "A"}]}
    expect_bad(write_jsonl(tmp_path / "d.jsonl", [record]), 1, errors.BAD_TURN_ORDER)


def test_bad_unknown_format(tmp_path):
    expect_bad(write_jsonl(tmp_path / "d.jsonl", [{"question": "Q", "answer": "A"}]), 1, errors.UNKNOWN_FORMAT)


# ---------------------------------------------------------------------------------------------------------------
# Skipping: counted by reason, summarised, logged


def test_skip_counts_by_reason_and_logs_summary(images_dir, caplog):
    bad_role = {"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]}
    same = {"prompt": "Q", "chosen": "X", "rejected": "X"}
    path = write_jsonl(images_dir / "mixed.jsonl", [GOOD, "{oops", bad_role, "{oops", same, GOOD])
    counter = BadRecordCounter()
    with caplog.at_level(logging.WARNING, logger="medee_jax.data"):
        kept = list(read_records(path, on_bad_record="skip", counter=counter))
    assert [r.source.line for r in kept] == [1, 6]
    assert counter.counts == {errors.MALFORMED_JSON: 2, errors.UNKNOWN_ROLE: 1, errors.IDENTICAL_RESPONSES: 1}
    assert counter.total == 4
    summary = counter.summary()
    assert summary.startswith("skipped 4 bad record(s)")
    assert "malformed_json: 2" in summary and f"{path}:2" in summary
    assert any("skipped 4 bad record(s)" in r.getMessage() for r in caplog.records)
    assert any(f"{path}:3" in r.getMessage() for r in caplog.records)


def test_bad_record_error_location_and_pickle():
    err = BadRecordError(None, None, errors.CORRUPT_IMAGE, "cannot decode image", image="/x/a.png")
    assert "<unknown file>" in str(err)
    located = err.at("data.jsonl", 7)
    assert str(located) == "data.jsonl:7: bad record (corrupt_image): cannot decode image [image: /x/a.png]"
    again = pickle.loads(pickle.dumps(located))
    assert (again.file, again.line, again.reason, again.image) == ("data.jsonl", 7, "corrupt_image", "/x/a.png")


def test_parse_record_directly():
    record = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    conv = parse_record(record, RecordRef("mem.jsonl", 3))
    assert conv.source.line == 3 and conv.messages[-1] == Message("assistant", "A")


def test_broken_json_array_stops_even_when_skipping(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n{\"conversations\": [\n]")
    with pytest.raises(BadRecordError, match=r"d.json:4: bad record \(malformed_json\)"):
        load_records(path, on_bad_record="skip")
