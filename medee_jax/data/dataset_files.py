"""From the data paths of a config to one random-access source and the format its records are read with.

A data path (data.train / data.eval, `DataConfig.paths`) may be:
- a file: `.jsonl` / `.json` / `.array_record` (`sources.open_source`), `.parquet` (`ParquetSource`), `.arrow`
  (`ArrowSource`);
- a glob (`data/train-*.parquet`), expanded in sorted order;
- a folder: written by `datasets.save_to_disk` (its `state.json` lists the Arrow shards, in order), or holding
  Parquet shards, Arrow files or JSON files (all of one type, in name order). A folder of several Hugging Face
  splits (`train-00000-of-00002.parquet`, `test-...`) or a `DatasetDict` is refused: name the split;
- `path/dataset_info.json:entry`: a LLaMA-Factory entry (`dataset_info.load_entry`), whose `file_name` is any of
  the above and whose columns and tags decide how records are read.

Parquet and Arrow files are checked for the columns their records need before anything is read (a preference set
without a `rejected` column fails at once, naming the file and the columns it has).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence

from medee_jax.data import dataset_info
from medee_jax.data.parquet_source import ArrowSource, ParquetSource
from medee_jax.data.record_formats import RecordFormat, check_format
from medee_jax.data.sources import ConcatSource, open_source

PARQUET, ARROW = "parquet", "arrow"
_JSON_EXTENSIONS = (".jsonl", ".json", ".array_record")
_SPLIT_SHARD = re.compile(r"^(?P<split>[\w.]+?)-\d+-of-\d+\.parquet$")
# A record of each mode needs one of these columns (any format: sharegpt, OpenAI/TRL, alpaca).
_SFT_COLUMNS = ("conversations", "messages", "text", "prompt", "instruction", "output")


def _kind(path: str) -> str:
    if path.endswith(".parquet"):
        return PARQUET
    if path.endswith(".arrow"):
        return ARROW
    return "json"


def _folder_files(folder: str) -> list[str]:
    state = os.path.join(folder, "state.json")
    if os.path.isfile(state):  # datasets.save_to_disk
        with open(state, encoding="utf-8") as f:
            files = [d["filename"] for d in json.load(f).get("_data_files", [])]
        if not files:
            raise ValueError(f"{folder}: its state.json lists no data files")
        return [os.path.join(folder, name) for name in files]
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        raise ValueError(f"{folder}: a saved DatasetDict; give one split's folder ({', '.join(splits)})")
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))
    data = [n for n in names if n.endswith((".parquet", ".arrow", *_JSON_EXTENSIONS))]
    if not data:
        raise ValueError(f"{folder}: no .parquet, .arrow, .jsonl or .json files in this folder")
    kinds = {_kind(n) for n in data}
    if len(kinds) > 1:
        raise ValueError(f"{folder}: holds files of several types ({', '.join(sorted(kinds))}); give one of them")
    splits = sorted({m.group("split") for m in map(_SPLIT_SHARD.match, data) if m})
    if len(splits) > 1:
        raise ValueError(f"{folder}: holds the splits {', '.join(splits)}; give one, e.g. "
                         f"{os.path.join(folder, splits[-1] + '-*.parquet')}")
    return [os.path.join(folder, n) for n in data]


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The data files behind `paths` (files, globs, folders; not dataset_info specs), in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for path in map(os.fspath, paths):
        if any(c in path for c in "*?[") and not os.path.exists(path):
            matched = sorted(glob.glob(path))
            if not matched:
                raise FileNotFoundError(f"no data files match {path}")
            files.extend(expand_paths(matched))
        elif os.path.isdir(path):
            files.extend(_folder_files(path))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"no such data file: {path}")
    return files


def data_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Every file a split's data is read from, in order: the data files behind files, globs, folders and
    dataset_info.json entries (an entry also names its dataset_info.json, whose mapping changes the records)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for path in map(os.fspath, paths):
        spec = dataset_info.split_spec(path)
        if spec is None:
            files.extend(expand_paths(path))
        else:
            files.append(spec[0])
            files.extend(expand_paths(dataset_info.load_entry(path)[0]))
    return files


def _check_columns(source, mode: str, record_format) -> None:
    names = set(source.column_names)
    where = source.paths[0] if len(source.paths) == 1 else f"{source.paths[0]} (and {len(source.paths) - 1} more)"
    if isinstance(record_format, RecordFormat):
        missing = [c for c in dataset_info.required_columns(record_format) if c not in names]
        if missing:
            raise ValueError(f"{where}: no column {', '.join(repr(c) for c in missing)} (columns: "
                             f"{', '.join(source.column_names)}); {record_format.origin} reads it")
        return
    if mode == "dpo":
        missing = [c for c in ("chosen", "rejected") if c not in names]
        if missing:
            raise ValueError(f"{where}: no column {', '.join(repr(c) for c in missing)} for preference data "
                             f"(columns: {', '.join(source.column_names)})")
    elif not names & set(_SFT_COLUMNS):
        raise ValueError(f"{where}: none of the columns {', '.join(source.column_names)} holds conversations "
                         f"(expected one of {', '.join(_SFT_COLUMNS)})")


def open_dataset(paths, record_format="auto", *, mode: str = "sft", index_cache: bool = False):
    """(random-access source, record format) for a config's data paths (see the module docstring).

    record_format: data.format ("auto", "sharegpt", "alpaca", "trl"); a dataset_info.json entry replaces it by the
    entry's `RecordFormat`. mode: "sft" or "dpo" (checks a dataset_info entry's `ranking` and the columns).
    Raises ValueError / FileNotFoundError naming the path and the problem.
    """
    check_format(record_format)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files, entry_formats = [], []
    for path in map(os.fspath, paths):
        spec = dataset_info.split_spec(path)
        if spec is None:
            files.extend(expand_paths(path))
            continue
        entry_paths, entry_format = dataset_info.load_entry(path)
        if entry_format.ranking != (mode == "dpo"):
            need = "a preference set ('ranking': true)" if mode == "dpo" else "an SFT set ('ranking': false)"
            raise ValueError(f"{entry_format.origin}: {mode.upper()} needs {need}")
        files.extend(expand_paths(entry_paths))
        entry_formats.append(entry_format)
    if entry_formats:
        if len(set(entry_formats)) > 1 or len(entry_formats) != len(paths):
            raise ValueError(f"{list(paths)}: one data split reads one format; give one dataset_info.json entry")
        record_format = entry_formats[0]
    sources, group = [], []

    def flush():
        if not group:
            return
        kind = _kind(group[0])
        if kind == PARQUET:
            source = ParquetSource(group)
        elif kind == ARROW:
            source = ArrowSource(group)
        else:
            source = open_source(group, index_cache=index_cache)
        if kind in (PARQUET, ARROW):
            _check_columns(source, mode, record_format)
        sources.append(source)
        group.clear()

    for path in files:
        if group and _kind(path) != _kind(group[0]):
            flush()
        group.append(path)
    flush()
    return (sources[0] if len(sources) == 1 else ConcatSource(sources)), record_format
