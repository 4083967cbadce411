"""Pre-flight check (``python -m medee_jax.train --config ... --check``): everything a run would do before its first
step, without training or writing anything to the workdir.

  * the config, resolved and validated as the trainer does;
  * every training and eval record through the pipeline's own stages (`pipeline.example_stages`: parsing, images,
    tokenization) in the first epoch's order, then into batches with the run's `BatchSpec`: record counts, bad
    records by reason with file:line, token / image-token / target length distributions, truncated sequences,
    batches per (length, patch) bucket;
  * the initial weights from their headers only (safetensors headers, Orbax metadata): names, shapes, dtypes;
  * the plan: steps, epochs, tokens per step, and the per-device memory of the real jitted train step, lowered and
    compiled for the current backend on abstract arrays (`jax.ShapeDtypeStruct`, no weights) at the largest
    buckets, from XLA's memory analysis.

`run_check` prints a report and a last JSON line (``{"ok": ..., "problems": [...], ...}``) and returns the exit
code: 0 when nothing would fail, 1 otherwise.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import tempfile
from typing import Any

import numpy as np

EXAMPLES_PER_REASON = 5  # bad records listed per reason (all are counted)


@dataclasses.dataclass
class SplitScan:
    """What reading one split through the pipeline found."""

    path: str
    records: int = 0
    examples: int = 0
    bad: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bad_examples: dict = dataclasses.field(default_factory=dict)  # reason -> ["file:line: ..."]
    tokens: list = dataclasses.field(default_factory=list)  # per example: its row length (DPO: longer sequence)
    image_tokens: list = dataclasses.field(default_factory=list)
    targets: list = dataclasses.field(default_factory=list)  # target tokens (DPO: chosen + rejected)
    truncated: int = 0  # examples cut to max_length
    batches: int = 0
    batch_shapes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (L, P or 0)
    real_tokens: int = 0
    token_slots: int = 0
    largest_batch: dict | None = None  # the built batch with the most patches, then the longest rows


def distribution(values: list) -> str:
    """'min / median / p95 / max' of ``values`` ('-' when empty)."""
    if not values:
        return "-"
    a = np.asarray(values)
    return f"{a.min()} / {int(np.median(a))} / {int(np.percentile(a, 95))} / {a.max()}"


def _example_lengths(example: dict, images) -> tuple[int, int, int, int]:
    """(row tokens, image tokens, target tokens, longest sequence) of a tokenized example (``images``: the model
    family's `ImageInputs`)."""
    info = example.get(images.info_key)
    image_tokens = 0 if info is None else int(sum(images.token_counts(info)))
    if "input_ids" in example:
        n = len(example["input_ids"])
        return n, image_tokens, int(example["target_mask"].sum()), n
    longest = max(len(example["chosen_input_ids"]), len(example["rejected_input_ids"]))
    targets = int(example["chosen_target_mask"].sum() + example["rejected_target_mask"].sum())
    return longest, image_tokens, targets, longest


def _full_length(parsed: dict, example: dict, tok, images) -> int:
    """The longest sequence of the record untruncated (it is re-tokenized with no max_length)."""
    from ..data.tokenize import tokenize_record

    info = example.get(images.info_key)
    counts = None if info is None else images.token_counts(info)
    return _example_lengths(tokenize_record(parsed["record"], tok, num_image_tokens=counts), images)[3]


def scan_split(data_config, model_cfg, spec, tok) -> SplitScan:
    """Reads every record of ``data_config``'s files through the pipeline's stages (first epoch's order) and packs
    the examples into batches with ``spec``, as the trainer's iterator does. Never raises for a bad record.
    ``model_cfg``: the model's config (its family reads the images); ``tok``: the split's `ChatTokenizer` (to
    measure sequences the stage truncated)."""
    import grain

    from ..data.dataset_files import open_dataset
    from ..data.pipeline import Dropped, example_stages, image_inputs

    records, record_format = open_dataset(data_config.paths, data_config.format, mode=data_config.mode)
    parse, load_images, tokenize = example_stages(data_config, model_cfg, record_format)
    images = image_inputs(data_config, model_cfg)
    scan = SplitScan(path=", ".join(data_config.paths))
    source = grain.MapDataset.source(records)
    if data_config.shuffle:
        source = source.shuffle(seed=data_config.seed)
    packer = spec.new_packer()

    def close_batch():
        batch = spec.build(packer.items)
        length = batch["input_ids"].shape[1]
        patches = batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
        scan.batches += 1
        scan.batch_shapes[(length, patches)] += 1
        scan.real_tokens += int(batch["attention_mask"].sum())
        scan.token_slots += int(batch["attention_mask"].size)
        if scan.largest_batch is None or (patches, length) > scan.largest_batch["_key"]:
            scan.largest_batch = {**batch, "_key": (patches, length)}

    for raw in source:
        scan.records += 1
        parsed = parse.map(raw)
        example = tokenize.map(load_images.map(parsed))
        if isinstance(example, Dropped):
            if example.error is not None:
                reason = example.error.reason
                scan.bad[reason] += 1
                listed = scan.bad_examples.setdefault(reason, [])
                if len(listed) < EXAMPLES_PER_REASON:
                    listed.append(example.error.message)
            else:
                scan.records -= 1  # a blank line is not a record
            continue
        scan.examples += 1
        row, image_tokens, targets, longest = _example_lengths(example, images)
        scan.tokens.append(row)
        scan.image_tokens.append(image_tokens)
        scan.targets.append(targets)
        if longest >= data_config.max_length and \
                _full_length(parsed, example, tok, images) > data_config.max_length:
            scan.truncated += 1
        if not packer.add(example):
            close_batch()
            packer = spec.new_packer()
            if not packer.add(example):
                raise AssertionError("an example did not fit an empty batch")
    if not packer.empty:
        close_batch()
    return scan


def checkpoint_report(c) -> tuple[list[str], list[str], Any]:
    """(report lines, problems, model config) for the initial weights, read from headers and metadata only."""
    from ..models import abstract_model, hf, orbax_io
    from .setup import initial_model_config

    lines, problems = [], []
    try:
        cfg = initial_model_config(c)
    except (OSError, ValueError) as e:
        return lines, [f"model config: {e}"], None
    if c.model.checkpoint:
        try:
            plan, infos = hf.plan_import(abstract_model(cfg), hf.local_checkpoint_dir(c.model.checkpoint))
        except (OSError, ValueError) as e:
            return lines, [str(e).splitlines()[0] + (" ..." if "\n" in str(e) else "")] + \
                [f"  {line.strip()}" for line in str(e).splitlines()[1:4]], cfg
        dtypes = collections.Counter(info.dtype for info in infos.values())
        files = {info.path for info in infos.values()}
        size = sum(info.nbytes for info in infos.values())
        lines.append(f"checkpoint {c.model.checkpoint}: {len(infos)} tensors in {len(files)} file(s), "
                     f"{size / 2**30:.2f} GiB, dtypes {dict(dtypes)}; every tensor the model needs is present with "
                     f"its shape ({len(plan)} loaded)")
        for info in sorted(infos.values(), key=lambda i: -i.nbytes)[:3]:
            lines.append(f"  largest: {info.name} {list(info.shape)} {info.dtype}")
    elif c.model.init_from:
        path = c.model.init_from
        if os.path.isdir(os.path.join(path, "checkpoints")):
            saved = sorted(int(p) for p in os.listdir(os.path.join(path, "checkpoints")) if p.isdigit())
            if saved:
                lines.append(f"init_from {path}: a run directory, latest checkpoint step {saved[-1]}")
            else:
                problems.append(f"model.init_from={path!r}: a run directory without any checkpoint")
        else:
            try:
                cfg, stored = orbax_io.check_orbax_dir(path)
            except (OSError, ValueError) as e:
                return lines, [str(e).splitlines()[0]], cfg
            dtypes = collections.Counter(str(getattr(m, "dtype", "?")) for m in stored.values())
            lines.append(f"init_from {path}: Orbax model directory, {len(stored)} arrays, dtypes {dict(dtypes)}")
    else:
        lines.append("model: the embedded tiny Qwen2.5-VL-shaped model (random init)")
    return lines, problems, cfg


def _device_memory_limit() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def _gib(n) -> str:
    """Bytes as GiB (MiB below 1 GiB); '?' when unknown."""
    if n is None:
        return "?"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _split_lines(name: str, scan: SplitScan, max_length: int) -> list[str]:
    lines = [f"{name} {scan.path}: {scan.records} records, {scan.examples} usable, "
             f"{sum(scan.bad.values())} bad, {scan.truncated} truncated to max_length={max_length}"]
    for reason, count in scan.bad.most_common():
        lines.append(f"  bad ({reason}): {count}")
        lines += [f"    {message}" for message in scan.bad_examples.get(reason, [])]
    lines.append(f"  tokens per example (min / median / p95 / max): {distribution(scan.tokens)}")
    lines.append(f"  image tokens per example: {distribution(scan.image_tokens)}")
    lines.append(f"  target tokens per example: {distribution(scan.targets)}")
    shapes = ", ".join(f"L={length} P={patches}: {n}" for (length, patches), n in sorted(scan.batch_shapes.items()))
    lines.append(f"  batches: {scan.batches} ({shapes or 'none'}); padding efficiency "
                 f"{scan.real_tokens / scan.token_slots if scan.token_slots else 0:.2f}")
    return lines


def run_check(config) -> int:
    """Runs the pre-flight for a config (resolved here if not already); prints the report and a last JSON line;
    returns 0 when nothing would fail, else 1. Writes nothing to the workdir."""
    from .mesh import local_data_shards, make_mesh
    from .setup import (embedded_family, embedded_model_config, resolve_config, resolve_data,
                        validate_config)

    c = resolve_config(config)
    problems: list[str] = []
    summary: dict[str, Any] = {"run": "demo" if c.demo else "real", "preset": c.preset or None}
    try:
        validate_config(c, c.workdir, create_workdir=False)
    except ValueError as e:
        problems += [p.strip() for p in str(e).split("\n  - ")[1:]] or [str(e)]
        return _finish(problems, summary)
    say = print
    mesh = make_mesh(dict(c.mesh))
    shards = local_data_shards(mesh)
    say(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} {mesh.devices.flat[0].platform} device(s); "
        f"{shards} data shard(s)")
    lines, found, model_cfg = checkpoint_report(c)
    for line in lines:
        say(line)
    problems += found
    with tempfile.TemporaryDirectory(prefix="medee_check_") as scratch:
        data = resolve_data(c, scratch, keep_tokenizer=False)  # the demo set, if any, lands in scratch
        if model_cfg is None and not (c.model.checkpoint or c.model.init_from):
            model_cfg = embedded_model_config(data.tokenizer_dir, embedded_family(c))
        if model_cfg is None:
            return _finish(problems, summary)
        scans = _scan_data(c, data, model_cfg, problems, say)
    train = scans.get("train")
    if train is None:
        return _finish(problems, summary)
    summary["train"] = {"records": train.records, "usable": train.examples, "bad": dict(train.bad),
                        "truncated": train.truncated, "batches": train.batches}
    if "eval" in scans:
        ev = scans["eval"]
        summary["eval"] = {"records": ev.records, "usable": ev.examples, "bad": dict(ev.bad),
                           "truncated": ev.truncated, "batches": ev.batches}
    _plan(c, train, shards, summary, problems, say)
    if train.largest_batch is not None:
        _memory(c, model_cfg, mesh, train.largest_batch, scans["_spec"], summary, problems, say)
    return _finish(problems, summary)


def _scan_data(c, data, model_cfg, problems, say) -> dict:
    """Scans the train and eval splits; adds their problems; returns {split: SplitScan, "_spec": BatchSpec}."""
    from ..data import pipeline
    from ..data.tokenize import load_chat_tokenizer
    from ..models.families import family_of
    from .setup import pipeline_config

    family = family_of(model_cfg)
    try:
        tok = load_chat_tokenizer(data.tokenizer_dir, **family.image_inputs(model_cfg).chat_tokens)
    except (OSError, ValueError) as e:
        problems.append(f"tokenizer {data.tokenizer_dir}: {e}")
        return {}
    if tok.image_token_id != model_cfg.image_token_id:
        problems.append(f"the model's image token id is {model_cfg.image_token_id} but the tokenizer in "
                        f"{data.tokenizer_dir} writes {tok.image_token} as id {tok.image_token_id}")
        return {}
    scans = {}
    for split, path in (("train", data.train_path), ("eval", data.eval_path)):
        if not path:
            continue
        dc = pipeline_config(c, data, split, num_epochs=1, bucket_field=family.bucket_field)
        try:
            spec = pipeline.batch_spec(dc, pipeline.image_inputs(dc, model_cfg), model_cfg.image_token_id)
        except ValueError as e:
            problems.append(str(e))
            return {}
        scan = scan_split(dc, model_cfg, spec, tok)
        scans[split] = scan
        if split == "train":
            scans["_spec"] = spec
        for line in _split_lines(split, scan, c.data.max_length):
            say(line)
        bad = sum(scan.bad.values())
        if scan.examples == 0:
            problems.append(f"{split} {path}: no usable record ({dict(scan.bad)})")
        elif bad and c.data.on_bad_record == "raise":
            first = next(iter(scan.bad_examples.values()))[0]
            problems.append(f"{split}: {bad} bad record(s) and data.on_bad_record='raise' would stop the run at "
                            f"the first it reads, e.g. {first}")
    return scans


def _plan(c, train: SplitScan, shards: int, summary: dict, problems: list, say) -> None:
    per_epoch = train.batches // shards // c.data.grad_accum_steps
    if c.train.steps > 0:
        steps, epochs = int(c.train.steps), (c.train.steps / per_epoch if per_epoch else float("inf"))
    else:
        steps, epochs = per_epoch * c.data.num_epochs, c.data.num_epochs
        if per_epoch < 1:
            problems.append(f"{train.path}: too few batches ({train.batches}) for one optimizer step with "
                            f"{shards} data shard(s) x data.grad_accum_steps={c.data.grad_accum_steps}")
    per_batch = train.real_tokens / train.batches if train.batches else 0.0
    slots = train.token_slots / train.batches if train.batches else 0.0
    tokens_per_step = per_batch * shards * c.data.grad_accum_steps
    summary["plan"] = {"steps": steps, "epochs": round(float(epochs), 3), "steps_per_epoch": per_epoch,
                       "tokens_per_step": round(tokens_per_step), "token_slots_per_step":
                       round(slots * shards * c.data.grad_accum_steps)}
    say(f"plan: {steps} steps ({per_epoch} per epoch, {float(epochs):.2f} epochs); {shards} data shard(s) x "
        f"{c.data.grad_accum_steps} micro-batch(es) of data.batch_size={c.data.batch_size}; ~{tokens_per_step:,.0f} "
        f"tokens per step ({slots * shards * c.data.grad_accum_steps:,.0f} padded slots)")


def _memory(c, model_cfg, mesh, batch, spec, summary, problems, say) -> None:
    from .step_memory import step_memory

    try:
        memory = step_memory(c, model_cfg, mesh, batch, spec)
    except Exception as e:  # noqa: BLE001 - a plan that does not compile is the finding, whatever XLA raised
        problems.append(f"the train step does not compile at the largest buckets: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}")
        return
    peak = memory["peak_bytes_per_device"]
    limit = _device_memory_limit()
    summary["memory"] = {"peak_bytes_per_device": peak, "state_bytes_per_device": memory["state"],
                         "device_bytes_limit": limit, **memory["batch_shape"]}
    shape = memory["batch_shape"]
    say(f"memory per device (compiled step at rows={shape['rows']} L={shape['length']} P={shape['patches']}, "
        f"XLA memory analysis): peak {_gib(peak)} = state {_gib(memory['state'])} + the largest transient; "
        f"device limit {_gib(limit)}")
    for name in ("accumulate_first", "accumulate", "clip", "update"):
        if name in memory:
            m = memory[name]
            say(f"  {name}: transient {_gib(m['transient'])} (outputs {_gib(m['outputs'])}, aliased "
                f"{_gib(m['aliased'])}, temporaries {_gib(m['temporaries'])})")
    if limit is not None and peak is not None and peak > limit:
        problems.append(f"the step needs {_gib(peak)} per device, more than the device's {_gib(limit)}: lower "
                        "data.batch_size or the largest buckets, raise mesh.fsdp / mesh.tensor, or use remat")


def _finish(problems: list[str], summary: dict) -> int:
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    ok = not problems
    print(f"check: {'OK, nothing would fail' if ok else f'{len(problems)} problem(s)'}; no training, nothing "
          "written")
    print(json.dumps({"ok": ok, "problems": problems, **summary}, default=str))
    return 0 if ok else 1
