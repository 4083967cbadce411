"""Training metrics: TensorBoard event files, a JSONL log, a console progress line, and MFU arithmetic.

* ``EventFileWriter`` writes TensorBoard event files itself (TFRecord framing with masked CRC32C and a hand-encoded
  ``Event`` protobuf), so neither TensorFlow nor the ``tensorboard`` package is needed at run time.
* ``MetricsLogger`` is what the trainer calls once per logged step: one JSON line in ``workdir/metrics.jsonl``,
  TensorBoard scalars in ``workdir/tensorboard/``, and a progress line on stderr. Only the chief process writes.
* ``batch_counts`` / ``step_flops`` / ``vision_flops`` / ``utilisation`` give model and hardware FLOPs utilisation
  (MFU, HFU) of a step from its host batch; ``flops_per_token`` the same per token for uniform sequences;
  ``measure_cpu_matmul_peak`` measures this machine's own matmul peak for benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import statistics
import struct
import sys
import time
from collections import deque
from typing import Any, Callable, Mapping, TextIO

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# CRC32C (Castagnoli) and TFRecord framing.

_CRC32C_POLY = 0x82F63B78  # reflected form of 0x1EDC6F41


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """Returns the CRC32C (Castagnoli) checksum of ``data`` (``crc32c(b"123456789") == 0xE3069283``)."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """Returns TFRecord's masked CRC32C: rotate right by 15 bits, add 0xa282ead8 (mod 2^32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
    """Returns one TFRecord: uint64 length, masked CRC of the length, data, masked CRC of the data (little-endian)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# ----------------------------------------------------------------------------------------------------------------
# A minimal protobuf encoder for tensorflow.Event / Summary / Summary.Value.

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
    """Returns the base-128 varint of n; negative int64 values take their 64-bit two's complement (10 bytes)."""
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(payload)) + payload


def _summary_value(tag: str, value: float) -> bytes:
    """``Summary.Value { string tag = 1; float simple_value = 2; }``"""
    with np.errstate(over="ignore"):  # beyond float32's range -> +-inf, as TensorFlow stores it
        as_f32 = np.asarray(value, dtype="<f4").tobytes()
    return _len_field(1, tag.encode("utf-8")) + _key(2, _FIXED32) + as_f32


SESSION_START = 1  # SessionLog.SessionStatus.START


def encode_event(*, wall_time: float, step: int = 0, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None, session_status: int | None = None) -> bytes:
    """Returns a serialized ``Event`` (wall_time = 1, step = 2, file_version = 3, summary = 5, session_log = 7
    holding ``SessionLog { status = 1 }``)."""
    out = _key(1, _FIXED64) + struct.pack("<d", wall_time)
    if step:
        out += _key(2, _VARINT) + _varint(int(step))
    if file_version is not None:
        out += _len_field(3, file_version.encode("utf-8"))
    if session_status is not None:
        out += _len_field(7, _key(1, _VARINT) + _varint(session_status))
    if scalars:
        summary = b"".join(_len_field(1, _summary_value(tag, v)) for tag, v in scalars.items())  # Summary.value = 1
        out += _len_field(5, summary)
    return out


class EventFileWriter:
    """Writes scalars to a TensorBoard event file ``logdir/events.out.tfevents.<time>.<host>.<pid>``.

    Writes are buffered; ``flush()`` hands them to the OS (what a reader sees), ``close()`` flushes and closes.
    """

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        base = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        path, k = os.path.join(self.logdir, base), 0
        while os.path.exists(path):  # a second writer in the same second and process: keep both files
            k += 1
            path = os.path.join(self.logdir, f"{base}.{k}")
        self.path = path
        self._file = open(path, "xb")
        self._write(encode_event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def _write(self, event: bytes) -> None:
        if self._file is None:
            raise ValueError(f"{self.path}: event file writer is closed")
        self._file.write(tfrecord_frame(event))

    def restart_at(self, step: int) -> None:
        """Records a restart from ``step``: TensorBoard then drops the events of earlier files at steps >= it
        (a SessionLog START event), so steps logged again after a resume are not shown twice."""
        self._write(encode_event(wall_time=time.time(), step=step, session_status=SESSION_START))

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Records one scalar (stored as float32) at ``step``."""
        self._write(encode_event(wall_time=time.time(), step=step, scalars={tag: float(value)}))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Records several scalars at ``step`` in one event."""
        if values:
            self._write(encode_event(wall_time=time.time(), step=step,
                                     scalars={tag: float(v) for tag, v in values.items()}))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None

    def __enter__(self) -> "EventFileWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------------
# Metrics logger: JSONL + TensorBoard + console progress.

# Keys the progress line reads from ``log``'s metrics (an optional "train/" prefix is accepted).
LOSS_KEYS = ("loss",)
LR_KEYS = ("learning_rate", "lr")
TOKENS_PER_S_KEYS = ("tokens_per_s",)
TOKENS_PER_STEP_KEYS = ("tokens",)
MFU_KEYS = ("mfu",)
HFU_KEYS = ("hfu",)


def _as_float(v: Any) -> float | None:
    """Returns v as a float if it is a number (Python, NumPy or a 0-d array), else None."""
    if v is None or isinstance(v, (str, bool)):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _find(numeric: Mapping[str, float], names: tuple[str, ...]) -> float | None:
    for name in names:
        for key in (name, f"train/{name}"):
            if key in numeric:
                return numeric[key]
    return None


def _plain_value(v: Any) -> Any:
    """Returns v as a JSON-able Python value: int, finite float, "nan"/"inf"/"-inf", None, or str."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    try:
        f = float(v)  # Python/NumPy floats and 0-d NumPy/JAX arrays
    except (TypeError, ValueError):
        return str(v)
    if math.isfinite(f):
        return f
    return "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")


def format_duration(seconds: float) -> str:
    """Returns ``M:SS`` under an hour, else ``H:MM:SS``."""
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt_num(x: float | None, spec: str) -> str:
    if x is None:
        return "?"
    return format(x, spec) if math.isfinite(x) else str(x)


class MetricsLogger:
    """Logs training metrics: one JSON line per ``log`` in ``workdir/metrics.jsonl``, TensorBoard scalars in
    ``workdir/tensorboard/``, and a progress line on stderr. Non-chief processes write nothing.

    ``log(step, metrics)``: ``step`` counts completed steps (1..total_steps). The progress line reads ``loss``,
    ``learning_rate`` (or ``lr``), ``tokens_per_s`` (else ``tokens`` per step divided by the measured step time),
    ``mfu`` and ``hfu``, each optionally prefixed ``train/``. Step time is measured between ``log`` calls (so it includes
    input and host time) and averaged over the last ``window`` intervals; the first call's interval (compilation)
    is not counted. On a TTY the line is rewritten in place with a carriage return; otherwise (CI, log files) a
    plain line is printed at the first log, then at most every ``plain_interval_s`` seconds, and at the last step.
    Non-finite values are written to JSON as the strings "nan", "inf", "-inf" (``float()`` reads them back) and
    ``None`` as null; TensorBoard receives every numeric value. A record whose metrics are all ``eval/...`` prints an
    "eval at step N: ..." line instead of the progress line.

    ``resume_step``: the step a run restarts from (its restored checkpoint; 0 for a restart from scratch). Records of
    later steps, written by the interrupted run and about to be logged again, are removed from metrics.jsonl, and
    TensorBoard is told to drop them (``EventFileWriter.restart_at``).
    """

    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, is_chief: bool = True,
                 use_tensorboard: bool = True, console: bool = True, stream: TextIO | None = None,
                 plain_interval_s: float = 30.0, window: int = 20,
                 clock: Callable[[], float] = time.monotonic, resume_step: int | None = None):
        self.workdir = os.fspath(workdir)
        self.total_steps = int(total_steps)
        self.is_chief = bool(is_chief)
        self.console = console and self.is_chief
        self._stream = stream
        self.plain_interval_s = plain_interval_s
        self._clock = clock
        self._intervals: deque[tuple[float, int]] = deque(maxlen=max(1, window))  # (seconds, steps)
        self._start = clock()
        self._last: tuple[float, int] | None = None  # (clock, step) of the previous log call
        self._last_print: float | None = None
        self._line_len = 0
        self._open_tty_line = False
        self._last_loss: float | None = None
        self._last_step = 0
        self._tokens_per_s: list[float] = []
        self._jsonl = None
        self._events: EventFileWriter | None = None
        if self.is_chief:
            os.makedirs(self.workdir, exist_ok=True)
            path = os.path.join(self.workdir, "metrics.jsonl")
            if resume_step is not None:
                drop_records_after(path, int(resume_step))
            self._jsonl = open(path, "a", encoding="utf-8")
            if use_tensorboard:
                self._events = EventFileWriter(os.path.join(self.workdir, "tensorboard"))
                if resume_step is not None:
                    self._events.restart_at(int(resume_step) + 1)
            if resume_step:
                self._last_step = int(resume_step)

    # -- timing ---------------------------------------------------------------------------------------------------

    def step_time(self) -> float | None:
        """Returns the moving-average seconds per step, or None before two log calls."""
        seconds = sum(s for s, _ in self._intervals)
        steps = sum(n for _, n in self._intervals)
        return seconds / steps if steps > 0 else None

    def eta(self) -> float | None:
        """Returns the estimated seconds to ``total_steps``, or None when unknown."""
        st = self.step_time()
        return None if st is None else st * max(self.total_steps - self._last_step, 0)

    # -- logging --------------------------------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records ``metrics`` (name -> number) at ``step``."""
        if not self.is_chief:
            return
        step = int(step)
        now = self._clock()
        if self._last is not None and step > self._last[1]:
            self._intervals.append((now - self._last[0], step - self._last[1]))
        self._last = (now, step)
        self._last_step = step

        plain = {k: _plain_value(v) for k, v in metrics.items()}
        record = {"step": step, "time": time.time(), **{k: v for k, v in plain.items() if k not in ("step", "time")}}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
            self._jsonl.flush()
        numeric = {k: f for k, f in ((k, _as_float(v)) for k, v in metrics.items()) if f is not None}
        if self._events is not None:
            self._events.scalars(numeric, step)
            self._events.flush()
        if metrics and all(k.startswith("eval/") for k in metrics):
            if self.console:
                self._show_eval(step, numeric)
            return

        loss = _find(numeric, LOSS_KEYS)
        if loss is not None:
            self._last_loss = loss
        tps = _find(numeric, TOKENS_PER_S_KEYS)
        if tps is None:
            tokens, st = _find(numeric, TOKENS_PER_STEP_KEYS), self.step_time()
            tps = tokens / st if tokens is not None and st else None
        if tps is not None and math.isfinite(tps):
            self._tokens_per_s.append(tps)
        if self.console:
            self._show(self.progress_line(step, loss, _find(numeric, LR_KEYS), tps, _find(numeric, MFU_KEYS),
                                          _find(numeric, HFU_KEYS)), now)

    def progress_line(self, step: int, loss: float | None, lr: float | None, tokens_per_s: float | None,
                      mfu: float | None = None, hfu: float | None = None) -> str:
        """Returns the one-line progress display for these values (and this logger's timing)."""
        total = max(self.total_steps, 1)
        frac = min(max(step / total, 0.0), 1.0)
        filled = int(frac * 20)
        st, eta = self.step_time(), self.eta()
        parts = [
            f"step {step}/{self.total_steps} [{'#' * filled}{'.' * (20 - filled)}] {frac * 100:3.0f}%",
            f"loss {_fmt_num(loss, '.4f')}",
            f"lr {_fmt_num(lr, '.2e')}",
            f"tokens/s {_fmt_num(tokens_per_s, ',.0f')}",
        ]
        if mfu is not None:
            parts.append(f"MFU {_fmt_num(None if not math.isfinite(mfu) else mfu * 100, '.1f')}%")
        if hfu is not None:
            parts.append(f"HFU {_fmt_num(None if not math.isfinite(hfu) else hfu * 100, '.1f')}%")
        parts.append(f"{_fmt_num(st, '.3f')} s/step")
        parts.append(f"ETA {format_duration(eta) if eta is not None else '?'}")
        return " | ".join(parts)

    def _out(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def _is_tty(self) -> bool:
        try:
            return bool(self._out().isatty())
        except (AttributeError, ValueError):
            return False

    def _show(self, line: str, now: float) -> None:
        out = self._out()
        if self._is_tty():
            width = shutil.get_terminal_size((120, 24)).columns - 1
            line = line[:width]
            out.write("\r" + line + " " * max(self._line_len - len(line), 0))
            self._line_len = len(line)
            self._open_tty_line = True
        else:
            due = (self._last_print is None or now - self._last_print >= self.plain_interval_s
                   or self._last_step >= self.total_steps)
            if not due:
                return
            out.write(line + "\n")
        self._last_print = now
        out.flush()

    def _show_eval(self, step: int, numeric: Mapping[str, float]) -> None:
        out = self._out()
        if self._open_tty_line:
            out.write("\n")
            self._open_tty_line = False
        values = " | ".join(f"{k[len('eval/'):]} {_fmt_num(v, '.4f')}" for k, v in numeric.items())
        out.write(f"eval at step {step}: {values}\n")
        out.flush()

    def summary(self) -> str:
        """Returns a one-line summary: steps done, wall time, final loss, mean tokens/s and step time."""
        elapsed = self._clock() - self._start
        tps = sum(self._tokens_per_s) / len(self._tokens_per_s) if self._tokens_per_s else None
        return (f"done {self._last_step}/{self.total_steps} steps in {format_duration(elapsed)} | "
                f"final loss {_fmt_num(self._last_loss, '.4f')} | mean tokens/s {_fmt_num(tps, ',.0f')} | "
                f"{_fmt_num(self.step_time(), '.3f')} s/step")

    def close(self) -> None:
        """Ends the progress line and closes the files (safe to call twice)."""
        if self._open_tty_line:
            self._out().write("\n")
            self._out().flush()
            self._open_tty_line = False
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._events is not None:
            self._events.close()
            self._events = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drop_records_after(path: str, step: int) -> int:
    """Rewrites the JSONL file ``path`` without its records of steps after ``step`` (and any line that is not a
    complete JSON record, such as the half-written last line of a killed process); returns the lines dropped."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = line.endswith("\n") and int(record["step"]) <= step
            except (ValueError, TypeError, KeyError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


# ----------------------------------------------------------------------------------------------------------------
# FLOPs, MFU and HFU.
#
# Conventions: a multiply-add is 2 FLOPs; a backward pass costs twice its forward (training = 3x forward).
# Only matmuls are counted (no norms, activations, softmax, rotary, biases or the embedding gather).
# Model FLOPs (MFU) count what the step needs, not what a kernel happens to execute:
#   * the decoder's weight matmuls on every real token (padding is not counted);
#   * attention scores and values on the (query, key) pairs the mask allows: l(l+1)/2 per causal sequence of l
#     tokens (about half of the l^2 a dense kernel computes), per packed segment, and for a shared-prompt DPO row
#     the prompt once plus each completion over the prompt and itself;
#   * the LM head on the training target positions only (the step runs it there and nowhere else);
#   * a frozen reference's forward, and the frozen vision tower's forward once per image (the family's
#     ``vision_flops_per_unit``).
# Hardware FLOPs (HFU) add what the step computes twice: the decoder forward that the remat policy recomputes in
# the backward pass (``REMAT_RECOMPUTE``) and the LM head's logits, which the chunked log-prob backward recomputes
# tile by tile (losses.chunked_token_logps). Neither counts padding or masked attention blocks.

FLOPS_MODES = ("sft", "dpo_frozen_ref", "dpo_no_ref", "forward")

# Remat policy (models/layers.REMAT_POLICIES, where each is defined) -> the matmuls of a decoder layer whose forward
# the backward pass runs again: "qkv" (q/k/v projections), "o" (o_proj), "mlp_in" (gate and up projections; the
# down projection's output is never needed by the backward pass, so no policy recomputes it), "attention" (q.k and
# p.v: every policy but "none" reruns the attention, whose probabilities / log-sum-exp are never kept). The offload
# variants keep (on the host) what their base policy keeps, and recompute the same.
REMAT_RECOMPUTE: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "full": frozenset({"qkv", "o", "mlp_in", "attention"}),
    "minimal": frozenset({"attention"}),
    "save_attention": frozenset({"mlp_in", "attention"}),
    "save_qkv_proj": frozenset({"o", "mlp_in", "attention"}),
}
REMAT_RECOMPUTE.update({f"{name}_offload": REMAT_RECOMPUTE[name]
                        for name in ("minimal", "save_attention", "save_qkv_proj")})


def layer_matmul_params(text_cfg) -> dict[str, int]:
    """Returns one decoder layer's matmul weights by family: "qkv", "o", "mlp_in" (gate, up), "mlp_out" (down)."""
    d, i, h, kv, dh = (text_cfg.hidden_size, text_cfg.intermediate_size, text_cfg.num_attention_heads,
                       text_cfg.num_key_value_heads, text_cfg.head_dim)
    return {"qkv": d * h * dh + 2 * d * kv * dh, "o": h * dh * d, "mlp_in": 2 * d * i, "mlp_out": d * i}


def decoder_matmul_params(text_cfg) -> int:
    """Returns the decoder layers' matmul weights one token passes through: q/k/v/o and gate/up/down per layer."""
    return text_cfg.num_hidden_layers * sum(layer_matmul_params(text_cfg).values())


def text_matmul_params(text_cfg) -> int:
    """Returns the matmul weights of the text model: the decoder layers' (`decoder_matmul_params`) + the LM head."""
    return decoder_matmul_params(text_cfg) + text_cfg.hidden_size * text_cfg.vocab_size


@dataclasses.dataclass(frozen=True)
class TokenCounts:
    """What a step's text FLOPs depend on, summed over its rows: ``tokens`` the decoder runs on (real tokens),
    ``attention_pairs`` (query, key) pairs the attention mask allows, ``targets`` LM-head target positions."""

    tokens: int
    attention_pairs: int
    targets: int

    def __add__(self, other: "TokenCounts") -> "TokenCounts":
        return TokenCounts(self.tokens + other.tokens, self.attention_pairs + other.attention_pairs,
                           self.targets + other.targets)


def sequence_counts(length: int, targets: int | None = None) -> TokenCounts:
    """Returns the counts of one causal sequence of ``length`` tokens (targets: all of them unless given)."""
    return TokenCounts(length, length * (length + 1) // 2, length if targets is None else targets)


def attention_pairs(attention_mask, segment_ids=None, branch_ids=None) -> int:
    """Returns Σ over rows and query tokens of the keys the decoder's mask allows (decoder.text_attention_mask:
    causal, real keys, same segment; with ``branch_ids`` the prompt (0) and the query's own branch). Arrays
    [..., L] with any leading axes."""
    mask = np.asarray(attention_mask).reshape(-1, np.shape(attention_mask)[-1]) != 0  # [R, L]
    seg = np.zeros(mask.shape, np.int64) if segment_ids is None else np.asarray(segment_ids).reshape(mask.shape)
    branch = np.zeros(mask.shape, np.int64) if branch_ids is None else np.asarray(branch_ids).reshape(mask.shape)
    total = 0
    for r in range(mask.shape[0]):
        for s in np.unique(seg[r][mask[r]]):
            in_seg = mask[r] & (seg[r] == s)
            shared = np.cumsum(in_seg & (branch[r] == 0))  # [L] branch-0 keys at or before each position
            total += int(shared[in_seg].sum())
            for b in np.unique(branch[r][in_seg & (branch[r] != 0)]):
                own = in_seg & (branch[r] == b)
                total += int(np.cumsum(own)[own].sum())
    return total


def batch_counts(batch: Mapping[str, Any]) -> TokenCounts:
    """Returns the TokenCounts of a host batch (the pipeline's or a stacked [S, ...] one): attention_mask,
    segment_ids / branch_ids when present, and the loss_mask's target positions."""
    mask = np.asarray(batch["attention_mask"])
    return TokenCounts(tokens=int((mask != 0).sum()),
                       attention_pairs=attention_pairs(mask, batch.get("segment_ids"), batch.get("branch_ids")),
                       targets=int((np.asarray(batch["loss_mask"]) != 0).sum()))


def step_flops(text_cfg, counts: TokenCounts, *, mode: str, remat: str = "none", vision: float = 0.0
               ) -> dict[str, float]:
    """Returns {"model", "hardware"} FLOPs of one step over ``counts`` (see the conventions above).

    ``mode``: "sft" / "dpo_no_ref" (forward + backward), "dpo_frozen_ref" (plus a forward-only reference pass),
    "forward" (evaluation). ``remat``: the decoder's remat policy (`REMAT_RECOMPUTE`); ``vision``: the vision
    tower's FLOPs of the step (`vision_flops`), added to both."""
    if mode not in FLOPS_MODES:
        raise ValueError(f"unknown FLOPs mode {mode!r}; expected one of {', '.join(FLOPS_MODES)}")
    if remat not in REMAT_RECOMPUTE:
        raise ValueError(f"remat policy {remat!r} has no recompute entry in metrics.REMAT_RECOMPUTE "
                         f"({', '.join(REMAT_RECOMPUTE)})")
    per_pair = 4 * text_cfg.num_attention_heads * text_cfg.head_dim * text_cfg.num_hidden_layers  # q.k + p.v
    weights = 2.0 * decoder_matmul_params(text_cfg) * counts.tokens
    attention = float(per_pair * counts.attention_pairs)
    head = 2.0 * text_cfg.hidden_size * text_cfg.vocab_size * counts.targets
    forward = weights + attention + head
    if mode == "forward":
        return {"model": forward + vision, "hardware": forward + vision}
    model = 3.0 * forward + (forward if mode == "dpo_frozen_ref" else 0.0) + vision
    recomputed = REMAT_RECOMPUTE[remat]
    per_layer = layer_matmul_params(text_cfg)
    recompute_weights = 2.0 * text_cfg.num_hidden_layers * counts.tokens * sum(
        n for family, n in per_layer.items() if family in recomputed)
    recompute = recompute_weights + (attention if "attention" in recomputed else 0.0) + head
    return {"model": model, "hardware": model + recompute}


def flops_per_token(text_cfg, *, seq_len: int, mode: str, target_fraction: float = 1.0, remat: str = "none",
                    hardware: bool = False) -> float:
    """Returns the text model's FLOPs per token of one step on causal sequences of ``seq_len`` tokens, with the LM
    head on ``target_fraction`` of them (`step_flops`; model FLOPs, or hardware FLOPs with ``hardware``)."""
    counts = sequence_counts(seq_len, round(seq_len * target_fraction))
    return step_flops(text_cfg, counts, mode=mode, remat=remat)["hardware" if hardware else "model"] / seq_len


def vision_flops(model_cfg, batch: Mapping[str, Any], images, *, trained: bool = False) -> float:
    """Returns the vision tower's FLOPs on a host batch's real images (pixel_values [..., P, ...] padded to a
    bucket, image_token_index [..., F] or [..., 2, F] of which the valid entries are the real features): real units
    = features x P / ``images.num_features(P)`` per shard, at the family's ``vision_flops_per_unit`` for images of
    (real units / rows holding image tokens) units each. 0 without images."""
    from ..models.families import family_of

    if "pixel_values" not in batch or "image_token_index" not in batch:
        return 0.0
    ids = np.asarray(batch["input_ids"])
    index = np.asarray(batch["image_token_index"])
    pixels = np.asarray(batch["pixel_values"])
    stacked = ids.ndim == 3  # [S, rows, L] or [rows, L]
    shards = [(ids[s], index[s], pixels.shape[1]) for s in range(ids.shape[0])] if stacked else \
        [(ids, index, pixels.shape[0])]
    per_unit = family_of(model_cfg).config().vision_flops_per_unit
    total = 0.0
    for shard_ids, shard_index, bucket in shards:
        flat = shard_index[0] if shard_index.ndim == 2 else shard_index  # DPO [2, F]: one copy
        valid = flat[flat < shard_ids.size]
        units = valid.size * bucket / max(images.num_features(bucket), 1)
        if units == 0:
            continue
        rows_with_images = max(np.unique(valid // shard_ids.shape[1]).size, 1)
        total += units * per_unit(model_cfg, trained=trained, units_per_image=max(int(units // rows_with_images), 1))
    return total


# Dense bf16 peak FLOP/s per chip, keyed by substrings of ``jax.devices()[0].device_kind`` (longest match wins).
PEAK_FLOPS: dict[str, float] = {
    "TPU v2": 45e12,
    "TPU v3": 123e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports "TPU v5"
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "A100": 312e12,
    "A800": 312e12,
    "H100": 989e12,
    "H100 PCIe": 756e12,
    "H800": 989e12,
    "H200": 989e12,
    "B200": 2250e12,
    "L4": 121e12,
    "L40": 181e12,
    "L40S": 362e12,
}


def lookup_peak_flops(device_kind: str) -> float | None:
    """Returns the table's peak for ``device_kind`` (longest matching key, case-insensitive), or None."""
    kind = device_kind.lower()
    matches = [key for key in PEAK_FLOPS if key.lower() in kind]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def peak_flops_per_device(configured: float | None = None, *, device_kind: str | None = None) -> float | None:
    """Returns ``configured`` if > 0, else the table's peak for this (or the given) device kind, else None."""
    if configured is not None and configured > 0:
        return float(configured)
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    return lookup_peak_flops(device_kind)


def mfu(tokens_per_s: float, flops_per_token: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
    """Returns achieved FLOP/s over the devices' peak (a fraction), or None when the peak is unknown."""
    return utilisation(tokens_per_s * flops_per_token, 1.0, num_devices, peak_per_device)


def utilisation(flops: float, seconds: float, num_devices: int, peak_per_device: float | None) -> float | None:
    """Returns ``flops`` done in ``seconds`` over the devices' peak (a fraction: MFU for model FLOPs, HFU for
    hardware FLOPs), or None when the peak is unknown."""
    if peak_per_device is None or peak_per_device <= 0 or num_devices <= 0 or seconds <= 0:
        return None
    value = flops / seconds / (num_devices * peak_per_device)
    return value if math.isfinite(value) else None


def measure_cpu_matmul_peak(dtype=jnp.float32, n: int = 1024, repeats: int = 5) -> float:
    """Returns FLOP/s of a jitted n x n matmul on the default device (median of ``repeats`` timed runs)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times)
