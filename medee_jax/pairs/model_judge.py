"""One of our own checkpoints as the judge, with the same rubric, through an injected generator (see
`medee_jax.evaluation.generation`; `model_runner.load_generator` once generation exists).

Per response: system = the rubric (with the reference answer when known), user = the case's images as `<image>`
placeholders and the case and answer as text. A reply that is not the rubric's JSON object is asked again with
another request seed and temperature `retry_temperature` (greedy decoding would repeat itself), up to
`max_retries` times, then counted as `malformed_scores`. Generations are cached (`generate_cached`).
"""

from __future__ import annotations

import dataclasses

from medee_jax.evaluation.cache import JsonlCache
from medee_jax.evaluation.generation import GenerationRequest, Sampling, generate_cached
from medee_jax.evaluation.items import ImageRef

from .candidates import Case
from .openai_judge import reference_text
from .rubric import RUBRIC_VERSION, MalformedReply, case_text, parse_scores, rubric_text


class ModelJudge:
    def __init__(self, generate_fn, model_id: str, cache: JsonlCache, *, max_retries: int = 2, batch_size: int = 8,
                 max_new_tokens: int = 512, temperature: float = 0.0, retry_temperature: float = 0.7, seed: int = 0):
        self.generate_fn, self.model_id, self.cache = generate_fn, f"{model_id}|{RUBRIC_VERSION}", cache
        self.max_retries, self.batch_size = max_retries, batch_size
        self.sampling = Sampling(n_samples=1, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        self.retry_temperature = retry_temperature
        self.stats = {"requests_sent": 0, "cache_hits": 0, "retries": 0}

    @staticmethod
    def request(case: Case, response: str, seed: int) -> GenerationRequest:
        marks = "<image>" * len(case.images)
        messages = [{"role": "system", "content": rubric_text(reference_text(case))},
                    {"role": "user", "content": marks + case_text(case.prompt_turns, response).replace(
                        "<image>", "[image]")}]
        return GenerationRequest.make(messages, [ImageRef(path=p) for p in case.images], seed)

    def judge(self, jobs: list[tuple[Case, str]]) -> list[dict]:
        results: list[dict | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))
        for attempt in range(self.max_retries + 1):
            sampling = self.sampling if attempt == 0 else dataclasses.replace(
                self.sampling, temperature=self.retry_temperature, seed=self.sampling.seed + attempt)
            requests = [self.request(*jobs[i], sampling.seed) for i in pending]
            before = len(self.cache)
            outputs = generate_cached(requests, self.generate_fn, sampling, model_id=self.model_id, cache=self.cache,
                                      batch_size=self.batch_size, label="judge", show_progress=False)
            self.stats["requests_sent"] += len(self.cache) - before
            self.stats["cache_hits"] += len(requests) - (len(self.cache) - before)
            still = []
            for i, samples in zip(pending, outputs):
                try:
                    results[i] = parse_scores(samples[0][0])
                except MalformedReply as e:
                    results[i] = {"failure": "malformed_scores", "detail": str(e)}
                    still.append(i)
            pending = still
            if not pending:
                break
            self.stats["retries"] += len(pending) if attempt < self.max_retries else 0
        return results
