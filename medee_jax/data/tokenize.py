"""Turning normalized records into token ids and target masks with the checkpoint's own tokenizer and chat template.

Rendering is the checkpoint's chat template (Qwen2.5-VL: a default system prompt, `<|im_start|>role\\n...<|im_end|>\\n`
turns, each image as `<|vision_start|><|image_pad|><|vision_end|>`). Each `<image>` placeholder becomes an image
part of the message, so the template itself decides how an image is written; the single image token it writes is
then expanded to the image's feature count (Qwen2.5-VL: t·h·w / merge_size² `<|image_pad|>` tokens from the image's
`image_grid_thw` row).

Targets: each assistant turn's text as the template renders it after the `<|im_start|>assistant\\n` header — the
content and the closing `<|im_end|>\\n`. The split points are found by rendering prefixes of the conversation (with
and without the generation prompt), and every piece is tokenized separately, so the prompt tokens are exactly those
the model sees at generation time and a target never shares a token with its header.

Outputs are numpy int32 arrays; `target_mask[t] = 1` when `input_ids[t]` is a training target (aligned, not
shifted). Truncation to `max_length` cuts from the right and never inside or before an image: a record whose
prompt (images included) leaves no room for a target token is a `BadRecordError` (`prompt_too_long`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from medee_jax.data import errors
from medee_jax.data.errors import BadRecordCounter, BadRecordError, OnBadRecord
from medee_jax.data.formats import IMAGE_PLACEHOLDER, Conversation, Message, PreferencePair

QWEN_IMAGE_TOKEN = "<|image_pad|>"
QWEN_VISION_BOUNDARY_TOKENS = ("<|vision_start|>", "<|vision_end|>")


class ChatTemplateError(ValueError):
    """The chat template cannot be used to find target spans (a configuration problem, not a bad record)."""


@dataclasses.dataclass(frozen=True)
class ChatTokenizer:
    """A transformers tokenizer plus what expansion and masking need to know about its image tokens.

    image_token: the token the chat template writes once per image part (Qwen2.5-VL: `<|image_pad|>`).
    image_prefix / image_suffix: tokens put around each expanded run (none for Qwen2.5-VL, whose template already
      writes `<|vision_start|>`/`<|vision_end|>`).
    boundary_tokens: tokens that belong to an image span when adjacent to it (never truncated apart from it).
    merge_size: spatial merge of the vision tower; an image with grid (t, h, w) has t·h·w / merge_size² tokens.
    """

    tokenizer: Any
    chat_template: str | None = None
    image_token: str = QWEN_IMAGE_TOKEN
    image_prefix: tuple[str, ...] = ()
    image_suffix: tuple[str, ...] = ()
    boundary_tokens: tuple[str, ...] = QWEN_VISION_BOUNDARY_TOKENS
    merge_size: int = 2

    def __post_init__(self):
        vocab = self.tokenizer.get_vocab()
        for token in (self.image_token, *self.image_prefix, *self.image_suffix):
            if token not in vocab:
                raise ValueError(f"the tokenizer has no {token!r} token")
        control = set(self.tokenizer.all_special_tokens)
        control.update(t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special)
        control.update((self.image_token, *self.image_prefix, *self.image_suffix))
        control.update(t for t in self.boundary_tokens if t in vocab)
        pattern = "|".join(re.escape(t) for t in sorted(control, key=len, reverse=True))
        boundary = [vocab[t] for t in (*self.boundary_tokens, *self.image_prefix, *self.image_suffix) if t in vocab]
        # Derived lookups, cached (get_vocab() of a real vocabulary is slow).
        object.__setattr__(self, "_control_re", re.compile(pattern))
        object.__setattr__(self, "image_token_id", vocab[self.image_token])
        object.__setattr__(self, "image_prefix_ids", [vocab[t] for t in self.image_prefix])
        object.__setattr__(self, "image_suffix_ids", [vocab[t] for t in self.image_suffix])
        object.__setattr__(self, "boundary_ids", frozenset(boundary))

    def render(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, with no BOS/EOS added (the template writes every control token itself)."""
        nonempty = [t for t in texts if t]
        encoded = iter(self.tokenizer(nonempty, add_special_tokens=False)["input_ids"]) if nonempty else iter(())
        return [list(next(encoded)) if t else [] for t in texts]


def load_chat_tokenizer(
    checkpoint_dir: str | os.PathLike,
    *,
    image_token: str = QWEN_IMAGE_TOKEN,
    image_prefix: tuple[str, ...] = (),
    image_suffix: tuple[str, ...] = (),
    boundary_tokens: tuple[str, ...] = QWEN_VISION_BOUNDARY_TOKENS,
    merge_size: int | None = None,
) -> ChatTokenizer:
    """Loads the tokenizer and chat template of a local checkpoint directory (no network).

    The chat template comes from the tokenizer (tokenizer_config.json or chat_template.jinja), else from the
    processor's chat_template.json. merge_size defaults to preprocessor_config.json's `merge_size`, else 2. The
    image keywords are the model family's (its `ImageInputs.chat_tokens`); the defaults are Qwen2.5-VL's.
    Code shipped in the folder is never run (`load_hf_tokenizer`).
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    tokenizer = load_hf_tokenizer(checkpoint_dir)
    chat_template = None
    if not tokenizer.chat_template:
        chat_template = _read_processor_chat_template(checkpoint_dir)
        if chat_template is None:
            raise ChatTemplateError(f"{checkpoint_dir} has no chat template: add the checkpoint's chat_template.jinja "
                                    f"to {checkpoint_dir} (or a 'chat_template' in its tokenizer_config.json or "
                                    "chat_template.json)")
    if merge_size is None:
        merge_size = 2
        preprocessor = os.path.join(checkpoint_dir, "preprocessor_config.json")
        if os.path.isfile(preprocessor):
            with open(preprocessor, encoding="utf-8") as f:
                merge_size = int(json.load(f).get("merge_size", 2))
    return ChatTokenizer(
        tokenizer,
        chat_template=chat_template,
        image_token=image_token,
        image_prefix=tuple(image_prefix),
        image_suffix=tuple(image_suffix),
        boundary_tokens=tuple(boundary_tokens),
        merge_size=merge_size,
    )


def load_hf_tokenizer(checkpoint_dir: str | os.PathLike):
    """Returns the transformers tokenizer of a local folder, never running code the folder ships.

    ``trust_remote_code=False`` (and no network): a folder whose tokenizer_config.json maps the tokenizer to its
    own Python file is refused with a ValueError instead of transformers asking on the terminal whether to run it.
    """
    import transformers

    checkpoint_dir = os.fspath(checkpoint_dir)
    try:
        return transformers.AutoTokenizer.from_pretrained(checkpoint_dir, local_files_only=True,
                                                          trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" not in str(e) and "custom code" not in str(e):
            raise
        raise ValueError(f"{checkpoint_dir}: the tokenizer needs Python code shipped in the folder "
                         "(tokenizer_config.json 'auto_map'); medee_jax never runs checkpoint code "
                         "(trust_remote_code=False). Use a tokenizer that transformers provides (e.g. the base "
                         "model's tokenizer.json and tokenizer_config.json without 'auto_map').") from None


def _read_processor_chat_template(checkpoint_dir: str) -> str | None:
    jinja = os.path.join(checkpoint_dir, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    js = os.path.join(checkpoint_dir, "chat_template.json")
    if os.path.isfile(js):
        with open(js, encoding="utf-8") as f:
            return json.load(f).get("chat_template")
    return None


# --------------------------------------------------------------------------------------------------------------
# Public entry points


def tokenize_conversation(
    conversation: Conversation,
    tok: ChatTokenizer,
    image_grid_thw: np.ndarray | Sequence[Sequence[int]] | None = None,
    *,
    num_image_tokens: Sequence[int] | None = None,
    max_length: int | None = None,
    on_bad_record: OnBadRecord = "raise",
    counter: BadRecordCounter | None = None,
    report: dict | None = None,
) -> dict[str, np.ndarray] | None:
    """SFT: `{"input_ids": int32 [L], "target_mask": int32 [L]}` with every assistant turn a target.

    Give the images' `image_grid_thw` ([n_images, 3], as the image processor returns it) or their token counts
    (`num_image_tokens`). Returns None for a skipped bad record (on_bad_record="skip"). `report` (a dict), when
    given, receives "truncated_tokens": the tokens cut to fit max_length (0 when nothing was cut).
    """
    errors.check_on_bad_record(on_bad_record)
    try:
        return _tokenize_conversation(conversation, tok, image_grid_thw, num_image_tokens, max_length,
                                      report if report is not None else {})
    except BadRecordError as error:
        errors.handle_bad_record(error, on_bad_record, counter)
        return None


def tokenize_preference_pair(
    pair: PreferencePair,
    tok: ChatTokenizer,
    image_grid_thw: np.ndarray | Sequence[Sequence[int]] | None = None,
    *,
    num_image_tokens: Sequence[int] | None = None,
    max_length: int | None = None,
    on_bad_record: OnBadRecord = "raise",
    counter: BadRecordCounter | None = None,
    report: dict | None = None,
) -> dict[str, np.ndarray] | None:
    """DPO: `{"chosen_input_ids", "chosen_target_mask", "rejected_input_ids", "rejected_target_mask"}` (int32).

    Both sequences start with the same prompt tokens (images expanded once, shared); only the completion is a
    target. With max_length, each completion is cut from the right to max_length − prompt length.
    Returns None for a skipped bad record (on_bad_record="skip"). `report`: as in `tokenize_conversation`
    (chosen and rejected tokens cut, summed).
    """
    errors.check_on_bad_record(on_bad_record)
    try:
        return _tokenize_pair(pair, tok, image_grid_thw, num_image_tokens, max_length,
                              report if report is not None else {})
    except BadRecordError as error:
        errors.handle_bad_record(error, on_bad_record, counter)
        return None


def tokenize_record(
    record: Conversation | PreferencePair, tok: ChatTokenizer, image_grid_thw=None, **kwargs
) -> dict[str, np.ndarray] | None:
    """`tokenize_conversation` or `tokenize_preference_pair`, by the record's type.

    An error raised while the chat template renders this record (Jinja's sandbox, the template's own
    `raise_exception`) is a `BadRecordError` (chat_template_error) naming the record and the template's message."""
    import jinja2

    if not isinstance(record, (Conversation, PreferencePair)):
        raise TypeError(f"expected a Conversation or PreferencePair, got {type(record).__name__}")
    tokenize = tokenize_conversation if isinstance(record, Conversation) else tokenize_preference_pair
    try:
        return tokenize(record, tok, image_grid_thw, **kwargs)
    except jinja2.TemplateError as e:
        error = BadRecordError(record.source.file, record.source.line, errors.CHAT_TEMPLATE_ERROR,
                               f"the chat template of {tok.tokenizer.name_or_path} failed on it: "
                               f"{type(e).__name__}: {e}")
    errors.handle_bad_record(error, kwargs.get("on_bad_record", "raise"), kwargs.get("counter"))
    return None


def image_token_counts(image_grid_thw: np.ndarray | Sequence[Sequence[int]], merge_size: int = 2) -> list[int]:
    """Tokens per image: t·h·w / merge_size² for each row of image_grid_thw."""
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    patches = grid.prod(axis=1)
    if np.any(patches % (merge_size * merge_size)) or np.any(grid <= 0):
        raise ValueError(
            f"image_grid_thw rows must be positive and h·w divisible by {merge_size}²: {grid.tolist()}"
        )
    return [int(n) for n in patches // (merge_size * merge_size)]


# --------------------------------------------------------------------------------------------------------------
# Implementation


def _fail(record, reason: str, detail: str):
    raise BadRecordError(record.source.file, record.source.line, reason, detail)


def _template_message(message: Message) -> dict:
    """A message as chat templates take it: string content, or text/image parts when it has images."""
    if IMAGE_PLACEHOLDER not in message.text:
        return {"role": message.role, "content": message.text}
    parts = []
    for i, piece in enumerate(message.text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return {"role": message.role, "content": parts}


def _check_text(record, tok: ChatTokenizer, messages: Sequence[Message]) -> None:
    for i, m in enumerate(messages):
        found = tok._control_re.search(m.text)
        if found:
            _fail(
                record, errors.CONTROL_TOKEN_IN_TEXT,
                f"{m.role} text (message {i}) contains the control token {found.group(0)!r}; "
                f"write images as {IMAGE_PLACEHOLDER} and remove chat-format tokens from the text",
            )


def _token_counts(record, tok: ChatTokenizer, image_grid_thw, num_image_tokens) -> list[int]:
    n_images = len(record.images)
    if num_image_tokens is not None:
        counts = [int(n) for n in num_image_tokens]
    elif image_grid_thw is not None:
        counts = image_token_counts(image_grid_thw, tok.merge_size)
    elif n_images == 0:
        counts = []
    else:
        raise ValueError(
            f"{record.source}: the record has {n_images} image(s); pass image_grid_thw or num_image_tokens"
        )
    if len(counts) != n_images:
        raise ValueError(f"{record.source}: {len(counts)} image grid row(s)/counts for {n_images} image(s)")
    return counts


def _expand_images(record, tok: ChatTokenizer, ids: list[int], counts: list[int]) -> np.ndarray:
    """Replace the k-th image token by prefix + image_token × counts[k] + suffix. Returns int32 [L']."""
    ids_arr = np.asarray(ids, dtype=np.int64)
    image_id = tok.image_token_id
    positions = np.flatnonzero(ids_arr == image_id)
    if len(positions) != len(counts):
        _fail(
            record, errors.PLACEHOLDER_COUNT,
            f"the chat template wrote {len(positions)} {tok.image_token} token(s) for {len(counts)} image(s)",
        )
    if not counts:
        return ids_arr.astype(np.int32)
    prefix, suffix = tok.image_prefix_ids, tok.image_suffix_ids
    pieces, start = [], 0
    for pos, n in zip(positions, counts):
        pieces.append(ids_arr[start:pos])
        pieces.append(np.asarray(prefix + [image_id] * n + suffix, dtype=np.int64))
        start = pos + 1
    pieces.append(ids_arr[start:])
    return np.concatenate(pieces).astype(np.int32)


def _image_span_end(tok: ChatTokenizer, ids: np.ndarray) -> int:
    """One past the last token of the last image span: its image tokens, the suffix tokens and the closing marker
    the template writes (Qwen2.5-VL: `<|vision_end|>`)."""
    positions = np.flatnonzero(ids == tok.image_token_id)
    if len(positions) == 0:
        return 0
    end = int(positions[-1]) + 1
    for _ in range(len(tok.image_suffix_ids) + 1):
        if end < len(ids) and int(ids[end]) in tok.boundary_ids:
            end += 1
    return end


def _split_rendered(record, tok: ChatTokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_target) pieces; targets are the assistant turns' rendered bodies."""
    full = tok.render(messages, add_generation_prompt=False)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < getattr(record, "target_from", 0):
            continue
        before = tok.render(messages[:i], add_generation_prompt=True)
        through = tok.render(messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through) and len(before) >= pos):
            raise ChatTemplateError(
                f"{record.source}: the chat template does not render conversations prefix-stably (rendering the "
                f"first {i} messages with the generation prompt is not a prefix of rendering the first {i + 1}); "
                "target spans cannot be located"
            )
        pieces.append((full[pos : len(before)], False))
        pieces.append((full[len(before) : len(through)], True))
        pos = len(through)
    pieces.append((full[pos:], False))
    return pieces


def _tokenize_conversation(conv, tok, image_grid_thw, num_image_tokens, max_length, report):
    if conv.plain:  # TRL's standard form: no chat template
        from medee_jax.data.tokenize_plain import tokenize_plain_conversation

        return tokenize_plain_conversation(conv, tok, max_length, report)
    _check_text(conv, tok, conv.messages)
    counts = _token_counts(conv, tok, image_grid_thw, num_image_tokens)
    messages = [_template_message(m) for m in conv.messages]
    pieces = _split_rendered(conv, tok, messages)
    encoded = tok.encode([text for text, _ in pieces])
    ids = [i for piece in encoded for i in piece]
    mask = [int(target) for (_, target), piece in zip(pieces, encoded) for _ in piece]
    # Image tokens are never targets (formats.py rejects images in answers), so expanding keeps mask alignment.
    input_ids = _expand_images(conv, tok, ids, counts)
    target_mask = _expand_mask(np.asarray(ids), np.asarray(mask, dtype=np.int32), tok, counts)
    if not target_mask.any():
        _fail(conv, errors.EMPTY_RESPONSE, "the rendered conversation has no assistant tokens")
    report["truncated_tokens"] = 0
    if max_length is not None and len(input_ids) > max_length:
        images_end = _image_span_end(tok, input_ids)
        first_target = int(np.argmax(target_mask))
        if images_end > max_length or first_target >= max_length:
            needed = max(images_end, first_target + 1)
            _fail(
                conv, errors.PROMPT_TOO_LONG,
                f"needs at least {needed} tokens before any answer token fits (images included) but max_length is "
                f"{max_length}",
            )
        report["truncated_tokens"] = len(input_ids) - max_length
        input_ids, target_mask = input_ids[:max_length], target_mask[:max_length]
    return {"input_ids": input_ids, "target_mask": target_mask}


def _expand_mask(ids: np.ndarray, mask: np.ndarray, tok: ChatTokenizer, counts: list[int]) -> np.ndarray:
    if not counts:
        return mask.astype(np.int32)
    extra = len(tok.image_prefix) + len(tok.image_suffix)
    repeats = np.ones(len(ids), dtype=np.int64)
    positions = np.flatnonzero(ids == tok.image_token_id)
    repeats[positions] = np.asarray(counts, dtype=np.int64) + extra
    if mask[positions].any():
        raise AssertionError("image token inside a target span")
    return np.repeat(mask, repeats).astype(np.int32)


def _tokenize_pair(pair, tok, image_grid_thw, num_image_tokens, max_length, report):
    if pair.plain:  # TRL's standard form: no chat template
        from medee_jax.data.tokenize_plain import plain_pair_pieces

        return _finish_pair(pair, *plain_pair_pieces(pair, tok), max_length, report)
    _check_text(pair, tok, [*pair.prompt, Message("assistant", pair.chosen), Message("assistant", pair.rejected)])
    counts = _token_counts(pair, tok, image_grid_thw, num_image_tokens)
    prompt = [_template_message(m) for m in pair.prompt]
    prompt_text = tok.render(prompt, add_generation_prompt=True)
    completions = []
    for name, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        full = tok.render(prompt + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise ChatTemplateError(
                f"{pair.source}: the chat template's rendering of prompt + {name} does not start with the rendered "
                "prompt (with generation prompt); the completion cannot be located"
            )
        completions.append(full[len(prompt_text) :])
    prompt_ids, chosen_ids, rejected_ids = tok.encode([prompt_text, *completions])
    prompt_arr = _expand_images(pair, tok, prompt_ids, counts)
    chosen_arr = np.asarray(chosen_ids, dtype=np.int32)
    rejected_arr = np.asarray(rejected_ids, dtype=np.int32)
    if tok.image_token_id in chosen_arr or tok.image_token_id in rejected_arr:
        _fail(pair, errors.IMAGE_IN_RESPONSE, "an answer renders an image token")
    return _finish_pair(pair, prompt_arr, chosen_arr, rejected_arr, max_length, report)


def _finish_pair(pair, prompt_arr, chosen_arr, rejected_arr, max_length, report):
    """The pair's output arrays from its prompt and completion ids, completions cut to fit max_length (the tokens
    cut are counted in ``report["truncated_tokens"]``)."""
    report["truncated_tokens"] = 0
    if max_length is not None:
        budget = max_length - len(prompt_arr)
        if budget < 1:
            _fail(
                pair, errors.PROMPT_TOO_LONG,
                f"the prompt is {len(prompt_arr)} tokens (images included) but max_length is {max_length}",
            )
        if len(chosen_arr) > budget or len(rejected_arr) > budget:
            report["truncated_tokens"] = max(0, len(chosen_arr) - budget) + max(0, len(rejected_arr) - budget)
            chosen_arr, rejected_arr = chosen_arr[:budget], rejected_arr[:budget]
            if np.array_equal(chosen_arr, rejected_arr):
                _fail(
                    pair, errors.IDENTICAL_AFTER_TRUNCATION,
                    f"'chosen' and 'rejected' are identical in their first {budget} tokens, all that fits in "
                    f"max_length {max_length}",
                )
    out = {}
    for name, completion in (("chosen", chosen_arr), ("rejected", rejected_arr)):
        out[f"{name}_input_ids"] = np.concatenate([prompt_arr, completion]).astype(np.int32)
        out[f"{name}_target_mask"] = np.concatenate(
            [np.zeros(len(prompt_arr), np.int32), np.ones(len(completion), np.int32)]
        )
    return out
