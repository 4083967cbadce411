"""The same data in every format gives the same batches through the real pipeline (tokens, masks, pixels).

TRL plain-string contents + images ≡ TRL image parts ≡ TRL implicit prompt ≡ LLaMA-Factory sharegpt ≡ alpaca
≡ a dataset_info.json entry with its own column names, for SFT and DPO, with and without images.
"""

import json

import pytest

from medee_jax.data.pipeline import make_iterator
from tests.format_helpers import FIXTURES, assert_batches_equal, data_config, demo_model_config, write_jsonl

IMAGES = ["../images/0.png", "../images/2.png", "../images/4.png"]
# (system, history [(question, answer)], question, answer/chosen, rejected, images)
CASES = [
    ("You are a radiologist.", [], "What does the film show?", "A right lower lobe opacity.", "A normal chest.",
     IMAGES[:1]),
    ("", [("Hello.", "Hi, send the scans.")], "Compare them.", "The second shows a nodule.", "They are the same.",
     IMAGES[1:]),
    ("", [], "What causes croup?", "Parainfluenza virus.", "Bacteria.", []),
    ("Be brief.", [], "Any abnormality?", "Cardiomegaly.", "None.", IMAGES[2:]),
]


def trl_messages(system, history, question, images, *, parts):
    out = [{"role": "system", "content": system}] if system else []
    for k, (q, a) in enumerate(history + [(question, None)]):
        if parts:  # TRL's prepared form: every content a list of parts (a string one would get the images)
            content = [{"type": "image"} for _ in (images if k == 0 else [])] + [{"type": "text", "text": q}]
        else:
            content = q
        out.append({"role": "user", "content": content})
        if a is not None:
            out.append({"role": "assistant", "content": a})
    return out


def with_placeholders(history, question, images):
    """The LLaMA-Factory spelling: `<image>` placeholders at the start of the first user turn."""
    first = "<image>" * len(images)
    if history:
        return [(first + history[0][0], history[0][1])] + history[1:], question
    return history, first + question


def forms(case, mode):
    system, history, question, chosen, rejected, images = case
    lf_history, lf_question = with_placeholders(history, question, images)
    sharegpt_turns = [t for q, a in lf_history for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    sharegpt_turns.append({"from": "human", "value": lf_question})
    out = {}
    for name, parts in (("trl_strings", False), ("trl_parts", True)):
        prompt = trl_messages(system, history, question, images, parts=parts)
        if mode == "sft":
            out[name] = {"messages": prompt + [{"role": "assistant", "content": chosen}], "images": images}
        else:
            out[name] = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}], "images": images}
    alpaca = {"instruction": lf_question, "system": system, "history": [list(p) for p in lf_history],
              "images": images}
    mapped = {"q": lf_question, "sys": system, "past": [list(p) for p in lf_history], "pics": images}
    if mode == "sft":
        out["sharegpt"] = {"conversations": sharegpt_turns + [{"from": "gpt", "value": chosen}], "system": system,
                           "images": images}
        out["alpaca"] = dict(alpaca, output=chosen)
        out["entry"] = dict(mapped, a=chosen)
    else:
        prompt = trl_messages(system, history, question, images, parts=False)
        out["trl_implicit"] = {"chosen": prompt + [{"role": "assistant", "content": chosen}],
                               "rejected": prompt + [{"role": "assistant", "content": rejected}], "images": images}
        out["sharegpt"] = {"conversations": sharegpt_turns, "system": system, "images": images,
                           "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}}
        out["alpaca"] = dict(alpaca, chosen=chosen, rejected=rejected)
        out["entry"] = dict(mapped, good=chosen, bad=rejected)
    return out


@pytest.mark.parametrize("mode", ["sft", "dpo"])
def test_every_form_gives_the_same_batches(tmp_path, demo_tokenizer_dir, chat_tokenizer, mode):
    folder = tmp_path / "trl"  # image paths are relative to the fixtures' trl folder
    folder.mkdir()
    (tmp_path / "images").symlink_to(FIXTURES / "images")
    per_form = {}
    for case in CASES:
        for name, record in forms(case, mode).items():
            per_form.setdefault(name, []).append(record)
    columns = {"prompt": "q", "system": "sys", "history": "past", "images": "pics"}
    columns.update({"response": "a"} if mode == "sft" else {"chosen": "good", "rejected": "bad"})
    entry = {"file_name": "entry.jsonl", "columns": columns, "ranking": mode == "dpo"}
    (folder / "dataset_info.json").write_text(json.dumps({"med": entry}))
    model_config = demo_model_config(chat_tokenizer)
    runs = {}
    for name, records in per_form.items():
        path = write_jsonl(folder / f"{name}.jsonl", records)
        spec = f"{folder}/dataset_info.json:med" if name == "entry" else str(path)
        runs[name] = list(make_iterator(data_config([spec], demo_tokenizer_dir, mode), model_config))
    assert len(runs) == (5 if mode == "sft" else 6)
    reference = runs.pop("sharegpt")
    assert sum(b["pixel_values"].shape[0] for b in reference) > 0
    for name, batches in runs.items():
        assert_batches_equal(reference, batches)
