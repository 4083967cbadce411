"""Host-side (numpy) layout of a batch of images for the Qwen2.5-VL vision tower.

The tower sees all patches of all images of a batch as one sequence of ``num_patches`` rows (padded to a bucket).
Everything data-dependent is computed here so the device program is shape-static:

* ``rot_pos``         [P, 2]   (h, w) patch coordinates for the 2-D rotary, in the window order the blocks see;
* ``window_index``    [P/4]    merge cells in window order (transformers' ``get_vision_window_index``), padding last;
* ``reverse_index``   [P/4]    its inverse, applied after the patch merger;
* ``window_segments`` [P]      attention segment per patch for window blocks (one id per window);
* ``image_segments``  [P]      attention segment per patch for full-attention blocks (one id per image frame).
Padding patches get a segment id of their own, so they never mix with real images.
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
    window_segments: np.ndarray  # [P] int32
    image_segments: np.ndarray  # [P] int32
    num_valid_patches: int

    def arrays(self) -> dict[str, np.ndarray]:
        """Returns the device-bound arrays keyed as the model's ``encode_images`` takes them."""
        return {
            "rot_pos": self.rot_pos,
            "window_index": self.window_index,
            "reverse_index": self.reverse_index,
            "window_segments": self.window_segments,
            "image_segments": self.image_segments,
        }


def num_patches(image_grid_thw) -> int:
    """Returns the total number of patches (rows of pixel_values) of a set of images."""
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    return int(np.prod(grids, axis=1).sum())


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
    window_index, window_seg_cells, image_seg_cells = [], [], []
    cell_offset, patch_offset, win_id, frame_id = 0, 0, 0, 0
    for t, h, w in grids.tolist():
        n = t * h * w
        hw[patch_offset:patch_offset + n] = _patch_hw(t, h, w, merge)
        for cells in _windows(t, h // merge, w // merge, cfg.window_merged):
            window_index.append(cells + cell_offset)
            window_seg_cells.append(np.full(cells.size, win_id))
            image_seg_cells.append(frame_id + cells // ((h // merge) * (w // merge)))
            win_id += 1
        frame_id += t
        cell_offset += n // unit
        patch_offset += n
    pad_cells = (pad_to - total) // unit
    window_index.append(np.arange(cell_offset, cell_offset + pad_cells))
    window_seg_cells.append(np.full(pad_cells, win_id))
    image_seg_cells.append(np.full(pad_cells, frame_id))

    window_index = np.concatenate(window_index).astype(np.int64)  # [P/4]
    reverse_index = np.argsort(window_index, kind="stable")
    # Everything the blocks see is in window order: permute per merge cell, then expand to patches.
    rot_pos = hw.reshape(-1, unit, 2)[window_index].reshape(-1, 2)
    window_segments = np.repeat(np.concatenate(window_seg_cells), unit)
    image_segments = np.repeat(np.concatenate(image_seg_cells), unit)
    return VisionLayout(
        rot_pos=rot_pos.astype(np.int32),
        window_index=window_index.astype(np.int32),
        reverse_index=reverse_index.astype(np.int32),
        window_segments=window_segments.astype(np.int32),
        image_segments=image_segments.astype(np.int32),
        num_valid_patches=total,
    )


def cu_window_seqlens(layout: VisionLayout) -> np.ndarray:
    """Returns transformers' ``cu_window_seqlens`` for the valid patches of ``layout`` (for tests and debugging)."""
    seg = layout.window_segments[: layout.num_valid_patches]
    bounds = np.nonzero(np.diff(seg))[0] + 1
    return np.concatenate([[0], bounds, [seg.size]]).astype(np.int32)
