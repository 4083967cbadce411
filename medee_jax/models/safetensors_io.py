"""A minimal streaming reader and writer for the safetensors format (bf16 included, never pickle).

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` (padded with spaces), then
the raw little-endian tensor bytes; offsets are relative to the start of that data block.

Reading parses only the header; each tensor is then read on its own with ``np.fromfile`` at its offset, so host
memory holds one tensor at a time. Writing takes the list of (name, shape, dtype) up front, writes the header, then
streams each tensor's bytes as a callable produces it. bf16 maps to ``ml_dtypes.bfloat16`` (safetensors' own numpy
backend cannot do bf16).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

# safetensors dtype name <-> numpy dtype (all little-endian).
DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
    "BOOL": np.dtype(bool),
}
_NAMES = {dt: name for name, dt in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the same guard as the reference implementation


def dtype_name(dtype) -> str:
    """Returns the safetensors name ("BF16", "F32", ...) of a numpy/jax dtype."""
    dt = np.dtype(dtype)
    if dt not in _NAMES:
        raise ValueError(f"dtype {dt} cannot be stored in safetensors")
    return _NAMES[dt]


class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    __slots__ = ("name", "path", "dtype", "shape", "start", "nbytes")

    def __init__(self, name: str, path: str, dtype: str, shape: tuple[int, ...], start: int, nbytes: int):
        self.name, self.path, self.dtype, self.shape, self.start, self.nbytes = name, path, dtype, shape, start, nbytes

    def __repr__(self):
        return f"TensorInfo({self.name!r}, {self.dtype}, {self.shape}, {os.path.basename(self.path)})"


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict]:
    """Returns ({tensor name: TensorInfo}, __metadata__) of a safetensors file, reading only its header.

    Raises ValueError naming the file when it is not a well-formed safetensors file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_bytes = size - data_start
    infos = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
            begin, end = _offset(begin), _offset(end)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: malformed header entry for tensor {name!r}: {entry!r}") from e
        if not 0 <= begin <= end <= data_bytes:
            raise ValueError(f"{path}: tensor {name!r} lies outside the file (offsets {begin}..{end} of a "
                             f"{data_bytes}-byte data block; truncated file?)")
        if dtype in DTYPES:
            expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            if end - begin != expected:
                raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes, "
                                 f"{dtype}{list(shape)} needs {expected}")
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
    _check_layout(path, infos, data_start, data_bytes)
    return infos, metadata


def _offset(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"offset {value!r} is not an integer")
    return value


def _check_layout(path: str, infos: dict[str, TensorInfo], data_start: int, data_bytes: int) -> None:
    """Raises ValueError unless the tensors tile the data block exactly: sorted by offset, each starts where the
    previous one ends (the first at 0) and the last ends at the end of the file — the rule of the safetensors
    library, which refuses overlapping tensors (two names reading the same bytes), gaps and trailing bytes."""
    position = 0
    previous = None
    for info in sorted(infos.values(), key=lambda i: (i.start, i.start + i.nbytes)):
        begin = info.start - data_start
        if begin < position:
            raise ValueError(f"{path}: tensors {previous!r} and {info.name!r} overlap (offsets "
                             f"{begin}..{begin + info.nbytes} start before {position}); not a valid safetensors file")
        if begin > position:
            raise ValueError(f"{path}: tensor offsets are not contiguous ({info.name!r} starts at {begin}, the "
                             f"previous tensor ends at {position}); not a valid safetensors file")
        position, previous = begin + info.nbytes, info.name
    if position != data_bytes:
        raise ValueError(f"{path}: {data_bytes - position} bytes after the last tensor (the header accounts for "
                         f"{position} of {data_bytes} data bytes); not a valid safetensors file")


def shard_path(folder: str, name) -> str:
    """Returns the path of shard ``name`` (from a ``model.safetensors.index.json``) inside ``folder``.

    Raises ValueError when the name could read a file outside the folder: not a string, an absolute path, a
    ``..`` component, or a path that resolves (through a symlinked file or directory) outside the folder. One
    exception keeps huggingface_hub's cache working: there ``snapshots/<rev>/<file>`` is a symlink to
    ``../../blobs/<sha>``, so a link into the ``blobs`` folder two levels above ``folder`` is accepted.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"shard name {name!r} is not a file name")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or ".." in parts:
        raise ValueError(f"shard name {name!r} points outside the checkpoint folder {folder}")
    path = os.path.join(folder, name)
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    if _inside(real, root):
        return path
    snapshots = os.path.dirname(root)
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    if len(parts) == 1 and os.path.basename(snapshots) == "snapshots" \
            and _inside(real, blobs):
        return path  # huggingface_hub cache: snapshots/<rev>/<file> -> ../../blobs/<sha>
    raise ValueError(f"shard name {name!r} resolves (through a symlink) to {real}, outside the checkpoint folder "
                     f"{folder}; copy the shard into the folder")


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def read_tensor(info: TensorInfo, file=None, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Returns one tensor (or rows [start, stop) of its leading axis) as a fresh numpy array.

    ``file``: an already open binary handle to ``info.path`` (opened here if None).
    """
    if info.dtype not in DTYPES:
        raise ValueError(f"{info.path}: tensor {info.name!r} has unsupported dtype {info.dtype}")
    if file is None:
        with open(info.path, "rb") as f:
            return read_tensor(info, f, rows)
    dt = DTYPES[info.dtype]
    shape, offset = info.shape, info.start
    if rows is not None:
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        start, stop = rows
        shape, offset = (stop - start, *shape[1:]), offset + start * row_items * dt.itemsize
    count = int(np.prod(shape, dtype=np.int64))
    file.seek(offset)
    array = np.fromfile(file, dtype=dt, count=count)
    if array.size != count:
        raise ValueError(f"{info.path}: tensor {info.name!r} is truncated")
    return array.reshape(shape)


class Reader:
    """Reads tensors by name from a set of safetensors files, keeping one open handle per file."""

    def __init__(self, infos: dict[str, TensorInfo]):
        self.infos = infos
        self._files: dict[str, object] = {}

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Returns tensor ``name`` (or rows [start, stop) of its leading axis)."""
        info = self.infos[name]
        if info.path not in self._files:
            self._files[info.path] = open(info.path, "rb")
        return read_tensor(info, self._files[info.path], rows)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_file(path: str, entries: Iterable[tuple[str, tuple[int, ...], object]], fetch: Callable[[str], np.ndarray],
               metadata: dict | None = None) -> int:
    """Writes a safetensors file tensor by tensor; returns the number of data bytes.

    ``entries`` lists (name, shape, dtype) in file order; ``fetch(name)`` returns that tensor (converted to the
    declared dtype here if needed) and is called once per tensor, in order, so only one is held at a time.
    """
    entries = list(entries)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_name(dtype), "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in entries:
            array = np.asarray(fetch(name))
            if tuple(array.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {name!r} has shape {array.shape}, declared {tuple(shape)}")
            array = np.ascontiguousarray(array, dtype=np.dtype(dtype))
            if array.dtype.byteorder == ">":
                array = array.byteswap().view(array.dtype.newbyteorder("<"))
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
            del array
    return offset
