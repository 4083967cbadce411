"""The image-blind control: the same items with blank images, or with images moved to other items.

- `blank_images(items)`: each image replaced by a uniform grey image of the same size (width x height).
- `shuffled_images(items, seed)`: each item's images replaced by another item's images. Items are grouped by
  their number of images (so `<image>` placeholders still match); within a group the image lists are permuted
  by a seeded permutation with no item keeping images equal to its own (a derangement, also over items that
  share an image file, as VQA-RAD questions do). A random permutation is drawn, then each position that still
  holds its own images is swapped with a position where the swap leaves neither item with its own images.
  Items that cannot be paired (a group of one, or every candidate shows the same image) are left out and counted.

Only items with at least one image take part; text-only items have nothing to blind. Everything but `images` is
left as it was, so a drop in accuracy measures the model's use of the image.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from .items import ImageRef, MCItem

CONDITIONS = ("standard", "blank", "shuffled")


def blank_images(items: list[MCItem]) -> list[MCItem]:
    """The items with images, each image replaced by a grey image of its size."""
    return [dataclasses.replace(item, images=tuple(ImageRef(blank_size=im.size()) for im in item.images))
            for item in items if item.images]


def _hashes(item: MCItem) -> frozenset[str]:
    return frozenset(im.sha256() for im in item.images)


def _derangement(own: list[frozenset[str]], rng: np.random.Generator) -> list[int | None]:
    """donor[i] for each position: a permutation where own[donor[i]] shares no image with own[i]; None where no
    such donor could be found."""
    m = len(own)
    perm = list(rng.permutation(m))

    def clash(i: int, j: int) -> bool:
        return i == j or bool(own[i] & own[j])

    for i in range(m):
        if not clash(i, perm[i]):
            continue
        for j in rng.permutation(m):
            if j != i and not clash(i, perm[j]) and not clash(j, perm[i]):
                perm[i], perm[j] = perm[j], perm[i]
                break
    return [p if not clash(i, p) else None for i, p in enumerate(perm)]


def shuffled_images(items: list[MCItem], seed: int = 0) -> tuple[list[MCItem], int]:
    """(items with another item's images, number of image items left out because no donor fits)."""
    rng = np.random.default_rng(seed)
    groups: dict[int, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        if item.images:
            groups[len(item.images)].append(index)
    donors: dict[int, int] = {}
    for count in sorted(groups):
        members = groups[count]
        if len(members) < 2:
            continue
        for position, donor in enumerate(_derangement([_hashes(items[i]) for i in members], rng)):
            if donor is not None:
                donors[members[position]] = members[donor]
    out = [dataclasses.replace(item, images=items[donors[i]].images) for i, item in enumerate(items) if i in donors]
    left_out = sum(len(g) for g in groups.values()) - len(out)
    return out, left_out
