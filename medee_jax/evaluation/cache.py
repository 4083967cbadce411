"""An append-only on-disk cache of JSON values keyed by a hash, so interrupted runs resume where they stopped.

One JSON object a line, `{"key": <hex>, "value": ...}`, appended and flushed as results arrive. A line cut short
by an interruption is dropped when the file is opened (and trimmed before the next append); a later entry for
the same key wins. `cache_key(obj)` is the SHA-256 of the canonical JSON of `obj` (sorted keys), so keys are
stable across runs and machines. Thread-safe for concurrent `put`s.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def cache_key(obj: Any) -> str:
    """Hex SHA-256 of the canonical JSON of `obj`."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


class JsonlCache:
    """`get(key)` / `put(key, value)` backed by a JSONL file at `path` (created with its folder on first put)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._entries: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.dropped_lines = 0
        if os.path.exists(self.path):
            self._load()

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        keep = data.rfind(b"\n") + 1  # a last line without its newline was cut short
        if keep < len(data):
            self.dropped_lines += 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        for raw in data[:keep].splitlines():
            try:
                entry = json.loads(raw)
                self._entries[entry["key"]] = entry["value"]
            except (ValueError, KeyError, TypeError):
                self.dropped_lines += 1

    def get(self, key: str, default: Any = None) -> Any:
        return self._entries.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: str, value: Any) -> None:
        line = json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n"
        with self._lock:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
            self._entries[key] = value
