"""The run directory: one run at a time (a lock), the config of every start, and what a resume changed.

Lock: ``workdir/.lock``, held with ``fcntl.flock`` for the whole run by the chief process (process 0); the file
holds the holder's pid, host, start time and command line. The kernel drops the lock when the holder exits, however
it exits (SIGKILL included), so a killed run never leaves a stale lock: the file may stay, the lock does not. On a
filesystem without locks the run goes on with a warning. In a multi-host job only the chief locks; every process
learns the outcome, so a refused job stops on all hosts together. (Locks on network filesystems are only as good
as the filesystem's own: NFSv4 and Lustre honour them, some FUSE mounts ignore them.)

Configs: every start that passes validation (config, model, data) writes ``workdir/configs/config.<UTC time>.json``
and replaces ``workdir/config.json`` with it (the latest start's config); a failed start writes neither. Each
checkpoint also records the config it was saved under (``RunCheckpointer.save``), which a resume compares against.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time

log = logging.getLogger("medee_jax.train")

LOCK_FILE = ".lock"


class WorkdirBusyError(ValueError):
    """Another run holds the workdir; the message names its pid and host."""


class WorkdirLock:
    """An exclusive, non-blocking ``flock`` on ``workdir/.lock`` (see the module docstring)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self._file = None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock or raises WorkdirBusyError naming the holder."""
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _holder_text(f.read())
            f.close()
            raise WorkdirBusyError(f"{os.path.dirname(self.path)}: the workdir is in use by another run ({holder}); "
                                   "wait for it to finish or stop it, or choose another --workdir") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                f.close()
                raise
            log.warning("%s: cannot lock the workdir on this filesystem (%s); make sure no other run uses it",
                        self.path, e.strerror)
        f.seek(0)
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": " ".join(sys.argv)}, f)
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            try:
                self._file.seek(0)
                self._file.truncate()
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            finally:
                self._file.close()
                self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None


def _holder_text(text: str) -> str:
    try:
        holder = json.loads(text)
        return (f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}: "
                f"{holder.get('command', '?')}")
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def lock_workdir(workdir: str, *, is_chief: bool) -> WorkdirLock | None:
    """Returns the chief's held lock (None on other processes); raises WorkdirBusyError on every process if the
    chief could not take it."""
    import jax

    lock, error = None, None
    if is_chief:
        try:
            lock = WorkdirLock(workdir).acquire()
        except WorkdirBusyError as e:
            error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            raise WorkdirBusyError(f"{workdir}: the workdir is in use by another run (the chief process could not "
                                   "lock it)")
    if error is not None:
        raise error
    return lock


# ---------------------------------------------------------------------------------------------------------------
# Configs


def config_dict(config) -> dict:
    """Returns the config as plain JSON data (as config.json holds it)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def save_start_config(workdir: str, config) -> str:
    """Writes this start's config to ``configs/config.<UTC time>.json`` and as ``config.json``; returns the former's
    path relative to the workdir."""
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    folder = os.path.join(workdir, "configs")
    os.makedirs(folder, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name, k = f"config.{stamp}.json", 1
    while os.path.exists(os.path.join(folder, name)):
        k += 1
        name = f"config.{stamp}-{k}.json"
    with open(os.path.join(folder, name), "x", encoding="utf-8") as f:
        f.write(text)
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, os.path.join(workdir, "config.json"))
    return os.path.join("configs", name)


def _flatten(tree, prefix="") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def changed_fields(saved: dict, now: dict, ignore=("workdir",)) -> list[str]:
    """Returns "field: saved -> now" for every config field that differs (sorted; ``ignore``d fields left out)."""
    a, b = _flatten(saved), _flatten(now)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        old, new = a.get(key, missing), b.get(key, missing)
        if old != new:
            show = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
            out.append(f"{key}: {show(old)} -> {show(new)}")
    return out
