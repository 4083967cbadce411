"""Run configs: the fields every SFT/DPO config has, size presets for real runs, and the embedded demo's sizes.

`configs/sft.py` and `configs/dpo.py` build on `base_config` and pick a preset from the command line, big_vision
style: ``--config configs/dpo.py:qwen2_5_vl_7b`` calls ``get_config("qwen2_5_vl_7b")``, which applies
``PRESETS["qwen2_5_vl_7b"]`` (`apply_preset`); ``--config configs/dpo.py:qwen2_5_vl_7b,topology=v5p-8`` also applies
that preset's plan for the slice (``SLICE_PLANS["qwen2_5_vl_7b"]["v5p-8"]``: mesh, batch, memory options).
Command-line overrides (``--config.x.y=v``) come after and win.

The embedded demo (no model.checkpoint, no model.init_from, no data.train) is decided once at the start of a run,
after the overrides, by `medee_jax.training.setup.resolve_config`; only then are `DEMO_SIZES` applied, and only to
fields the command line did not set. A run that names a checkpoint or data never gets them.

This module is imported by the config files, so it stays light: ml_collections only (no jax).
"""

from __future__ import annotations

from typing import Any

import ml_collections

MODES = ("sft", "dpo")

# Qwen2.5-VL image limits shared by the presets. Training follows what peers use for Qwen2.5-VL fine-tuning, not
# the processor's 12.8-megapixel maximum (16,384 patches, 4,096 tokens for one image).
QWEN_IMAGE_MAX_PIXELS = 768 * 768  # LLaMA-Factory's image_max_pixels default: ~3,000 patches, ~750 image tokens
# The most patches one image can have after that pre-resize and the processor's rounding to 28-pixel cells: 3,136
# for a square, 3,564 at extreme aspect ratios (e.g. 71 x 8303); rounded up to a multiple of 128.
QWEN_PATCHES_PER_IMAGE = 3584


def base_config(mode: str) -> ml_collections.ConfigDict:
    """The fields every run has, with recipe values for a real run (bf16, remat, 4k-token buckets).

    Every field can be overridden on the command line:
    ``python -m medee_jax.train --config configs/dpo.py --config.optimizer.lr=5e-7 --workdir runs/dpo``.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: must be one of {', '.join(MODES)}")
    c = ml_collections.ConfigDict()
    c.mode = mode  # "sft" (Stage-I) or "dpo" (Stage-II)
    c.seed = 0
    c.workdir = f"workdir/{mode}"  # the --workdir flag overrides
    # "auto": decided at the start of the run (after command-line overrides) and saved as true or false: true for
    # the embedded demo (no model.checkpoint, no model.init_from, no data.train), whose CPU sizes (DEMO_SIZES)
    # then replace the recipe's for every field the command line did not set.
    c.demo = "auto"
    c.preset = ""  # set by get_config(preset): the PRESETS entry this config was built from ("" = none)
    c.topology = ""  # set by get_config("preset,topology=SLICE"): the SLICE_PLANS entry applied ("" = none)

    # Where the initial weights come from: a Hugging Face checkpoint directory, an earlier run's workdir (Stage-I
    # result -> Stage-II policy and reference), or neither: the embedded tiny Qwen2.5-VL-shaped model.
    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""  # HF dir (config.json + safetensors)
    c.model.init_from = ""  # a medee_jax workdir or an Orbax dir from tools/convert_checkpoint.py hf2orbax
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "float32"  # master weights
    # Text attention in the train step (models/attention.py). auto: on TPU the Pallas splash kernel (under a
    # shard_map over the step's mesh: rows on their data shard, heads over mesh.tensor) where the heads divide
    # mesh.tensor, else blockwise; on GPU blockwise (online softmax, O(L) memory: the step's rows carry padding and
    # segment masks that cudnn does not take); on CPU the dense reference for short rows, blockwise for long ones.
    # DPO share_prompt rows (branch ids) run blockwise everywhere. reference: the dense O(L^2) math of the parity
    # tests; blockwise: always; splash: always (TPU only).
    c.model.attention = "auto"
    # none | full | minimal | save_attention | save_qkv_proj, and <named>_offload (host offload, TPU/GPU): what each
    # keeps and recomputes is in models/layers.py (REMAT_POLICIES); "dots" and "dots_no_batch" were retired.
    c.model.remat = "full"
    # Frozen parameters (vision tower and projector unless trained): "compute" stores them in model.dtype (they
    # are cast to it at use anyway and never get gradients: half the bytes of fp32), "param" in model.param_dtype.
    c.model.frozen_dtype = "compute"
    c.model.train_vision = False
    c.model.train_projector = False
    c.model.family = ""  # the embedded tiny model's family: "" (qwen2_5_vl) or internvl; checkpoints name their own

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # JSONL / JSON / ArrayRecord; "" = the embedded synthetic demo
    c.data.eval = ""
    c.data.media_root = ""  # folder image paths are relative to ("" = each data file's folder)
    c.data.tokenizer = ""  # defaults to the model checkpoint's directory (or the demo tokenizer)
    c.data.max_length = 4096  # tokens per sequence (prompt, image tokens and completion); SFT row capacity
    c.data.length_buckets = (1024, 2048, 4096)  # padded row lengths; the largest must be >= max_length
    c.data.patch_buckets = (1024, 2048, QWEN_PATCHES_PER_IMAGE)  # padded patch counts per batch; the largest is
    # the batch's patch budget (multiples of the vision merge unit, 4 for Qwen2.5-VL)
    c.data.target_buckets = ()  # widths of the per-row target arrays the LM head runs on; () = length_buckets
    c.data.batch_size = 1  # rows per data shard per micro-batch (pairs for DPO)
    c.data.grad_accum_steps = 1
    c.data.packing = False
    c.data.num_workers = 0
    c.data.num_epochs = 1
    c.data.shuffle = True
    # Qwen2-VL resize bounds; 0 = the checkpoint's preprocessor_config.json (logged at start), else the
    # processor's class defaults (3136 .. 12845056). image_max_pixels is the training limit.
    c.data.min_pixels = 0
    c.data.max_pixels = 0
    c.data.image_max_pixels = QWEN_IMAGE_MAX_PIXELS  # > 0: pre-resize larger images (LLaMA-Factory style)
    c.data.on_bad_record = "raise"  # raise | skip
    # Dataset format and the checkpoint's image processor. data.train / data.eval may also be a Parquet file, a
    # folder of shards, a datasets.save_to_disk folder, a glob, or path/dataset_info.json:entry (LLaMA-Factory).
    c.data.format = "auto"  # auto | sharegpt | alpaca | trl: how records are read (auto: from their keys)
    c.data.min_tiles = 0  # InternVL tiles per image; 0 = the checkpoint's processor (min_patches / max_patches)
    c.data.max_tiles = 0  # (a thumbnail tile is added when an image has several)
    c.data.tile_buckets = (8, 16, 32, 64)  # InternVL: tiles per batch (what patch_buckets are for Qwen2.5-VL)
    # 16-bit / float images (medical PNG/TIFF scans) -> 8 bits: "min_max" stretches each image's own range onto
    # 0..255; "bit_depth" scales by the format's range (x / 257 for 16-bit); "refuse" drops the record (reason
    # high_bit_depth). 48-bit colour PNGs are reduced by Pillow to each sample's high byte in either scaling mode.
    c.data.high_bit_depth = "min_max"
    # With data.on_bad_record="skip": stop before training when more than this fraction of an epoch's records is
    # bad (counted by reason in one pass over the data, cached per data file). 1.0: never stop for it.
    c.data.max_bad_fraction = 1.0
    # The eval file's image folder ("": data.media_root if set, else the eval file's own folder).
    c.data.eval_media_root = ""
    # Resume weights and optimizer state but start the data from its beginning (new data, or another pipeline).
    c.data.reset_iterator = False

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 1e-5
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.final_lr_ratio = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.max_grad_norm = 1.0
    # AdamW's first moment: "bfloat16" saves 2 bytes per trainable parameter (what puts 7B DPO on one 141 GB
    # H200 with the precomputed reference). The second moment stays fp32: its per-step change (1 - b2 = 0.1%) is
    # below bf16's resolution and would be rounded away.
    c.optimizer.mu_dtype = "float32"

    c.train = ml_collections.ConfigDict()
    c.train.steps = -1  # -1: num_epochs over the training set
    c.train.log_every = 1
    c.train.eval_every = 0  # 0: evaluate at the end only
    c.train.eval_batches = 8
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 3
    c.train.async_checkpointing = True
    c.train.max_nonfinite_in_a_row = 5
    c.train.export_hf = False  # write workdir/hf (safetensors + config.json) at the end
    c.train.peak_flops_per_device = 0.0  # 0: look the device up (unknown on CPU: MFU reported as null)
    c.train.distributed = "auto"  # auto | true | false: jax.distributed.initialize()
    c.train.vocab_chunk = 8192
    c.train.seq_chunk = 1024
    # The LM head's matmuls (the chunked log-probs): "compute" = model.dtype operands (bf16 on the MXU / tensor
    # cores) with fp32 accumulation, logsumexp and gradients; "float32" = fp32 operands (TF32 or slower on GPU).
    c.train.lm_head_dtype = "compute"
    # GPU only: the share of each GPU's memory JAX preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION; JAX's default
    # 0.75 leaves a quarter unused). Set at the trainer's start; the environment variable, when set, wins. 0: JAX's
    # default.
    c.train.gpu_memory_fraction = 0.95
    # CPU float32 runs only: compile the step's forward/backward programs with XLA:CPU's YNNPACK fused dot and
    # 512-bit vectors (setup.CPU_FP32_STEP_COMPILER_OPTIONS; about 1.15x faster on the 62M benchmark, sums in a
    # different fp32 order). False: XLA's defaults. No effect on TPU, GPU or bf16 runs.
    c.train.xla_cpu_fused_dot = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.sharding_rules = ml_collections.ConfigDict({
        "layers": None, "norm": None, "embed": "fsdp", "vocab": "tensor", "q_heads": "tensor", "kv_heads": "tensor",
        "mlp": "tensor", "vision_patch": None, "vision_embed": "fsdp", "vision_heads": "tensor",
        "vision_mlp": "tensor", "vision_merge": "fsdp"})

    c.dpo = ml_collections.ConfigDict()
    c.dpo.loss_type = "sigmoid"
    c.dpo.beta = 0.1
    # With loss_type "sigmoid", label_smoothing > 0 is conservative DPO (cDPO), as in LLaMA-Factory; TRL 1.16
    # ignores label_smoothing for that loss, so a TRL run with it set trains plain DPO.
    c.dpo.label_smoothing = 0.0
    c.dpo.sft_weight = 0.0
    c.dpo.reference = "frozen"  # frozen | precomputed | none
    # True: one row per pair, [prompt | chosen | rejected]; the prompt and its image tokens go through the decoder
    # once for both completions (same log-probs as separate rows; rows take up to 2 x data.max_length tokens).
    # Measured on CPU (62M model, 64-token prompt + 64 image tokens, 192-token answers; README, Benchmarks): 1.3x
    # faster per step without remat, 1.04x with remat full and train.xla_cpu_fused_dot. Off by default: its branch
    # mask (a completion sees the prompt and itself) is not a causal + segment mask, which the fused attention
    # kernels (splash, cuDNN) take, so on accelerators it may need the dense attention path; turn it on where your
    # plan's attention supports it.
    c.dpo.share_prompt = False
    return c


# ---------------------------------------------------------------------------------------------------------------
# Size presets for real runs. One explicit dict per preset: dotted config field -> value, or {"sft": v, "dpo": v}
# where the stages differ. Memory figures are for 80-96 GB accelerators (H100/H200, TPU v5p) with bf16 compute,
# fp32 master weights and AdamW moments sharded by fsdp; check a plan on the real slice with `--check`, or ahead
# of time for a TPU slice with tools/aot_compile.py. SLICE_PLANS (below) adjust a preset for a named slice.

# InternVL3 tiles: 448 px, 256 LLM tokens each. At most 6 tiles + a thumbnail per image (1,792 tokens) leaves
# room in a 4,096-token row for the question and a long chain of thought (the processor allows 12 + 1).
INTERNVL_MAX_TILES = 6
INTERNVL_TILES_PER_IMAGE = INTERNVL_MAX_TILES + 1

PRESETS: dict[str, dict[str, Any]] = {
    "qwen2_5_vl_3b": {
        "mesh.data": 1,  # all devices on fsdp: 3.8B params x 16 B (fp32 weights, grads, Adam) = 60 GB to spread
        "mesh.fsdp": -1,  # -1 = every device
        "mesh.tensor": 1,  # 16 heads / 2 KV heads: small enough that tensor parallelism only adds collectives
        "model.remat": "full",  # 36 layers x 4k tokens of saved activations otherwise dominate memory
        "data.batch_size": {"sft": 4, "dpo": 2},  # per data shard: 4 rows (2 pairs = 4 rows) of 4k tokens
        "data.max_length": 4096,  # a question, one ~750-token image and a long chain of thought
        "data.length_buckets": (1024, 2048, 4096),  # three compiled lengths; most cases fall under 2k tokens
        "data.target_buckets": (512, 1024, 2048, 4096),  # LM head only over completions, mostly under 1k tokens
        "data.image_max_pixels": QWEN_IMAGE_MAX_PIXELS,  # LLaMA-Factory's default, not the processor's 12.8 MP
        "data.patch_buckets": {"sft": (1024, 4096, 4 * QWEN_PATCHES_PER_IMAGE),  # one full-size image per row
                               "dpo": (1024, 4096, 2 * QWEN_PATCHES_PER_IMAGE)},  # images once per pair
        "optimizer.lr": {"sft": 1e-5, "dpo": 1e-6},  # SFT: the paper-adjacent 1e-5; DPO: upper half of 5e-7..5e-6
    },
    "qwen2_5_vl_7b": {
        "mesh.data": 1,  # all devices on fsdp: 8.3B params x 16 B = 133 GB of training state to spread
        "mesh.fsdp": -1,  # -1 = every device; one 8-chip host holds ~17 GB state per device
        "mesh.tensor": 1,  # 28 heads / 4 KV heads: fsdp alone fits, tensor parallelism would only add traffic
        "model.remat": "full",  # 28 layers x 4k tokens x 3584 wide: saved activations would not fit with the state
        "data.batch_size": {"sft": 2, "dpo": 1},  # per data shard: 2 rows of 4k tokens (1 pair = 2 rows)
        "data.max_length": 4096,  # a question, one ~750-token image and a long chain of thought
        "data.length_buckets": (1024, 2048, 4096),  # three compiled lengths; most cases fall under 2k tokens
        "data.target_buckets": (512, 1024, 2048, 4096),  # LM head only over completions, mostly under 1k tokens
        "data.image_max_pixels": QWEN_IMAGE_MAX_PIXELS,  # LLaMA-Factory's default, not the processor's 12.8 MP
        "data.patch_buckets": {"sft": (1024, 2048, 2 * QWEN_PATCHES_PER_IMAGE),  # one full-size image per row
                               "dpo": (1024, 2048, QWEN_PATCHES_PER_IMAGE)},  # one image per pair
        "optimizer.lr": {"sft": 1e-5, "dpo": 5e-7},  # the recipe's values for 7B (LLaMA-Factory example; paper)
    },
    "qwen2_5_vl_32b": {
        "mesh.data": 1,  # fsdp over all devices: 33.5B params x 16 B = 536 GB of training state
        "mesh.fsdp": -1,  # -1 = every device left after tensor; needs >= 32 devices of 80 GB
        "mesh.tensor": 4,  # 40 heads / 8 KV heads split 4 ways: fewer data shards keep the global batch small
        "model.remat": "full",  # 64 layers x 5120 wide: activations must be recomputed
        "data.batch_size": {"sft": 2, "dpo": 1},  # per data shard (4 devices): 2 rows, or 1 pair
        "data.max_length": 4096,  # a question, one ~750-token image and a long chain of thought
        "data.length_buckets": (1024, 2048, 4096),  # three compiled lengths; most cases fall under 2k tokens
        "data.target_buckets": (512, 1024, 2048, 4096),  # LM head only over completions, mostly under 1k tokens
        "data.image_max_pixels": QWEN_IMAGE_MAX_PIXELS,  # LLaMA-Factory's default, not the processor's 12.8 MP
        "data.patch_buckets": {"sft": (1024, 2048, 2 * QWEN_PATCHES_PER_IMAGE),  # one full-size image per row
                               "dpo": (1024, 2048, QWEN_PATCHES_PER_IMAGE)},  # one image per pair
        "optimizer.lr": {"sft": 5e-6, "dpo": 3e-7},  # half the 7B values: wider models take smaller steps
    },
    "qwen2_5_vl_72b": {
        "mesh.data": 1,  # fsdp over all devices: 73.4B params x 16 B = 1.17 TB of training state
        "mesh.fsdp": -1,  # -1 = every device left after tensor; needs >= 64 devices of 80 GB
        "mesh.tensor": 8,  # 64 heads / 8 KV heads split within a host: a 64-chip slice has 8 data shards, not 64
        "model.remat": "full",  # 80 layers x 8192 wide: activations must be recomputed
        "data.batch_size": {"sft": 2, "dpo": 1},  # per data shard (8 devices): 2 rows, or 1 pair
        "data.max_length": 4096,  # a question, one ~750-token image and a long chain of thought
        "data.length_buckets": (1024, 2048, 4096),  # three compiled lengths; most cases fall under 2k tokens
        "data.target_buckets": (512, 1024, 2048, 4096),  # LM head only over completions, mostly under 1k tokens
        "data.image_max_pixels": QWEN_IMAGE_MAX_PIXELS,  # LLaMA-Factory's default, not the processor's 12.8 MP
        "data.patch_buckets": {"sft": (1024, 2048, 2 * QWEN_PATCHES_PER_IMAGE),  # one full-size image per row
                               "dpo": (1024, 2048, QWEN_PATCHES_PER_IMAGE)},  # one image per pair
        "optimizer.lr": {"sft": 5e-6, "dpo": 2e-7},  # smaller again for the widest model
    },
}


def _internvl_preset(*, tensor: int, batch: dict[str, int], lr: dict[str, float]) -> dict[str, Any]:
    """An InternVL3 preset: the choices of the Qwen2.5-VL preset with the same decoder size (each entry's comment in
    `PRESETS` says which), with tiles instead of patches."""
    return {
        "mesh.data": 1,  # fsdp over every device (after tensor): the state is spread, not replicated
        "mesh.fsdp": -1,
        "mesh.tensor": tensor,  # see the preset's comment
        "model.remat": "full",  # 4k-token rows: activations are recomputed layer by layer
        "data.batch_size": batch,  # rows (SFT) or pairs (DPO) per data shard
        "data.max_length": 4096,  # a question, one image of up to 7 tiles (1,792 tokens) and a chain of thought
        "data.length_buckets": (1024, 2048, 4096),  # three compiled lengths; most cases fall under 2k tokens
        "data.target_buckets": (512, 1024, 2048, 4096),  # LM head only over completions, mostly under 1k tokens
        "data.image_max_pixels": QWEN_IMAGE_MAX_PIXELS,  # the same pre-resize as Qwen's (LLaMA-Factory default)
        "data.max_tiles": INTERNVL_MAX_TILES,  # + a thumbnail: 7 tiles, 1,792 image tokens per image at most
        "data.tile_buckets": {"sft": (2, 4, batch["sft"] * INTERNVL_TILES_PER_IMAGE),  # one full image per row
                              "dpo": (2, 4, batch["dpo"] * INTERNVL_TILES_PER_IMAGE)},  # images once per pair
        "optimizer.lr": lr,
    }


PRESETS.update({
    # 0.9B decoder (ViT-300M): as qwen2_5_vl_3b, fsdp alone; 14 heads / 2 KV heads do not split further.
    "internvl3_1b": _internvl_preset(tensor=1, batch={"sft": 4, "dpo": 2}, lr={"sft": 1e-5, "dpo": 1e-6}),
    # 1.5B decoder: as qwen2_5_vl_3b.
    "internvl3_2b": _internvl_preset(tensor=1, batch={"sft": 4, "dpo": 2}, lr={"sft": 1e-5, "dpo": 1e-6}),
    # 7B decoder (Qwen2.5-7B), ViT-300M: as qwen2_5_vl_7b.
    "internvl3_8b": _internvl_preset(tensor=1, batch={"sft": 2, "dpo": 1}, lr={"sft": 1e-5, "dpo": 5e-7}),
    # 14B decoder (48 layers x 5120, 40 / 8 heads): fsdp alone on 16+ devices; tensor 2 would halve the shards.
    "internvl3_14b": _internvl_preset(tensor=1, batch={"sft": 2, "dpo": 1}, lr={"sft": 5e-6, "dpo": 3e-7}),
    # 32B decoder + InternViT-6B (frozen, bf16): as qwen2_5_vl_32b, tensor 4.
    "internvl3_38b": _internvl_preset(tensor=4, batch={"sft": 2, "dpo": 1}, lr={"sft": 5e-6, "dpo": 3e-7}),
    # 72B decoder + InternViT-6B: as qwen2_5_vl_72b, tensor 8 within a host.
    "internvl3_78b": _internvl_preset(tensor=8, batch={"sft": 2, "dpo": 1}, lr={"sft": 5e-6, "dpo": 2e-7}),
})

# Plans of a preset for named slices: slice -> the fields that differ there from the preset. A slice is a TPU slice
# (``v5p-8``: 4 chips; ``v6e-8``: 8 chips; tools/aot_compile.py compiles the step for it ahead of time) or a GPU
# host (``h200-1``: one 141 GB H200; ``h200-8``: one 8-GPU host). Applied by ``configs/dpo.py:PRESET,topology=SLICE``
# and by ``tools/aot_compile.py --topology SLICE``; the README's pod-plan table is this table compiled.
SLICE_PLANS: dict[str, dict[str, dict[str, Any]]] = {
    "qwen2_5_vl_7b": {
        "v5p-8": {  # 4 chips: the preset as it is, fsdp over the 4 (8.3B x 16 B of state: 33 GB per chip)
            "mesh.fsdp": -1,
            "mesh.tensor": 1,
        },
        "h200-1": {  # one 141 GB GPU: no reference weights, bf16 first moment, one pair per step
            "mesh.data": 1,
            "mesh.fsdp": 1,
            "mesh.tensor": 1,
            "dpo.reference": "precomputed",  # one forward pass over the data first; no 15 GB bf16 copy resident
            "optimizer.mu_dtype": "bfloat16",  # 15 GB less than fp32 moments
            "data.batch_size": {"sft": 1, "dpo": 1},
        },
    },
    "qwen2_5_vl_32b": {
        "v5p-32": {  # 16 chips: tensor 4 (40 / 8 heads) x fsdp 4
            "mesh.fsdp": -1,
            "mesh.tensor": 4,
        },
    },
    "qwen2_5_vl_72b": {
        "v5p-64": {  # 32 chips: tensor 8 (64 / 8 heads) x fsdp 4
            "mesh.fsdp": -1,
            "mesh.tensor": 8,
        },
    },
    "internvl3_78b": {
        "v5p-64": {  # 32 chips: tensor 8 x fsdp 4, as qwen2_5_vl_72b (the same decoder, InternViT-6B frozen in bf16)
            "mesh.fsdp": -1,
            "mesh.tensor": 8,
        },
    },
}

# The embedded demo's CPU sizes (tiny random model, synthetic data, 2 cores, <= 2 minutes for the DPO demo).
DEMO_SIZES: dict[str, dict[str, Any]] = {
    "sft": {
        "model.dtype": "float32",  # bf16 matmuls are emulated on CPU: slower than float32
        "model.remat": "none",  # the tiny model's activations are a few MB
        "optimizer.lr": 2e-3,  # a randomly initialised tiny model, not a pretrained one: it needs large steps
        "data.max_length": 384,  # a demonstration with its chat template is 220-320 tokens: none is cut
        "data.length_buckets": (128, 384),
        "data.target_buckets": (),
        "data.patch_buckets": (256, 512, 1024),
        "data.max_pixels": 224 * 224,  # the demo's scans are 224 x 224
        "data.image_max_pixels": 0,
        "data.batch_size": 8,
        "data.grad_accum_steps": 1,
        "train.checkpoint_every": 50,
        "train.eval_every": 50,
    },
    "dpo": {
        "model.dtype": "float32",  # bf16 matmuls are emulated on CPU: slower than float32
        "model.remat": "none",  # the tiny model's activations are a few MB
        "optimizer.lr": 2e-4,  # large for DPO, right for a tiny model that must learn in 60 steps
        "data.max_length": 384,  # prompt, 64 image tokens and the longer completion
        "data.length_buckets": (128, 384),
        "data.target_buckets": (),
        "data.patch_buckets": (256, 512, 1024),
        "data.max_pixels": 224 * 224,  # the demo's scans are 224 x 224
        "data.image_max_pixels": 0,
        "data.batch_size": 4,
        "data.grad_accum_steps": 1,
        "train.checkpoint_every": 50,
        "train.eval_every": 50,
    },
}


# Variants of the embedded demo, chosen like a preset (``--config configs/dpo.py:internvl_demo``). They keep the
# run an embedded demo (no checkpoint, no data), so DEMO_SIZES still apply on top of them.
DEMO_VARIANTS: dict[str, dict[str, Any]] = {
    "internvl_demo": {
        "model.family": "internvl",  # a tiny InternVL3-shaped model (224 px tiles, 64 image tokens each)
        "data.tile_buckets": (4, 8, 16),  # the demo's one-tile images: up to 4 pairs per batch, 2 tiles each
    },
}


def preset_values(name: str, mode: str) -> dict[str, Any]:
    """Returns {dotted field: value} of preset ``name`` for ``mode`` (stage-specific values resolved)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}; demo variants: "
                         f"{', '.join(DEMO_VARIANTS)}")
    return {field: (value[mode] if isinstance(value, dict) else value) for field, value in PRESETS[name].items()}


def set_field(c: ml_collections.ConfigDict, field: str, value: Any) -> None:
    """Sets the dotted ``field`` of ``c`` (which must exist) to ``value``."""
    *parents, leaf = field.split(".")
    node = c
    for name in parents:
        node = node[name]
    if leaf not in node:
        raise KeyError(f"{field}: no such config field")
    node[leaf] = value


def get_field(c: ml_collections.ConfigDict, field: str) -> Any:
    """Returns the value of the dotted ``field`` of ``c``."""
    node = c
    for name in field.split("."):
        node = node[name]
    return node


def slice_plan_values(preset: str, slice_name: str, mode: str) -> dict[str, Any] | None:
    """Returns {dotted field: value} of ``preset``'s plan for ``slice_name`` (stage-specific values resolved), or
    None when the preset has no plan for that slice."""
    plan = SLICE_PLANS.get(preset, {}).get(slice_name)
    if plan is None:
        return None
    return {field: (value[mode] if isinstance(value, dict) else value) for field, value in plan.items()}


def apply_slice_plan(c: ml_collections.ConfigDict, slice_name: str, keep=()) -> bool:
    """Applies ``c.preset``'s plan for ``slice_name`` to ``c`` except on the dotted fields in ``keep`` (the command
    line's overrides) and sets ``c.topology``; returns False (nothing changed but ``c.topology``) when the preset
    has no plan for that slice."""
    values = slice_plan_values(c.preset, slice_name, c.mode) if c.preset else None
    c.topology = slice_name
    if values is None:
        return False
    for field, value in values.items():
        if field not in set(keep):
            set_field(c, field, value)
    return True


def apply_preset(c: ml_collections.ConfigDict, name: str | None) -> ml_collections.ConfigDict:
    """Returns ``c`` with preset ``name`` applied (None or "": unchanged) and ``c.preset`` set to it.

    The value after the colon of ``--config configs/dpo.py:NAME`` is the preset name, optionally followed by
    ``,topology=SLICE``: then the preset's plan for that slice (`SLICE_PLANS`) is applied too.
    """
    name, *options = [part.strip() for part in (name or "").split(",")]
    if not name:
        return c
    if name in DEMO_VARIANTS:
        if options:
            raise ValueError(f"{name!r} is a demo variant: it takes no options ({', '.join(options)})")
        for field, value in DEMO_VARIANTS[name].items():
            set_field(c, field, value)
        return c
    for field, value in preset_values(name, c.mode).items():
        set_field(c, field, value)
    c.preset = name
    for option in options:
        key, _, value = option.partition("=")
        if key != "topology" or not value:
            raise ValueError(f"--config ...:{name},{option}: the only option after a preset is topology=SLICE")
        if not apply_slice_plan(c, value):
            planned = ", ".join(SLICE_PLANS.get(name, {})) or "none"
            raise ValueError(f"preset {name!r} has no plan for slice {value!r} (planned: {planned})")
    return c
