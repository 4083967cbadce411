"""TRL's dataset types (SFT and DPO, TRL 1.16), read the way TRL reads them, normalised to our records.

- language modeling, `messages` / `text`: a `Conversation` (every assistant turn a target) / plain text, all of
  it a target;
- prompt-completion, `prompt` + `completion`: a `Conversation` whose targets are the completion's turns
  (`target_from`);
- preference with an explicit prompt, `prompt` + `chosen` + `rejected`: a `PreferencePair`;
- preference with an implicit prompt, `chosen` + `rejected`: split at their longest common prefix (TRL's
  `extract_prompt`), then as above.

Conversational values are lists of `{"role", "content"}` messages; standard values are strings. Standard records
are `plain`: TRL tokenizes them as they are, without the chat template, and appends the tokenizer's EOS to the
completion (`medee_jax.data.tokenize_plain`). The prompt (or `messages`, or `chosen` when the prompt is implicit)
decides the form: a conversational prompt may have string answers (the assistant's contents), a standard one
may not have message-list answers.

Images come from `images` (a list) or `image` (one; TRL's vision collator turns it into a list). Message contents
may be strings or lists of `{"type": "text"}` / `{"type": "image"}` parts. TRL's rule for string contents
(`prepare_multimodal_messages`): one image part per image is put before the text of the first user message whose
content is a string; the number of image parts must then equal the number of images. With data.format="auto" a
record whose text already holds `<image>` placeholders (LLaMA-Factory style) is taken as written instead; with
data.format="trl" such text is refused, since TRL would read `<image>` as plain text.

Not supported (a bad record that says so): prompt-only records, unpaired preference (`label`, KTO), tool turns,
image parts carrying their own image, images on standard (plain-text) records.
Differences from TRL: SFT on `messages` trains the assistant turns only (TRL's `assistant_only_loss=True`; TRL's
default trains every token); an implicit-prompt pair with images is accepted (TRL's vision collator needs an
explicit prompt).
"""

from __future__ import annotations

import dataclasses
import os

from medee_jax.data import errors
from medee_jax.data.formats import (IMAGE_PLACEHOLDER, Conversation, Message, PreferencePair, RecordRef, _Parser,
                                    parse_record)

TRL_KEYS = ("messages", "text", "prompt", "completion", "chosen", "rejected")


def insert_image_parts(messages: list, num_images: int) -> list:
    """TRL's `prepare_multimodal_messages` placement: `num_images` image parts before the text of the first user
    message whose content is a string. Returns new message dicts (the input is not changed)."""
    out, placed = [], False
    for message in messages:
        if (not placed and isinstance(message, dict) and message.get("role") == "user"
                and isinstance(message.get("content"), str)):
            parts = [{"type": "image"} for _ in range(num_images)]
            message = {**message, "content": parts + [{"type": "text", "text": message["content"]}]}
            placed = True
        out.append(message)
    return out


def split_implicit_prompt(chosen, rejected):
    """TRL's `extract_prompt`: (prompt, chosen, rejected) split at the first position where `chosen` and
    `rejected` (two message lists, or two strings) differ; for strings a space just before that position goes to
    the answers. When neither differs before the shorter one ends, the split is before its last element (as
    TRL's loop leaves it). None when either is empty."""
    n = min(len(chosen), len(rejected))
    if n == 0:
        return None
    idx = n - 1
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i
            if i > 0 and chosen[i - 1] == " ":  # TRL: remove the space before the answers from the prompt
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _form(p: _Parser, record: dict, key: str) -> str:
    """"conversational" (a list of messages, or one message) or "standard" (a string) for record[key]."""
    value = record[key]
    if isinstance(value, str):
        return "standard"
    if isinstance(value, (list, dict)):
        return "conversational"
    p.fail(errors.BAD_FIELD, f"'{key}' must be a string or a list of messages, got {type(value).__name__}")


def _images(p: _Parser, record: dict) -> list:
    if record.get("image") is not None:
        if record.get("images"):
            p.fail(errors.BAD_FIELD, "the record has both 'image' and 'images'")
        return [record["image"]]
    value = record.get("images")
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _texts(messages: list):
    """The strings of a message list's contents (string contents and text parts)."""
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield part["text"]


def _image_parts(p: _Parser, messages: list, what: str) -> int:
    """Counts `{"type": "image"}` parts; refuses parts that carry their own image."""
    count = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "image":
                if part.get("image") is not None:
                    p.fail(errors.BAD_FIELD, f"an image part in {what} carries its own image; list the images in "
                                             "'images' and leave the parts as {\"type\": \"image\"}")
                count += 1
    return count


def _place_images(p: _Parser, prompt: list, answers: list[list], images: list, *, strict: bool) -> list:
    """The prompt with TRL's image parts inserted (see the module docstring); checks the image-part count."""
    if not isinstance(prompt, list):
        return prompt  # the record parser reports it
    every = [prompt, *answers]
    if any(IMAGE_PLACEHOLDER in text for messages in every for text in _texts(messages)):
        if strict:
            p.fail(errors.PLACEHOLDER_COUNT,
                   f"the text contains {IMAGE_PLACEHOLDER}, which TRL reads as plain text; mark images with "
                   "{\"type\": \"image\"} parts (or plain-string contents), or set data.format=sharegpt")
        return prompt  # LLaMA-Factory style placeholders: counted by the record parser
    if images:
        prompt = insert_image_parts(prompt, len(images))
    count = _image_parts(p, prompt, "the prompt")
    if count != len(images):
        p.fail(errors.PLACEHOLDER_COUNT,
               f"{count} image part(s) in the messages but {len(images)} image(s) (TRL puts one image part per image "
               "before the text of the first user message whose content is a string)")
    for answer in answers:
        if _image_parts(p, answer, "an answer"):
            p.fail(errors.IMAGE_IN_RESPONSE, "an answer has an image part")
    return prompt


def _nonempty(p: _Parser, text: str, key: str) -> str:
    if not text.strip():
        p.fail(errors.EMPTY_RESPONSE, f"'{key}' is empty")
    return text


def _plain_record(p: _Parser, record: dict, kind: str, images: list, source: RecordRef):
    """A standard (plain-text) TRL record."""
    if images:
        p.fail(errors.BAD_FIELD, "TRL's standard (plain-string) form has no chat template to place images in; "
                                 "write the prompt as messages ([{\"role\": \"user\", \"content\": ...}])")
    if kind == "sft":
        if "text" in record:
            text = _nonempty(p, p.text(record["text"], "'text'"), "text")
            return Conversation((Message("assistant", text),), (), source, plain=True)
        prompt = p.text(record["prompt"], "'prompt'")
        completion = _nonempty(p, p.text(record["completion"], "'completion'"), "completion")
        return Conversation((Message("user", prompt), Message("assistant", completion)), (), source, plain=True)
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            p.fail(errors.MISSING_RESPONSE, f"'{key}' is missing")
    chosen, rejected = p.text(record["chosen"], "'chosen'"), p.text(record["rejected"], "'rejected'")
    if "prompt" in record:
        prompt = p.text(record["prompt"], "'prompt'")
    else:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected) or ("", chosen, rejected)
    if not prompt.strip():
        p.fail(errors.EMPTY_MESSAGE, "the prompt is empty (no shared beginning of 'chosen' and 'rejected')")
    _nonempty(p, chosen, "chosen")
    _nonempty(p, rejected, "rejected")
    if chosen.strip() == rejected.strip():
        p.fail(errors.IDENTICAL_RESPONSES, "'chosen' and 'rejected' are identical")
    return PreferencePair((Message("user", prompt),), chosen, rejected, (), source, plain=True)


def parse_trl(
    record: dict,
    source: RecordRef,
    *,
    kind: str = "auto",
    base_dir: str | os.PathLike | None = None,
    media_root: str | os.PathLike | None = None,
    check_images: bool = True,
    strict: bool = True,
):
    """Normalises one TRL record (see the module docstring) to a `Conversation` or `PreferencePair`.

    strict: data.format="trl" (a `<image>` in the text is refused) rather than "auto" (it is a placeholder).
    Raises BadRecordError at `source`.
    """
    p = _Parser(source)
    is_preference = "chosen" in record or "rejected" in record
    if kind == "auto":
        kind = "preference" if is_preference else "sft"
    if kind == "sft" and is_preference:
        p.fail(errors.UNKNOWN_FORMAT, "expected an SFT record but it has 'chosen'/'rejected' (a preference record)")
    if kind == "preference" and not is_preference:
        p.fail(errors.UNKNOWN_FORMAT, "expected a preference record but it has no 'chosen'/'rejected'")
    if "label" in record and "completion" in record:
        p.fail(errors.UNKNOWN_FORMAT, "unpaired preference records ('prompt', 'completion', 'label') are not supported")
    if kind == "sft":
        if "messages" in record:
            keys = ["messages"]
        elif "text" in record:
            keys = ["text"]
        elif "prompt" in record and "completion" in record:
            keys = ["prompt", "completion"]
        elif "prompt" in record:
            p.fail(errors.UNKNOWN_FORMAT, "a prompt-only record (no 'completion') has nothing to train on")
        else:
            p.fail(errors.UNKNOWN_FORMAT, f"no 'messages', 'text' or 'prompt' + 'completion' (keys: {sorted(record)}); "
                                          "not an SFT record")
    else:
        keys = [k for k in ("prompt", "messages", "chosen", "rejected") if record.get(k) is not None]
    # The prompt's form decides; with a conversational prompt, string answers are the assistant's contents.
    forms = [_form(p, record, key) for key in keys]
    if forms[0] == "standard" and "conversational" in forms:
        p.fail(errors.BAD_FIELD, f"{', '.join(repr(k) for k in keys)} mix strings and message lists; use one form "
                                 "(TRL's standard or conversational)")
    images = _images(p, record)
    if forms[0] == "standard" and "messages" in keys:
        p.fail(errors.BAD_FIELD, "'messages' must be a list of messages, got a string")
    if forms[0] == "standard":
        return _plain_record(p, record, kind, images, source)
    options = dict(base_dir=base_dir, media_root=media_root, check_images=check_images, record_format="sharegpt")
    canonical = {"images": images, "system": record.get("system")}
    if kind == "sft":
        prompt = record["messages"] if "messages" in record else record["prompt"]
        completion = _as_list(record["completion"]) if "completion" in record else []
        canonical["messages"] = _place_images(p, prompt, [completion], images, strict=strict) + completion
        conversation = parse_record(canonical, source, kind="sft", **options)
        if completion:  # the prompt's own assistant turns are context
            conversation = dataclasses.replace(conversation,
                                               target_from=len(conversation.messages) - len(completion))
        return conversation
    if "prompt" in record or "messages" in record:
        if strict and "prompt" not in record:
            p.fail(errors.UNKNOWN_FORMAT, "TRL preference records have 'prompt', 'chosen' and 'rejected' (or only "
                                          "'chosen' and 'rejected'); 'messages' + answers is LLaMA-Factory's form")
        key = "prompt" if "prompt" in record else "messages"  # `messages` + answers: LLaMA-Factory's OpenAI style
        prompt, chosen, rejected = record[key], record.get("chosen"), record.get("rejected")
    else:
        split = split_implicit_prompt(record["chosen"], record["rejected"])
        prompt, chosen, rejected = split or ([], record["chosen"], record["rejected"])
        if not prompt:
            p.fail(errors.EMPTY_MESSAGE, "'chosen' and 'rejected' share no prompt turns")
    answers = [_as_list(a) for a in (chosen, rejected) if isinstance(a, (list, dict))]
    canonical.update(prompt=_place_images(p, prompt, answers, images, strict=strict), chosen=chosen,
                     rejected=rejected)
    return parse_record(canonical, source, kind="preference", **options)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]
