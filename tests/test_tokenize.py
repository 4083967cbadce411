"""Tokenization against a transformers-built reference.

The reference renders the whole conversation with `apply_chat_template`, expands each `<|image_pad|>` in the
*string* to t·h·w/4 copies, tokenizes the whole string once, and finds target spans by tokenizing rendered
prefixes (with and without the generation prompt). medee_jax tokenizes pieces and expands at the token level, so
the two paths share only the tokenizer and the template.
"""

import filecmp
import json
import shutil

import numpy as np
import pytest

from medee_jax.data import errors
from medee_jax.data.demo_tokenizer import ADDED_TOKENS, BPE_VOCAB_SIZE, build_demo_tokenizer
from medee_jax.data.errors import BadRecordCounter, BadRecordError
from medee_jax.data.formats import Conversation, Message, PreferencePair, RecordRef, parse_record, read_records
from medee_jax.data.tokenize import (
    ChatTemplateError,
    ChatTokenizer,
    image_token_counts,
    load_chat_tokenizer,
    tokenize_conversation,
    tokenize_preference_pair,
    tokenize_record,
)

PAD = "<|image_pad|>"
SRC = RecordRef("mem.jsonl", 1)


# ---------------------------------------------------------------------------------------------------------------
# Reference, built from transformers only


def expand_string(text, counts):
    pieces = text.split(PAD)
    out = pieces[0]
    for k, piece in enumerate(pieces[1:]):
        out += PAD * counts[k] + piece
    return out


def ref_tokens(hf, text, counts):
    return hf(expand_string(text, counts), add_special_tokens=False)["input_ids"]


def ref_sft(hf, messages, counts):
    full = hf.apply_chat_template(messages, tokenize=False)
    ids = ref_tokens(hf, full, counts)
    mask = np.zeros(len(ids), np.int32)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before = hf.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            through = hf.apply_chat_template(messages[: i + 1], tokenize=False)
            mask[len(ref_tokens(hf, before, counts)) : len(ref_tokens(hf, through, counts))] = 1
    return np.asarray(ids), mask


def ref_pair(hf, prompt, answer, counts):
    messages = prompt + [{"role": "assistant", "content": answer}]
    ids = ref_tokens(hf, hf.apply_chat_template(messages, tokenize=False), counts)
    n_prompt = len(ref_tokens(hf, hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), counts))
    return np.asarray(ids), np.asarray([0] * n_prompt + [1] * (len(ids) - n_prompt))


def grid_counts(grids):
    return [t * h * w // 4 for t, h, w in grids]


def to_conversation(messages, n_images):
    """Through formats.py, as a user's TRL/OpenAI-style record would go."""
    record = {"messages": messages, "images": [f"/img/{k}.png" for k in range(n_images)]}
    return parse_record(record, SRC, check_images=False)


def text_part(text):
    return {"type": "text", "text": text}


IMAGE = {"type": "image"}


# ---------------------------------------------------------------------------------------------------------------
# Demo tokenizer


def test_demo_tokenizer_special_ids_and_determinism(demo_tokenizer_dir, chat_tokenizer, tmp_path):
    ids = build_demo_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(demo_tokenizer_dir / name, tmp_path / name, shallow=False), name
    assert list(ids) == [text for text, _ in ADDED_TOKENS]
    assert list(ids.values()) == list(range(BPE_VOCAB_SIZE, BPE_VOCAB_SIZE + len(ADDED_TOKENS)))
    hf = chat_tokenizer.tokenizer
    assert len(hf) == BPE_VOCAB_SIZE + len(ADDED_TOKENS)
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", PAD, "<think>"):
        assert hf.convert_tokens_to_ids(token) == ids[token]
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    assert "<think>" not in hf.all_special_tokens and PAD in hf.all_special_tokens
    text = "A 45-year-old woman: <think>pleural effusion?</think> Answer: B. Café"
    assert hf.decode(hf(text)["input_ids"]) == text
    assert hf.convert_ids_to_tokens(hf("<think>x</think>")["input_ids"])[0] == "<think>"


# ---------------------------------------------------------------------------------------------------------------
# SFT against the reference


def check_sft(chat_tokenizer, messages, grids):
    hf = chat_tokenizer.tokenizer
    conv = to_conversation(messages, len(grids))
    out = tokenize_conversation(conv, chat_tokenizer, np.asarray(grids).reshape(-1, 3))
    ids, mask = ref_sft(hf, messages, grid_counts(grids))
    assert out["input_ids"].dtype == np.int32 and out["target_mask"].dtype == np.int32
    np.testing.assert_array_equal(out["input_ids"], ids)
    np.testing.assert_array_equal(out["target_mask"], mask)
    assert int((out["input_ids"] == chat_tokenizer.image_token_id).sum()) == sum(grid_counts(grids))
    return out


def test_sft_text_only_matches_reference_and_generation_mask(chat_tokenizer):
    messages = [
        {"role": "system", "content": "You are a careful physician."},
        {"role": "user", "content": "A 60-year-old man has crushing chest pain. Next step?"},
        {"role": "assistant", "content": "<think>Suspect infarction.</think> Obtain an electrocardiogram."},
    ]
    out = check_sft(chat_tokenizer, messages, [])
    # The demo template marks assistant turns with {% generation %}: a third, independent mask.
    hf_mask = chat_tokenizer.tokenizer.apply_chat_template(
        messages, return_dict=True, return_assistant_tokens_mask=True
    )["assistant_masks"]
    np.testing.assert_array_equal(out["target_mask"], hf_mask)


def test_sft_one_image_matches_reference(chat_tokenizer):
    messages = [
        {"role": "user", "content": [IMAGE, text_part("What does the chest radiograph show?")]},
        {"role": "assistant", "content": "A right lower lobe consolidation."},
    ]
    check_sft(chat_tokenizer, messages, [(1, 4, 6)])


def test_sft_two_images_multi_turn_matches_reference(chat_tokenizer):
    messages = [
        {"role": "user", "content": [text_part("Axial CT:"), IMAGE, text_part(" Any lesion?")]},
        {"role": "assistant", "content": "A hypodense lesion in the liver."},
        {"role": "user", "content": [text_part("Follow-up scan "), IMAGE, text_part(". Changed?")]},
        {"role": "assistant", "content": "It has grown to 3.2 cm."},
    ]
    check_sft(chat_tokenizer, messages, [(1, 8, 8), (2, 4, 6)])


def test_multi_turn_every_assistant_turn_is_a_target(chat_tokenizer):
    answers = ["Fever and cough.", "<think>Consolidation.</think> Pneumonia.", "Start ceftriaxone."]
    messages = [{"role": "system", "content": "Be brief."}]
    for k, answer in enumerate(answers):
        messages += [{"role": "user", "content": f"Question {k}?"}, {"role": "assistant", "content": answer}]
    out = check_sft(chat_tokenizer, messages, [])
    hf = chat_tokenizer.tokenizer
    ids, mask = out["input_ids"], out["target_mask"]
    # Contiguous target runs, one per assistant turn, each exactly the content + "<|im_end|>\n".
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    runs = [hf.decode(ids[s:e]) for s, e in zip(edges[::2], edges[1::2])]
    assert runs == [a + "<|im_end|>\n" for a in answers]
    assert "assistant" not in hf.decode(ids[mask == 1])
    # The header right before each run is untouched.
    for s in edges[::2]:
        assert hf.decode(ids[s - 3 : s]) == "<|im_start|>assistant\n"


def test_image_token_counts_and_explicit_counts(chat_tokenizer):
    assert image_token_counts([[1, 4, 6], [2, 4, 4], [1, 2, 2]]) == [6, 8, 1]
    with pytest.raises(ValueError):
        image_token_counts([[1, 3, 3]])
    messages = [{"role": "user", "content": [IMAGE, text_part("?")]}, {"role": "assistant", "content": "No."}]
    conv = to_conversation(messages, 1)
    a = tokenize_conversation(conv, chat_tokenizer, [[1, 4, 6]])
    b = tokenize_conversation(conv, chat_tokenizer, num_image_tokens=[6])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    with pytest.raises(ValueError, match="image_grid_thw"):
        tokenize_conversation(conv, chat_tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# DPO against the reference


@pytest.mark.parametrize("grids", [[], [(1, 4, 6)], [(1, 4, 4), (1, 6, 8)]])
def test_dpo_matches_reference(chat_tokenizer, grids):
    content = [text_part("Which is abnormal? ")] + [IMAGE] * len(grids) + [text_part(" Answer with a letter.")]
    prompt = [{"role": "system", "content": "You are a radiologist."}, {"role": "user", "content": content}]
    chosen, rejected = "<think>The left lung is opacified.</think> B", "A, the right lung is normal."
    pair = parse_record(
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}], "rejected": rejected,
         "images": [f"/img/{k}.png" for k in range(len(grids))]},
        SRC, check_images=False,
    )
    out = tokenize_preference_pair(pair, chat_tokenizer, np.asarray(grids, dtype=np.int64).reshape(-1, 3))
    assert set(out) == {"chosen_input_ids", "chosen_target_mask", "rejected_input_ids", "rejected_target_mask"}
    hf = chat_tokenizer.tokenizer
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        ids, mask = ref_pair(hf, prompt, answer, grid_counts(grids))
        np.testing.assert_array_equal(out[f"{name}_input_ids"], ids)
        np.testing.assert_array_equal(out[f"{name}_target_mask"], mask)
        assert hf.decode(out[f"{name}_input_ids"][out[f"{name}_target_mask"] == 1]) == answer + "<|im_end|>\n"
    n_prompt = int(np.argmax(out["chosen_target_mask"]))
    assert n_prompt == int(np.argmax(out["rejected_target_mask"]))
    np.testing.assert_array_equal(out["chosen_input_ids"][:n_prompt], out["rejected_input_ids"][:n_prompt])
    assert int((out["chosen_input_ids"] == chat_tokenizer.image_token_id).sum()) == sum(grid_counts(grids))


# ---------------------------------------------------------------------------------------------------------------
# Truncation


def image_conversation(answer="The radiograph shows a right lower lobe consolidation with an air bronchogram."):
    messages = [{"role": "user", "content": [IMAGE, text_part("Findings?")]}, {"role": "assistant", "content": answer}]
    return to_conversation(messages, 1)


def test_sft_truncates_completion_from_the_right(chat_tokenizer):
    conv = image_conversation()
    full = tokenize_conversation(conv, chat_tokenizer, [[1, 8, 8]])
    n_prompt = int(np.argmax(full["target_mask"]))
    for max_length in (n_prompt + 1, n_prompt + 5, len(full["input_ids"]) - 1, len(full["input_ids"]) + 10):
        out = tokenize_conversation(conv, chat_tokenizer, [[1, 8, 8]], max_length=max_length)
        keep = min(max_length, len(full["input_ids"]))
        np.testing.assert_array_equal(out["input_ids"], full["input_ids"][:keep])
        np.testing.assert_array_equal(out["target_mask"], full["target_mask"][:keep])


@pytest.mark.parametrize("where", ["inside_image", "after_image_before_answer"])
def test_sft_prompt_too_long_is_dropped_never_cut_in_image(chat_tokenizer, where):
    conv = image_conversation()
    full = tokenize_conversation(conv, chat_tokenizer, [[1, 8, 8]])
    image_positions = np.flatnonzero(full["input_ids"] == chat_tokenizer.image_token_id)
    max_length = int(image_positions[5]) if where == "inside_image" else int(np.argmax(full["target_mask"]))
    with pytest.raises(BadRecordError) as info:
        tokenize_conversation(conv, chat_tokenizer, [[1, 8, 8]], max_length=max_length)
    assert info.value.reason == errors.PROMPT_TOO_LONG
    assert str(info.value).startswith("mem.jsonl:1: bad record (prompt_too_long)")
    counter = BadRecordCounter()
    assert tokenize_conversation(conv, chat_tokenizer, [[1, 8, 8]], max_length=max_length,
                                 on_bad_record="skip", counter=counter) is None
    assert counter.counts == {errors.PROMPT_TOO_LONG: 1}


def test_multi_turn_truncation_keeps_earlier_targets(chat_tokenizer):
    messages = [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "First answer."},
                {"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "Second answer, longer."}]
    conv = to_conversation(messages, 0)
    full = tokenize_conversation(conv, chat_tokenizer)
    cut = len(full["input_ids"]) - 4
    out = tokenize_conversation(conv, chat_tokenizer, max_length=cut)
    np.testing.assert_array_equal(out["target_mask"], full["target_mask"][:cut])


def make_pair(chosen, rejected, n_images=1):
    prompt = (Message("user", "<image>" * n_images + "Describe the image."),)
    return PreferencePair(prompt, chosen, rejected, tuple(f"/img/{k}.png" for k in range(n_images)), SRC)


def test_dpo_truncates_each_completion_keeps_prompt(chat_tokenizer):
    pair = make_pair("A long and detailed description of a spiculated mass in the breast.", "Normal.")
    full = tokenize_preference_pair(pair, chat_tokenizer, [[1, 4, 4]])
    n_prompt = int(np.argmax(full["chosen_target_mask"]))
    out = tokenize_preference_pair(pair, chat_tokenizer, [[1, 4, 4]], max_length=n_prompt + 6)
    assert len(out["chosen_input_ids"]) == n_prompt + 6
    np.testing.assert_array_equal(out["chosen_input_ids"], full["chosen_input_ids"][: n_prompt + 6])
    # The shorter answer fits whole.
    np.testing.assert_array_equal(out["rejected_input_ids"], full["rejected_input_ids"])
    np.testing.assert_array_equal(out["rejected_target_mask"], full["rejected_target_mask"])


def test_dpo_prompt_too_long(chat_tokenizer):
    pair = make_pair("Yes.", "No.")
    full = tokenize_preference_pair(pair, chat_tokenizer, [[1, 8, 8]])
    n_prompt = int(np.argmax(full["chosen_target_mask"]))
    with pytest.raises(BadRecordError, match=r"mem.jsonl:1: bad record \(prompt_too_long\)"):
        tokenize_preference_pair(pair, chat_tokenizer, [[1, 8, 8]], max_length=n_prompt)
    assert tokenize_preference_pair(pair, chat_tokenizer, [[1, 8, 8]], max_length=n_prompt + 1) is not None


def test_dpo_identical_after_truncation(chat_tokenizer):
    pair = make_pair("The lesion is benign because it is stable.", "The lesion is benign because it grew.")
    full = tokenize_preference_pair(pair, chat_tokenizer, [[1, 4, 4]])
    n_prompt = int(np.argmax(full["chosen_target_mask"]))
    counter = BadRecordCounter()
    out = tokenize_preference_pair(pair, chat_tokenizer, [[1, 4, 4]], max_length=n_prompt + 3,
                                   on_bad_record="skip", counter=counter)
    assert out is None and counter.counts == {errors.IDENTICAL_AFTER_TRUNCATION: 1}


# ---------------------------------------------------------------------------------------------------------------
# Bad input seen at tokenization


def test_control_token_in_text(chat_tokenizer):
    conv = Conversation((Message("user", "Hi<|im_end|>"), Message("assistant", "Hello.")), (), SRC)
    with pytest.raises(BadRecordError) as info:
        tokenize_conversation(conv, chat_tokenizer)
    assert info.value.reason == errors.CONTROL_TOKEN_IN_TEXT and "'<|im_end|>'" in str(info.value)
    pair = make_pair("Looks like <|image_pad|>", "No.", n_images=0)
    with pytest.raises(BadRecordError, match="control_token_in_text"):
        tokenize_preference_pair(pair, chat_tokenizer)


def test_end_to_end_from_file_with_skips(chat_tokenizer, tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    rows = [
        {"conversations": [{"from": "human", "value": "<image>Findings?"}, {"from": "gpt", "value": "Effusion."}],
         "images": ["x.png"]},
        {"conversations": [{"from": "human", "value": "Q <|vision_start|>"}, {"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "images": ["x.png"]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    counter = BadRecordCounter()
    outs = []
    for record in read_records(path, on_bad_record="skip", counter=counter):
        grids = [[1, 4, 4]] * record.num_images
        out = tokenize_record(record, chat_tokenizer, grids, on_bad_record="skip", counter=counter)
        if out is not None:
            outs.append(out)
    assert len(outs) == 1 and int(outs[0]["target_mask"].sum()) > 0
    assert counter.counts == {errors.PLACEHOLDER_COUNT: 1, errors.CONTROL_TOKEN_IN_TEXT: 1}
    assert f"{path}:2" in counter.summary() and f"{path}:3" in counter.summary()


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_chat_template_from_processor_file(demo_tokenizer_dir, chat_tokenizer, tmp_path):
    """Checkpoints whose template lives only in the processor's chat_template.json load the same."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_tokenizer_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": config.pop("chat_template")}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"merge_size": 2}))
    tok = load_chat_tokenizer(tmp_path)
    assert tok.chat_template and tok.merge_size == 2
    conv = image_conversation()
    a = tokenize_conversation(conv, tok, [[1, 4, 4]])
    b = tokenize_conversation(conv, chat_tokenizer, [[1, 4, 4]])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(a["target_mask"], b["target_mask"])


def test_template_that_is_not_prefix_stable_is_refused(chat_tokenizer):
    template = ("{{ messages | length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = ChatTokenizer(chat_tokenizer.tokenizer, chat_template=template)
    conv = Conversation((Message("user", "Q"), Message("assistant", "A")), (), SRC)
    with pytest.raises(ChatTemplateError, match="prefix"):
        tokenize_conversation(conv, tok)


def test_image_prefix_suffix_expansion(chat_tokenizer):
    """Families whose template writes a bare image token (InternVL: `<IMG_CONTEXT>` → `<img>`…`</img>`) wrap it."""
    bare = chat_tokenizer.tokenizer.chat_template.replace("<|vision_start|><|image_pad|><|vision_end|>", PAD)
    tok = ChatTokenizer(chat_tokenizer.tokenizer, chat_template=bare,
                        image_prefix=("<|vision_start|>",), image_suffix=("<|vision_end|>",))
    conv = image_conversation()
    wrapped = tokenize_conversation(conv, tok, [[1, 4, 6]])
    native = tokenize_conversation(conv, chat_tokenizer, [[1, 4, 6]])
    np.testing.assert_array_equal(wrapped["input_ids"], native["input_ids"])
    np.testing.assert_array_equal(wrapped["target_mask"], native["target_mask"])
    end_of_image = int(np.flatnonzero(native["input_ids"] == chat_tokenizer.image_token_id)[-1]) + 1
    with pytest.raises(BadRecordError, match="prompt_too_long"):  # the suffix belongs to the image span
        tokenize_conversation(conv, tok, [[1, 4, 6]], max_length=end_of_image)


def write_remote_code_tokenizer(src_dir, out_dir, marker):
    """A tokenizer folder whose tokenizer_config.json asks transformers to import its own Python file; importing
    that file writes ``marker`` (proof that the code ran)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src_dir / name, out_dir / name)
    config = json.loads((out_dir / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    config["tokenizer_class"] = "EvilTokenizer"
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (out_dir / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")


def test_tokenizer_code_in_the_checkpoint_never_runs(demo_tokenizer_dir, tmp_path):
    """transformers asks on a terminal whether to run a tokenizer folder's own code; answering "y" must not run it:
    every load passes trust_remote_code=False, and the folder is refused with a message saying why."""
    import subprocess
    import sys

    marker = tmp_path / "code_ran"
    folder = tmp_path / "tok"
    folder.mkdir()
    write_remote_code_tokenizer(demo_tokenizer_dir, folder, marker)
    script = ("import sys\nfrom medee_jax.data.tokenize import load_chat_tokenizer\n"
              "from medee_jax.training.setup import embedded_model_config\n"
              "for load in (load_chat_tokenizer, embedded_model_config):\n"
              "    try:\n        load(sys.argv[1])\n    except ValueError as e:\n        print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], input="y\ny\ny\n", capture_output=True,
                          text=True, timeout=120)
    assert not marker.exists(), proc.stdout + proc.stderr
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("refused:") == 2 and "trust_remote_code" in proc.stdout and str(folder) in proc.stdout
