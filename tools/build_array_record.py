"""Convert a JSON-lines dataset into one ArrayRecord file for fast random access by the Grain pipeline.

    python tools/build_array_record.py IN.jsonl OUT.array_record [--options group_size:1]

Each record is one line's bytes exactly as in the file (without the line break; a UTF-8 BOM on the first line is
dropped), so record i is line i + 1 of IN.jsonl: blank lines are kept as empty records (the pipeline skips them)
and error messages name the same line numbers as for the JSONL file. Records are not parsed or checked here; bad
records are reported by the pipeline as usual.

Image paths in the records stay as written. Relative ones are resolved against the folder of the file being read,
so write OUT next to IN (or set the pipeline's `media_root` to IN's folder).

The output is written to a temporary file beside OUT and renamed into place when complete. `group_size:1` (the
default) makes every record its own chunk, which is what random access wants. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_BOM = b"\xef\xbb\xbf"


def convert(src: str, dst: str, *, options: str = "group_size:1") -> dict:
    """Writes every line of `src` as one record of the ArrayRecord file `dst`; returns counts."""
    from array_record.python.array_record_module import ArrayRecordWriter

    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"no such file: {src}")
    with open(src, "rb") as f:
        head = f.read(4096)
    if head.removeprefix(_BOM).lstrip()[:1] == b"[":
        raise ValueError(f"{src} holds a JSON array; convert JSON-lines files (one object per line)")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.{os.getpid()}.tmp"
    records = blank = 0
    start = time.perf_counter()
    writer = ArrayRecordWriter(tmp, options)
    try:
        with open(src, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if line_no == 1:
                    line = line.removeprefix(_BOM)
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    blank += 1
                writer.write(line)
                records += 1
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - already failing; the original error matters
            pass
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if os.path.dirname(src) != os.path.dirname(dst):
        print(f"note: {dst} is not in {os.path.dirname(src)}; relative image paths need media_root="
              f"{os.path.dirname(src)}", file=sys.stderr)
    return {"input": src, "output": dst, "records": records, "blank_lines": blank,
            "bytes": os.path.getsize(dst), "seconds": round(time.perf_counter() - start, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="JSON-lines dataset file")
    parser.add_argument("output", help="ArrayRecord file to write")
    parser.add_argument("--options", default="group_size:1", help="ArrayRecordWriter options (default group_size:1)")
    args = parser.parse_args(argv)
    print(json.dumps(convert(args.input, args.output, options=args.options)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
