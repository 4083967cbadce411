"""Evaluation: ``python -m medee_jax.evaluate --config configs/eval.py [--config.x=...] [--workdir DIR]``.

With no overrides: the embedded demo's held-out multiple-choice cases (image questions answerable only from the
image, text questions), the untrained demo model and the Stage-I / Stage-II demo models from the default training
workdirs (workdir/sft, workdir/dpo, which ``python -m medee_jax.pipeline --config configs/pipeline.py`` writes; the
command that creates a missing one is printed), with the image-blind controls. Real runs:
``--config.models=stage2=/path/to/hf_or_workdir --config.benchmarks=medxpertqa:/data/MM/
test.jsonl,mmmu:/data/mmmu_validation.jsonl --config.prompt.style=medxpertqa_cot``.

Benchmark formats (``benchmarks``, comma-separated FORMAT:PATH): mc_jsonl, medxpertqa, medqa, medbullets, mmmu,
mmmu_pro, vlmevalkit_tsv, pmc_vqa, omnimedvqa, vqa_rad, slake, pathvqa (see medee_jax/evaluation/readers*.py).
"""

import ml_collections

from medee_jax.data.demo import INSTRUCTION as DEMO_INSTRUCTION


def get_config():
    c = ml_collections.ConfigDict()
    c.workdir = "workdir/eval"  # one folder per model inside, plus the combined results.md / results.png
    # name=location, comma-separated; location: "embedded" (untrained demo model), a Hugging Face checkpoint
    # directory, or a training workdir (its latest checkpoint).
    c.models = "base=embedded,stage1=workdir/sft,stage2=workdir/dpo"
    c.benchmarks = ""  # "" = the embedded demo's held-out cases
    c.media_root = ""
    c.on_bad_record = "skip"  # skip (counted in results.json) | raise
    c.limit = 0  # > 0: the first N items of each benchmark
    c.mmmu_subjects = "health"  # health (MMMU Health & Medicine) | all

    c.prompt = ml_collections.ConfigDict()
    c.prompt.style = "cot"  # direct | cot | medxpertqa_cot
    c.prompt.instruction = ""  # "" = the style's default; the demo uses the instruction its models learned
    c.prompt.system = ""

    c.sampling = ml_collections.ConfigDict()
    c.sampling.n_samples = 1  # > 1: inference-time scaling (mean, maj@N, pass@N for N = 1, 2, 4, ...)
    c.sampling.temperature = 0.0  # greedy; the paper's scaling runs use about 0.3
    c.sampling.top_p = 1.0
    c.sampling.max_new_tokens = 512
    c.sampling.seed = 0

    c.batch_size = 8
    c.blind_controls = True  # also evaluate with blank and with shuffled images
    c.shuffle_seed = 0
    c.model_dtype = "float32"
    # Qwen-style image size bounds; 0 = the model's own: a training workdir's data.min_pixels / data.max_pixels
    # (the demo pipeline's 64 * 64 bound: 56 x 56 images), the embedded demo model's (the same), else the family's
    # processor defaults.
    c.min_pixels = 0
    c.max_pixels = 0

    c.demo_instruction = DEMO_INSTRUCTION  # used when benchmarks == "" and prompt.instruction == ""
    return c
