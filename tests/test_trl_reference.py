"""Our reading of TRL datasets against TRL 1.16 itself, through fixtures made by TRL's own code
(tests/fixtures/make_reference_fixtures.py): the vision DPO collator, and DPO/SFT dataset preparation."""

import json

import numpy as np
import pytest

from tests.format_helpers import MAX_PIXELS, MIN_PIXELS, TRL_FIXTURES, read_jsonl
from medee_jax.data.formats import RecordRef, parse_record
from medee_jax.data.images import qwen2_vl_preprocess
from medee_jax.data.tokenize import tokenize_record


def parse(record, i, name, record_format="auto"):
    return parse_record(record, RecordRef(str(TRL_FIXTURES / name), i + 1), record_format=record_format)


@pytest.mark.parametrize("record_format", ["auto", "trl"])
def test_vision_pairs_match_trl_collator(chat_tokenizer, record_format):
    """Plain-string contents + `images`: same tokens, completion masks, pixels and grids as TRL's collator."""
    expected = np.load(TRL_FIXTURES / "dpo_vision.npz")
    records = read_jsonl(TRL_FIXTURES / "dpo_vision.jsonl")
    tokens_per_pair = []
    for i, record in enumerate(records):
        pair = parse(record, i, "dpo_vision.jsonl", record_format)
        pixels, grid = qwen2_vl_preprocess(list(pair.images), MIN_PIXELS, MAX_PIXELS)
        np.testing.assert_array_equal(grid, expected[f"{i}_image_grid_thw"])
        np.testing.assert_allclose(pixels, expected[f"{i}_pixel_values"], rtol=0, atol=1e-6)
        out = tokenize_record(pair, chat_tokenizer, grid)
        for side in ("chosen", "rejected"):
            np.testing.assert_array_equal(out[f"{side}_input_ids"], expected[f"{i}_{side}_input_ids"])
            np.testing.assert_array_equal(out[f"{side}_target_mask"], expected[f"{i}_{side}_completion_mask"])
        tokens_per_pair.append(int((out["chosen_input_ids"] == chat_tokenizer.image_token_id).sum()))
    assert len(set(tokens_per_pair)) > 2  # the sizes differ: the comparison covers several resize outcomes


def test_text_pairs_match_trl_prepare_dataset(chat_tokenizer):
    """Standard and conversational, explicit and implicit prompt: DPOTrainer's prompt/chosen/rejected ids."""
    expected = json.loads((TRL_FIXTURES / "dpo_text.json").read_text())
    records = read_jsonl(TRL_FIXTURES / "dpo_text.jsonl")
    assert len(records) == len(expected) == 4
    for i, (record, ref) in enumerate(zip(records, expected)):
        out = tokenize_record(parse(record, i, "dpo_text.jsonl", "trl"), chat_tokenizer)
        for side in ("chosen", "rejected"):
            ids = ref["prompt_ids"] + ref[f"{side}_ids"]
            mask = [0] * len(ref["prompt_ids"]) + [1] * len(ref[f"{side}_ids"])
            assert out[f"{side}_input_ids"].tolist() == ids, (i, side)
            assert out[f"{side}_target_mask"].tolist() == mask, (i, side)


def test_sft_records_match_trl_prepare_dataset(chat_tokenizer):
    """`text`, standard and conversational prompt-completion: SFTTrainer's input_ids and completion_mask."""
    expected = json.loads((TRL_FIXTURES / "sft_text.json").read_text())
    records = read_jsonl(TRL_FIXTURES / "sft_text.jsonl")
    assert len(records) == len(expected) == 3
    for i, (record, ref) in enumerate(zip(records, expected)):
        out = tokenize_record(parse(record, i, "sft_text.jsonl", "trl"), chat_tokenizer)
        assert out["input_ids"].tolist() == ref["input_ids"], i
        assert out["target_mask"].tolist() == ref["completion_mask"], i
