"""The Grain input pipeline: files → records → images → tokens → packed, bucketed device batches.

    source (JSONL / JSON array / ArrayRecord / Parquet / Arrow, `dataset_files.open_dataset`)
      → shuffle(seed)            global, reshuffled every epoch
      → [shard_index::shard_count]  this host's share of every epoch (disjoint across hosts, covering the data)
      → repeat(num_epochs)
      → ParseRecord → LoadImages → Tokenize     one Grain `MapTransform` per stage, run in worker processes
      → mp_prefetch(num_workers)                 workers take interleaved slices; their output is merged in order
      → PackAndBatch                             in the consuming process: packing, padding, positions, layout

`PackAndBatch` runs after the workers, so the batches do not depend on `num_workers`: the workers' merged output
is exactly the record order. A bad record is passed along as a marker and handled there by `on_bad_record`:
"raise" stops with a `BadRecordError` naming file, line and reason; "skip" counts it by reason (see
`BatchIterator.stats()`, which also reports packing efficiency and the examples cut to `max_length`). A whole
epoch without one usable record raises `errors.NoUsableRecordsError` with the counts by reason (instead of reading
an all-bad file forever).

The iterator (`make_iterator`) is a `grain.DatasetIterator`: `get_state()` is a JSON-able dict (the position in the
record stream plus running statistics), and `set_state()` on a fresh iterator of the same config resumes with
exactly the batches the saved one would have produced next (`grain.checkpoint.CheckpointSave/Restore` work on it).
A state saved under different data settings (files — by name and size, so a moved
data file or workdir still resumes —, seed, batch shape, num_workers, shard) is refused with a message naming them. The batch layout is documented in `medee_jax.data.batching`; DPO records may carry
precomputed reference log-probs (`ref_chosen_logps`, `ref_rejected_logps`), which become the batch's `ref_logps`.

Multi-host: every host builds the same pipeline with its own shard (default: `jax.process_index()` of
`jax.process_count()`). Packing makes the number of batches per epoch data dependent, so hosts can run out at
different steps: train multi-host runs with `num_epochs=None` and a step count.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from medee_jax.data import batching, errors, formats
from medee_jax.data.batching import BatchSpec
from medee_jax.data.errors import BadRecordCounter, BadRecordError
from medee_jax.data.dataset_files import data_files, open_dataset
from medee_jax.data.images import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, check_high_bit_depth
from medee_jax.data.sources import RawRecord

# Reason code for an example whose images alone exceed the largest vision-unit bucket (not in errors.py's list).
TOO_MANY_PATCHES = "too_many_image_patches"
# Arrays of at least this many bytes go from the workers through shared memory, smaller ones are pickled.
MIN_SHM_BYTES = 768 << 10


# ---------------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything the input pipeline needs besides the model's family and vision settings.

    paths: data files (.jsonl, .json array, .array_record, .parquet, .arrow), folders, globs or
      "dataset_info.json:entry" (`medee_jax.data.dataset_files`); one string or several.
    format: how records are read: "auto" | "sharegpt" | "alpaca" | "trl" (`medee_jax.data.record_formats`).
    tokenizer_dir: checkpoint (or tokenizer) directory with the tokenizer and chat template.
    mode: "sft" (Conversation records, assistant turns are targets) or "dpo" (preference pairs).
    batch_size: rows per SFT batch; pairs per DPO batch (2 × batch_size rows).
    max_length: tokens per sequence (longer ones are truncated by the tokenizer); SFT row capacity when packing.
    length_buckets / patch_buckets: padded sizes of L and of the vision-unit count P (patches for Qwen2.5-VL, tiles
      for InternVL; None: powers of two up to max_length / max_patches). The largest is the per-batch budget.
    packing: SFT only; several examples per row.
    seed, shuffle, num_epochs (None: forever).
    shard_index / shard_count: this host's shard (None: jax.process_index() / jax.process_count());
      drop_remainder: give every shard the same number of records per epoch.
    num_workers: Grain worker processes (0: in the calling process); worker_buffer_size: examples each buffers;
      read_threads / read_buffer_size: threads and buffered examples per process for the map stages.
    min_pixels / max_pixels: Qwen2-VL image resizing bounds; image_max_pixels > 0 first shrinks larger images to
      that area (LLaMA-Factory's `image_max_pixels`), keeping the aspect ratio.
    high_bit_depth: how 16-bit / float images become 8-bit: "min_max" | "bit_depth" | "refuse" (`images.to_8bit`).
    min_tiles / max_tiles: InternVL tiles per image (before its thumbnail tile).
    on_bad_record: "raise" | "skip".  media_root: folder image paths are relative to (default: the data file's).
    index_cache: keep JSONL line indexes in `<file>.index.npz` sidecars.
    share_prompt: DPO only; one row per pair with the prompt once (`batching.dpo_shared_prompt_batch`).
    """

    paths: tuple[str, ...]
    tokenizer_dir: str
    mode: str = "sft"
    batch_size: int = 8
    max_length: int = 2048
    length_buckets: tuple[int, ...] | None = None
    patch_buckets: tuple[int, ...] | None = None
    max_patches: int = 16384
    packing: bool = True
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    shard_index: int | None = None
    shard_count: int | None = None
    drop_remainder: bool = False
    num_workers: int = 0
    worker_buffer_size: int = 8
    read_threads: int = 1
    read_buffer_size: int = 8
    min_pixels: int = QWEN_MIN_PIXELS
    max_pixels: int = QWEN_MAX_PIXELS
    image_max_pixels: int = 0
    high_bit_depth: str = "min_max"
    min_tiles: int = 1
    max_tiles: int = 12
    on_bad_record: str = "raise"
    media_root: str | None = None
    index_cache: bool = False
    share_prompt: bool = False
    format: str = "auto"

    def __post_init__(self):
        paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else self.paths
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in paths))
        for name in ("length_buckets", "patch_buckets"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))
        if not self.paths:
            raise ValueError("DataConfig.paths is empty: give at least one data file")
        if self.mode not in ("sft", "dpo"):
            raise ValueError(f"DataConfig.mode must be 'sft' or 'dpo', got {self.mode!r}")
        errors.check_on_bad_record(self.on_bad_record)
        check_high_bit_depth(self.high_bit_depth)
        for name in ("batch_size", "max_length", "max_patches", "worker_buffer_size", "read_buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.read_threads < 0:
            raise ValueError("DataConfig.num_workers and read_threads must be >= 0")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"DataConfig.num_epochs must be >= 1 or None (forever), got {self.num_epochs}")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("set both DataConfig.shard_index and shard_count, or neither")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | Any) -> "DataConfig":
        """From a dict or an ml_collections ConfigDict; unknown keys are an error."""
        if hasattr(values, "to_dict"):
            values = values.to_dict()
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def with_updates(self, **changes) -> "DataConfig":
        return dataclasses.replace(self, **changes)

    def shard_options(self) -> grain.sharding.ShardOptions:
        if self.shard_index is None:
            return grain.sharding.ShardByJaxProcess(drop_remainder=self.drop_remainder)
        return grain.sharding.ShardOptions(self.shard_index, self.shard_count, self.drop_remainder)


def batch_spec(config: DataConfig, images, image_token_id: int) -> BatchSpec:
    """The static batch settings for `config` and the model family's `ImageInputs`."""
    length_buckets = config.length_buckets or batching.default_length_buckets(config.max_length)
    patch_buckets = config.patch_buckets or batching.default_patch_buckets(config.max_patches,
                                                                           multiple=images.unit_multiple)
    return BatchSpec(
        mode=config.mode,
        batch_size=config.batch_size,
        max_length=config.max_length,
        length_buckets=tuple(length_buckets),
        patch_buckets=tuple(patch_buckets),
        image_token_id=int(image_token_id),
        images=images,
        packing=config.packing and config.mode == "sft",
        share_prompt=config.share_prompt and config.mode == "dpo",
    )


# ---------------------------------------------------------------------------------------------------------------
# Map stages (run in Grain worker threads/processes; they never raise for a bad record, they pass a marker)


class Dropped:
    """Stands in for a record that yields no example: `error` is its BadRecordError, or None for a blank record."""

    __slots__ = ("error",)

    def __init__(self, error: BadRecordError | None):
        self.error = error

    def __reduce__(self):
        return (Dropped, (self.error,))


class ParseRecord(grain.transforms.Map):
    """RawRecord → {"record": Conversation | PreferencePair, "source": "file:line"}."""

    def __init__(self, mode: str, media_root: str | None = None, record_format="auto"):
        self.kind = "sft" if mode == "sft" else "preference"
        self.media_root = media_root
        self.record_format = record_format  # a data.format name or a dataset_info.json entry's RecordFormat

    def map(self, raw: RawRecord):
        ref = formats.RecordRef(raw.file, raw.line)
        try:
            obj = raw.data
            if isinstance(obj, BadRecordError):
                raise obj
            if isinstance(obj, (bytes, bytearray, memoryview)):
                obj = bytes(obj)
                if not obj.strip():
                    return Dropped(None)
                obj = _decode_json(obj, ref)
            record = formats.parse_record(obj, ref, kind=self.kind, media_root=self.media_root,
                                          record_format=self.record_format)
            out = {"record": record, "source": str(ref)}
            if self.kind == "preference":
                ref_logps = _reference_logps(obj, ref)
                if ref_logps is not None:
                    out["ref_logps"] = ref_logps
        except BadRecordError as error:
            return Dropped(error)
        return out


REF_LOGP_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def _reference_logps(obj: dict, ref: formats.RecordRef) -> np.ndarray | None:
    """float32 [2] precomputed reference log-probs (chosen, rejected) of a preference record, or None."""
    present = [k for k in REF_LOGP_KEYS if obj.get(k) is not None]
    if not present:
        return None
    values = []
    for key in REF_LOGP_KEYS:
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise BadRecordError(ref.file, ref.line, errors.BAD_FIELD,
                                 f"'{key}' must be a finite number when {present[0]!r} is given, got {value!r}")
        values.append(float(value))
    return np.asarray(values, np.float32)


def _decode_json(data: bytes, ref: formats.RecordRef) -> dict:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecordError(ref.file, ref.line, errors.NOT_UTF8,
                             f"the line is not valid UTF-8 (byte {data[e.start:e.start + 1]!r} at column {e.start + 1})")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecordError(ref.file, ref.line, errors.MALFORMED_JSON, f"not valid JSON: {e.msg} at column {e.colno}")
    except RecursionError:
        raise BadRecordError(ref.file, ref.line, errors.MALFORMED_JSON,
                             "JSON nested too deeply to parse (thousands of levels)") from None
    if not isinstance(obj, dict):
        raise BadRecordError(ref.file, ref.line, errors.MALFORMED_JSON, f"expected a JSON object, got {type(obj).__name__}")
    return obj


class LoadImages(grain.transforms.Map):
    """Adds "pixel_values" and the family's per-image info (`images.info_key`) for records with images, as the
    family's `ImageInputs.load` gives them (Qwen2.5-VL: uint8 patches [p, 588], 8x fewer bytes to move between
    processes than float32 [p, 1176], normalised by batch assembly into the same float32 values; InternVL: float32
    tiles [p, 3, S, S])."""

    def __init__(self, images, max_patches: int):
        self.images = images
        self.max_patches = max_patches

    def map(self, example):
        if isinstance(example, Dropped):
            return example
        record = example["record"]
        if not record.images:
            return example
        src = record.source
        try:
            pixels, info = self.images.load(record.images)
        except BadRecordError as error:
            return Dropped(error.at(src.file, src.line))
        if pixels.shape[0] > self.max_patches:
            unit = self.images.unit_name
            return Dropped(BadRecordError(
                src.file, src.line, TOO_MANY_PATCHES,
                f"its images have {pixels.shape[0]} {unit}, more than the largest vision bucket ({self.max_patches});"
                f" make the images smaller (fewer {unit}) or raise max_patches / the bucket sizes",
            ))
        return {**example, "pixel_values": pixels, self.images.info_key: info}


_TOKENIZERS = threading.local()


def _chat_tokenizer(tokenizer_dir: str, images):
    """The ChatTokenizer of `tokenizer_dir` with the family's image tokens, loaded once per thread (fast
    tokenizers are not shareable across threads)."""
    from medee_jax.data.tokenize import load_chat_tokenizer

    cache = getattr(_TOKENIZERS, "cache", None)
    if cache is None:
        cache = _TOKENIZERS.cache = {}
    key = (tokenizer_dir, type(images).__name__)
    if key not in cache:
        cache[key] = load_chat_tokenizer(tokenizer_dir, **images.chat_tokens)
    return cache[key]


class Tokenize(grain.transforms.Map):
    """Record (+ images) → the example dict `medee_jax.data.batching` packs (input ids, target masks, images)."""

    def __init__(self, tokenizer_dir: str, max_length: int, images):
        self.tokenizer_dir = os.fspath(tokenizer_dir)
        self.max_length = max_length
        self.images = images

    def map(self, example):
        if isinstance(example, Dropped):
            return example
        from medee_jax.data.tokenize import tokenize_record

        tok = _chat_tokenizer(self.tokenizer_dir, self.images)
        info = example.get(self.images.info_key)
        counts = None if info is None else self.images.token_counts(info)
        report = {}
        try:
            out = tokenize_record(example["record"], tok, num_image_tokens=counts, max_length=self.max_length,
                                  on_bad_record="raise", report=report)
        except BadRecordError as error:
            return Dropped(error)
        out["source"] = example["source"]
        out["truncated_tokens"] = report.get("truncated_tokens", 0)
        if "ref_logps" in example:
            out["ref_logps"] = example["ref_logps"]
        if info is not None:
            out["pixel_values"] = example["pixel_values"]
            out[self.images.info_key] = info
        return out


# ---------------------------------------------------------------------------------------------------------------
# Packing and batching (in the consuming process)


class PackAndBatch(grain.IterDataset):
    """Examples → device batches (`batching.BatchSpec`), with bad-record handling and checkpointable state.

    `fingerprint`: settings a saved state is only valid for (files, order, workers, batch shape); `set_state`
    refuses a state saved under different ones.
    """

    def __init__(self, parent: grain.IterDataset, spec: BatchSpec, on_bad_record: str = "raise",
                 fingerprint: dict | None = None, records_per_epoch: int | None = None, where: str = ""):
        super().__init__(parent)
        self.spec = spec
        self.on_bad_record = on_bad_record
        self.fingerprint = dict(fingerprint or {})
        self.records_per_epoch = records_per_epoch
        self.where = where

    def __iter__(self) -> "BatchIterator":
        return BatchIterator(self._parent.__iter__(), self.spec, self.on_bad_record, self.fingerprint,
                             records_per_epoch=self.records_per_epoch, where=self.where)

    def __str__(self) -> str:
        return f"PackAndBatch(mode={self.spec.mode}, batch_size={self.spec.batch_size})"


_TOTALS = ("batches", "examples", "tokens", "token_slots", "target_tokens", "truncated_examples",
           "truncated_tokens", "blank")


class BatchIterator(grain.DatasetIterator):
    """Yields device batches. State = the upstream state at the first example of the next batch + statistics."""

    def __init__(self, parent: grain.DatasetIterator, spec: BatchSpec, on_bad_record: str,
                 fingerprint: dict | None = None, *, records_per_epoch: int | None = None, where: str = ""):
        super().__init__(parent)
        self.spec = spec
        self.on_bad_record = on_bad_record
        self.fingerprint = dict(fingerprint or {})
        self.records_per_epoch = records_per_epoch  # this shard's records per epoch (None: unknown)
        self.where = where or ", ".join(str(p) for p in self.fingerprint.get("paths", ())) or "the data"
        self._carry = None  # an example that did not fit the previous batch; it opens the next one
        self._carry_state = None  # the upstream state just before that example
        self._counter = BadRecordCounter()
        self._totals = dict.fromkeys(_TOTALS, 0)
        self._unusable_in_a_row = 0  # records read since the last usable one (bad or blank)
        self._seen_usable = False

    def __next__(self) -> dict[str, Any]:
        packer = self.spec.new_packer()
        truncated = []  # tokens cut from each example of this batch that lost some
        if self._carry is not None:
            if not packer.add(self._carry):
                raise AssertionError("an example did not fit an empty batch")
            truncated.append(self._carry.get("truncated_tokens", 0))
            self._carry = self._carry_state = None
        while True:
            state = self._parent.get_state()
            try:
                item = next(self._parent)
            except StopIteration:
                if packer.empty:
                    raise
                break
            if isinstance(item, Dropped):
                if item.error is not None:
                    errors.handle_bad_record(item.error, self.on_bad_record, self._counter)
                else:
                    self._totals["blank"] += 1
                self._note_unusable()
                continue
            self._unusable_in_a_row, self._seen_usable = 0, True
            if not packer.add(item):
                self._carry, self._carry_state = item, state
                break
            truncated.append(item.get("truncated_tokens", 0))
        batch = self.spec.build(packer.items)
        t = self._totals
        t["batches"] += 1
        t["examples"] += packer.num_examples
        t["tokens"] += int(batch["attention_mask"].sum())
        t["token_slots"] += int(batch["attention_mask"].size)
        t["target_tokens"] += int(batch["loss_mask"].sum())
        t["truncated_examples"] += sum(1 for n in truncated if n > 0)
        t["truncated_tokens"] += int(sum(truncated))
        return batch

    def _note_unusable(self) -> None:
        """Counts a bad or blank record; a whole epoch of them is an error, not an endless read.

        Epochs are reshuffled, so a run of unusable records can straddle two epochs that each have a usable one:
        a run proves an unusable epoch at N records (N per epoch) when nothing usable came before, else at 2N - 1.
        """
        self._unusable_in_a_row += 1
        n = self.records_per_epoch
        if n and self._unusable_in_a_row >= (2 * n - 1 if self._seen_usable else n):
            raise errors.NoUsableRecordsError(self.where, self._unusable_in_a_row, self._counter,
                                              blank=self._totals["blank"])

    def get_state(self) -> dict[str, Any]:
        parent = self._carry_state if self._carry is not None else self._parent.get_state()
        return {
            "upstream": copy.deepcopy(parent),
            "totals": dict(self._totals),
            "skipped": dict(sorted(self._counter.counts.items())),
            "pipeline": dict(self.fingerprint),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("pipeline", {})
        changed = {k: (saved[k], v) for k, v in self.fingerprint.items() if k in saved and saved[k] != v}
        if changed:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"the data iterator state was saved by a different input pipeline ({detail}); resume "
                             "with the same data settings, or start the data from the beginning")
        self._parent.set_state(state["upstream"])
        self._carry = self._carry_state = None
        self._unusable_in_a_row = 0
        self._totals = {k: int(state["totals"].get(k, 0)) for k in _TOTALS}
        self._seen_usable = self._totals["examples"] > 0
        self._counter = BadRecordCounter()
        self._counter.counts.update({k: int(v) for k, v in state.get("skipped", {}).items()})

    def stats(self) -> dict[str, Any]:
        """Running totals since the start of the data: batches, examples, tokens, padding efficiency, skips by
        reason, blank lines, and the examples (and tokens) cut to max_length."""
        t = self._totals
        return {
            **t,
            "packing_efficiency": t["tokens"] / t["token_slots"] if t["token_slots"] else 0.0,
            "examples_per_batch": t["examples"] / t["batches"] if t["batches"] else 0.0,
            "skipped": dict(self._counter.counts),
            "skipped_total": self._counter.total,
        }

    @property
    def bad_records(self) -> BadRecordCounter:
        return self._counter

    def __str__(self) -> str:
        return f"BatchIterator(mode={self.spec.mode})"


# ---------------------------------------------------------------------------------------------------------------
# Building


def image_inputs(config: DataConfig, model_config, image_token_id: int | None = None):
    """The model family's `ImageInputs` for a model config (its vision settings and image token id, checked against
    `image_token_id` when both are given) or a family's vision config, with the image options of `config`."""
    from medee_jax.models.families import family_of

    model_id = getattr(model_config, "image_token_id", None)
    if model_id is not None and image_token_id is not None and int(image_token_id) != int(model_id):
        raise ValueError(f"image_token_id {image_token_id} != the model config's {model_id}")
    return family_of(model_config).image_inputs(model_config, config, model_id if model_id is not None
                                                else image_token_id)


def example_dataset(config: DataConfig, model_config) -> grain.MapDataset:
    """The per-example part of the pipeline (shuffled, sharded, repeated, parsed, with images and tokens);
    model_config: a model config or a family's vision config (see `image_inputs`)."""
    return _example_dataset(config, model_config)[0]


def _example_dataset(config: DataConfig, model_config) -> tuple[grain.MapDataset, int]:
    """(`example_dataset`, this shard's records per epoch)."""
    source, record_format = open_dataset(config.paths, config.format, mode=config.mode,
                                         index_cache=config.index_cache)
    ds = grain.MapDataset.source(source)
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    shard = config.shard_options()
    if shard.shard_count > 1:
        n = len(ds)
        if shard.drop_remainder:
            ds = ds[: n - n % shard.shard_count]
        ds = ds[shard.shard_index :: shard.shard_count]
    if len(ds) == 0:
        raise ValueError(f"no records for shard {shard.shard_index} of {shard.shard_count} in {list(config.paths)}")
    records_per_epoch = len(ds)
    if config.num_epochs != 1:
        ds = ds.repeat(config.num_epochs)
    for stage in example_stages(config, model_config, record_format):
        ds = ds.map(stage)
    return ds, records_per_epoch


def example_stages(config: DataConfig, model_config, record_format="auto") -> tuple[ParseRecord, LoadImages,
                                                                                    Tokenize]:
    """The per-record map stages of the pipeline, in order (raw record -> parsed -> with images -> tokens).

    model_config: a model config or a family's vision config (see `image_inputs`); ``record_format``: what
    `dataset_files.open_dataset` returned for the split's files (a data.format name or a dataset_info.json entry's
    format)."""
    images = image_inputs(config, model_config)
    max_patches = max(config.patch_buckets) if config.patch_buckets else config.max_patches
    return (
        ParseRecord(config.mode, config.media_root, record_format),
        LoadImages(images, max_patches=max_patches),
        Tokenize(config.tokenizer_dir, config.max_length, images),
    )


def build_dataset(config: DataConfig, model_config, *, image_token_id: int | None = None) -> PackAndBatch:
    """The whole pipeline as a Grain IterDataset of device batches.

    model_config: the model's config (its family, vision settings and image token id, checked against the
    tokenizer) or a family's vision config (then the image token id comes from the tokenizer unless given).
    """
    from medee_jax.data.tokenize import load_chat_tokenizer

    images = image_inputs(config, model_config, image_token_id)
    image_token_id = images.image_token_id
    tok = load_chat_tokenizer(config.tokenizer_dir, **images.chat_tokens)  # fail early on a bad tokenizer dir
    if image_token_id is None:
        image_token_id = tok.image_token_id
    elif image_token_id != tok.image_token_id:
        raise ValueError(
            f"the model's image token id is {image_token_id} but the tokenizer in {config.tokenizer_dir} writes "
            f"{tok.image_token} as id {tok.image_token_id}; use the checkpoint's own tokenizer"
        )
    spec = batch_spec(config, images, image_token_id)
    examples, records_per_epoch = _example_dataset(config, model_config)
    ds = examples.to_iter_dataset(
        grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size)
    )
    if config.num_workers > 0:
        _ensure_absl_flags_parsed()
        # Only large arrays (image patches) travel through shared memory; smaller ones are cheaper pickled. The
        # crossover (one new segment, its page faults and unlink per array vs. pickling through the pipe) measured
        # between 0.6 and 0.9 MB: a 448x448 image's uint8 patches (0.6 MB) cost 0.3 ms worker CPU pickled, 1.1 shm.
        ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(min_shm_size=MIN_SHM_BYTES))
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size,
        ))
    return PackAndBatch(ds, spec, config.on_bad_record, _fingerprint(config), records_per_epoch=records_per_epoch,
                        where=", ".join(config.paths))


def _fingerprint(config: DataConfig) -> dict:
    """The settings a saved iterator state depends on (JSON-able)."""
    shard = config.shard_options()
    return {  # files by name and size, not absolute path: a moved data file or workdir resumes
        "files": [[os.path.basename(p), os.path.getsize(p)] for p in data_files(config.paths)], "mode": config.mode,
        "format": config.format if isinstance(config.format, str) else repr(config.format),
        "seed": config.seed,
        "shuffle": config.shuffle, "num_epochs": config.num_epochs, "batch_size": config.batch_size,
        "max_length": config.max_length, "packing": config.packing, "num_workers": config.num_workers,
        "shard": f"{shard.shard_index}/{shard.shard_count}",
    }


def _ensure_absl_flags_parsed() -> None:
    """Grain's worker start reads an absl flag, which raises in a program that never parsed flags (plain scripts,
    pytest) once jax is imported; treat such a program's flags as parsed with their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(config: DataConfig, model_config, *, image_token_id: int | None = None,
                  state: dict | None = None) -> BatchIterator:
    """A fresh batch iterator, positioned at `state` (from `get_state()`) when given."""
    iterator = iter(build_dataset(config, model_config, image_token_id=image_token_id))
    if state is not None:
        iterator.set_state(state)
    return iterator


def summarize_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Shapes and a few counts of a batch, for logs."""
    out = {k: list(np.shape(v)) for k, v in batch.items() if k != "vision"}
    out["packing_efficiency"] = batching.packing_efficiency(batch)
    out["segments"] = int(np.asarray(batch["segment_ids"]).max(axis=1).sum())
    return out
