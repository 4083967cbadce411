"""`--check`: the pre-flight reads every record through the pipeline's stages, the checkpoint's headers, compiles
the step for its memory, reports, and exits non-zero when the run would fail, writing nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from medee_jax.models.families import family_of
from PIL import Image

from tests.run_training import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DPO_CONFIG = os.path.join(ROOT, "configs", "dpo.py")


def check(config, capsys) -> tuple[int, dict, str]:
    from medee_jax.training.preflight import run_check

    code = run_check(config)
    out = capsys.readouterr()
    return code, json.loads(out.out.strip().splitlines()[-1]), out.out + out.err


def pair(i, image="scan.png", chosen="The lesion is in the upper left.", role="human"):
    return json.dumps({"conversations": [{"from": role, "value": f"<image>Case {i}: where is the lesion?"}],
                       "chosen": {"from": "gpt", "value": chosen},
                       "rejected": {"from": "gpt", "value": f"There is no lesion {i}."}, "images": [image]})


@pytest.fixture()
def sharegpt_pairs(tmp_path):
    """A LLaMA-Factory sharegpt preference file with 8 good pairs and, on lines 3, 5, 7 and 9: a missing image, an
    unknown role, a line that is not JSON, and a chosen answer longer than max_length (truncated, not bad)."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(tmp_path / "scan.png")
    lines = [pair(i) for i in range(8)]
    lines.insert(2, pair(100, image="absent.png"))
    lines.insert(4, pair(101, role="robot"))
    lines.insert(6, '{"conversations": [')
    lines.insert(8, pair(102, chosen=" ".join(["lesion"] * 400)))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.jsonl"


def real_layout_config(data, tokenizer, workdir):
    c = load_config(DPO_CONFIG, [])
    c.data.train = str(data)
    c.data.tokenizer = str(tokenizer)
    c.workdir = str(workdir)
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.data.batch_size = 2
    c.data.max_length = 128
    c.data.length_buckets = (64, 128)
    c.data.target_buckets = ()
    c.data.patch_buckets = (64, 128)
    c.data.image_max_pixels = 0
    c.data.min_pixels = 56 * 56
    c.data.max_pixels = 112 * 112
    return c


def test_check_reports_bad_records_by_reason_with_file_and_line(sharegpt_pairs, demo_tokenizer_dir, tmp_path,
                                                               capsys):
    workdir = tmp_path / "work"
    code, summary, text = check(real_layout_config(sharegpt_pairs, demo_tokenizer_dir, workdir), capsys)
    assert code == 1 and not summary["ok"]
    train = summary["train"]
    assert train["records"] == 12 and train["usable"] == 9 and train["truncated"] == 1
    assert train["bad"] == {"missing_image": 1, "unknown_role": 1, "malformed_json": 1}
    for line, reason in ((3, "missing_image"), (5, "unknown_role"), (7, "malformed_json")):
        assert f"{sharegpt_pairs}:{line}: bad record ({reason})" in text
    assert "data.on_bad_record='raise' would stop the run" in summary["problems"][0]
    assert "tokens per example (min / median / p95 / max)" in text and "image tokens per example" in text
    assert not workdir.exists()  # the check writes nothing

    c = real_layout_config(sharegpt_pairs, demo_tokenizer_dir, workdir)
    c.data.on_bad_record = "skip"
    code, summary, text = check(c, capsys)
    assert code == 0 and summary["ok"], summary["problems"]
    # 9 usable pairs in batches of 2: 5 batches -> 5 steps; the step compiled at the largest buckets
    assert summary["plan"]["steps"] == 5 and summary["train"]["batches"] == 5
    assert summary["memory"]["length"] == 128 and summary["memory"]["patches"] == 128
    assert summary["memory"]["peak_bytes_per_device"] > 0
    assert not workdir.exists()


def test_check_reads_checkpoint_headers(demo_tokenizer_dir, sharegpt_pairs, tmp_path, capsys):
    from flax import nnx

    from medee_jax.models import save_pretrained
    from medee_jax.models.qwen2_5_vl.model import Qwen25VL
    from medee_jax.training.setup import embedded_model_config

    ckpt = tmp_path / "ckpt"
    model = Qwen25VL(embedded_model_config(str(demo_tokenizer_dir)), rngs=nnx.Rngs(0))
    save_pretrained(model, str(ckpt), source_dir=str(demo_tokenizer_dir))
    c = real_layout_config(sharegpt_pairs, demo_tokenizer_dir, tmp_path / "work")
    c.data.on_bad_record = "skip"
    c.data.tokenizer = ""
    c.model.checkpoint = str(ckpt)
    code, summary, text = check(c, capsys)
    assert code == 0, summary["problems"]
    assert f"checkpoint {ckpt}: " in text and "every tensor the model needs is present" in text

    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] += 1
    (ckpt / "config.json").write_text(json.dumps(cfg))
    code, summary, text = check(c, capsys)
    assert code == 1 and "missing" in " ".join(summary["problems"])


def test_check_on_the_demo_from_the_command_line(tmp_path):
    workdir = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "medee_jax.train", "--config", DPO_CONFIG,
                           "--check", f"--workdir={workdir}"], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["run"] == "demo"
    assert summary["train"] == {"records": 240, "usable": 240, "bad": {}, "truncated": summary["train"]["truncated"],
                                "batches": 60}
    assert summary["plan"]["steps"] == 60 and summary["memory"]["peak_bytes_per_device"] > 0
    assert "run: the embedded dpo demo" in proc.stderr
    assert not workdir.exists()
    # The resident state the memory plan counts: trainable float32 params + AdamW's two moments + the frozen
    # vision tower + the float32 frozen reference copy (demo: float32 compute), plus a few scalars.
    trainable, frozen = demo_param_counts()
    expected = 4 * (3 * trainable + frozen + trainable)
    assert 0 <= summary["memory"]["state_bytes_per_device"] - expected < 1024


def demo_param_counts() -> tuple[int, int]:
    """(trainable, frozen) parameter counts of the embedded demo model with the default frozen vision parts."""
    import jax
    from flax import nnx

    from medee_jax.data.demo_tokenizer import build_demo_tokenizer
    from medee_jax.models import abstract_model
    from medee_jax.training import steps
    from medee_jax.training.setup import embedded_model_config

    with tempfile.TemporaryDirectory() as tok:
        build_demo_tokenizer(tok)
        model = abstract_model(embedded_model_config(tok))
    _, params, frozen = nnx.split(model, steps.trainable_filter(family_of(model.config), False, False), nnx.Param)
    count = lambda state: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.to_pure_dict(state)))  # noqa: E731
    return count(params), count(frozen)
