"""DPO reference mode "precomputed": one pass of the initial policy over the data, then no reference weights.

The pass writes ``workdir/reference/<name>.jsonl``: the data file's records, each with ``ref_chosen_logps`` and
``ref_rejected_logps`` added (summed completion log-probs of the reference, fp32). Training then reads that file,
and the input pipeline turns the two fields into the batch's ``ref_logps`` — for image data too, since the
reference's image features need no weights once its log-probs are known. Records the pipeline skipped stay as
they were (they are skipped again). The file is written to a temporary name and renamed when complete, so a run
interrupted during the pass recomputes it on restart.

``workdir/reference/<name>.key.json`` records what the log-probs depend on: the data file (path, size, mtime), the
initial model (its checkpoint files, or the init_from run's latest checkpoint, or the embedded model's seed), the
tokenizer files and the settings that change log-probs (mode, max_length, image sizes and scaling, image folder,
dtypes). The file is reused only while that key is unchanged: new or edited data, another model or other settings
recompute it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import numpy as np

from . import identity, steps
from .batches import BatchSource

log = logging.getLogger("medee_jax.train")


def _reference_pass(trainer, source: BatchSource) -> dict[str, tuple[float, float]]:
    """Returns {"file:line": (chosen logp, rejected logp)} for every pair this process's shard holds."""
    opts = dataclasses.replace(trainer.opts, reference="none")
    graphdef = trainer.graphdef

    def logps(params, frozen, batch):
        from flax import nnx

        model = nnx.merge(graphdef, params, frozen)
        policy, _, _ = steps.dpo_logps(model, None, batch, opts)
        return policy  # [S, 2n]

    # The step's compiler options, so these log-probs sum in the order the frozen copy's would.
    logps = jax.jit(logps, compiler_options=trainer.compiler_options)

    out: dict[str, tuple[float, float]] = {}
    source.reset()
    while True:
        local = source.next_local(allow_end=True, keep_sources=True)
        if local is None:
            break
        names = local.pop("sources")
        values = np.asarray(jax.device_get(logps(trainer.params, trainer.frozen, source.to_device(local))))
        for shard, shard_names in enumerate(names):
            n = values.shape[1] // 2
            for i, name in enumerate(shard_names):
                if name is not None:
                    out[name] = (float(values[shard, i]), float(values[shard, n + i]))
    return out


def _gather_results(local: dict, workdir: str, name: str) -> dict:
    """Returns the union of every process's results (through files in the shared workdir)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    part = os.path.join(workdir, "reference", f"{name}.part{jax.process_index()}.json")
    with open(part, "w") as f:
        json.dump(local, f)
    multihost_utils.sync_global_devices(f"reference-{name}-written")
    merged = {}
    for i in range(jax.process_count()):
        with open(os.path.join(workdir, "reference", f"{name}.part{i}.json")) as f:
            merged.update({k: tuple(v) for k, v in json.load(f).items()})
    return merged


def write_with_reference(data_path: str, results: dict, out_path: str) -> int:
    """Copies ``data_path`` (JSONL) to ``out_path`` adding the reference log-probs; returns records annotated."""
    tmp = out_path + ".tmp"
    annotated = 0
    with open(data_path, "rb") as src, open(tmp, "w", encoding="utf-8") as dst:
        for line_no, raw in enumerate(src, start=1):
            key = f"{data_path}:{line_no}"
            if key in results and raw.strip():
                record = json.loads(raw)
                record["ref_chosen_logps"], record["ref_rejected_logps"] = results[key]
                dst.write(json.dumps(record, ensure_ascii=False) + "\n")
                annotated += 1
            else:
                dst.write(raw.decode("utf-8", errors="replace").rstrip("\n") + "\n")
    os.replace(tmp, out_path)
    return annotated


def reference_key(trainer, split: str, data_path: str) -> dict:
    """Returns what ``split``'s reference log-probs depend on (see the module docstring), as JSON data."""
    c, d = trainer.config, trainer.config.data
    source = BatchSource(trainer.data, split, trainer.config, trainer.model.config, trainer.mesh, path=data_path,
                         shuffle=False, num_epochs=1)
    p = source.data_config
    return {
        "data": identity.file_identity(data_path),
        "model": identity.model_identity(c),
        "tokenizer": identity.tokenizer_identity(trainer.data.tokenizer_dir),
        "settings": {"mode": c.mode, "max_length": d.max_length, "min_pixels": d.min_pixels,
                     "max_pixels": d.max_pixels, "image_max_pixels": d.image_max_pixels,
                     "high_bit_depth": d.high_bit_depth, "media_root": p.media_root, "dtype": c.model.dtype,
                     "param_dtype": c.model.param_dtype, "train_vision": c.model.train_vision,
                     "train_projector": c.model.train_projector},
    }


def precompute(trainer, split: str) -> str:
    """Returns the path of ``split``'s data annotated with reference log-probs, computing it unless a file made
    from the same data, model and settings (``reference_key``) is already there."""
    data_path = trainer.data.train_path if split == "train" else trainer.data.eval_path
    if not data_path.endswith(".jsonl"):
        raise ValueError(f"{data_path}: dpo.reference='precomputed' needs JSONL data to annotate")
    out_dir = os.path.join(trainer.workdir, "reference")
    out_path = os.path.join(out_dir, f"{split}.jsonl")
    key_path = os.path.join(out_dir, f"{split}.key.json")
    key = json.loads(json.dumps(reference_key(trainer, split, data_path)))
    saved = identity.read_json(key_path)
    if os.path.isfile(out_path) and saved == key:
        return out_path
    if os.path.isfile(out_path):
        changed = sorted(k for k in key if (saved or {}).get(k) != key[k])
        log.info("recomputing the %s reference log-probs: %s changed", split, ", ".join(changed) or "key")
    os.makedirs(out_dir, exist_ok=True)
    source = BatchSource(trainer.data, split, trainer.config, trainer.model.config, trainer.mesh,
                         path=data_path, shuffle=False, num_epochs=1)
    results = _gather_results(_reference_pass(trainer, source), trainer.workdir, split)
    if jax.process_index() == 0:
        if os.path.exists(key_path):
            os.remove(key_path)  # the old key must not vouch for a half-replaced file
        n = write_with_reference(os.path.abspath(data_path), results, out_path)  # sources name absolute paths
        identity.write_json(key_path, key)
        log.info("reference log-probs for %d records of %s -> %s", n, data_path, out_path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"reference-{split}-done")
    return out_path


def has_reference_logps(path: str) -> bool:
    """Returns whether the first record of a JSONL file already carries reference log-probs."""
    if not os.path.isfile(path):  # a folder, a glob or a dataset_info.json entry: precompute() explains
        return False
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    record = json.loads(raw)
                except ValueError:
                    return False
                return isinstance(record, dict) and "ref_chosen_logps" in record and "ref_rejected_logps" in record
    return False
