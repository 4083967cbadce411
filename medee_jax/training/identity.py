"""Cheap identities of files, checkpoints and settings, for caches that must notice when their inputs change.

A file is identified by (real path, size, mtime in ns) — what ``os.stat`` says, no reading; a model by the files
it is loaded from; a set of settings by their values. ``digest`` turns any such JSON-able description into a short
hash for a cache file name. Neither the contents of image files nor a rewrite that keeps size and mtime is noticed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

log = logging.getLogger("medee_jax.train")


def file_identity(path) -> dict:
    """Returns {"path": real path, "size": bytes, "mtime_ns": ...} of an existing file."""
    path = os.path.realpath(os.fspath(path))
    stat = os.stat(path)
    return {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def folder_identity(folder, names=None) -> list[dict]:
    """Returns the identities of the files ``names`` (default: every file) directly inside ``folder`` that exist."""
    folder = os.fspath(folder)
    names = sorted(os.listdir(folder)) if names is None else names
    return [file_identity(os.path.join(folder, n)) for n in names if os.path.isfile(os.path.join(folder, n))]


def tokenizer_identity(tokenizer_dir) -> list[dict]:
    """Returns the identities of the tokenizer and chat template files of ``tokenizer_dir``."""
    from .setup import TOKENIZER_FILES

    return folder_identity(tokenizer_dir, TOKENIZER_FILES)


def model_identity(config) -> dict:
    """Returns what identifies the initial weights of a run's config: the checkpoint's files, the init_from run's
    latest checkpoint, or the embedded model's seed."""
    c = config.model
    if c.checkpoint:
        from ..models.hf import checkpoint_files

        files = [os.path.join(c.checkpoint, "config.json"), *checkpoint_files(c.checkpoint)]
        return {"checkpoint": [file_identity(f) for f in files]}
    if c.init_from:
        runs = os.path.join(c.init_from, "checkpoints")
        if os.path.isdir(runs):
            steps = sorted(int(n) for n in os.listdir(runs) if n.isdigit())
            if steps:
                meta = os.path.join(runs, str(steps[-1]), "_CHECKPOINT_METADATA")
                return {"init_from": os.path.realpath(c.init_from), "step": steps[-1],
                        "metadata": file_identity(meta) if os.path.isfile(meta) else None}
        return {"init_from": folder_identity(c.init_from, ["config.json", "_CHECKPOINT_METADATA"])}
    return {"embedded": True, "seed": int(config.seed)}


def digest(value) -> str:
    """Returns a 16-hex-digit hash of a JSON-able value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_json(path: str):
    """Returns the JSON value stored at ``path``, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, value) -> bool:
    """Writes ``value`` to ``path`` through a temporary file (never half-written); returns False (with a warning)
    when the folder is not writable: a cache is then simply not kept."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1)
        os.replace(tmp, path)
        return True
    except OSError as e:
        log.warning("cannot write %s (%s)", path, e)
        return False
