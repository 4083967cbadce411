"""From the input pipeline's per-shard host batches to global device arrays.

Each data shard (data x fsdp device group) gets its own complete batch from this process's Grain iterator. The
shards of one step are padded to a common bucket (sequence length L and vision-unit count P: patches or tiles),
stacked along a leading axis S and assembled into global arrays sharded over data x fsdp. A text-only shard in a
step whose other shards have images gets an empty vision input (zero units, every feature row dropped), so all
shards share one program.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from ..data import pipeline
from ..models.families import family_of
from .mesh import local_data_shards, stack_shards, to_global

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


def common_shapes(batches: list[dict]) -> tuple[int, int | None]:
    """Returns (L, P) every shard of a step is padded to (P None when no shard has images)."""
    length = max(b["input_ids"].shape[1] for b in batches)
    with_images = [b["pixel_values"].shape[0] for b in batches if "pixel_values" in b]
    return length, (max(with_images) if with_images else None)


class BatchSource:
    """This process's input iterator for one split, yielding stacked per-shard batches [S_local, ...]."""

    def __init__(self, data, split: str, config, model_cfg, mesh, *, path: str | None = None,
                 shuffle: bool | None = None, num_epochs: int | None | str = "default"):
        self.split = split
        self.mesh = mesh
        self.model_cfg = model_cfg
        family = family_of(model_cfg)
        self.shards = local_data_shards(mesh)
        if path is None:
            path = data.train_path if split == "train" else data.eval_path
        if shuffle is None:
            shuffle = bool(config.data.shuffle) and split == "train"
        if num_epochs == "default":
            num_epochs = None if split == "train" else 1
        d = config.data
        self.data_config = pipeline.DataConfig(
            paths=(path,), tokenizer_dir=data.tokenizer_dir, mode=config.mode, batch_size=d.batch_size,
            max_length=d.max_length, length_buckets=tuple(d.seq_buckets),
            patch_buckets=tuple(d[family.bucket_field]),  # the family's vision units: patches or tiles
            packing=bool(d.packing) and config.mode == "sft", seed=config.seed,
            shuffle=shuffle, num_epochs=num_epochs,
            num_workers=d.num_workers, min_pixels=d.min_pixels, max_pixels=d.max_pixels,
            image_max_pixels=d.image_max_pixels, min_tiles=d.get("min_tiles", 1), max_tiles=d.get("max_tiles", 12),
            on_bad_record=d.on_bad_record, media_root=data.media_root or None,
            share_prompt=config.mode == "dpo" and bool(config.dpo.share_prompt))
        self.images = pipeline.image_inputs(self.data_config, model_cfg)
        self.target_buckets = tuple(d.target_buckets) or tuple(d.seq_buckets)
        self._iterator = None
        self._batches_per_epoch = None

    @property
    def iterator(self):
        if self._iterator is None:
            self._iterator = pipeline.make_iterator(self.data_config, self.model_cfg)
        return self._iterator

    @property
    def batches_per_epoch(self) -> int:
        """Returns the number of steps' worth of stacked batches one epoch gives (counted by a dry pass)."""
        if self._batches_per_epoch is None:
            once = pipeline.make_iterator(self.data_config.with_updates(num_epochs=1), self.model_cfg)
            count = sum(1 for _ in once)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                count = int(np.min(multihost_utils.process_allgather(np.array([count]))))
            self._batches_per_epoch = count // self.shards
        return self._batches_per_epoch

    def reset(self) -> None:
        """Starts the split again from its beginning (used for evaluation passes)."""
        self._iterator = None

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
        length, patches = common_shapes(shards)
        shards = [pad_shard_batch(b, length, patches, self.images) for b in shards]
        width = target_width(shards, self.target_buckets)
        shards = [add_target_arrays(b, width) for b in shards]
        stacked = stack_shards([{k: v for k, v in b.items() if k in _DEVICE_KEYS} for b in shards])
        if keep_sources:
            stacked["sources"] = [b.get("sources", []) for b in shards]
        return stacked

    def to_device(self, local: dict) -> dict:
        """Returns global device arrays for a stacked host batch."""
        return to_global(self.mesh, local)


_DEVICE_KEYS = ("input_ids", "attention_mask", "segment_ids", "position_ids", "labels", "loss_mask",
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
