"""Fields shared by the SFT and DPO configs. Every field can be overridden on the command line:
``python -m medee_jax.train --config configs/dpo.py --config.optimizer.lr=5e-7 --workdir runs/dpo``.
"""

import ml_collections


def base_config(mode: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = mode  # "sft" (Stage-I) or "dpo" (Stage-II)
    c.seed = 0
    c.workdir = f"workdir/{mode}"  # the --workdir flag overrides

    # Where the initial weights come from: a Hugging Face checkpoint directory, an earlier run's workdir (Stage-I
    # result -> Stage-II policy and reference), or neither: the embedded tiny Qwen2.5-VL-shaped model.
    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""  # HF dir (config.json + safetensors)
    c.model.init_from = ""  # a medee_jax workdir or an Orbax dir from tools/convert_checkpoint.py hf2orbax
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "float32"  # master weights
    c.model.remat = "full"  # none | full | dots | dots_no_batch
    c.model.train_vision = False
    c.model.train_projector = False
    c.model.family = ""  # the embedded tiny model's family: "" (qwen2_5_vl) or internvl; checkpoints name their own

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # JSONL / JSON / ArrayRecord; "" = the embedded synthetic demo
    c.data.eval = ""
    c.data.media_root = ""
    c.data.tokenizer = ""  # defaults to the model checkpoint's directory (or the demo tokenizer)
    c.data.max_length = 1024
    c.data.seq_buckets = (128, 256, 512, 1024)
    c.data.patch_buckets = (256, 1024, 4096)
    c.data.target_buckets = ()  # widths of the per-row target arrays the LM head runs on; () = seq_buckets
    c.data.batch_size = 4  # rows per data shard per micro-batch (pairs for DPO)
    c.data.grad_accum_steps = 1
    c.data.packing = False
    c.data.num_workers = 0
    c.data.num_epochs = 1
    c.data.shuffle = True
    c.data.min_pixels = 3136
    c.data.max_pixels = 12845056
    c.data.image_max_pixels = 0  # > 0: pre-resize larger images (LLaMA-Factory style) before the processor
    c.data.min_tiles = 1  # InternVL: tiles per image (a thumbnail tile is added when an image has several)
    c.data.max_tiles = 12
    c.data.tile_buckets = (8, 16, 32, 64)  # InternVL: tiles per batch (what patch_buckets are for Qwen2.5-VL)
    c.data.on_bad_record = "raise"  # raise | skip

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 1e-5
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.final_lr_ratio = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.max_grad_norm = 1.0

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
    c.dpo.label_smoothing = 0.0
    c.dpo.sft_weight = 0.0
    c.dpo.reference = "frozen"  # frozen | precomputed | none
    # True: one row per pair, [prompt | chosen | rejected]; the prompt and its image tokens go through the decoder
    # once for both completions (same log-probs as separate rows; rows take up to 2 x data.max_length tokens).
    # Fewer tokens, but a longer dense attention: measured slower than separate rows on CPU (README, Benchmarks).
    c.dpo.share_prompt = False
    return c


def internvl_demo(c: ml_collections.ConfigDict) -> None:
    """The embedded demo with a tiny InternVL3-shaped model (224 px tiles, 64 image tokens each)."""
    c.model.family = "internvl"
    c.data.tile_buckets = (4, 8, 16)


def embedded_demo_sizes(c: ml_collections.ConfigDict, *, lr: float, max_length: int, batch_size: int) -> None:
    """CPU-sized settings of the embedded demo (tiny model, synthetic data); real runs override them."""
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.optimizer.lr = lr
    c.data.max_length = max_length
    c.data.seq_buckets = (128, max_length) if max_length > 128 else (max_length,)
    c.data.patch_buckets = (256, 512, 1024)
    c.data.max_pixels = 224 * 224
    c.data.batch_size = batch_size
    c.train.checkpoint_every = 50
    c.train.eval_every = 50
