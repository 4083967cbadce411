"""From the input pipeline's per-shard host batches to global device arrays.

Each data shard (data x fsdp device group) gets its own complete batch from this process's Grain iterator. The
shards of one step are padded to a common bucket (sequence length L and vision-unit count P: patches or tiles),
stacked along a leading axis S and assembled into global arrays sharded over data x fsdp. A text-only shard in a
step whose other shards have images gets an empty vision input (zero units, every feature row dropped), so all
shards share one program.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np

from ..data import pipeline
from ..data.dataset_files import data_files
from ..models.families import family_of
from . import identity
from .mesh import local_data_shards, stack_shards, to_global
from .setup import image_bounds, pipeline_config, target_buckets

log = logging.getLogger("medee_jax.train")

ROW_KEYS = ("input_ids", "attention_mask", "segment_ids", "labels", "loss_mask")
OPTIONAL_ROW_KEYS = ("branch_ids", "sequence_position")  # shared-prompt DPO batches


def _pad_last(x: np.ndarray, length: int) -> np.ndarray:
    pad = [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])]
    return np.pad(x, pad)


def pad_shard_batch(batch: dict, length: int, patches: int | None, images) -> dict:
    """Returns ``batch`` padded to sequence length ``length`` and (if not None) ``patches`` vision units (patches
    or tiles; ``images``: the family's ``ImageInputs``)."""
    rows, l0 = batch["input_ids"].shape
    out = dict(batch)
    for key in ROW_KEYS + tuple(k for k in OPTIONAL_ROW_KEYS if k in batch):
        out[key] = _pad_last(batch[key], length)
    out["position_ids"] = _pad_last(batch["position_ids"], length)
    if patches is None:
        return out
    features = images.num_features(patches)
    copies = 2 if "pair_mask" in batch and "branch_ids" not in batch else 1  # unshared DPO: [2, F] index
    if "pixel_values" in batch:
        p0 = batch["pixel_values"].shape[0]
        pad = [(0, patches - p0)] + [(0, 0)] * (batch["pixel_values"].ndim - 1)
        out["pixel_values"] = np.pad(batch["pixel_values"], pad)
        out["vision"] = images.extend_layout(batch["vision"], patches)
        index = np.asarray(batch["image_token_index"]).reshape(copies, -1)
        valid = index < rows * l0
        rebased = np.where(valid, (index // l0) * length + index % l0, rows * length)
        index = np.pad(rebased, ((0, 0), (0, features - index.shape[1])), constant_values=rows * length)
    else:
        out["pixel_values"] = images.empty_pixels(patches)
        out["vision"] = images.layout(images.concat_info([]), pad_to=patches)
        index = np.full((copies, features), rows * length, np.int32)
    out["image_token_index"] = (index[0] if copies == 1 else index).astype(np.int32)
    return out


def target_width(batches: list[dict], buckets: tuple[int, ...]) -> int:
    """Returns T, the target-array width of a step: the smallest of ``buckets`` that holds every row's target count
    (loss-mask positions) in every shard, capped at the shards' common length L."""
    count = max(int((b["loss_mask"] != 0).sum(-1).max(initial=0)) for b in batches)
    length = batches[0]["loss_mask"].shape[-1]
    fits = [t for t in buckets if t >= count]
    return min(fits[0] if fits else length, length)


def add_target_arrays(batch: dict, width: int) -> dict:
    """Returns ``batch`` plus the places, labels and weights of each sequence's training targets, left-aligned:

      target_row   [S, T] int32    the batch row holding sequence s's target j
      target_index [S, T] int32    its position in that row; both 0 on the padding entries
      target_labels [S, T] int32   labels[s, t] for the sequence positions t (ascending) where loss_mask[s, t] != 0
      target_mask  [S, T] float32  loss_mask[s, t]; 0 on padding

    Sequences are the rows of labels / loss_mask [S, L]: the batch rows themselves, or for a shared-prompt DPO
    batch its chosen and rejected sequences, placed by sequence_row [S] / sequence_position [S, L]. The step runs
    the LM head on these T places only (their gathered hidden states), not on all L positions of every row."""
    mask = batch["loss_mask"] != 0  # [S, L]
    counts = mask.sum(-1)  # [S]
    if width < counts.max(initial=0):
        raise ValueError(f"target width {width} is below a row's {counts.max()} targets")
    order = np.argsort(~mask, axis=-1, kind="stable")[:, :width]  # [S, T] target positions first, in order
    valid = np.arange(width)[None, :] < counts[:, None]  # [S, T]
    position = np.where(valid, order, 0)
    rows = batch.get("sequence_row", np.arange(mask.shape[0]))  # [S]
    places = batch.get("sequence_position")
    out = dict(batch)
    out["target_row"] = np.where(valid, np.asarray(rows)[:, None], 0).astype(np.int32)
    index = position if places is None else np.take_along_axis(places, position, -1)
    out["target_index"] = np.where(valid, index, 0).astype(np.int32)
    out["target_labels"] = np.where(valid, np.take_along_axis(batch["labels"], position, -1), 0).astype(np.int32)
    out["target_mask"] = np.where(valid, np.take_along_axis(batch["loss_mask"], position, -1), 0).astype(np.float32)
    return out


def run_batch_spec(config, data, model_cfg, split: str = "train"):
    """Returns the `BatchSpec` the input pipeline builds this run's batches of ``split`` with: `pipeline.batch_spec`
    of `setup.pipeline_config` (the one translation of the run config: buckets, dpo.share_prompt, image bounds)
    and the model family's `ImageInputs`. ``data``: the run's `setup.DataSpec` (its paths are not opened)."""
    dc = pipeline_config(config, data, split, bucket_field=family_of(model_cfg).bucket_field)
    return pipeline.batch_spec(dc, pipeline.image_inputs(dc, model_cfg), model_cfg.image_token_id)


def assemble_step(shards: list[dict], images, target_buckets: tuple[int, ...]) -> dict:
    """Returns one step's stacked host batch [S, ...] from its data shards' pipeline batches: padded to their common
    length and vision-unit bucket (`pad_shard_batch`; ``images``: the family's ``ImageInputs``), with target arrays
    of the step's width (`target_width`, `add_target_arrays`), device keys only."""
    length, patches = common_shapes(shards)
    shards = [pad_shard_batch(b, length, patches, images) for b in shards]
    width = target_width(shards, target_buckets)
    shards = [add_target_arrays(b, width) for b in shards]
    return stack_shards([{k: v for k, v in b.items() if k in DEVICE_KEYS} for b in shards])


def common_shapes(batches: list[dict]) -> tuple[int, int | None]:
    """Returns (L, P) every shard of a step is padded to (P None when no shard has images)."""
    length = max(b["input_ids"].shape[1] for b in batches)
    with_images = [b["pixel_values"].shape[0] for b in batches if "pixel_values" in b]
    return length, (max(with_images) if with_images else None)


# DataConfig fields a batch count does not depend on (they change speed, not batches).
_COUNT_INDEPENDENT = ("paths", "tokenizer_dir", "num_epochs", "num_workers", "worker_buffer_size", "read_threads",
                      "read_buffer_size", "index_cache")
CENSUS_VERSION = 1


class BatchSource:
    """This process's input iterator for one split, yielding stacked per-shard batches [S_local, ...].

    ``cache_dir``: where ``census()`` keeps its counts between starts (None: not kept).
    """

    def __init__(self, data, split: str, config, model_cfg, mesh, *, path: str | None = None,
                 shuffle: bool | None = None, num_epochs: int | None | str = "default", cache_dir: str | None = None):
        self.split = split
        self.cache_dir = cache_dir
        self.mesh = mesh
        self.model_cfg = model_cfg
        family = family_of(model_cfg)
        self.shards = local_data_shards(mesh)
        self.image_bounds = image_bounds(config, data)
        if split == "train":
            log.info("%s", self.image_bounds.description)
        self.data_config = pipeline_config(config, data, split, path=path, shuffle=shuffle, num_epochs=num_epochs,
                                           bounds=self.image_bounds, bucket_field=family.bucket_field)
        self.images = pipeline.image_inputs(self.data_config, model_cfg)
        self.target_buckets = target_buckets(config)
        self._iterator = None
        self._batches_per_epoch = None
        self._census = None

    @property
    def iterator(self):
        if self._iterator is None:
            self._iterator = pipeline.make_iterator(self.data_config, self.model_cfg)
        return self._iterator

    def census(self) -> dict:
        """Returns one epoch of this process's share of the split as the pipeline reads it: "batches", "examples",
        "skipped" {reason: count}, "skipped_total", "blank", "truncated_examples", "truncated_tokens".

        Counted exactly by a dry pass through the whole pipeline (parsing, images, tokens, packing), then kept in
        ``cache_dir`` under a key of the data files' identities (path, size, mtime), the tokenizer files, the model's
        vision settings and every data setting a count depends on: a later start with the same data and settings
        reads nothing (image files edited in place without touching the data file are not noticed). A split with no
        usable record raises ``NoUsableRecordsError`` naming the skip counts.
        """
        if self._census is None:
            path = self._census_path()
            census = identity.read_json(path) if path else None
            if census is None:
                once = pipeline.make_iterator(self.data_config.with_updates(num_epochs=1), self.model_cfg)
                batches = sum(1 for _ in once)
                stats = once.stats()
                census = {"batches": batches, **{k: stats[k] for k in (
                    "examples", "skipped", "skipped_total", "blank", "truncated_examples", "truncated_tokens")}}
                if path:
                    identity.write_json(path, census)
            self._census = census
        return self._census

    def _census_path(self) -> str | None:
        if not self.cache_dir:
            return None
        d = self.data_config
        shard = d.shard_options()
        key = {
            "version": CENSUS_VERSION,
            "files": [identity.file_identity(p) for p in data_files(d.paths)],
            "tokenizer": identity.tokenizer_identity(d.tokenizer_dir),
            "settings": {k: v for k, v in dataclasses.asdict(d).items() if k not in _COUNT_INDEPENDENT},
            "shard": [shard.shard_index, shard.shard_count],
            "vision": repr(self.model_cfg.vision), "image_token_id": int(self.model_cfg.image_token_id),
        }
        return os.path.join(self.cache_dir, f"census-{self.split}-{identity.digest(key)}.json")

    @property
    def batches_per_epoch(self) -> int:
        """Returns the number of steps' worth of stacked batches one epoch gives (``census``)."""
        if self._batches_per_epoch is None:
            count = self.census()["batches"]
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                count = int(np.min(multihost_utils.process_allgather(np.array([count]))))
            self._batches_per_epoch = count // self.shards
        return self._batches_per_epoch

    def reset(self) -> None:
        """Starts the split again from its beginning (used for evaluation passes)."""
        self._iterator = None

    def stats(self) -> dict | None:
        """Returns the live iterator's running statistics (``BatchIterator.stats``), None before it started."""
        return None if self._iterator is None else self._iterator.stats()

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state) -> None:
        self.iterator.set_state(state)

    def next_local(self, allow_end: bool = False, keep_sources: bool = False) -> dict | None:
        """Returns this process's next stacked host batch [S_local, ...]; None at the end of a finite split.

        With ``keep_sources`` the result also holds "sources": per shard, the "file:line" of each DPO pair.
        """
        shards = []
        for _ in range(self.shards):
            try:
                shards.append(next(self.iterator))
            except StopIteration:
                if allow_end:
                    break
                raise
        if not shards:
            return None
        while len(shards) < self.shards:  # end of an evaluation split: fill with an all-padding shard
            shards.append(_empty_like(shards[0]))
        stacked = assemble_step(shards, self.images, self.target_buckets)
        if keep_sources:
            stacked["sources"] = [b.get("sources", []) for b in shards]
        return stacked

    def to_device(self, local: dict) -> dict:
        """Returns global device arrays for a stacked host batch."""
        return to_global(self.mesh, local)


DEVICE_KEYS = ("input_ids", "attention_mask", "segment_ids", "position_ids", "labels", "loss_mask",
                "pixel_values", "vision", "image_token_index", "pair_mask", "num_target_tokens", "ref_logps",
                "branch_ids", "target_row", "target_index", "target_labels", "target_mask")


def _empty_like(batch: dict) -> dict:
    """Returns a batch of the same shapes with no tokens, targets or images (it contributes nothing)."""
    out = {}
    for key, value in batch.items():
        if key == "vision":
            out[key] = value
        elif key == "image_token_index":
            rows, length = batch["input_ids"].shape
            out[key] = np.full_like(value, rows * length)
        elif key == "sources":
            out[key] = []
        elif isinstance(value, np.ndarray):
            out[key] = np.zeros_like(value)
        else:
            out[key] = value
    return out
