"""Token ids and target masks of plain-text records (TRL's standard dataset form), the way TRL 1.16 makes them.

No chat template: the tokenizer's EOS token is appended to the text that is trained on unless it already ends
with it (TRL's `add_eos`), and texts are tokenized with the tokenizer's own special tokens (a BOS where it adds one).
- language modeling (`text`): every token of text + EOS is a target;
- prompt-completion: prompt + completion + EOS, the targets from where its tokens stop agreeing with the prompt's
  alone (TRL's `common_prefix_length`);
- preference: prompt + chosen + EOS and prompt + rejected + EOS share the prompt tokens up to where either stops
  agreeing with the prompt's alone; the rest of each is its completion.
Outputs have the same keys and truncation rules as `medee_jax.data.tokenize`.
"""

from __future__ import annotations

import numpy as np

from medee_jax.data import errors
from medee_jax.data.errors import BadRecordError
from medee_jax.data.formats import Conversation, Message, PreferencePair


def _fail(record, reason: str, detail: str):
    raise BadRecordError(record.source.file, record.source.line, reason, detail)


def _with_eos(tok, record, text: str) -> str:
    """text + EOS (unless it already ends with it), after the check that the text holds no control token."""
    from medee_jax.data.tokenize import _check_text

    eos = tok.tokenizer.eos_token
    body = text[: -len(eos)] if eos and text.endswith(eos) else text
    _check_text(record, tok, [Message("assistant", body)])
    return body + eos if eos else body


def _encode(tok, text: str) -> list[int]:
    return list(tok.tokenizer(text)["input_ids"]) if text else []


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Number of leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_plain_conversation(conv: Conversation, tok, max_length: int | None,
                                report: dict | None = None) -> dict[str, np.ndarray]:
    """{"input_ids", "target_mask"} (int32 [L]) of a plain `Conversation`: (user prompt,) assistant text. The tokens
    cut to fit max_length are counted in ``report["truncated_tokens"]``."""
    report = {} if report is None else report
    report["truncated_tokens"] = 0
    from medee_jax.data.tokenize import _check_text

    *context, answer = conv.messages
    prompt = "".join(m.text for m in context)
    _check_text(conv, tok, list(context))
    ids = _encode(tok, prompt + _with_eos(tok, conv, answer.text))
    start = common_prefix_length(_encode(tok, prompt), ids) if prompt else 0
    input_ids = np.asarray(ids, np.int32)
    target_mask = (np.arange(len(ids)) >= start).astype(np.int32)
    if not target_mask.any():
        _fail(conv, errors.EMPTY_RESPONSE, "the completion has no tokens of its own")
    if max_length is not None and len(input_ids) > max_length:
        if start >= max_length:
            _fail(conv, errors.PROMPT_TOO_LONG,
                  f"the prompt is {start} tokens but max_length is {max_length}; no answer token fits")
        report["truncated_tokens"] = len(input_ids) - max_length
        input_ids, target_mask = input_ids[:max_length], target_mask[:max_length]
    return {"input_ids": input_ids, "target_mask": target_mask}


def plain_pair_pieces(pair: PreferencePair, tok) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt ids, chosen ids, rejected ids), int32, of a plain `PreferencePair` (before truncation)."""
    from medee_jax.data.tokenize import _check_text

    _check_text(pair, tok, list(pair.prompt))
    prompt = "".join(m.text for m in pair.prompt)
    prompt_ids = _encode(tok, prompt)
    chosen = _encode(tok, prompt + _with_eos(tok, pair, pair.chosen))
    rejected = _encode(tok, prompt + _with_eos(tok, pair, pair.rejected))
    start = min(common_prefix_length(prompt_ids, chosen), common_prefix_length(prompt_ids, rejected))
    return (np.asarray(prompt_ids[:start], np.int32), np.asarray(chosen[start:], np.int32),
            np.asarray(rejected[start:], np.int32))
