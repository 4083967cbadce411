"""Host-side batch assembly: packing, bucketed padding, positions, vision layout, scatter indices.

What is specific to a model family comes from its `ImageInputs` (`BatchSpec.images`; see
`medee_jax.models.families`): how images load, how many tokens and feature rows they give, their pixel layout,
their position ids. A batch's images are "units" (rows of pixel_values: Qwen2.5-VL patches, InternVL tiles).

Device batch contract (what `medee_jax.data.pipeline` yields and the trainer consumes; numpy arrays)
=====================================================================================================

SFT batch, B rows of length L (L from `length_buckets`):
  input_ids        [B, L]    int32    token ids; padding is `pad_id` (0)
  attention_mask   [B, L]    int32    1 on real tokens, 0 on padding
  segment_ids      [B, L]    int32    1..k for the k examples packed in a row (left to right), 0 on padding
  position_ids     [*A, B, L] int32   the family's rotary positions (A = images.position_axes: Qwen2.5-VL M-RoPE
                                      (T, H, W) [3, B, L], InternVL 1-D [B, L]), restarting at 0 for every
                                      example; 0 on padding
  labels           [B, L]    int32    labels[b, t] = the token logits[b, t] predicts = input_ids[b, t + 1] when
                                      t + 1 is in the same example, else 0
  loss_mask        [B, L]    float32  1 where labels[b, t] is a training target (target_mask[t + 1] of the same
                                      example), else 0
  only when at least one image is in the batch (the family-specific vision part: pixel_values and vision):
  pixel_values     [P, ...]  float32  all images' units, in the order their image tokens appear in the flattened
                                      [B * L] batch; zero units pad P up to a `patch_buckets` size (a multiple of
                                      images.unit_multiple). Qwen2.5-VL: patches [P, 1176]; InternVL: tiles
                                      [P, 3, S, S]
  vision           dict of the family's layout arrays (`images.layout(info, pad_to=P)`): Qwen2.5-VL rot_pos
                   [P, 2], window_index [P/4], reverse_index [P/4], window_gather [NB, W], window_block_segments
                   [NB, W], window_scatter [P], image_segments [P] (int32; NB window blocks of W patches, NB set by
                   P);
                   InternVL none (an empty dict)
  image_token_index [F]      int32    flat index into [B * L] of the image token each feature row fills
                                      (F = images.num_features(P): P/4 for Qwen2.5-VL, 256·P for InternVL3);
                                      B * L (out of range, dropped) for padding feature rows
  A text-only batch has none of these three vision keys: the vision tower must not run for it.

DPO batch, n = batch_size pairs, 2n rows: [chosen_0 .. chosen_{n-1}, rejected_0 .. rejected_{n-1}]:
  input_ids, attention_mask, segment_ids, position_ids, labels, loss_mask as above ([2n, L], [*A, 2n, L]); each
  row is one sequence (segment id 1 on its tokens) with its own labels, loss mask (the completion) and positions;
  num_target_tokens [2n]     int32    loss_mask.sum(-1): the completion length |y| (for ipo / sigmoid_norm)
  pair_mask        [n]       float32  1 for real pairs, 0 for padding pairs (a short final batch, or a batch cut
                                      early by the patch budget); padding pairs have all-zero rows
  ref_logps        [2n]      float32  only when the records carry precomputed reference log-probs
                                      ("ref_chosen_logps", "ref_rejected_logps"): per row, 0 for padding pairs
  with images: pixel_values holds each pair's images once (pair order), vision as above, and
  image_token_index [2, F] int32: row 0 the flat [2n * L] slots in the chosen rows, row 1 the slots in the
  rejected rows (feature f goes to both), 2n * L for padding feature rows.

`forward_inputs(batch)` returns the keys a model's `forward` takes. Shapes come only from the bucket lists, so a
run compiles at most len(length_buckets) × (len(patch_buckets) + 1) programs per mode.

Packing (SFT): examples are taken in order and placed first-fit into the B rows of the current batch (row capacity
max_length); the batch is closed when an example fits in no row or would take the batch's patches past the largest
patch bucket, and that example opens the next batch. Without packing each row holds one example. Deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

# Keys of a device batch that a model's `forward` takes.
FORWARD_KEYS = (
    "input_ids", "position_ids", "attention_mask", "segment_ids", "pixel_values", "vision", "image_token_index",
)
VISION_KEYS = ("pixel_values", "vision", "image_token_index")


# ---------------------------------------------------------------------------------------------------------------
# Buckets


def power_of_two_buckets(low: int, high: int) -> tuple[int, ...]:
    """Powers of two from `low` (rounded up to one) to the first one >= high, with the last replaced by `high`."""
    if low < 1 or high < 1:
        raise ValueError(f"bucket bounds must be positive, got {low}, {high}")
    out, b = [], 1 << max(0, (low - 1).bit_length())
    while b < high:
        out.append(b)
        b *= 2
    out.append(high)
    return tuple(out)


def default_length_buckets(max_length: int, smallest: int = 128) -> tuple[int, ...]:
    """Sequence-length buckets: 128, 256, ... and max_length last."""
    return power_of_two_buckets(min(smallest, max_length), max_length)


def default_patch_buckets(max_patches: int, smallest: int = 256, multiple: int = 4) -> tuple[int, ...]:
    """Vision-unit buckets: 256, 512, ... and max_patches (rounded up to a multiple of `multiple`) last."""
    top = -(-max_patches // multiple) * multiple
    return power_of_two_buckets(min(smallest, top), top)


def bucket_problems(max_length, length_buckets, patch_buckets, *, merge_unit: int | None = None,
                    prefix: str = "") -> list[str]:
    """Returns what is wrong with a run's bucket settings, one message per problem ([] when valid): each list must
    be non-empty positive ints, the largest length bucket must hold max_length, patch buckets must be multiples of
    the vision merge unit (when known). The one place these rules live (`BatchSpec` raises them, the trainer's config
    validation lists them with ``prefix`` "data.")."""
    problems = []
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        problems.append(f"{prefix}max_length={max_length!r}: must be a positive integer")
    sizes = {}
    for name, buckets in (("length_buckets", length_buckets), ("patch_buckets", patch_buckets)):
        values = tuple(buckets) if isinstance(buckets, (list, tuple)) else None
        if not values or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1
                                 for b in values):
            problems.append(f"{prefix}{name}={buckets!r}: must be a non-empty list of positive sizes, e.g. (1024, 2048)")
            continue
        sizes[name] = tuple(int(b) for b in values)
    if "length_buckets" in sizes and not problems and max(sizes["length_buckets"]) < max_length:
        problems.append(f"{prefix}length_buckets={sizes['length_buckets']}: the largest length bucket "
                        f"{max(sizes['length_buckets'])} is below {prefix}max_length={max_length}; add it to the buckets")
    if "patch_buckets" in sizes and merge_unit:
        bad = [b for b in sizes["patch_buckets"] if b % merge_unit]
        if bad:
            problems.append(f"{prefix}patch_buckets={sizes['patch_buckets']}: must be multiples of {merge_unit} "
                            f"(the vision tower merges {merge_unit} patches into one token), got {bad}")
    return problems


def pick_bucket(size: int, buckets: Sequence[int]) -> int:
    """Returns the smallest bucket >= size (buckets sorted ascending)."""
    for b in buckets:
        if b >= size:
            return b
    raise ValueError(f"size {size} exceeds the largest bucket {buckets[-1]}")


# ---------------------------------------------------------------------------------------------------------------
# Examples (what the tokenize stage of the pipeline produces; plain dicts so Grain moves arrays via shared memory)
#
# SFT example:  {"input_ids": int32 [n], "target_mask": int32 [n], "source": "file:line",
#                "pixel_values": [p, ...], images.info_key: per-image info}   (last two only with images)
#   pixel_values are what the family's `ImageInputs.load` gives (Qwen2.5-VL: uint8 patches [p, 588] or float32
#   [p, 1176], info "image_grid_thw" [k, 3]; InternVL: float32 tiles [p, 3, S, S], info "image_num_patches" [k]);
#   batch assembly turns them into the batch's float32 pixel_values (`ImageInputs.pixel_batch`).
# DPO example:  {"chosen_input_ids", "chosen_target_mask", "rejected_input_ids", "rejected_target_mask",
#                "source", and "pixel_values", images.info_key with images, "ref_logps" float32 [2] (chosen,
#                rejected) when the record has precomputed reference log-probs}


def example_patches(example: dict) -> int:
    """Number of vision units (pixel_values rows: patches or tiles) of an example."""
    pixels = example.get("pixel_values")
    return 0 if pixels is None else int(pixels.shape[0])


def example_length(example: dict) -> int:
    """Tokens of an SFT example, or of the longer sequence of a DPO pair."""
    if "input_ids" in example:
        return int(example["input_ids"].shape[0])
    return max(int(example["chosen_input_ids"].shape[0]), int(example["rejected_input_ids"].shape[0]))


def shifted_targets(input_ids: np.ndarray, target_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels int32 [n], loss_mask float32 [n]) of one sequence: labels[t] = ids[t+1], mask[t] = target[t+1]."""
    labels = np.zeros_like(input_ids, dtype=np.int32)
    loss_mask = np.zeros(input_ids.shape, dtype=np.float32)
    labels[:-1] = input_ids[1:]
    loss_mask[:-1] = target_mask[1:]
    return labels, loss_mask


# ---------------------------------------------------------------------------------------------------------------
# Batch spec: the static settings every batch of a run shares


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """Static batch settings. batch_size counts rows for SFT and pairs for DPO (2 × batch_size rows).
    patch_buckets: the batch sizes of vision units (patches or tiles); images: the family's `ImageInputs`
    (its image token id is set to `image_token_id`)."""

    mode: str  # "sft" | "dpo"
    batch_size: int
    max_length: int
    length_buckets: tuple[int, ...]
    patch_buckets: tuple[int, ...]
    image_token_id: int
    images: Any
    packing: bool = True
    pad_id: int = 0
    share_prompt: bool = False  # DPO: one row per pair, [prompt | chosen | rejected] (see dpo_shared_prompt_batch)

    def __post_init__(self):
        if self.mode not in ("sft", "dpo"):
            raise ValueError(f"mode must be 'sft' or 'dpo', got {self.mode!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.images.image_token_id != self.image_token_id:
            object.__setattr__(self, "images", dataclasses.replace(self.images, image_token_id=self.image_token_id))
        problems = bucket_problems(self.max_length, self.length_buckets, self.patch_buckets,
                                   merge_unit=self.images.unit_multiple)
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "length_buckets", tuple(sorted({int(b) for b in self.length_buckets})))
        object.__setattr__(self, "patch_buckets", tuple(sorted({int(b) for b in self.patch_buckets})))

    @property
    def row_buckets(self) -> tuple[int, ...]:
        """Padded row lengths. A shared-prompt DPO row holds both completions (up to 2 × max_length tokens), so the
        length buckets gain 2 × max_length there when they stop short of it."""
        if self.mode == "dpo" and self.share_prompt and self.length_buckets[-1] < 2 * self.max_length:
            return self.length_buckets + (2 * self.max_length,)
        return self.length_buckets

    def row_length(self, example: dict) -> int:
        """Tokens the example takes in a row: an SFT example's length; a DPO pair's longer sequence, or with
        share_prompt the shared prompt once plus both completions."""
        if self.mode == "dpo" and self.share_prompt:
            prefix = shared_prefix_length(example)
            return len(example["chosen_input_ids"]) + len(example["rejected_input_ids"]) - prefix
        return example_length(example)

    @property
    def max_patches(self) -> int:
        """Vision-unit budget of one batch (the largest patch bucket)."""
        return self.patch_buckets[-1]

    def new_packer(self) -> "Packer":
        return Packer(self)

    def build(self, items: list) -> dict[str, Any]:
        """The device batch of a filled packer's contents (`Packer.items`)."""
        if self.mode == "sft":
            return sft_batch(items, self)
        if self.share_prompt:
            return dpo_shared_prompt_batch(items, self)
        return dpo_batch(items, self)


class Packer:
    """Collects examples into one batch: SFT rows (first-fit packing) or DPO pairs, within the patch budget."""

    def __init__(self, spec: BatchSpec):
        self.spec = spec
        self.patches = 0
        if spec.mode == "sft":
            self.rows: list[list[dict]] = [[] for _ in range(spec.batch_size)]
            self.used = [0] * spec.batch_size
        else:
            self.pairs: list[dict] = []

    @property
    def num_examples(self) -> int:
        return sum(len(r) for r in self.rows) if self.spec.mode == "sft" else len(self.pairs)

    @property
    def empty(self) -> bool:
        return self.num_examples == 0

    @property
    def items(self) -> list:
        return self.rows if self.spec.mode == "sft" else self.pairs

    def add(self, example: dict) -> bool:
        """Places `example` in this batch and returns True, or returns False if it does not fit (batch is full)."""
        spec = self.spec
        n, p = example_length(example), example_patches(example)
        if n > spec.max_length:
            raise ValueError(f"{example.get('source')}: {n} tokens exceed max_length {spec.max_length}")
        n = spec.row_length(example)
        if p > spec.max_patches:
            raise ValueError(f"{example.get('source')}: {p} {spec.images.unit_name} exceed the largest patch bucket "
                             f"{spec.max_patches}")
        if self.patches + p > spec.max_patches:
            return False
        if spec.mode == "dpo":
            if len(self.pairs) >= spec.batch_size:
                return False
            self.pairs.append(example)
            self.patches += p
            return True
        for r in range(spec.batch_size):
            fits = self.used[r] + n <= spec.max_length if spec.packing else self.used[r] == 0
            if fits:
                self.rows[r].append(example)
                self.used[r] += n
                self.patches += p
                return True
        return False


# ---------------------------------------------------------------------------------------------------------------
# Assembly


def _vision_arrays(pixels: list[np.ndarray], infos: list, spec: BatchSpec) -> dict[str, Any]:
    """pixel_values padded to a bucket, the family's layout arrays and the feature count; {} without images."""
    if not pixels:
        return {}
    total = sum(int(p.shape[0]) for p in pixels)
    bucket = pick_bucket(total, spec.patch_buckets)
    images = spec.images
    return {"pixel_values": images.pixel_batch(pixels, bucket),
            "vision": images.layout(images.concat_info(infos), pad_to=bucket),
            "features": images.num_features(total), "feature_rows": images.num_features(bucket)}


def _image_slots(input_ids: np.ndarray, attention_mask: np.ndarray, rows: slice, spec: BatchSpec) -> np.ndarray:
    """Flat [B*L] indices of the image tokens in `rows`, in row-major order."""
    flat_ids = input_ids.reshape(-1)
    flat_mask = attention_mask.reshape(-1)
    length = input_ids.shape[1]
    lo, hi = rows.start * length, rows.stop * length
    hits = np.flatnonzero((flat_ids[lo:hi] == spec.image_token_id) & (flat_mask[lo:hi] != 0))
    return (hits + lo).astype(np.int32)


def _positions(input_ids, infos, attention_mask, segment_ids, spec: BatchSpec) -> np.ndarray:
    images = spec.images
    return images.positions(input_ids, images.concat_info(infos), attention_mask, segment_ids)


def sft_batch(rows: list[list[dict]], spec: BatchSpec) -> dict[str, Any]:
    """The SFT device batch of `rows` (each a list of examples packed left to right)."""
    b = spec.batch_size
    if len(rows) != b:
        raise ValueError(f"expected {b} rows, got {len(rows)}")
    used = max(sum(int(ex["input_ids"].shape[0]) for ex in row) for row in rows)
    length = pick_bucket(max(used, 1), spec.length_buckets)
    input_ids = np.full((b, length), spec.pad_id, np.int32)  # [B, L]
    attention_mask = np.zeros((b, length), np.int32)
    segment_ids = np.zeros((b, length), np.int32)
    labels = np.zeros((b, length), np.int32)
    loss_mask = np.zeros((b, length), np.float32)
    pixels, infos = [], []
    for r, row in enumerate(rows):
        offset = 0
        for k, ex in enumerate(row):
            ids = np.asarray(ex["input_ids"], np.int32)
            n = ids.shape[0]
            span = slice(offset, offset + n)
            input_ids[r, span] = ids
            attention_mask[r, span] = 1
            segment_ids[r, span] = k + 1
            labels[r, span], loss_mask[r, span] = shifted_targets(ids, np.asarray(ex["target_mask"]))
            if example_patches(ex):
                # Rows in order, examples left to right within a row: the flattened order of their image tokens.
                pixels.append(ex["pixel_values"])
                infos.append(ex[spec.images.info_key])
            offset += n
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "segment_ids": segment_ids,
        "position_ids": _positions(input_ids, infos, attention_mask, segment_ids, spec),
        "labels": labels,
        "loss_mask": loss_mask,
    }
    vision = _vision_arrays(pixels, infos, spec)
    if vision:
        slots = _image_slots(input_ids, attention_mask, slice(0, b), spec)
        _check_slots(slots.size, vision["features"])
        index = np.full(vision["feature_rows"], b * length, np.int32)  # [F]
        index[: slots.size] = slots
        batch.update(pixel_values=vision["pixel_values"], vision=vision["vision"], image_token_index=index)
    return batch


def dpo_batch(pairs: list[dict], spec: BatchSpec) -> dict[str, Any]:
    """The DPO device batch of up to batch_size pairs (missing pairs are all-zero padding rows)."""
    n = spec.batch_size
    if not 0 < len(pairs) <= n:
        raise ValueError(f"expected 1..{n} pairs, got {len(pairs)}")
    length = pick_bucket(max(example_length(p) for p in pairs), spec.length_buckets)
    rows = 2 * n
    input_ids = np.full((rows, length), spec.pad_id, np.int32)  # [2n, L]
    attention_mask = np.zeros((rows, length), np.int32)
    labels = np.zeros((rows, length), np.int32)
    loss_mask = np.zeros((rows, length), np.float32)
    pair_mask = np.zeros((n,), np.float32)
    pixels, infos = [], []
    for i, pair in enumerate(pairs):
        pair_mask[i] = 1.0
        for row, side in ((i, "chosen"), (n + i, "rejected")):
            ids = np.asarray(pair[f"{side}_input_ids"], np.int32)
            k = ids.shape[0]
            input_ids[row, :k] = ids
            attention_mask[row, :k] = 1
            labels[row, :k], loss_mask[row, :k] = shifted_targets(ids, np.asarray(pair[f"{side}_target_mask"]))
        if example_patches(pair):
            pixels.append(pair["pixel_values"])
            infos.append(pair[spec.images.info_key])
    segment_ids = attention_mask.copy()
    # Positions: the chosen rows consume every pair's images in order, then the rejected rows the same again.
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "segment_ids": segment_ids,
        "position_ids": _positions(input_ids, infos + infos, attention_mask, None, spec),
        "labels": labels,
        "loss_mask": loss_mask,
        "num_target_tokens": loss_mask.sum(axis=1).astype(np.int32),
        "pair_mask": pair_mask,
        "sources": [p.get("source") for p in pairs],  # host-only: "file:line" of each pair, in row order
    }
    ref = _reference_logps(pairs, n)
    if ref is not None:
        batch["ref_logps"] = ref
    vision = _vision_arrays(pixels, infos, spec)
    if vision:
        index = np.full((2, vision["feature_rows"]), rows * length, np.int32)  # [2, F]
        for side, span in ((0, slice(0, n)), (1, slice(n, rows))):
            slots = _image_slots(input_ids, attention_mask, span, spec)
            _check_slots(slots.size, vision["features"])
            index[side, : slots.size] = slots
        batch.update(pixel_values=vision["pixel_values"], vision=vision["vision"], image_token_index=index)
    return batch


def shared_prefix_length(pair: dict) -> int:
    """Tokens the chosen and rejected sequences of a pair share at their start, up to the first training target of
    either (their common prompt, images included)."""
    chosen, rejected = np.asarray(pair["chosen_input_ids"]), np.asarray(pair["rejected_input_ids"])
    limit = min(len(chosen), len(rejected))
    differ = np.flatnonzero(chosen[:limit] != rejected[:limit])
    prefix = int(differ[0]) if differ.size else limit
    for side in ("chosen", "rejected"):
        targets = np.flatnonzero(np.asarray(pair[f"{side}_target_mask"]))
        if targets.size:
            prefix = min(prefix, int(targets[0]))
    return prefix


def dpo_shared_prompt_batch(pairs: list[dict], spec: BatchSpec) -> dict[str, Any]:
    """The DPO device batch with one row per pair: [prompt | chosen completion | rejected completion].

    The prompt (and its image tokens) is embedded and run through the decoder once for both completions: with
    ``branch_ids`` (0 prompt, 1 chosen, 2 rejected) a completion token attends to the prompt and to its own
    completion only, and takes the positions it has in its own sequence, so every hidden state equals that of the
    unshared layout. Row keys ([n, L]): input_ids, attention_mask, segment_ids (1 on tokens), branch_ids,
    position_ids [*A, n, L]; image_token_index [F] (one row per pair: the features go in once).

    Targets stay per sequence, chosen then rejected ([2n, L], the unshared layout's labels and loss_mask), with
    where each sits in the rows: sequence_row [2n] and sequence_position [2n, L] (host-only; the trainer turns
    them into target_row / target_index). The last prompt token predicts the first token of both completions.
    num_target_tokens, pair_mask, ref_logps and sources as in `dpo_batch`.
    """
    images = spec.images
    n = spec.batch_size
    if not 0 < len(pairs) <= n:
        raise ValueError(f"expected 1..{n} pairs, got {len(pairs)}")
    length = pick_bucket(max(spec.row_length(p) for p in pairs), spec.row_buckets)
    seq_length = pick_bucket(max(example_length(p) for p in pairs), spec.length_buckets)
    input_ids = np.full((n, length), spec.pad_id, np.int32)  # [n, L]
    attention_mask = np.zeros((n, length), np.int32)
    branch_ids = np.zeros((n, length), np.int32)
    position_ids = np.zeros((*images.position_axes, n, length), np.int32)
    labels = np.zeros((2 * n, seq_length), np.int32)  # [2n, Ls] per sequence, chosen then rejected
    loss_mask = np.zeros((2 * n, seq_length), np.float32)
    sequence_row = np.concatenate([np.arange(n), np.arange(n)]).astype(np.int32)  # [2n]
    sequence_position = np.zeros((2 * n, seq_length), np.int32)
    pair_mask = np.zeros((n,), np.float32)
    pixels, infos = [], []
    for i, pair in enumerate(pairs):
        pair_mask[i] = 1.0
        prefix = shared_prefix_length(pair)
        info = images.concat_info([pair[images.info_key]] if images.info_key in pair else [])
        start = prefix
        for s, side in ((i, "chosen"), (n + i, "rejected")):
            ids = np.asarray(pair[f"{side}_input_ids"], np.int32)
            k = ids.shape[0]
            if (ids[prefix:] == spec.image_token_id).any():
                raise ValueError(f"{pair.get('source')}: image tokens after the shared prompt of the {side} answer; "
                                 "set dpo.share_prompt=False for such pairs")
            stop = start + k - prefix
            input_ids[i, start:stop] = ids[prefix:]
            attention_mask[i, start:stop] = 1
            branch_ids[i, start:stop] = 1 if side == "chosen" else 2
            positions = images.sequence_positions(ids, info)  # [*A, k]
            position_ids[..., i, start:stop] = positions[..., prefix:]
            if side == "chosen":
                input_ids[i, :prefix], attention_mask[i, :prefix] = ids[:prefix], 1
                position_ids[..., i, :prefix] = positions[..., :prefix]
            labels[s, :k], loss_mask[s, :k] = shifted_targets(ids, np.asarray(pair[f"{side}_target_mask"]))
            sequence_position[s, :k] = np.concatenate([np.arange(prefix), np.arange(start, stop)])
            start = stop
        if example_patches(pair):
            pixels.append(pair["pixel_values"])
            infos.append(info)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "segment_ids": attention_mask.copy(),
        "branch_ids": branch_ids,
        "position_ids": position_ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "sequence_row": sequence_row,
        "sequence_position": sequence_position,
        "num_target_tokens": loss_mask.sum(axis=1).astype(np.int32),
        "pair_mask": pair_mask,
        "sources": [p.get("source") for p in pairs],
    }
    ref = _reference_logps(pairs, n)
    if ref is not None:
        batch["ref_logps"] = ref
    vision = _vision_arrays(pixels, infos, spec)
    if vision:
        index = np.full((vision["feature_rows"],), n * length, np.int32)  # [F]
        slots = _image_slots(input_ids, attention_mask, slice(0, n), spec)
        _check_slots(slots.size, vision["features"])
        index[: slots.size] = slots
        batch.update(pixel_values=vision["pixel_values"], vision=vision["vision"], image_token_index=index)
    return batch


def _reference_logps(pairs: list[dict], n: int) -> np.ndarray | None:
    """[2n] precomputed reference log-probs (chosen then rejected, 0 for padding pairs), or None when no pair has
    them; raises when only some pairs do."""
    with_ref = [p for p in pairs if "ref_logps" in p]
    if not with_ref:
        return None
    if len(with_ref) != len(pairs):
        missing = next(p.get("source") for p in pairs if "ref_logps" not in p)
        raise ValueError(f"{missing}: no ref_chosen_logps/ref_rejected_logps, but other records of the batch have "
                         "them; precomputed reference log-probs must be given for every record or none")
    ref = np.zeros((2 * n,), np.float32)
    for i, pair in enumerate(pairs):
        ref[i], ref[n + i] = pair["ref_logps"]
    return ref


def _check_slots(tokens: int, features: int) -> None:
    if tokens != features:
        raise ValueError(f"the batch has {tokens} image tokens but its images give {features} features")


# ---------------------------------------------------------------------------------------------------------------
# Helpers for consumers


def forward_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The subset of a device batch that a model's `forward` takes (no vision keys for text-only batches)."""
    return {k: batch[k] for k in FORWARD_KEYS if k in batch}


def has_images(batch: dict[str, Any]) -> bool:
    return "pixel_values" in batch


def packing_efficiency(batch: dict[str, Any]) -> float:
    """Fraction of the batch's token slots that hold real tokens (1 - padding fraction)."""
    mask = batch["attention_mask"]
    return float(mask.sum()) / float(mask.size)
