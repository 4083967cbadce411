"""Where exports and conversions may write: the destination rule, atomic replacement, stale staging clean-up.

Every directory medee_jax writes as a whole (``save_pretrained``, ``orbax_io.save_model``, both directions of
``tools/convert_checkpoint.py``, the trainer's ``workdir/hf``) carries a marker file, ``.medee_jax_export.json``,
listing the entries it wrote. An existing destination is then:

* replaced without asking when it is empty, or when it holds our marker and nothing but the entries that marker
  lists (a directory we wrote and nobody added to);
* refused (``DestinationError``) in every other case — a training workdir, a transformers checkpoint, an export
  someone added a README or eval files to — unless the caller passes ``overwrite=True`` (``--overwrite``); then the
  entries that were not ours are named in a warning, since replacing the directory removes them;
* refused even with ``overwrite=True`` when it is (or contains) a source of the write: the checkpoint being
  converted, the folder the tokenizer files are copied from. Replacing it would delete the input.

The new directory is built in a staging directory beside the destination (same filesystem: the final rename is
atomic), named ``.<name>.staging-<host>-<pid>-<random>``, and only swapped in when complete; the replaced one is
moved into the staging directory first and removed last. A process killed mid-write leaves that staging directory
behind: the next write to the same destination from the same host removes every staging directory of a process
that no longer runs, after moving a replaced destination back into place if the kill came between the two renames.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import time

log = logging.getLogger("medee_jax.export")

MARKER = ".medee_jax_export.json"
_STAGING = ".staging-"


class DestinationError(FileExistsError, ValueError):
    """A destination directory that an export or conversion must not replace; the message says why and what to do.
    (A ValueError too, so command lines that print bad-input errors as one line catch it.)"""


def _real(path) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _contains(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def read_marker(directory) -> dict | None:
    """Returns the marker medee_jax wrote into ``directory`` (None when there is none or it is unreadable)."""
    try:
        with open(os.path.join(os.fspath(directory), MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("entries"), list) else None


def foreign_entries(directory) -> list[str]:
    """Returns the entries of an existing ``directory`` that medee_jax did not write there (sorted; all of them
    when it holds no marker)."""
    names = sorted(os.listdir(directory))
    marker = read_marker(directory)
    ours = set(marker["entries"]) | {MARKER} if marker else set()
    return [n for n in names if n not in ours]


def check_destination(out_dir, *, overwrite: bool = False, sources=()) -> list[str]:
    """Raises DestinationError unless ``out_dir`` may be (re)written under the rule above; returns the entries a
    replacement would remove that medee_jax did not write (non-empty only with ``overwrite=True``).

    ``sources``: directories the write reads from (None entries ignored); the destination may not be or contain
    one, whatever ``overwrite`` says.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    real = _real(out_dir)
    for source in sources:
        if source and _contains(real, _real(source)):
            same = real == _real(source)
            raise DestinationError(
                f"{out_dir}: {'is' if same else 'contains'} the source {os.fspath(source)}; writing there would "
                "delete the input. Choose a new destination directory.")
    if not os.path.lexists(out_dir):
        return []
    if not os.path.isdir(out_dir):
        raise DestinationError(f"{out_dir}: exists and is not a directory")
    foreign = foreign_entries(out_dir)
    if foreign and not overwrite:
        what = "was not written by medee_jax" if read_marker(out_dir) is None else \
            "holds files medee_jax did not write there"
        raise DestinationError(
            f"{out_dir}: exists and {what} ({_listing(foreign)}); refusing to replace it. Choose a new "
            "directory, or pass overwrite=True (tools: --overwrite) to replace it and remove those files.")
    return foreign


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _staging_prefix(name: str) -> str:
    return f".{name}{_STAGING}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_staging(out_dir) -> list[str]:
    """Removes the staging directories beside ``out_dir`` left by killed writes from this host (their process is
    gone); if ``out_dir`` is missing and one of them holds the replaced directory, moves it back first. Returns
    the paths removed."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent, name = os.path.dirname(out_dir), os.path.basename(out_dir)
    prefix, host = _staging_prefix(name), socket.gethostname()
    removed = []
    try:
        candidates = sorted(os.listdir(parent))
    except OSError:
        return removed
    for entry in candidates:
        if not entry.startswith(prefix):
            continue
        try:
            entry_host, pid, _ = entry[len(prefix):].rsplit("-", 2)
            pid = int(pid)
        except ValueError:
            continue
        if entry_host != host or _pid_alive(pid):
            continue
        stage_root = os.path.join(parent, entry)
        old = os.path.join(stage_root, name + ".old")
        if not os.path.lexists(out_dir) and os.path.isdir(old):
            os.rename(old, out_dir)  # killed between moving the old one out and the new one in
            log.warning("restored %s from an interrupted replacement", out_dir)
        shutil.rmtree(stage_root, ignore_errors=True)
        removed.append(stage_root)
        log.warning("removed %s, left by an interrupted write (process %d)", stage_root, pid)
    return removed


def _write_marker(stage: str, kind: str, sources) -> None:
    entries = sorted(os.listdir(stage))
    marker = {"writer": "medee_jax", "kind": kind, "entries": entries,
              "sources": [os.path.abspath(os.fspath(s)) for s in sources if s],
              "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(os.path.join(stage, MARKER), "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2)


@contextlib.contextmanager
def atomic_directory(out_dir, *, kind: str = "hf", overwrite: bool = False, sources=()):
    """Yields a not-yet-existing staging path; on success it is marked as ours and renamed to ``out_dir``, on
    failure removed. ``out_dir`` is checked first (``check_destination``: raises DestinationError before any work)
    and stale staging directories of earlier killed writes are removed. An existing ``out_dir`` is swapped out
    only after the new one is complete, so a failed write never leaves a half-written directory behind.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent, name = os.path.dirname(out_dir), os.path.basename(out_dir)
    clean_stale_staging(out_dir)
    check_destination(out_dir, overwrite=overwrite, sources=sources)
    os.makedirs(parent, exist_ok=True)
    stage_root = os.path.join(parent, f"{_staging_prefix(name)}{socket.gethostname()}-{os.getpid()}-"
                                      f"{secrets.token_hex(4)}")
    os.mkdir(stage_root)
    stage = os.path.join(stage_root, name)
    try:
        yield stage
        if not os.path.isdir(stage):
            raise RuntimeError(f"{stage}: nothing was written")
        _write_marker(stage, kind, sources)
        if os.path.exists(out_dir):
            removed = check_destination(out_dir, overwrite=overwrite, sources=sources)  # again: it may have changed
            if removed:
                log.warning("replacing %s: removing %d entr%s medee_jax did not write: %s", out_dir, len(removed),
                            "y" if len(removed) == 1 else "ies", _listing(removed, limit=50))
            old = os.path.join(stage_root, name + ".old")
            os.rename(out_dir, old)
            try:
                os.rename(stage, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
        else:
            os.rename(stage, out_dir)
    finally:
        shutil.rmtree(stage_root, ignore_errors=True)
