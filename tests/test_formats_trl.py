"""TRL dataset types: image placement, prompt-completion targets, implicit prompts, plain (standard) records."""

import numpy as np
import pytest

from medee_jax.data import errors
from medee_jax.data.errors import BadRecordError
from medee_jax.data.formats import Conversation, Message, PreferencePair, RecordRef, parse_record
from medee_jax.data.formats_trl import insert_image_parts, split_implicit_prompt
from medee_jax.data.tokenize import tokenize_record

SRC = RecordRef("trl.jsonl", 3)


def parse(record, **kwargs):
    kwargs.setdefault("check_images", False)
    return parse_record(record, SRC, base_dir="/data", **kwargs)


def bad(record, reason, contains=None, **kwargs):
    with pytest.raises(BadRecordError) as info:
        parse(record, **kwargs)
    assert (info.value.file, info.value.line, info.value.reason) == ("trl.jsonl", 3, reason)
    assert str(info.value).startswith(f"trl.jsonl:3: bad record ({reason})")
    if contains:
        assert contains in str(info.value)
    return info.value


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


# ---------------------------------------------------------------------------------------------------------------
# TRL's image placement (prepare_multimodal_messages)


def test_insert_image_parts_goes_to_the_first_string_user_message_only():
    messages = [{"role": "system", "content": "Be brief."}, user("Q1"), assistant("A1"), user("Q2")]
    out = insert_image_parts(messages, 2)
    assert out[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q1"}]
    assert out[0] == messages[0] and out[2:] == messages[2:]
    assert messages[1]["content"] == "Q1"  # the input is not changed


def test_insert_image_parts_skips_user_messages_that_are_already_parts():
    messages = [user([{"type": "text", "text": "Q1"}]), assistant("A1"), user("Q2")]
    assert insert_image_parts(messages, 1)[2]["content"] == [{"type": "image"}, {"type": "text", "text": "Q2"}]


def test_string_contents_plus_images_equal_the_parts_list_form():
    images = ["a.png", "b.png"]
    strings = {"prompt": [{"role": "system", "content": "S"}, user("Which is abnormal?")],
               "chosen": [assistant("B")], "rejected": [assistant("A")], "images": images}
    parts = {"prompt": [{"role": "system", "content": "S"},
                        user([{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which is abnormal?"}])],
             "chosen": [assistant("B")], "rejected": [assistant("A")], "images": images}
    sharegpt = {"conversations": [{"from": "human", "value": "<image><image>Which is abnormal?"}],
                "system": "S", "chosen": {"from": "gpt", "value": "B"}, "rejected": {"from": "gpt", "value": "A"},
                "images": images}
    a, b, c = parse(strings), parse(parts), parse(sharegpt)
    assert a == b == c
    assert a.prompt[1] == Message("user", "<image><image>Which is abnormal?")
    assert a.images == ("/data/a.png", "/data/b.png")
    assert parse(strings, record_format="trl") == a


def test_multi_turn_sft_images_go_to_the_first_user_turn():
    record = {"messages": [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")], "image": "a.png"}
    conv = parse(record)
    assert [m.text for m in conv.messages] == ["<image>Q1", "A1", "Q2", "A2"]
    assert conv.images == ("/data/a.png",) and conv.target_from == 0


def test_image_part_count_must_match_the_images():
    record = {"messages": [user([{"type": "image"}, {"type": "text", "text": "Q"}]), user("again"), assistant("A")],
              "images": ["a.png"]}
    # TRL inserts one part into the string user turn as well: 2 parts for 1 image (TRL raises the same way).
    bad(record, errors.PLACEHOLDER_COUNT, "2 image part(s) in the messages but 1 image(s)")


def test_strict_trl_refuses_llama_factory_placeholders_auto_takes_them():
    record = {"messages": [user("<image>Q"), assistant("A")], "images": ["a.png"]}
    assert parse(record).messages[0] == Message("user", "<image>Q")
    bad(record, errors.PLACEHOLDER_COUNT, "TRL reads as plain text", record_format="trl")


def test_image_parts_in_answers_and_parts_with_their_own_image():
    bad({"prompt": [user("Q")], "chosen": [assistant([{"type": "image"}])], "rejected": [assistant("A")],
         "images": []}, errors.IMAGE_IN_RESPONSE)
    bad({"messages": [user([{"type": "image", "image": "x.png"}]), assistant("A")], "images": []},
        errors.BAD_FIELD, "carries its own image")


# ---------------------------------------------------------------------------------------------------------------
# Dataset types


def test_prompt_completion_conversational_trains_the_completion_only(chat_tokenizer):
    record = {"prompt": [user("Q1"), assistant("A1"), user("Q2")], "completion": [assistant("A2")]}
    conv = parse(record)
    assert isinstance(conv, Conversation) and conv.target_from == 3
    assert [m.text for m in conv.messages] == ["Q1", "A1", "Q2", "A2"]
    out = tokenize_record(conv, chat_tokenizer)
    targets = chat_tokenizer.tokenizer.decode(out["input_ids"][out["target_mask"] == 1])
    assert targets == "A2<|im_end|>\n"
    whole = tokenize_record(Conversation(conv.messages, (), SRC), chat_tokenizer)  # every assistant turn
    np.testing.assert_array_equal(whole["input_ids"], out["input_ids"])
    assert chat_tokenizer.tokenizer.decode(whole["input_ids"][whole["target_mask"] == 1]) == \
        "A1<|im_end|>\nA2<|im_end|>\n"


def test_implicit_prompt_conversational_splits_at_the_longest_common_prefix():
    shared = [{"role": "system", "content": "S"}, user("Q1"), assistant("A1"), user("Q2")]
    record = {"chosen": shared + [assistant("right")], "rejected": shared + [assistant("wrong")],
              "images": ["a.png"]}
    pair = parse(record)
    assert isinstance(pair, PreferencePair)
    assert [m.text for m in pair.prompt] == ["S", "<image>Q1", "A1", "Q2"]
    assert (pair.chosen, pair.rejected) == ("right", "wrong")
    explicit = {"prompt": shared, "chosen": [assistant("right")], "rejected": [assistant("wrong")],
                "images": ["a.png"]}
    assert parse(explicit) == pair


def test_split_implicit_prompt_follows_trl_extract_prompt():
    # Strings: the space before the first difference goes to the answers.
    assert split_implicit_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    assert split_implicit_prompt("ab", "ac") == ("a", "b", "c")
    # No difference before the shorter one ends: TRL's loop leaves the split before its last element.
    assert split_implicit_prompt("abc", "abcd") == ("ab", "c", "cd")
    assert split_implicit_prompt([1, 2], [1, 3]) == ([1], [2], [3])
    assert split_implicit_prompt("", "x") is None


def test_standard_forms_are_plain_text(chat_tokenizer):
    hf = chat_tokenizer.tokenizer
    eos = hf.eos_token
    lm = parse({"text": "The chest radiograph is clear."})
    assert lm == Conversation((Message("assistant", "The chest radiograph is clear."),), (), SRC, plain=True)
    out = tokenize_record(lm, chat_tokenizer)
    assert out["input_ids"].tolist() == hf("The chest radiograph is clear." + eos)["input_ids"]
    assert out["target_mask"].all()

    pc = parse({"prompt": "The chest radiograph", "completion": " is clear."})
    assert pc.plain and pc.messages == (Message("user", "The chest radiograph"), Message("assistant", " is clear."))
    out = tokenize_record(pc, chat_tokenizer)
    full = hf("The chest radiograph is clear." + eos)["input_ids"]
    prompt = hf("The chest radiograph")["input_ids"]
    assert out["input_ids"].tolist() == full
    assert out["target_mask"].tolist() == [0] * len(prompt) + [1] * (len(full) - len(prompt))

    pair = parse({"prompt": "Croup is caused by", "chosen": " a virus.", "rejected": " bacteria."})
    assert pair.plain and pair.prompt == (Message("user", "Croup is caused by"),)
    out = tokenize_record(pair, chat_tokenizer)
    for side, answer in (("chosen", " a virus."), ("rejected", " bacteria.")):
        assert out[f"{side}_input_ids"].tolist() == hf("Croup is caused by" + answer + eos)["input_ids"]
    implicit = parse({"chosen": "Croup is caused by a virus.", "rejected": "Croup is caused by bacteria."})
    assert implicit == pair


def test_plain_text_already_ending_with_eos_gets_no_second_one(chat_tokenizer):
    eos = chat_tokenizer.tokenizer.eos_token
    a = tokenize_record(parse({"text": "Clear." + eos}), chat_tokenizer)
    b = tokenize_record(parse({"text": "Clear."}), chat_tokenizer)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_record_kinds_and_unsupported_types():
    bad({"prompt": [user("Q")]}, errors.UNKNOWN_FORMAT, "prompt-only", kind="sft")
    bad({"prompt": "Q", "completion": "A", "label": True}, errors.UNKNOWN_FORMAT, "unpaired")
    bad({"text": "x"}, errors.UNKNOWN_FORMAT, "expected a preference record", kind="preference")
    bad({"prompt": "Q", "chosen": [assistant("A")], "rejected": [assistant("B")]}, errors.BAD_FIELD, "mix strings")
    bad({"prompt": "<image>Q", "chosen": "A", "rejected": "B", "images": ["a.png"]}, errors.BAD_FIELD,
        "no chat template")
    bad({"messages": "Q"}, errors.BAD_FIELD, "must be a list")
    bad({"chosen": [user("Q"), assistant("A")], "rejected": [user("P"), assistant("B")]}, errors.EMPTY_MESSAGE,
        "share no prompt")
    bad({"chosen": "same", "rejected": "same"}, errors.IDENTICAL_RESPONSES)
    bad({"messages": [user("Q")], "chosen": [assistant("A")], "rejected": [assistant("B")]},
        errors.UNKNOWN_FORMAT, "LLaMA-Factory", record_format="trl")


def test_conversational_prompt_with_string_answers():
    pair = parse({"prompt": [user("Q")], "chosen": "A", "rejected": [assistant("B")]})
    assert (pair.chosen, pair.rejected, pair.plain) == ("A", "B", False)


def test_records_pickle_with_their_new_fields():
    import pickle

    conv = parse({"prompt": [user("Q1"), assistant("A1"), user("Q2")], "completion": [assistant("A2")]})
    again = pickle.loads(pickle.dumps(conv))
    assert again == conv and again.target_from == 3
