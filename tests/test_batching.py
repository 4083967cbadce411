"""Host-side batch assembly: buckets, packing invariants, DPO layout (pure numpy, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from medee_jax.data import batching
from medee_jax.data.batching import BatchSpec, Packer, pick_bucket, shifted_targets
from medee_jax.models.qwen2_5_vl.config import tiny_config
from medee_jax.models.qwen2_5_vl.host import QwenImageInputs, mrope_positions_for_sequence

IMAGE = 7  # image token id of these synthetic examples
VISION = tiny_config(64).vision
GRIDS = [(1, 4, 4), (1, 4, 8), (1, 8, 8), (1, 6, 4)]


def spec(mode="sft", **kw):
    base = dict(mode=mode, batch_size=3, max_length=64, length_buckets=(16, 32, 64), patch_buckets=(64, 128, 256),
                image_token_id=IMAGE, images=QwenImageInputs(VISION))
    base.update(kw)
    return BatchSpec(**base)


def make_example(rng, uid, n_images=None, max_len=40):
    """A random SFT example whose pixel rows are tagged with its uid (pixel_values[:, 0] = uid, [:, 1] = row)."""
    n_images = int(rng.integers(0, 3)) if n_images is None else n_images
    grids = [GRIDS[int(rng.integers(len(GRIDS)))] for _ in range(n_images)]
    ids = list(rng.integers(10, 60, int(rng.integers(2, 6))))
    for g in grids:
        ids += [8] + [IMAGE] * (int(np.prod(g)) // 4) + [9] + list(rng.integers(10, 60, int(rng.integers(1, 4))))
    ids += list(rng.integers(10, 60, int(rng.integers(2, max(3, max_len - len(ids))))))
    ids = np.asarray(ids[:max(len(ids), 1)], np.int32)
    mask = np.zeros(len(ids), np.int32)
    start = int(rng.integers(1, len(ids)))
    mask[start:] = (ids[start:] != IMAGE).astype(np.int32)
    ex = {"input_ids": ids, "target_mask": mask, "source": f"mem:{uid}"}
    if grids:
        p = sum(int(np.prod(g)) for g in grids)
        pixels = np.zeros((p, 1176), np.float32)
        pixels[:, 0] = uid
        pixels[:, 1] = np.arange(p)
        ex.update(pixel_values=pixels, image_grid_thw=np.asarray(grids, np.int64))
    return ex


def pack_all(examples, s):
    """Batches from a stream of examples, closing a batch when the next example does not fit (as the pipeline)."""
    batches, packer = [], s.new_packer()
    for ex in examples:
        if not packer.add(ex):
            batches.append((s.build(packer.items), packer.items))
            packer = s.new_packer()
            assert packer.add(ex)
    if not packer.empty:
        batches.append((s.build(packer.items), packer.items))
    return batches


def alone(ex, s):
    """The batch of one example on its own (one row, no packing)."""
    one = BatchSpec(**{**s.__dict__, "batch_size": 1, "packing": False})
    return one.build([[ex]])


# ---------------------------------------------------------------------------------------------------------------


def test_bucket_helpers():
    assert batching.power_of_two_buckets(100, 1000) == (128, 256, 512, 1000)
    assert batching.default_length_buckets(2048) == (128, 256, 512, 1024, 2048)
    assert batching.default_patch_buckets(5000) == (256, 512, 1024, 2048, 4096, 5000)
    assert batching.default_patch_buckets(5001)[-1] == 5004
    assert pick_bucket(1, (16, 32)) == 16 and pick_bucket(16, (16, 32)) == 16 and pick_bucket(17, (16, 32)) == 32
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        pick_bucket(33, (16, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        spec(patch_buckets=(64, 130))
    with pytest.raises(ValueError, match="below max_length"):
        spec(length_buckets=(16, 32))


def test_shifted_targets():
    labels, mask = shifted_targets(np.array([5, 6, 7, 8]), np.array([0, 0, 1, 1]))
    assert labels.tolist() == [6, 7, 8, 0] and mask.tolist() == [0, 1, 1, 0] and mask.dtype == np.float32


@pytest.mark.parametrize("packing", [True, False])
def test_packing_keeps_every_example_once_and_equal_to_alone(packing):
    rng = np.random.default_rng(0)
    s = spec(packing=packing)
    examples = [make_example(rng, uid) for uid in range(1, 41)]
    batches = pack_all(examples, s)
    seen = []
    for batch, rows in batches:
        b, length = batch["input_ids"].shape
        assert b == s.batch_size and length in s.length_buckets
        for r, row in enumerate(rows):
            assert packing or len(row) <= 1
            offset = 0
            for k, ex in enumerate(row):
                n = len(ex["input_ids"])
                span = slice(offset, offset + n)
                ref = alone(ex, s)
                assert (batch["segment_ids"][r, span] == k + 1).all()
                np.testing.assert_array_equal(batch["input_ids"][r, span], ex["input_ids"])
                np.testing.assert_array_equal(batch["labels"][r, span], ref["labels"][0, :n])
                np.testing.assert_array_equal(batch["loss_mask"][r, span], ref["loss_mask"][0, :n])
                np.testing.assert_array_equal(batch["position_ids"][:, r, span], ref["position_ids"][:, 0, :n])
                grid = ex.get("image_grid_thw", np.zeros((0, 3)))
                pos, used = mrope_positions_for_sequence(ex["input_ids"], grid, image_token_id=IMAGE)
                assert used == len(grid)
                np.testing.assert_array_equal(batch["position_ids"][:, r, span], pos)
                seen.append(ex["source"])
                offset += n
            # nothing after the last example of the row
            assert (batch["segment_ids"][r, offset:] == 0).all() and (batch["attention_mask"][r, offset:] == 0).all()
            assert (batch["loss_mask"][r, offset:] == 0).all() and (batch["labels"][r, offset:] == 0).all()
        # the label of the last token of a segment never crosses into the next example
        seg = batch["segment_ids"]
        boundary = np.zeros_like(seg, bool)
        boundary[:, :-1] = seg[:, :-1] != seg[:, 1:]
        boundary[:, -1] = True
        assert (batch["loss_mask"][boundary] == 0).all() and (batch["labels"][boundary] == 0).all()
        check_image_routing(batch, rows, s)
    assert sorted(seen) == sorted(ex["source"] for ex in examples)  # every example exactly once
    total_targets = sum(float(shifted_targets(ex["input_ids"], ex["target_mask"])[1].sum()) for ex in examples)
    assert sum(float(b["loss_mask"].sum()) for b, _ in batches) == total_targets
    if packing:
        assert len(batches) < len(examples) / s.batch_size  # packing really put several examples in rows


def check_image_routing(batch, rows, s):
    """Every image token's feature row comes from its own example's pixels, in that example's image order."""
    if "pixel_values" not in batch:
        assert not any("pixel_values" in ex for row in rows for ex in row)
        assert "vision" not in batch and "image_token_index" not in batch
        return
    pixels, index = batch["pixel_values"], batch["image_token_index"]
    p, length = pixels.shape[0], batch["input_ids"].shape[1]
    assert p in s.patch_buckets and index.shape == (p // 4,)
    assert set(batch["vision"]) == {"rot_pos", "window_index", "reverse_index", "window_gather",
                                    "window_block_segments", "window_scatter", "image_segments"}
    flat_seg = batch["segment_ids"].reshape(-1)
    flat_ids = batch["input_ids"].reshape(-1)
    valid = index < batch["input_ids"].size
    assert (flat_ids[index[valid]] == IMAGE).all()
    assert valid.sum() == (flat_ids == IMAGE).sum()
    assert (index[~valid] == batch["input_ids"].size).all() and (pixels[4 * valid.sum():] == 0).all()
    for f in np.flatnonzero(valid):
        slot = int(index[f])
        r, t = divmod(slot, length)
        ex = rows[r][flat_seg[slot] - 1]
        # the k-th image token of the example takes the example's k-th merged feature (4 patch rows)
        k = int((ex["input_ids"][: t - sum(len(e["input_ids"]) for e in rows[r][: flat_seg[slot] - 1])] == IMAGE).sum())
        np.testing.assert_array_equal(pixels[4 * f : 4 * f + 4, 0], ex["pixel_values"][0, 0])
        np.testing.assert_array_equal(pixels[4 * f : 4 * f + 4, 1], np.arange(4 * k, 4 * k + 4))


def test_patch_budget_closes_batch():
    rng = np.random.default_rng(1)
    s = spec(patch_buckets=(64, 128))
    examples = [make_example(rng, uid, n_images=2) for uid in range(1, 13)]
    for batch, rows in pack_all(examples, s):
        used = sum(len(ex["pixel_values"]) for row in rows for ex in row)
        assert used <= 128 and batch["pixel_values"].shape[0] == pick_bucket(used, (64, 128))
    with pytest.raises(ValueError, match="patches exceed"):
        Packer(spec(patch_buckets=(16,))).add(make_example(rng, 99, n_images=2))


def test_only_configured_shapes():
    rng = np.random.default_rng(2)
    s = spec(length_buckets=(32, 48, 64), patch_buckets=(32, 96, 256))
    shapes = set()
    for packing in (True, False):
        examples = [make_example(rng, uid, max_len=int(rng.integers(8, 60))) for uid in range(60)]
        for batch, _ in pack_all(examples, BatchSpec(**{**s.__dict__, "packing": packing})):
            shapes.add((batch["input_ids"].shape, batch.get("pixel_values", np.zeros((0, 1176))).shape))
            for key, value in batch.items():
                if key == "vision":
                    assert all(v.dtype == np.int32 for v in value.values())
                else:
                    assert value.dtype == (np.float32 if key in ("loss_mask", "pixel_values") else np.int32), key
    lengths = {shape[0][1] for shape in shapes}
    patches = {shape[1][0] for shape in shapes}
    assert lengths <= {32, 48, 64} and patches <= {0, 32, 96, 256}
    assert all(shape[0][0] == 3 for shape in shapes)


def make_pair(rng, uid, n_images):
    prompt = make_example(rng, uid, n_images=n_images, max_len=20)
    ids = prompt["input_ids"]
    out = {"source": f"mem:{uid}"}
    for side, n in (("chosen", int(rng.integers(2, 12))), ("rejected", int(rng.integers(2, 12)))):
        answer = rng.integers(10, 60, n).astype(np.int32)
        out[f"{side}_input_ids"] = np.concatenate([ids, answer])
        out[f"{side}_target_mask"] = np.concatenate([np.zeros(len(ids), np.int32), np.ones(n, np.int32)])
    if n_images:
        out.update(pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"])
    return out


def test_dpo_batch_layout():
    rng = np.random.default_rng(3)
    s = spec("dpo", batch_size=3)
    pairs = [make_pair(rng, 1, 1), make_pair(rng, 2, 0), make_pair(rng, 3, 2)]
    packer = s.new_packer()
    assert all(packer.add(p) for p in pairs) and not packer.add(make_pair(rng, 4, 0))
    batch = s.build(packer.items)
    n, length = 3, batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == (2 * n, length) and batch["position_ids"].shape == (3, 2 * n, length)
    for i, pair in enumerate(pairs):
        for row, side in ((i, "chosen"), (n + i, "rejected")):
            ids = pair[f"{side}_input_ids"]
            k = len(ids)
            np.testing.assert_array_equal(batch["input_ids"][row, :k], ids)
            assert batch["attention_mask"][row].sum() == k and (batch["segment_ids"][row] == batch["attention_mask"][row]).all()
            labels, mask = shifted_targets(ids, pair[f"{side}_target_mask"])
            np.testing.assert_array_equal(batch["labels"][row, :k], labels)
            np.testing.assert_array_equal(batch["loss_mask"][row, :k], mask)
            assert batch["num_target_tokens"][row] == mask.sum() == pair[f"{side}_target_mask"].sum()
            pos, _ = mrope_positions_for_sequence(ids, pair.get("image_grid_thw", np.zeros((0, 3))), image_token_id=IMAGE)
            np.testing.assert_array_equal(batch["position_ids"][:, row, :k], pos)
    assert batch["pair_mask"].tolist() == [1, 1, 1]
    # images once per pair: pair 1's then pair 3's patch rows
    patches = sum(len(p["pixel_values"]) for p in pairs if "pixel_values" in p)
    np.testing.assert_array_equal(batch["pixel_values"][:patches, 0], np.concatenate(
        [p["pixel_values"][:, 0] for p in pairs if "pixel_values" in p]))
    index = batch["image_token_index"]
    assert index.shape == (2, batch["pixel_values"].shape[0] // 4)
    valid = index[0] < 2 * n * length
    assert (valid == (index[1] < 2 * n * length)).all() and valid.sum() == patches // 4
    rows0, cols0 = np.divmod(index[0][valid], length)
    rows1, cols1 = np.divmod(index[1][valid], length)
    assert (rows0 < n).all() and (rows1 == rows0 + n).all() and (cols0 == cols1).all()  # same prompt slots
    assert (batch["input_ids"].reshape(-1)[index[:, valid]] == IMAGE).all()
    # a short batch is padded with zero pairs
    short = s.build(pairs[:1])
    assert short["pair_mask"].tolist() == [1, 0, 0] and short["num_target_tokens"][[1, 2, 4, 5]].sum() == 0
    assert short["attention_mask"][[1, 2, 4, 5]].sum() == 0


def test_text_only_dpo_batch_has_no_vision_keys():
    rng = np.random.default_rng(4)
    s = spec("dpo", batch_size=2)
    batch = s.build([make_pair(rng, 1, 0), make_pair(rng, 2, 0)])
    assert not set(batching.VISION_KEYS) & set(batch)
    assert set(batching.forward_inputs(batch)) == {"input_ids", "position_ids", "attention_mask", "segment_ids"}


def test_precomputed_reference_logps_follow_their_rows():
    rng = np.random.default_rng(5)
    s = spec("dpo", batch_size=3)
    pairs = [make_pair(rng, uid, 0) for uid in (1, 2)]
    pairs[0]["ref_logps"] = np.array([-3.5, -7.0], np.float32)
    pairs[1]["ref_logps"] = np.array([-1.0, -2.0], np.float32)
    batch = s.build(pairs)
    assert batch["ref_logps"].tolist() == [-3.5, -1.0, 0.0, -7.0, -2.0, 0.0]
    assert "ref_logps" not in s.build([make_pair(rng, 3, 0)])
    with pytest.raises(ValueError, match="mem:4: no ref_chosen_logps"):
        s.build([pairs[0], make_pair(rng, 4, 0)])


def with_uint8_patches(ex, rng):
    """`ex` with random uint8 patches [p, 588] (as the pipeline's LoadImages gives), and the same example with
    their float32 pixel_values [p, 1176] (`normalize_patches`, = qwen2_vl_preprocess)."""
    from medee_jax.data.images import normalize_patches

    if "pixel_values" not in ex:
        return ex, ex
    patches = rng.integers(0, 256, (ex["pixel_values"].shape[0], 588), dtype=np.uint8)
    return {**ex, "pixel_values": patches}, {**ex, "pixel_values": normalize_patches(patches)}


@pytest.mark.parametrize("mode", ["sft", "dpo"])
def test_uint8_patches_give_the_float_batch(mode):
    """Batches of examples carrying uint8 patches are bit for bit those of the same examples with float32 pixels,
    also when both kinds meet in one batch."""
    rng = np.random.default_rng(11)
    s = spec(mode)
    made = [make_example(rng, uid) if mode == "sft" else make_pair(rng, uid, uid % 3) for uid in range(1, 13)]
    pairs = [with_uint8_patches(ex, rng) for ex in made]
    compact, floats = [c for c, _ in pairs], [f for _, f in pairs]
    mixed = [c if i % 2 else f for i, (c, f) in enumerate(pairs)]
    reference = [b for b, _ in pack_all(floats, s)]
    assert any("pixel_values" in b for b in reference)
    for examples in (compact, mixed):
        batches = [b for b, _ in pack_all(examples, s)]
        assert len(batches) == len(reference)
        for got, want in zip(batches, reference):
            assert got.keys() == want.keys()
            for key in want:
                if key == "vision":
                    for name in want[key]:
                        np.testing.assert_array_equal(got[key][name], want[key][name])
                elif key != "sources":
                    assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key


def test_dpo_shared_prompt_layout():
    rng = np.random.default_rng(5)
    s = spec("dpo", batch_size=3, share_prompt=True)
    pairs = [make_pair(rng, 1, 1), make_pair(rng, 2, 0), make_pair(rng, 3, 2)]
    batch = s.build(pairs)
    n, length = 3, batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == (n, length) and length in s.row_buckets
    assert batch["labels"].shape[0] == batch["loss_mask"].shape[0] == 2 * n
    for i, pair in enumerate(pairs):
        prefix = batching.shared_prefix_length(pair)
        chosen, rejected = pair["chosen_input_ids"], pair["rejected_input_ids"]
        assert (chosen[:prefix] == rejected[:prefix]).all() and prefix == len(chosen) - (pair["chosen_target_mask"] > 0).sum()
        row_len = len(chosen) + len(rejected) - prefix
        assert s.row_length(pair) == row_len and batch["attention_mask"][i].sum() == row_len
        np.testing.assert_array_equal(batch["input_ids"][i, :row_len],
                                      np.concatenate([chosen, rejected[prefix:]]))
        np.testing.assert_array_equal(batch["branch_ids"][i, :row_len], [0] * prefix + [1] * (len(chosen) - prefix)
                                      + [2] * (len(rejected) - prefix))
        grid = pair.get("image_grid_thw", np.zeros((0, 3)))
        for seq, ids, side in ((i, chosen, "chosen"), (n + i, rejected, "rejected")):
            k = len(ids)
            places = batch["sequence_position"][seq, :k]
            assert batch["sequence_row"][seq] == i
            np.testing.assert_array_equal(batch["input_ids"][i, places], ids)  # each sequence token, in place
            pos, _ = mrope_positions_for_sequence(ids, grid, image_token_id=IMAGE)
            np.testing.assert_array_equal(batch["position_ids"][:, i, places], pos)  # with its own positions
            labels, mask = shifted_targets(ids, pair[f"{side}_target_mask"])
            np.testing.assert_array_equal(batch["labels"][seq, :k], labels)
            np.testing.assert_array_equal(batch["loss_mask"][seq, :k], mask)
    # image features go in once, into the prompt's slots
    index = batch["image_token_index"]
    valid = index < n * length
    assert index.ndim == 1 and valid.sum() == sum(len(p["pixel_values"]) for p in pairs if "pixel_values" in p) // 4
    assert (batch["input_ids"].reshape(-1)[index[valid]] == IMAGE).all()
    assert (batch["branch_ids"].reshape(-1)[index[valid]] == 0).all()
