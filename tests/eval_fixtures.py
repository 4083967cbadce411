"""Shared helpers of the evaluation and pair-building tests: tiny images, JSONL writing, and a fake generator."""

from __future__ import annotations

import hashlib
import io
import json
import os

from PIL import Image


def png_bytes(value: int, size=(8, 6)) -> bytes:
    """A tiny grey PNG whose pixels all equal `value`."""
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path, value: int, size=(8, 6)) -> str:
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(png_bytes(value, size))
    return os.fspath(path)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return os.fspath(path)


class FakeGenerator:
    """A deterministic stand-in for the model: the answer letter is a hash of (prompt, image hashes, seed, sample)
    unless `answer_of` returns one. Counts calls and requests so tests can check batching and caching."""

    def __init__(self, answer_of=None, *, interrupt_after: int | None = None, prefix: str = "<think>\nok\n</think>\n"):
        self.answer_of = answer_of
        self.interrupt_after = interrupt_after
        self.prefix = prefix
        self.calls = 0
        self.requests = 0

    def __call__(self, requests, *, n_samples, temperature, top_p, max_new_tokens, seed):
        if self.interrupt_after is not None and self.calls >= self.interrupt_after:
            raise KeyboardInterrupt("interrupted by the test")
        self.calls += 1
        self.requests += len(requests)
        outputs = []
        for request in requests:
            samples = []
            for k in range(n_samples):
                letter = self.answer_of(request, k) if self.answer_of else None
                if letter is None:
                    key = json.dumps([request.messages, list(request.image_hashes), request.seed, k, temperature])
                    letter = "ABCD"[hashlib.sha256(key.encode()).digest()[0] % 4]
                samples.append((f"{self.prefix}The answer is {letter}", "stop"))
            outputs.append(samples)
        return outputs
