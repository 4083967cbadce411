"""Stage-II pair building: ``python tools/build_pairs.py --config configs/pairs.py [--config.x=...] --workdir W``.

Stages (``stage``): sample (K responses per case from ``model`` -> ``candidates``), judge (score every response
under MMRP -> pairs in ``output`` and W/summary.json), all (sample then judge). With no overrides: the embedded
demo's multimodal cases, the Stage-I demo model (workdir/sft), the offline rules judge.

Judges (``judge.kind``): rules (offline); openai (``judge.base_url``, ``judge.model``, key in OPENAI_API_KEY;
``judge.concurrency`` requests in flight, ``judge.max_requests`` budget, retries with backoff); model (a checkpoint
of ours as the judge: ``judge.model`` = HF dir or training workdir). ``judge.criteria`` lists the criteria that
count in the mean (the per-criterion ablation); responses are always scored on all four.
"""

import ml_collections

from medee_jax.data.demo import INSTRUCTION as DEMO_INSTRUCTION


def get_config():
    c = ml_collections.ConfigDict()
    c.stage = "all"  # sample | judge | all
    c.seed = 0
    c.cases = ""  # "" = demo Stage-II cases | sharegpt:PATH | FORMAT:PATH (an evaluation benchmark format)
    c.limit = 0  # > 0: the first N cases
    c.candidates = ""  # the sample stage's output and the judge stage's input; "" = W/candidates.jsonl
    c.output = ""  # the preference pairs; "" = W/pairs.jsonl
    c.model = "workdir/sft"  # the policy to sample: "embedded", an HF checkpoint dir or a training workdir

    c.sample = ml_collections.ConfigDict()
    c.sample.k = 8
    c.sample.temperature = 0.7
    c.sample.top_p = 0.9
    c.sample.max_new_tokens = 512
    c.sample.batch_size = 8
    c.sample.style = "cot"  # prompt style for benchmark-format cases (medee_jax.evaluation.prompts)
    c.sample.instruction = DEMO_INSTRUCTION

    c.judge = ml_collections.ConfigDict()
    c.judge.kind = "rules"  # rules | openai | model
    c.judge.base_url = ""  # e.g. https://api.openai.com/v1 or a local OpenAI-compatible server
    c.judge.model = ""  # endpoint model name (openai) or checkpoint location (model)
    c.judge.concurrency = 4
    c.judge.max_requests = 0  # 0: no budget
    c.judge.timeout_s = 120.0
    c.judge.max_retries = 4
    c.judge.backoff_s = 1.0
    c.judge.max_backoff_s = 60.0
    c.judge.temperature = 0.0
    c.judge.max_tokens = 512
    c.judge.criteria = "logical_consistency,image_grounding,no_hallucination,reflection"

    c.pairs = ml_collections.ConfigDict()
    c.pairs.min_margin = 1.0
    c.pairs.require_correct = True  # chosen must answer correctly when the case has an answer
    c.pairs.length_ratio = 0.0  # > 0: rejected at most this many times longer/shorter than chosen
    return c
