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
    c.data.min_pixels = 0  # Qwen2-VL resize bounds; 0 = the checkpoint's preprocessor_config.json (logged at start)
    c.data.max_pixels = 0
    c.data.image_max_pixels = 0  # > 0: pre-resize larger images (LLaMA-Factory style) before the processor
    c.data.on_bad_record = "raise"  # raise | skip
    # Dataset format and the checkpoint's image processor. data.train / data.eval may also be a Parquet file, a
    # folder of shards, a datasets.save_to_disk folder, a glob, or path/dataset_info.json:entry (LLaMA-Factory).
    c.data.format = "auto"  # auto | sharegpt | alpaca | trl: how records are read (auto: from their keys)
    c.data.min_tiles = 0  # InternVL tiles per image; 0 = the checkpoint's processor (min_patches / max_patches)
    c.data.max_tiles = 0

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
    # With loss_type "sigmoid", label_smoothing > 0 is conservative DPO (cDPO), as in LLaMA-Factory; TRL 1.16
    # ignores label_smoothing for that loss, so a TRL run with it set trains plain DPO.
    c.dpo.label_smoothing = 0.0
    c.dpo.sft_weight = 0.0
    c.dpo.reference = "frozen"  # frozen | precomputed | none
    # True: one row per pair, [prompt | chosen | rejected]; the prompt and its image tokens go through the decoder
    # once for both completions (same log-probs as separate rows; rows take up to 2 x data.max_length tokens).
    # Fewer tokens, but a longer dense attention: measured slower than separate rows on CPU (README, Benchmarks).
    c.dpo.share_prompt = False

    # ---- Data safety settings (issue 9, "no lost work, no surprises") ----------------------------------------------
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
    return c


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
