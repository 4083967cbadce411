"""Benchmark checkpoint conversion: wall time and peak host memory of hf2orbax (and orbax2hf) on a synthetic
~1.5B-LLM Qwen2.5-VL-shaped bf16 checkpoint (Qwen2.5-1.5B-sized decoder + the released 675M vision tower).

    python tools/bench_convert.py [--workdir DIR] [--keep] [--layers 28] [--skip-orbax2hf] [--verify]
                                  [--from-pretrained]

The checkpoint is written with medee_jax's own streaming safetensors writer from random numpy (no torch), sharded
at 2GB like the hub's. Each conversion runs as `python tools/convert_checkpoint.py ...` in a fresh subprocess; its
peak RSS is that child's ru_maxrss (os.wait4's rusage, what getrusage(RUSAGE_CHILDREN) reports per child). A bare
child that only imports the converter's modules gives the fixed runtime overhead. The goal for hf2orbax is
1.5 GiB + 2 x the largest tensor. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "convert_checkpoint.py")
GOAL_BASE_MB = 1.5 * 1024


def bench_config(layers: int):
    """Qwen2.5-1.5B's decoder (tied embeddings) with the released Qwen2.5-VL vision tower."""
    from medee_jax.models.qwen2_5_vl.config import Qwen25VLConfig, VisionConfig
    from medee_jax.models.text_config import TextConfig

    return Qwen25VLConfig(
        text=TextConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=layers,
                        num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
                        max_position_embeddings=128000),
        vision=VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=1536,
                            fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2),
        tie_word_embeddings=True,
    )


def build_checkpoint(out_dir: str, cfg) -> dict:
    """Writes a random bf16 transformers-layout checkpoint; returns its parameter count and largest tensor."""
    import ml_dtypes
    import numpy as np

    from medee_jax.models import abstract_model, hf

    model = abstract_model(cfg)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    shapes = {path: tuple(hf.get_param(model, path).get_value().shape) for _, path, _ in hf.model_params(model)}
    entries = hf.export_entries(cfg, shapes, {path: bf16 for path in shapes})
    rng = np.random.default_rng(0)

    def fetch(entry):
        shape = entry[4]
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bf16)

    hf.write_checkpoint(out_dir, cfg, entries, fetch, max_shard_size="2GB")
    sizes = [int(np.prod(e[4])) for e in entries]
    return {"params": int(sum(sizes)), "largest_tensor_mb": max(sizes) * bf16.itemsize / 2**20,
            "checkpoint_mb": sum(sizes) * bf16.itemsize / 2**20}


def run_child(args: list[str]) -> dict:
    """Runs one child process; returns its wall seconds and peak RSS (MiB), from ``os.wait4``'s rusage of that
    child alone (the same ru_maxrss that getrusage(RUSAGE_CHILDREN) aggregates)."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        log = out.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed (status {proc.returncode}):\n{log[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def verify(a_dir: str, b_dir: str) -> bool:
    """Compares two checkpoints tensor by tensor (streaming)."""
    import numpy as np

    from medee_jax.models import hf
    from medee_jax.models.safetensors_io import read_tensor

    a, b = hf.read_headers(a_dir), hf.read_headers(b_dir)
    if a.keys() != b.keys():
        return False

    return all(np.array_equal(read_tensor(a[k]), read_tensor(b[k])) for k in a)


def child_json(args: list[str]) -> dict:
    """Runs this script's internal step in a child process (so this orchestrator stays small) and parses its JSON."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--skip-orbax2hf", action="store_true")
    p.add_argument("--verify", action="store_true", help="check orbax2hf reproduces the source bit for bit")
    p.add_argument("--from-pretrained", action="store_true", help="also measure from_pretrained (holds the model)")
    p.add_argument("--_build", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--_verify", nargs=2, metavar=("A", "B"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, REPO)
    if args._build:  # internal steps, run in children
        print(json.dumps(build_checkpoint(args._build, bench_config(args.layers))))
        return 0
    if args._verify:
        print(json.dumps({"identical": verify(*args._verify)}))
        return 0

    # The orchestrator imports nothing heavy: a child's ru_maxrss starts from its parent's RSS at fork/exec.
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(work, exist_ok=True)
    src, orb, back = (os.path.join(work, n) for n in ("hf", "orbax", "hf_back"))
    try:
        for d in (src, orb, back):
            shutil.rmtree(d, ignore_errors=True)
        start = time.perf_counter()
        info = child_json(["--_build", src, "--layers", str(args.layers)])
        build_s = time.perf_counter() - start
        # Fixed overhead: a child that imports what the converter imports and starts the JAX runtime.
        baseline = run_child(["-c", "import jax, orbax.checkpoint, medee_jax.models.orbax_io; jax.devices()"])
        result = {"config": f"Qwen2.5-VL-shaped, LLM hidden 1536 x {args.layers} layers, vision as released, bf16",
                  "params": info["params"], "checkpoint_mb": round(info["checkpoint_mb"], 1),
                  "build_seconds": round(build_s, 1), "runtime_baseline_rss_mb": baseline["peak_rss_mb"]}
        h2o = run_child([TOOL, "hf2orbax", src, orb])
        largest = info["largest_tensor_mb"]
        goal = GOAL_BASE_MB + 2 * largest
        result.update(seconds=h2o["seconds"], peak_rss_mb=h2o["peak_rss_mb"], largest_tensor_mb=round(largest, 1),
                      goal_mb=round(goal, 1), within_goal=h2o["peak_rss_mb"] <= goal)
        if args.from_pretrained:  # for scale: loading holds the model (bf16) + one tensor on the host
            load = run_child(["-c", "import sys, jax.numpy as jnp; from medee_jax.models import from_pretrained; "
                                    "m = from_pretrained(sys.argv[1], dtype=jnp.bfloat16)", src])
            result.update(from_pretrained_seconds=load["seconds"], from_pretrained_peak_rss_mb=load["peak_rss_mb"])
        if not args.skip_orbax2hf:
            o2h = run_child([TOOL, "orbax2hf", orb, back])
            result.update(orbax2hf_seconds=o2h["seconds"], orbax2hf_peak_rss_mb=o2h["peak_rss_mb"])
            if args.verify:
                result["orbax2hf_bit_identical"] = child_json(["--_verify", src, back])["identical"]
    finally:
        if not args.keep:
            for d in (src, orb, back):
                shutil.rmtree(d, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
