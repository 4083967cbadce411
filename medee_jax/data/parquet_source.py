"""Random access by row to Hugging Face datasets as they ship: Parquet files and `save_to_disk` Arrow files.

Both are `grain.sources.RandomAccessDataSource`s whose elements are `sources.RawRecord(file, row, record)`: the
file, the 1-based row within it (error messages read `file.parquet:18: bad record (...)`) and the row as a Python
dict (strings, lists, dicts; `datasets.Image` values stay `{"bytes", "path"}` dicts, decoded later by the image
stage with the same checks as image files).

- `ParquetSource(paths)`: the row groups of every file are indexed once from the files' footers (row counts only);
  reading row i reads just its row group (the needed columns), and each process keeps the last few row groups it
  read decoded (`cache_row_groups`), so neighbouring rows cost one read. Nothing else is held in memory.
- `ArrowSource(paths)`: Arrow IPC files (`data-00000-of-00001.arrow` from `datasets.save_to_disk`; stream or file
  format) memory-mapped: record batches are located once, rows are sliced without copying.

Both pickle without their open files (Grain workers reopen them on first use) and report `column_names`.
pyarrow is the reader (the format's reference implementation, already what `datasets` writes with).
"""

from __future__ import annotations

import bisect
import collections
import os
import threading
from collections.abc import Sequence

import numpy as np

from medee_jax.data.sources import RawRecord


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("reading Parquet/Arrow datasets needs pyarrow (pip install pyarrow)") from e
    import pyarrow

    return pyarrow


class _RowIndex:
    """Global row -> (file number, block number, row in block) over files of blocks with known row counts."""

    def __init__(self, counts_per_file: list[list[int]]):
        self.blocks = [(f, b) for f, counts in enumerate(counts_per_file) for b in range(len(counts))]
        sizes = [n for counts in counts_per_file for n in counts]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()  # [blocks + 1]
        self.file_starts = [0]
        for counts in counts_per_file:
            self.file_starts.append(self.file_starts[-1] + sum(counts))

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, i: int) -> tuple[int, int, int, int]:
        """(file number, block number, row in block, row in file) of global row i."""
        k = bisect.bisect_right(self.starts, i) - 1
        file_no, block = self.blocks[k]
        return file_no, block, i - self.starts[k], i - self.file_starts[file_no]


class _PerProcess:
    """State rebuilt in every process that reads (open files, decoded blocks); never pickled."""

    def __init__(self):
        self._pid = None
        self._lock = threading.Lock()
        self.value = None

    def get(self, build):
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self.value = build()
                    self._pid = os.getpid()
        return self.value

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def _check_index(i, n: int, what: str) -> int:
    i = int(i)
    if not -n <= i < n:
        raise IndexError(f"row {i} out of range for {what} ({n} rows)")
    return i % n


def _index_files(paths, blocks, kind: str):
    """(absolute paths, column names, _RowIndex) of files whose `blocks(path)` gives (rows per block, columns).
    Raises ValueError for an unreadable file or files whose columns differ."""
    pa = _pyarrow()
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    if not paths:
        raise ValueError(f"a {kind} source needs at least one file")
    counts, schema = [], None
    for path in paths:
        try:
            file_counts, names = blocks(path)
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{path}: not a readable {kind} file ({e})") from None
        counts.append(file_counts)
        if schema is None:
            schema = list(names)
        elif list(names) != schema:
            raise ValueError(f"{path}: its columns {list(names)} differ from {paths[0]}'s {schema}")
    return paths, schema, _RowIndex(counts)


class ParquetSource:
    """Random access to the rows of one or more Parquet files (in order: file 0's rows, then file 1's, ...)."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *, cache_row_groups: int = 2):
        def blocks(path):
            meta = _pyarrow().parquet.ParquetFile(path).metadata
            rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            return rows, meta.schema.to_arrow_schema().names

        self.paths, self.column_names, self._index = _index_files(paths, blocks, "Parquet")
        self._cache_size = max(1, int(cache_row_groups))
        self._state = _PerProcess()

    def __len__(self) -> int:
        return len(self._index)

    def _open(self):
        pa = _pyarrow()
        return {"files": [pa.parquet.ParquetFile(p) for p in self.paths], "groups": collections.OrderedDict(),
                "lock": threading.Lock()}

    def _row_group(self, file_no: int, group: int):
        state = self._state.get(self._open)
        cache = state["groups"]
        key = (file_no, group)
        with state["lock"]:  # Grain's read threads share this process's files and cache
            table = cache.get(key)
            if table is None:
                table = state["files"][file_no].read_row_group(group, use_threads=False)
                cache[key] = table
                while len(cache) > self._cache_size:
                    cache.popitem(last=False)
            else:
                cache.move_to_end(key)
        return table

    def __getitem__(self, index) -> RawRecord:
        i = _check_index(index, len(self), self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} files")
        file_no, group, row, file_row = self._index.locate(i)
        table = self._row_group(file_no, group)
        return RawRecord(self.paths[file_no], file_row + 1, table.slice(row, 1).to_pylist()[0])

    def __repr__(self) -> str:
        return f"ParquetSource({len(self.paths)} file(s), {len(self)} rows)"


def _read_arrow_batches(path: str):
    """The record batches of an Arrow IPC file (file or stream format), memory-mapped (no copy)."""
    pa = _pyarrow()
    source = pa.memory_map(path, "r")
    try:
        reader = pa.ipc.open_file(source)
        return [reader.get_batch(b) for b in range(reader.num_record_batches)], reader.schema
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_stream(source)
        batches = list(reader)
        return batches, reader.schema


class ArrowSource:
    """Random access to the rows of Arrow IPC files (`datasets.save_to_disk` shards), memory-mapped."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        def blocks(path):
            batches, schema = _read_arrow_batches(path)
            return [b.num_rows for b in batches], schema.names

        self.paths, self.column_names, self._index = _index_files(paths, blocks, "Arrow")
        self._state = _PerProcess()

    def __len__(self) -> int:
        return len(self._index)

    def _open(self):
        return [_read_arrow_batches(p)[0] for p in self.paths]

    def __getitem__(self, index) -> RawRecord:
        i = _check_index(index, len(self), self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} files")
        file_no, block, row, file_row = self._index.locate(i)
        batch = self._state.get(self._open)[file_no][block]
        return RawRecord(self.paths[file_no], file_row + 1, batch.slice(row, 1).to_pylist()[0])

    def __repr__(self) -> str:
        return f"ArrowSource({len(self.paths)} file(s), {len(self)} rows)"
