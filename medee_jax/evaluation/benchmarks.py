"""Benchmark formats by name, and loading the items an evaluation config names.

`parse_benchmark_specs("medxpertqa:/data/MM/test.jsonl,mmmu:/data/mmmu_val.jsonl")` -> [(format, path)];
`load_items(specs, ...)` -> (items, {skip reason: count}); `demo_items(demo_dir)` -> the demo's held-out
multiple-choice cases (image questions answerable only from the image, and text questions), generated on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from medee_jax.data.errors import BadRecordCounter

from .items import MCItem
from .readers import read_mc_jsonl, read_medxpertqa, read_omnimedvqa, read_pmc_vqa, read_text_mc
from .readers_mmmu import HEALTH_AND_MEDICINE, read_mmmu, read_vlmevalkit_tsv
from .readers_vqa import read_closed_vqa

READERS = {
    "mc_jsonl": read_mc_jsonl,
    "medxpertqa": read_medxpertqa,
    "medqa": read_text_mc,
    "medbullets": read_text_mc,
    "mmmu": read_mmmu,
    "mmmu_pro": functools.partial(read_mmmu, pro=True),
    "vlmevalkit_tsv": read_vlmevalkit_tsv,
    "pmc_vqa": read_pmc_vqa,
    "omnimedvqa": read_omnimedvqa,
    "vqa_rad": functools.partial(read_closed_vqa, dataset="vqa_rad"),
    "slake": functools.partial(read_closed_vqa, dataset="slake"),
    "pathvqa": functools.partial(read_closed_vqa, dataset="pathvqa"),
}
SUBJECT_SETS = {"": None, "all": None, "health": HEALTH_AND_MEDICINE}


def parse_benchmark_specs(text: str) -> list[tuple[str, str]]:
    """"format:path,..." -> [(format, path)]; raises ValueError naming the known formats."""
    specs = []
    for entry in [e.strip() for e in text.split(",") if e.strip()]:
        fmt, sep, path = entry.partition(":")
        if not sep or fmt not in READERS:
            raise ValueError(f"benchmark {entry!r}: expected FORMAT:PATH with FORMAT one of {sorted(READERS)}")
        specs.append((fmt, path))
    return specs


def load_items(specs: list[tuple[str, str]], *, media_root: str = "", on_bad_record: str = "skip", limit: int = 0,
               mmmu_subjects: str = "health") -> tuple[list[MCItem], dict[str, int]]:
    """Items of every benchmark (the first `limit` of each when limit > 0) and the skipped rows by reason."""
    counter = BadRecordCounter()
    items = []
    for fmt, path in specs:
        if not os.path.exists(path):
            raise FileNotFoundError(f"benchmark {fmt}: {path} does not exist")
        kwargs = dict(media_root=media_root or None, on_bad_record=on_bad_record, counter=counter)
        if fmt in ("mmmu", "mmmu_pro"):
            if mmmu_subjects not in SUBJECT_SETS:
                raise ValueError(f"mmmu_subjects must be one of {sorted(SUBJECT_SETS)}, got {mmmu_subjects!r}")
            kwargs["subjects"] = SUBJECT_SETS[mmmu_subjects]
        found = READERS[fmt](path, **kwargs)
        items += found[:limit] if limit > 0 else found
    return items, dict(counter.counts)


def demo_items(demo_dir: str) -> list[MCItem]:
    """The embedded demo's held-out multiple-choice items (generated into `demo_dir` if needed)."""
    from medee_jax.data.demo import ensure_demo

    paths = ensure_demo(demo_dir)
    return [dataclasses.replace(item, benchmark=name) for name, key in (("demo_image", "mcq_image_eval"),
                                                                         ("demo_text", "mcq_text_eval"))
            for item in read_mc_jsonl(paths[key])]
