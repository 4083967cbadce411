"""Host-side (numpy) layout of a batch of images for the Qwen2.5-VL vision tower.

The tower sees all patches of all images of a batch as one sequence of ``num_patches`` rows (padded to a bucket).
Everything data-dependent is computed here so the device program is shape-static:

* ``rot_pos``               [P, 2]   (h, w) patch coordinates for the 2-D rotary, in the window order the blocks see;
* ``window_index``          [P/4]    merge cells in window order (transformers' ``get_vision_window_index``),
                                     padding last;
* ``reverse_index``         [P/4]    its inverse, applied after the patch merger;
* ``window_gather``         [NB, W]  window blocks: the window-order patch row of each of a block's W slots (W = the
                                     patches of a full window, 64 for the released config); empty slots hold P, a
                                     zero row the device appends;
* ``window_block_segments`` [NB, W]  the window of each slot within its block (0, 1, ...); empty slots W;
* ``window_scatter``        [P]      the flat slot (into [NB * W]) of each window-order patch; padding patches
                                     NB * W (a zero row: their window attention output is 0);
* ``image_segments``        [P]      attention segment per patch for full-attention blocks (one id per image frame).
Padding patches get an image segment of their own, so they never mix with real images.

Window blocks. A window holds at most W patches; full windows fill a block, edge windows (smaller) are packed
several to a block by first-fit decreasing and kept apart by ``window_block_segments``, so window attention is a
batched ``[NB, heads, W, W]`` computation: memory linear in patches. NB depends only on the bucket P
(``num_window_blocks``): first fit opens a block for a window of s ≤ W/2 patches only when every open block holds
more than W - s ≥ W/2, and a window of more than W/2 fills its own block past half, so every block but the last holds
more than half a window and NB ≤ 1 + (cells - 1) // (cells_per_window // 2 + 1).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .config import VisionConfig


@dataclasses.dataclass(frozen=True)
class VisionLayout:
    rot_pos: np.ndarray  # [P, 2] int32
    window_index: np.ndarray  # [P/4] int32
    reverse_index: np.ndarray  # [P/4] int32
    window_gather: np.ndarray  # [NB, W] int32
    window_block_segments: np.ndarray  # [NB, W] int32
    window_scatter: np.ndarray  # [P] int32
    image_segments: np.ndarray  # [P] int32
    window_segments: np.ndarray  # [P] int32, host only: the window of each patch (padding: one more id)
    num_valid_patches: int

    def arrays(self) -> dict[str, np.ndarray]:
        """Returns the device-bound arrays keyed as the model's ``encode_images`` takes them."""
        return {
            "rot_pos": self.rot_pos,
            "window_index": self.window_index,
            "reverse_index": self.reverse_index,
            "window_gather": self.window_gather,
            "window_block_segments": self.window_block_segments,
            "window_scatter": self.window_scatter,
            "image_segments": self.image_segments,
        }


def num_patches(image_grid_thw) -> int:
    """Returns the total number of patches (rows of pixel_values) of a set of images."""
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    return int(np.prod(grids, axis=1).sum())


def window_patches(cfg: VisionConfig) -> int:
    """Returns W, the patches of one full attention window (window_merged² merge cells)."""
    return cfg.window_merged**2 * cfg.merge_unit


def num_window_blocks(patches: int, cfg: VisionConfig) -> int:
    """Returns NB, the window blocks of a bucket of ``patches`` patches (enough for any images that fit in it)."""
    cells, per_window = patches // cfg.merge_unit, cfg.window_merged**2
    return 1 + max(cells - 1, 0) // (per_window // 2 + 1)


def _patch_hw(t: int, h: int, w: int, merge: int) -> np.ndarray:
    """Returns [t*h*w, 2] (h, w) of each patch in merge-cell order (the 4 patches of a 2x2 cell contiguous)."""
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hh = hh.reshape(shape).transpose(0, 2, 1, 3).ravel()
    ww = ww.reshape(shape).transpose(0, 2, 1, 3).ravel()
    return np.tile(np.stack([hh, ww], axis=-1), (t, 1))


def _windows(t: int, hm: int, wm: int, win: int) -> list[np.ndarray]:
    """Returns the merge-cell indices (local to the image) of each non-empty window, windows row-major per frame."""
    index = np.arange(t * hm * wm).reshape(t, hm, wm)
    out = []
    for f in range(t):
        for r in range(0, hm, win):
            for c in range(0, wm, win):
                cells = index[f, r:r + win, c:c + win].ravel()
                if cells.size:
                    out.append(cells)
    return out


def pack_windows(sizes: list[int], capacity: int) -> list[tuple[int, int]]:
    """Returns (block, offset) of each window of ``sizes`` cells packed into blocks of ``capacity`` cells by first-fit
    decreasing (ties in window order, so full windows fill blocks 0, 1, ... in order)."""
    placement: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    blocks = 0
    open_blocks: list[list[int]] = []  # [block, cells used] of blocks with room left, in block order
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        slot = next((o for o in open_blocks if o[1] + sizes[i] <= capacity), None)
        if slot is None:
            slot = [blocks, 0]
            blocks += 1
            open_blocks.append(slot)
        placement[i] = (slot[0], slot[1])
        slot[1] += sizes[i]
        if slot[1] == capacity:
            open_blocks.remove(slot)
    return placement


def vision_layout(image_grid_thw, cfg: VisionConfig, pad_to: int | None = None) -> VisionLayout:
    """Returns the host-side layout for images of ``image_grid_thw`` [n, 3], padded to ``pad_to`` patches."""
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    merge, unit = cfg.spatial_merge_size, cfg.merge_unit
    total = num_patches(grids)
    pad_to = total if pad_to is None else int(pad_to)
    if pad_to < total or pad_to % unit:
        raise ValueError(f"pad_to={pad_to} must be >= {total} patches and a multiple of {unit}")
    for g in grids:
        if g[1] % merge or g[2] % merge:
            raise ValueError(f"image grid {g.tolist()} is not a multiple of spatial_merge_size {merge}")

    hw = np.zeros((pad_to, 2), np.int64)
    window_index, window_sizes, image_seg_cells = [], [], []
    cell_offset, patch_offset, frame_id = 0, 0, 0
    for t, h, w in grids.tolist():
        n = t * h * w
        hw[patch_offset:patch_offset + n] = _patch_hw(t, h, w, merge)
        for cells in _windows(t, h // merge, w // merge, cfg.window_merged):
            window_index.append(cells + cell_offset)
            window_sizes.append(cells.size)
            image_seg_cells.append(frame_id + cells // ((h // merge) * (w // merge)))
        frame_id += t
        cell_offset += n // unit
        patch_offset += n
    pad_cells = (pad_to - total) // unit
    window_index.append(np.arange(cell_offset, cell_offset + pad_cells))
    image_seg_cells.append(np.full(pad_cells, frame_id))

    window_index = np.concatenate(window_index).astype(np.int64)  # [P/4]
    reverse_index = np.argsort(window_index, kind="stable")
    # Everything the blocks see is in window order: permute per merge cell, then expand to patches.
    rot_pos = hw.reshape(-1, unit, 2)[window_index].reshape(-1, 2)
    image_segments = np.repeat(np.concatenate(image_seg_cells), unit)
    window_segments = np.repeat(np.concatenate([np.repeat(np.arange(len(window_sizes)), window_sizes),
                                                np.full(pad_cells, len(window_sizes))]), unit)
    gather, block_segments, scatter = _window_blocks(window_sizes, pad_to, cfg)
    return VisionLayout(
        rot_pos=rot_pos.astype(np.int32),
        window_index=window_index.astype(np.int32),
        reverse_index=reverse_index.astype(np.int32),
        window_gather=gather,
        window_block_segments=block_segments,
        window_scatter=scatter,
        image_segments=image_segments.astype(np.int32),
        window_segments=window_segments.astype(np.int32),
        num_valid_patches=total,
    )


def _window_blocks(window_sizes: list[int], patches: int, cfg: VisionConfig):
    """Returns (gather [NB, W], block segments [NB, W], scatter [P]) int32 for windows of ``window_sizes`` cells
    laid out one after another (window order) at the start of a ``patches``-row sequence."""
    unit, width = cfg.merge_unit, window_patches(cfg)
    blocks = num_window_blocks(patches, cfg)
    gather = np.full((blocks, width), patches, np.int64)
    segments = np.full((blocks, width), width, np.int64)
    scatter = np.full(patches, blocks * width, np.int64)
    placement = pack_windows(window_sizes, cfg.window_merged**2)
    used = max((b for b, _ in placement), default=-1) + 1
    if used > blocks:  # cannot happen for windows of at most W patches (see the module docstring)
        raise ValueError(f"{len(window_sizes)} windows need {used} window blocks, more than the {blocks} of a "
                         f"{patches}-patch bucket")
    local = np.zeros(blocks, np.int64)  # next segment id per block
    start = 0
    for size, (block, offset) in zip(window_sizes, placement):
        rows = np.arange(start * unit, (start + size) * unit)
        slots = np.arange(offset * unit, (offset + size) * unit)
        gather[block, slots] = rows
        segments[block, slots] = local[block]
        scatter[rows] = block * width + slots
        local[block] += 1
        start += size
    return gather.astype(np.int32), segments.astype(np.int32), scatter.astype(np.int32)


def extend_window_blocks(vision: dict, patches: int, cfg: VisionConfig) -> dict:
    """Returns the window-block arrays of ``vision`` (for P0 patches) for a longer bucket of ``patches`` patches:
    more empty blocks, empty slots pointing at the new zero row, the added padding patches at the zero slot."""
    gather, segments, scatter = vision["window_gather"], vision["window_block_segments"], vision["window_scatter"]
    p0, (nb0, width) = scatter.shape[0], gather.shape
    blocks = num_window_blocks(patches, cfg)
    gather = np.where(gather == p0, patches, gather)
    scatter = np.where(scatter == nb0 * width, blocks * width, scatter)
    return {
        "window_gather": np.concatenate([gather, np.full((blocks - nb0, width), patches)]).astype(np.int32),
        "window_block_segments": np.concatenate([segments, np.full((blocks - nb0, width), width)]).astype(np.int32),
        "window_scatter": np.concatenate([scatter, np.full(patches - p0, blocks * width)]).astype(np.int32),
    }


def cu_window_seqlens(layout: VisionLayout) -> np.ndarray:
    """Returns transformers' ``cu_window_seqlens`` for the valid patches of ``layout`` (for tests and debugging)."""
    seg = layout.window_segments[: layout.num_valid_patches]
    bounds = np.nonzero(np.diff(seg))[0] + 1
    return np.concatenate([[0], bounds, [seg.size]]).astype(np.int32)
