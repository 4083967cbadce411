"""Random-access record sources for Grain: JSON lines (byte-offset index) and ArrayRecord files.

Every source is a `grain.sources.RandomAccessDataSource` (`__len__`, `__getitem__`) whose elements are
`RawRecord(file, line, data)`: the dataset file, the record's 1-based line (JSONL; for ArrayRecord files built by
`tools/build_array_record.py` the record number, which is the line of the JSONL it was built from) and the JSON
object's bytes (or, for a `.json` array file, the already parsed object / the `BadRecordError` of an unreadable
one). Parsing is left to the pipeline's map transforms, so reading stays cheap and errors keep their location.

- `JsonlSource(path)`: scans the file once for line starts (numpy over 16 MiB chunks) and keeps (offset, length,
  line) per non-empty line in memory; `index_cache=True` also stores that index in a sidecar `<file>.index.npz`
  (reused while the file's size and mtime match; skipped silently when the folder is read-only). Records are read
  with `os.pread` on a per-process file handle, so the source pickles cheaply into Grain worker processes.
- `JsonArraySource(path)`: a `.json` file holding one JSON array, read whole into memory.
- `ArrayRecordSource(path)`: one ArrayRecord file (records are the JSON line bytes; empty records stand for blank
  lines and are skipped downstream).
- `ConcatSource(sources)` and `open_source(paths)`: several files as one index space, picked by extension.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from medee_jax.data import formats

_CHUNK = 16 << 20
_BOM = b"\xef\xbb\xbf"


class RawRecord(NamedTuple):
    """One undecoded record: where it is and its bytes (or a parsed object / error for JSON array files)."""

    file: str
    line: int
    data: Any  # bytes | dict | BadRecordError


def _scan_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets int64, lengths int64, 1-based line numbers int64) of the non-blank lines of a file."""
    starts_parts, size, pos = [np.zeros(1, np.int64)], 0, 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 0x0A).astype(np.int64)
            starts_parts.append(newlines + pos + 1)
            pos += len(chunk)
        size = pos
    starts = np.concatenate(starts_parts)
    ends = np.append(starts[1:], size + 1) - 1  # exclusive, without the newline
    if starts[-1] >= size:  # file ends with a newline: no line after it
        starts, ends = starts[:-1], ends[:-1]
    lines = np.arange(1, starts.size + 1, dtype=np.int64)
    lengths = ends - starts
    keep = lengths > 16  # short lines may be blank (no record); a longer blank one is skipped by the parse stage
    if np.any(~keep):
        with open(path, "rb") as f:
            for i in np.flatnonzero(~keep):
                f.seek(int(starts[i]))
                if f.read(int(lengths[i])).strip():
                    keep[i] = True
    return starts[keep], lengths[keep], lines[keep]


def _sidecar_path(path: str) -> str:
    return path + ".index.npz"


def _load_sidecar(path: str, stat: os.stat_result):
    try:
        with np.load(_sidecar_path(path)) as z:
            if int(z["size"]) == stat.st_size and int(z["mtime_ns"]) == stat.st_mtime_ns:
                return z["offsets"], z["lengths"], z["lines"]
    except (OSError, KeyError, ValueError):
        pass
    return None


def _write_sidecar(path: str, stat: os.stat_result, offsets, lengths, lines) -> None:
    target = _sidecar_path(path)
    tmp = f"{target}.{os.getpid()}.tmp.npz"
    try:
        np.savez(tmp, offsets=offsets, lengths=lengths, lines=lines, size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        os.replace(tmp, target)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass


class JsonlSource:
    """Random access to the records (non-blank lines) of one JSON-lines file."""

    def __init__(self, path: str | os.PathLike, *, index_cache: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        stat = os.stat(self.path)
        index = _load_sidecar(self.path, stat) if index_cache else None
        if index is None:
            index = _scan_lines(self.path)
            if index_cache:
                _write_sidecar(self.path, stat, *index)
        self._offsets, self._lengths, self._lines = index
        self._fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._offsets.size)

    def _handle(self) -> int:
        if self._pid != os.getpid():  # first use in this process (e.g. a Grain worker): open our own handle
            with self._lock:
                if self._pid != os.getpid():
                    self._fd = os.open(self.path, os.O_RDONLY)
                    self._pid = os.getpid()
        return self._fd

    def __getitem__(self, index) -> RawRecord:
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for {self.path} ({len(self)} records)")
        offset, length, line = int(self._offsets[i]), int(self._lengths[i]), int(self._lines[i])
        data = os.pread(self._handle(), length, offset)
        if offset == 0 and data.startswith(_BOM):
            data = data[len(_BOM):]
        return RawRecord(self.path, line, data)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_fd=None, _pid=None, _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, {len(self)} records)"


class JsonArraySource:
    """The records of a `.json` file holding one JSON array, parsed into memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        self._records = list(formats.iter_raw_records(self.path))

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index) -> RawRecord:
        line, obj = self._records[int(index)]
        return RawRecord(self.path, line, obj)

    def __repr__(self) -> str:
        return f"JsonArraySource({self.path!r}, {len(self)} records)"


class ArrayRecordSource:
    """Random access to one ArrayRecord file of JSON records; record i is reported as line i + 1."""

    def __init__(self, path: str | os.PathLike):
        import grain

        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no such ArrayRecord file: {self.path}")
        self._source = grain.sources.ArrayRecordDataSource([self.path])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index) -> RawRecord:
        i = int(index)
        return RawRecord(self.path, i + 1, self._source[i])

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.path!r}, {len(self)} records)"


class ConcatSource:
    """Several sources as one: indices run through the first source, then the second, ..."""

    def __init__(self, sources: Sequence):
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        self.sources = list(sources)
        self._ends = np.cumsum([len(s) for s in self.sources]).tolist()

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, index) -> RawRecord:
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range ({len(self)} records)")
        k = bisect.bisect_right(self._ends, i)
        start = self._ends[k - 1] if k else 0
        return self.sources[k][i - start]

    def __repr__(self) -> str:
        return f"ConcatSource({self.sources!r})"


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(_BOM):
        head = head[len(_BOM):]
    return head.lstrip()[:1] == b"["


def open_source(paths: str | os.PathLike | Sequence[str | os.PathLike], *, index_cache: bool = False):
    """One random-access source over `paths`: `.array_record` files → ArrayRecordSource, a `.json` file holding
    an array → JsonArraySource, anything else → JsonlSource (one JSON object per line)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    sources = []
    for path in paths:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such data file: {path}")
        if path.endswith(".array_record") or ".array_record-" in os.path.basename(path):
            sources.append(ArrayRecordSource(path))
        elif path.endswith(".json") and _is_json_array(path):
            sources.append(JsonArraySource(path))
        else:
            sources.append(JsonlSource(path, index_cache=index_cache))
    return sources[0] if len(sources) == 1 else ConcatSource(sources)
