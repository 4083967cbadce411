"""Tests for medee_jax.training.metrics: event files read back by TensorBoard, JSONL, progress line, FLOPs, MFU."""

import io
import json
import math
import os
import struct

import numpy as np
import pytest

from medee_jax.models.qwen2_5_vl.config import PRESETS, VisionConfig, vision_flops_per_patch
from medee_jax.models.text_config import TextConfig
from medee_jax.training import metrics as M


def _read_scalars(logdir):
    """Returns {tag: [(step, value), ...]} read by TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _records(path):
    """Returns the payloads of a TFRecord file, checking both masked CRCs of every record."""
    with open(path, "rb") as f:
        data, out, pos = f.read(), [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        payload = data[pos + 12:pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert length_crc == M.masked_crc32c(header)
        assert payload_crc == M.masked_crc32c(payload)
        out.append(payload)
        pos += 16 + length
    return out


# ---------------------------------------------------------------------------------------------------------------
# CRC32C and event files


def test_crc32c_known_vectors():
    assert M.crc32c(b"123456789") == 0xE3069283
    # RFC 3720 (iSCSI) appendix B.4 vectors.
    assert M.crc32c(bytes(32)) == 0x8A9136AA
    assert M.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert M.crc32c(bytes(range(32))) == 0x46DD794E
    assert M.crc32c(b"") == 0
    crc = 0xE3069283
    assert M.masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def test_varint_encoding():
    assert M._varint(0) == b"\x00"
    assert M._varint(1) == b"\x01"
    assert M._varint(300) == b"\xac\x02"
    assert M._varint(-1) == b"\xff" * 9 + b"\x01"  # int64 -1: ten bytes


def test_event_file_round_trip_through_tensorboard(tmp_path):
    values = {
        "train/loss": [(1, 2.5), (2, 1.0 / 3.0), (10, 1e-7)],
        "train/learning_rate": [(1, 3e-5), (2, 2.9e-5), (10, 0.0)],
        "eval/accuracy": [(1_000_000_000_000, 0.75)],  # a step beyond 32 bits
    }
    with M.EventFileWriter(tmp_path) as w:
        for tag, points in values.items():
            for step, value in points:
                w.scalar(tag, value, step)
        w.scalars({"pair/a": 1.5, "pair/b": -2.25}, step=7)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("events.out.tfevents.")
    assert files[0].endswith(f".{os.getpid()}")

    got = _read_scalars(tmp_path)
    want = {tag: [(s, float(np.float32(v))) for s, v in points] for tag, points in values.items()}
    want["pair/a"], want["pair/b"] = [(7, 1.5)], [(7, -2.25)]
    assert got == want

    records = _records(tmp_path / files[0])
    assert len(records) == 1 + 7 + 1  # file_version, 7 single scalars, one two-value event
    assert b"brain.Event:2" in records[0]


def test_event_file_non_finite_and_flush(tmp_path):
    w = M.EventFileWriter(tmp_path)
    w.scalar("x", float("nan"), 1)
    w.scalar("x", float("inf"), 2)
    w.scalar("x", 1e300, 3)  # beyond float32: stored as inf
    w.flush()  # readable before close
    got = _read_scalars(tmp_path)["x"]
    assert [s for s, _ in got] == [1, 2, 3]
    assert math.isnan(got[0][1]) and got[1][1] == math.inf and got[2][1] == math.inf
    w.close()
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.scalar("x", 1.0, 4)


def test_two_writers_in_one_directory_keep_separate_files(tmp_path):
    a, b = M.EventFileWriter(tmp_path), M.EventFileWriter(tmp_path)
    assert a.path != b.path
    a.close(), b.close()


# ---------------------------------------------------------------------------------------------------------------
# MetricsLogger


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class TTYBuffer(io.StringIO):
    def isatty(self):
        return True


def test_jsonl_tensorboard_and_nan(tmp_path):
    logger = M.MetricsLogger(tmp_path, total_steps=10, console=False)
    logger.log(1, {"loss": 2.0, "learning_rate": np.float32(1e-4), "tokens": 512, "mfu": None})
    logger.log(2, {"loss": float("nan"), "learning_rate": 1e-4, "grad_norm": float("-inf"), "note": "warmup"})
    logger.close()

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)  # strict JSON: no bare NaN/Infinity
    assert set(first) == {"step", "time", "loss", "learning_rate", "tokens", "mfu"}
    assert first["step"] == 1 and first["loss"] == 2.0 and first["tokens"] == 512 and first["mfu"] is None
    assert first["learning_rate"] == pytest.approx(1e-4)
    assert isinstance(first["time"], float)
    assert set(second) == {"step", "time", "loss", "learning_rate", "grad_norm", "note"}
    assert second["loss"] == "nan" and math.isnan(float(second["loss"]))
    assert second["grad_norm"] == "-inf" and second["note"] == "warmup"

    got = _read_scalars(tmp_path / "tensorboard")
    assert set(got) == {"loss", "learning_rate", "tokens", "grad_norm"}
    assert got["loss"][0] == (1, 2.0) and got["loss"][1][0] == 2 and math.isnan(got["loss"][1][1])
    assert got["tokens"] == [(1, 512.0)]


def test_jsonl_appends_on_resume(tmp_path):
    for step in (1, 2):
        with M.MetricsLogger(tmp_path, total_steps=2, console=False, use_tensorboard=False) as logger:
            logger.log(step, {"loss": 1.0})
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (tmp_path / "tensorboard").exists()


def test_resume_drops_records_after_the_restored_step(tmp_path):
    """A run killed at step 7 with its last checkpoint at step 5 resumes from 5: steps 6 and 7 are logged again, so
    their first records go (JSONL rewritten; TensorBoard told to purge them with a SessionLog START)."""
    with M.MetricsLogger(tmp_path, total_steps=10, console=False) as logger:
        for step in range(1, 8):
            logger.log(step, {"loss": float(step)})
        logger.log(5, {"eval/loss": 9.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # the killed process's half-written line
    with M.MetricsLogger(tmp_path, total_steps=10, console=False, resume_step=5) as logger:
        for step in range(6, 11):
            logger.log(step, {"loss": 100.0 + step})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10]
    assert [r["loss"] for r in records if "loss" in r][5:] == [106.0, 107.0, 108.0, 109.0, 110.0]
    got = _read_scalars(tmp_path / "tensorboard")
    assert got["loss"] == [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 11)]
    assert got["eval/loss"] == [(5, 9.0)]


def test_eval_records_print_an_eval_line_not_a_progress_line(tmp_path):
    """Evaluation metrics logged at the last step used to print a final progress line "loss ? | lr ?"."""
    out = io.StringIO()
    logger = M.MetricsLogger(tmp_path, total_steps=2, use_tensorboard=False, stream=out, clock=FakeClock())
    logger.log(1, {"loss": 1.5, "lr": 1e-3, "tokens": 10})
    logger.log(2, {"loss": 1.25, "lr": 1e-3, "tokens": 10})
    logger.log(2, {"eval/loss": 1.75, "eval/rewards/accuracies": 0.5})
    logger.close()
    lines = out.getvalue().splitlines()
    assert "?" not in lines[-1] and lines[-1] == "eval at step 2: loss 1.7500 | rewards/accuracies 0.5000"
    assert "loss 1.2500" in lines[-2] and "lr 1.00e-03" in lines[-2]
    assert logger.summary().count("final loss 1.2500") == 1


def test_non_chief_writes_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    logger = M.MetricsLogger(workdir, total_steps=5, is_chief=False)
    for step in range(1, 6):
        logger.log(step, {"loss": 1.0, "learning_rate": 1e-3, "tokens_per_s": 10.0})
    logger.close()
    assert not workdir.exists()
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_progress_line_plain_stream(tmp_path, capsys):
    clock = FakeClock()
    logger = M.MetricsLogger(tmp_path, total_steps=100, use_tensorboard=False, clock=clock, plain_interval_s=30.0)
    logger.log(1, {"loss": 2.5, "learning_rate": 1e-4, "tokens": 1000})  # first call: compile time not counted
    for step in range(2, 11):
        clock.t += 0.5
        logger.log(step, {"loss": 2.0, "learning_rate": 2e-4, "tokens": 1000})
    clock.t += 30.0
    logger.log(20, {"train/loss": 1.5, "train/learning_rate": 3e-4, "tokens_per_s": 1234.0, "mfu": 0.421,
                    "hfu": 0.5})
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err
    assert len(lines) == 2  # the first log, then the next one after plain_interval_s; none in between
    assert "step 1/100" in lines[0] and "loss 2.5000" in lines[0] and "lr 1.00e-04" in lines[0]
    assert "ETA ?" in lines[0]
    last = lines[1]
    # step time = (9 x 0.5 s + 30 s) / 19 steps = 34.5/19 s; ETA = 80 steps x 34.5/19 s = 145 s.
    assert "step 20/100" in last and "loss 1.5000" in last and "lr 3.00e-04" in last
    assert "tokens/s 1,234" in last and "MFU 42.1% | HFU 50.0%" in last and "ETA 2:25" in last
    assert "HFU" not in lines[0]  # only when reported
    assert logger.step_time() == pytest.approx(34.5 / 19)
    summary = logger.summary()
    assert "\n" not in summary and "20/100" in summary and "final loss 1.5000" in summary
    logger.close()
    assert capsys.readouterr().err == ""


def test_progress_line_tokens_per_step_and_final_step(tmp_path):
    clock, out = FakeClock(), io.StringIO()
    logger = M.MetricsLogger(tmp_path, total_steps=3, use_tensorboard=False, clock=clock, stream=out)
    logger.log(1, {"loss": 1.0, "lr": 1e-3, "tokens": 100})
    clock.t += 0.25
    logger.log(2, {"loss": 1.0, "lr": 1e-3, "tokens": 100})
    clock.t += 0.25
    logger.log(3, {"loss": 1.0, "lr": 1e-3, "tokens": 100})  # the last step always prints
    logger.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "step 3/3" in lines[1] and "tokens/s 400" in lines[1] and "ETA 0:00" in lines[1]


def test_progress_line_tty_rewrites_in_place(tmp_path):
    clock, out = FakeClock(), TTYBuffer()
    logger = M.MetricsLogger(tmp_path, total_steps=4, use_tensorboard=False, clock=clock, stream=out)
    for step in range(1, 5):
        clock.t += 1.0
        logger.log(step, {"loss": 1.0 / step, "learning_rate": 1e-5, "tokens_per_s": 50.0})
    logger.close()
    text = out.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    final = text.split("\r")[-1]
    assert "step 4/4" in final and "loss 0.2500" in final and "lr 1.00e-05" in final
    assert "tokens/s 50" in final and "ETA 0:00" in final


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and MFU


TINY = TextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


def test_attention_pairs_by_hand():
    """Only the (query, key) pairs the decoder's mask allows: causal, real keys, same segment, prompt + own
    branch."""
    assert M.attention_pairs(np.array([[1, 1, 1, 0]])) == 1 + 2 + 3  # padding: no query, no key
    # two packed examples in one row (segments 1 and 2) and padding
    assert M.attention_pairs(np.array([[1, 1, 1, 1, 1, 0]]), np.array([[1, 1, 2, 2, 2, 0]])) == (1 + 2) + (1 + 2 + 3)
    # a shared prompt of 2 tokens, a 2-token chosen and a 3-token rejected completion: each completion token sees
    # the prompt and its own branch so far. = separate rows (4 and 5 tokens: 10 + 15) minus the prompt once (3).
    mask = np.ones((1, 7), np.int32)
    branch = np.array([[0, 0, 1, 1, 2, 2, 2]])
    assert M.attention_pairs(mask, mask, branch) == 3 + (3 + 4) + (3 + 4 + 5) == 10 + 15 - 3
    # leading axes are flattened: a stacked [S, rows, L] batch sums over every row
    stacked = np.ones((2, 3, 4), np.int32)
    assert M.attention_pairs(stacked) == 6 * 10


def test_step_flops_tiny_config_by_hand():
    # head_dim 4. Decoder per layer: q 16*16 + k 16*8 + v 16*8 + o 16*16 = 768; MLP 3*16*32 = 1536 -> 2304;
    # 2 layers = 4608 weights; LM head 16*100 = 1600 (text_matmul_params = 6208).
    assert M.decoder_matmul_params(TINY) == 4608 and M.text_matmul_params(TINY) == 6208
    counts = M.TokenCounts(tokens=8, attention_pairs=36, targets=3)  # one causal 8-token sequence, 3 targets
    assert M.sequence_counts(8, 3) == counts
    weights = 2 * 4608 * 8  # 73728
    attention = 4 * 4 * 4 * 2 * 36  # q.k + p.v: 4 x heads x head_dim x layers per pair = 4608
    head = 2 * 1600 * 3  # the LM head on the 3 targets only = 9600
    forward = weights + attention + head  # 87936
    assert M.step_flops(TINY, counts, mode="forward") == {"model": forward, "hardware": forward}
    sft = M.step_flops(TINY, counts, mode="sft")
    assert sft["model"] == 3 * forward == 263808
    assert sft["hardware"] == 3 * forward + head  # the chunked LM head's backward recomputes its logits
    assert M.step_flops(TINY, counts, mode="dpo_no_ref") == sft
    ref = M.step_flops(TINY, counts, mode="dpo_frozen_ref")  # + a forward-only reference pass
    assert ref["model"] == 4 * forward and ref["hardware"] == 4 * forward + head
    # HFU: the layer's forward again, but for the down projection (16*32 per layer) whose output no backward needs
    full = M.step_flops(TINY, counts, mode="sft", remat="full")
    down = 2 * (16 * 32) * 2 * 8  # 2 FLOPs x weights x 2 layers x 8 tokens
    assert full["model"] == 3 * forward and full["hardware"] == 3 * forward + weights - down + attention + head
    minimal = M.step_flops(TINY, counts, mode="sft", remat="minimal")  # weight matmuls kept: only q.k, p.v again
    assert minimal["hardware"] == 3 * forward + attention + head
    assert M.step_flops(TINY, counts, mode="sft", remat="minimal_offload") == minimal
    qkv = M.step_flops(TINY, counts, mode="sft", remat="save_qkv_proj")  # o_proj, gate/up and attention again
    assert qkv["hardware"] == 3 * forward + 2 * 2 * 8 * (16 * 16 + 2 * 16 * 32) + attention + head
    attn = M.step_flops(TINY, counts, mode="sft", remat="save_attention")  # gate/up and attention again
    assert attn["hardware"] == 3 * forward + 2 * 2 * 8 * (2 * 16 * 32) + attention + head
    assert M.step_flops(TINY, counts, mode="sft", vision=1000.0)["model"] == 3 * forward + 1000.0
    assert M.step_flops(TINY, counts + counts, mode="sft")["model"] == 2 * 3 * forward
    with pytest.raises(ValueError, match="unknown FLOPs mode"):
        M.step_flops(TINY, counts, mode="ppo")
    with pytest.raises(ValueError, match="no recompute entry"):
        M.step_flops(TINY, counts, mode="sft", remat="offload")


def test_every_remat_policy_has_a_recompute_entry():
    from medee_jax.models.layers import REMAT_POLICIES

    assert set(REMAT_POLICIES) == set(M.REMAT_RECOMPUTE)


def test_flops_per_token_halves_causal_attention_and_counts_targets():
    seq = 8
    # per token: (weights + causal attention over 36 pairs + head on every token) / 8, three times
    assert M.flops_per_token(TINY, seq_len=seq, mode="sft") == 3 * (2 * 4608 * 8 + 128 * 36 + 2 * 1600 * 8) / 8
    quarter = M.flops_per_token(TINY, seq_len=seq, mode="sft", target_fraction=0.25)
    assert quarter == 3 * (2 * 4608 * 8 + 128 * 36 + 2 * 1600 * 2) / 8
    # 7B at 4,096 tokens: the old count (full L^2 attention, the head on every token) was 12% higher.
    text = PRESETS["qwen2_5_vl_7b"].text
    n = M.text_matmul_params(text)
    old = 6 * n + 12 * 28 * 4096 * 28 * 128
    new = M.flops_per_token(text, seq_len=4096, mode="sft")
    assert new == pytest.approx(6 * n + 12 * 28 * 28 * 128 * 4097 / 2)  # the attention term: (L + 1) / 2 keys
    assert 0.8 < new / old < 0.95


def test_batch_counts_and_vision_flops_of_a_dpo_batch():
    from medee_jax.models.families import family_of
    from medee_jax.models.qwen2_5_vl.config import tiny_config

    cfg = tiny_config(64)
    images = family_of(cfg).image_inputs(cfg)
    rows, length = 4, 10  # 2 pairs: chosen rows 0-1, rejected rows 2-3
    mask = np.zeros((1, rows, length), np.int32)
    mask[0, :, :6] = 1
    loss = np.zeros((1, rows, length), np.float32)
    loss[0, :, 3:6] = 1.0
    counts = M.batch_counts({"attention_mask": mask, "loss_mask": loss})
    assert counts == M.TokenCounts(tokens=24, attention_pairs=4 * 21, targets=12)
    # 16 patches padded to a 32-patch bucket: 4 of 8 feature rows real, both in row 0 (one image of 16 patches)
    index = np.full((1, 2, 8), rows * length, np.int32)
    index[0, 0, :4] = [1, 2, 3, 4]
    index[0, 1, :4] = [21, 22, 23, 24]
    batch = {"input_ids": np.zeros((1, rows, length), np.int32), "image_token_index": index,
             "pixel_values": np.zeros((1, 32, cfg.vision.patch_dim), np.float32)}
    per_patch = family_of(cfg).config().vision_flops_per_unit(cfg, units_per_image=16)
    assert M.vision_flops(cfg, batch, images) == pytest.approx(16 * per_patch)
    assert M.vision_flops(cfg, {"input_ids": batch["input_ids"]}, images) == 0.0


def test_vision_flops_per_patch_by_hand():
    v = VisionConfig(depth=2, hidden_size=8, intermediate_size=12, num_heads=2, out_hidden_size=16,
                     fullatt_block_indexes=(1,), patch_size=14, window_size=56, in_channels=3,
                     temporal_patch_size=2, spatial_merge_size=2)
    # patch embed 1176*8 = 9408; blocks 2*(3*64 + 64 + 3*8*12) = 2*544 = 1088;
    # merger (32*32 + 32*16) / 4 = 384; attention: window (56/14)^2 = 16 patches, 2*8*(1*100 + 1*16) = 1856.
    macs = 9408 + 1088 + 384 + 1856
    assert vision_flops_per_patch(v, patches_per_image=100) == 2 * macs
    assert vision_flops_per_patch(v, trained=True, patches_per_image=100) == 6 * macs
    # an image smaller than a window: window blocks see the whole image.
    small = 9408 + 1088 + 384 + 2 * 8 * (10 + 10)
    assert vision_flops_per_patch(v, patches_per_image=10) == 2 * small


def test_mfu_arithmetic():
    assert M.utilisation(6e12, 2.0, 4, 1e12) == pytest.approx(0.75)
    assert M.utilisation(6e12, 2.0, 4, None) is None and M.utilisation(6e12, 0.0, 4, 1e12) is None
    assert M.mfu(1000.0, 6e9, 4, 1e12) == pytest.approx(1000 * 6e9 / 4e12) == pytest.approx(1.5)
    assert M.mfu(2000.0, 1e9, 8, 989e12) == pytest.approx(2e12 / (8 * 989e12))
    assert M.mfu(1000.0, 6e9, 4, None) is None
    assert M.mfu(1000.0, 6e9, 4, 0.0) is None


def test_peak_flops_lookup():
    assert M.peak_flops_per_device(5e12) == 5e12  # configured wins
    assert M.peak_flops_per_device(0.0, device_kind="cpu") is None
    assert M.peak_flops_per_device(None, device_kind="TPU v4") == 275e12
    assert M.peak_flops_per_device(None, device_kind="TPU v5 lite") == 197e12
    assert M.peak_flops_per_device(None, device_kind="TPU v5") == 459e12
    assert M.peak_flops_per_device(None, device_kind="TPU v6 lite") == 918e12
    assert M.peak_flops_per_device(None, device_kind="NVIDIA H100 80GB HBM3") == 989e12
    assert M.peak_flops_per_device(None, device_kind="NVIDIA H200") == 989e12
    assert M.peak_flops_per_device(None, device_kind="NVIDIA A100-SXM4-80GB") == 312e12
    assert M.peak_flops_per_device(None, device_kind="NVIDIA L4") == 121e12
    assert M.peak_flops_per_device(None, device_kind="NVIDIA L40S") == 362e12
    assert M.peak_flops_per_device(None) is None  # this test machine is a CPU


def test_measure_cpu_matmul_peak():
    peak = M.measure_cpu_matmul_peak(n=128, repeats=3)
    assert isinstance(peak, float) and 1e6 < peak < 1e15


def test_metrics_module_imports_neither_tensorflow_nor_tensorboard():
    import subprocess
    import sys

    code = ("import sys, medee_jax.training.metrics; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorboard')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
