"""What every command line of the project shares: one ``error:`` line naming the flag or config field for a bad
command line (exit code 2, no traceback), and absl flag parsing that ends that way."""

from __future__ import annotations

import re
import sys

from absl import flags

EXIT_USAGE = 2
# Config fields that were renamed: old dotted name -> new one (named in the error for the old name).
RENAMED_FIELDS = {"data.seq_buckets": "data.length_buckets"}


def error(message: str) -> None:
    """Prints ``message`` as ``error:`` lines on stderr (one per line of the message)."""
    for line in str(message).strip().splitlines() or [""]:
        print(f"error: {line.strip()}", file=sys.stderr)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else str(text)


def _overrides(argv: list[str]) -> list[str]:
    """The dotted config fields overridden in ``argv`` (``--config.a.b=v`` or ``--config.a.b v``)."""
    out = []
    for arg in argv:
        match = re.match(r"--?config\.([^=\s]+)", arg)
        if match:
            out.append(match.group(1))
    return out


def flag_error(e: Exception, argv: list[str]) -> str:
    """Returns one line saying which flag or config field is wrong and why."""
    if isinstance(e, (KeyError, AttributeError)):  # ml_collections: an override names no field of the config
        text = str(e)
        named = re.search(r'instead of "([^"]+)"', text) or re.search(r"([A-Za-z0-9_]+)", text)
        leaf = named.group(1) if named else text
        fields = [f for f in _overrides(argv) if leaf in f.split(".")] or [leaf]
        field = fields[0]
        if field in RENAMED_FIELDS:
            return f"--config.{field}: this field was renamed {RENAMED_FIELDS[field]}"
        hint = re.search(r'Did you mean "([^"]+)"', str(text))
        suggestion = f" (did you mean {field.rsplit('.', 1)[0] + '.' if '.' in field else ''}{hint.group(1)}?)" \
            if hint else ""
        return f"--config.{field}: no such config field{suggestion}"
    if isinstance(e, flags.IllegalFlagValueError):
        flag = re.match(r"flag (--\S+?)(=|:|\s)", str(e))
        where = f"{flag.group(1)}: " if flag else ""
        return where + _last_line(str(e).split(": ", 1)[-1] if flag else str(e))
    if isinstance(e, OSError):  # the config file cannot be loaded
        return f"--config: {_last_line(str(e))}"
    return _last_line(str(e))


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl flag parsing for ``app.run(main, flags_parser=parse_flags_or_exit)``: returns the remaining arguments;
    a bad flag, config file or config field ends with one ``error:`` line and exit code 2."""
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:
            flags.FLAGS.config.keys()  # a config file that failed to load raises only when first read
        return rest
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
        error(flag_error(e, argv))
        sys.exit(EXIT_USAGE)
