"""The model side of evaluation and pair building, as an injected callable, with an on-disk generation cache.

A generator is any callable

    generate_fn(requests: list[GenerationRequest], *, n_samples, temperature, top_p, max_new_tokens, seed)
        -> list (one per request) of lists (n_samples) of (text, finish_reason)

where `finish_reason` is "stop" (an end token) or "length" (hit max_new_tokens). A request is chat messages
(`{"role", "content"}` with `<image>` placeholders) and the images in placeholder order; `request.seed` is the
request's own seed (derived from the run seed and the request's content, so a request samples the same way in
whatever batch it lands), `seed` the run seed. `model_runner.load_generator` builds the one for our checkpoints.

`generate_cached` runs the requests not yet in the cache, in batches, and stores each batch as it completes: an
interrupted run repeats at most one batch. The key covers the model identity, the messages, the images' SHA-256,
the sampling parameters and the request seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from .cache import JsonlCache, cache_key
from .items import ImageRef
from .progress import Progress

FINISH_REASONS = ("stop", "length")


class GenerationUnavailable(RuntimeError):
    """Raised when a model was asked to generate but `medee_jax.models.generate` is not available."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[tuple[str, str], ...]  # (role, content)
    images: tuple[ImageRef, ...] = ()
    seed: int = 0

    @staticmethod
    def make(messages: Sequence[dict], images: Sequence[ImageRef], run_seed: int) -> "GenerationRequest":
        """A request whose own seed is derived from `run_seed` and its content."""
        msgs = tuple((m["role"], m["content"]) for m in messages)
        hashes = [im.sha256() for im in images]
        seed = int(cache_key([run_seed, msgs, hashes])[:8], 16)
        return GenerationRequest(msgs, tuple(images), seed)

    @property
    def message_dicts(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def image_hashes(self) -> tuple[str, ...]:
        return tuple(im.sha256() for im in self.images)

    def prompt_sha256(self) -> str:
        return cache_key(self.messages)


GenerateFn = Callable[..., list]


def request_key(model_id: str, request: GenerationRequest, sampling: Sampling) -> str:
    return cache_key({"model": model_id, "messages": request.messages, "images": list(request.image_hashes),
                      "sampling": sampling.as_dict(), "request_seed": request.seed})


def _check_outputs(outputs, batch: list[GenerationRequest], n_samples: int) -> list[list[list]]:
    if not isinstance(outputs, (list, tuple)) or len(outputs) != len(batch):
        raise RuntimeError(f"the generator returned {type(outputs).__name__} of length "
                           f"{len(outputs) if hasattr(outputs, '__len__') else '?'} for {len(batch)} requests")
    checked = []
    for samples in outputs:
        if len(samples) != n_samples:
            raise RuntimeError(f"the generator returned {len(samples)} samples for a request, expected {n_samples}")
        row = []
        for text, reason in samples:
            if not isinstance(text, str) or reason not in FINISH_REASONS:
                raise RuntimeError(f"bad generator output ({type(text).__name__}, {reason!r}); expected "
                                   f"(text, one of {FINISH_REASONS})")
            row.append([text, reason])
        checked.append(row)
    return checked


def generate_cached(requests: Sequence[GenerationRequest], generate_fn: GenerateFn, sampling: Sampling, *,
                    model_id: str, cache: JsonlCache, batch_size: int, label: str = "generate",
                    show_progress: bool = True) -> list[list[tuple[str, str]]]:
    """[(text, finish_reason)] * n_samples for each request, from the cache or from `generate_fn`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    keys = [request_key(model_id, r, sampling) for r in requests]
    missing: dict[str, GenerationRequest] = {}
    for key, request in zip(keys, requests):
        if key not in cache and key not in missing:
            missing[key] = request
    n = sampling.n_samples
    progress = Progress(label, len(set(keys)) * n, done=(len(set(keys)) - len(missing)) * n, enabled=show_progress)
    todo = list(missing.items())
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        batch = [r for _, r in chunk]
        outputs = generate_fn(batch, n_samples=n, temperature=sampling.temperature, top_p=sampling.top_p,
                              max_new_tokens=sampling.max_new_tokens, seed=sampling.seed)
        for (key, _), samples in zip(chunk, _check_outputs(outputs, batch, n)):
            cache.put(key, samples)
        progress.update(len(chunk) * n)
    progress.close()
    return [[(text, reason) for text, reason in cache.get(key)] for key in keys]
