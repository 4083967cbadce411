"""Memory of the Qwen2.5-VL vision tower on one large vs one smaller image: ours (JAX) and transformers eager.

A tiny-width tower with the released depth and window layout (32 blocks, full attention at 7/15/23/31, 112 px
windows of 14 px patches, 2x2 merge; hidden 32, 2 heads unless told otherwise) encodes one square image of each
``--sides`` (default 1008 and 2016 px: 5184 and 20736 patches). Reported, per side:

* ``compiled``: XLA's ``memory_analysis()`` of the jitted forward and forward+backward (gradient of Σ features² with
  respect to the tower's parameters), ``peak_bytes`` = temp + arguments + outputs; for ``--implementations`` (default
  ``auto``, which is blockwise full attention on CPU at these sizes, and ``reference``, the dense [P, P] path).
  Only compiled, never run, so the dense path is measured at full size too.
* ``run``: the process's resident-memory high-water mark while one call runs (Linux VmHWM, reset after compiling),
  each in its own subprocess: ours forward and forward+backward (``auto``), transformers' eager
  ``Qwen2_5_VisionTransformerPretrainedModel`` forward (``torch.no_grad``) with the same dimensions; add
  ``--torch-backward`` for its forward+backward and ``--run-dense`` to run our dense path too (both need ~10+ GB at
  2016 px).

The headline is ``growth_gib``: large-side minus small-side bytes for each measure (goal: ≤ 1.5 GiB). Without
remat the forward+backward keeps every block's activations (~1000 floats a patch a block at width 32), which grows
linearly but past that goal at 32 blocks; ``--remat full`` keeps one [P, D] row a block. Prints one JSON object.
Examples (about 10 minutes on 2 CPU cores; the transformers forward at 2016 px needs ~7 GB)::

    PYTHONPATH=. python tools/bench_vision_memory.py
    PYTHONPATH=. python tools/bench_vision_memory.py --remat full --implementations auto --skip-torch
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.bench_common import REPO, high_water_rss_mb, reset_peak_rss  # noqa: E402

PATCH = 14
GIB = 2**30


def vision_dims(args) -> dict:
    """Returns the tower's dimensions (transformers' Qwen2_5_VLVisionConfig keyword names)."""
    return {"depth": args.depth, "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden,
            "num_heads": args.heads, "out_hidden_size": 2 * args.hidden, "fullatt_block_indexes": [7, 15, 23, 31],
            "window_size": 112, "patch_size": PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2}


def _jax_setup(dims: dict, side: int, remat: str = "none"):
    """Returns (graphdef, state, pixel_values [P, 1176], layout arrays) for one side x side image."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from medee_jax.models.qwen2_5_vl.config import VisionConfig
    from medee_jax.models.qwen2_5_vl.model import VisionTower
    from medee_jax.models.qwen2_5_vl.vision_layout import vision_layout

    kw = dict(dims, fullatt_block_indexes=tuple(dims["fullatt_block_indexes"]))
    cfg = VisionConfig(**{k: v for k, v in kw.items() if k in VisionConfig.__dataclass_fields__})
    graphdef, state = nnx.split(VisionTower(cfg, remat=remat, rngs=nnx.Rngs(0)))
    n = side // PATCH
    grid = np.array([(1, n, n)])
    layout = {k: jnp.asarray(v) for k, v in vision_layout(grid, cfg).arrays().items()}
    pixels = jnp.asarray(np.random.default_rng(0).standard_normal((n * n, cfg.patch_dim)).astype(np.float32))
    return graphdef, state, pixels, layout


def _jax_fn(graphdef, implementation: str, backward: bool):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def features(state, pixels, layout):
        return nnx.merge(graphdef, state)(pixels, **layout, implementation=implementation)

    if backward:
        return jax.grad(lambda s, p, lay: jnp.sum(features(s, p, lay) ** 2))
    return features


def compiled_memory(dims: dict, side: int, implementation: str, backward: bool, remat: str = "none") -> dict:
    """Returns XLA's memory analysis of the jitted tower (compiled only)."""
    import jax

    graphdef, state, pixels, layout = _jax_setup(dims, side, remat)
    mem = jax.jit(_jax_fn(graphdef, implementation, backward)).lower(state, pixels, layout).compile().memory_analysis()
    out = {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
           "output_bytes": int(mem.output_size_in_bytes)}
    out["peak_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"]
    return out


def worker_jax(dims: dict, side: int, implementation: str, backward: bool, remat: str = "none") -> dict:
    """Runs one call of ours (after compiling) and returns its resident-memory high-water mark."""
    import jax

    graphdef, state, pixels, layout = _jax_setup(dims, side, remat)
    step = jax.jit(_jax_fn(graphdef, implementation, backward)).lower(state, pixels, layout).compile()
    jax.block_until_ready(step(state, pixels, layout))  # warm: allocator pools, thread pools
    reset = reset_peak_rss()
    jax.block_until_ready(step(state, pixels, layout))
    return {"peak_rss_mb": high_water_rss_mb(), "reset": reset}


def worker_torch(dims: dict, side: int, backward: bool) -> dict:
    """Runs transformers' eager vision tower once and returns its resident-memory high-water mark."""
    import torch
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(vision_config=dims).vision_config
    cfg._attn_implementation = "eager"
    model = Qwen2_5_VisionTransformerPretrainedModel(cfg).float()
    model.train(False)
    n = side // PATCH
    pixels = torch.randn(n * n, 3 * 2 * PATCH * PATCH)
    grid = torch.tensor([[1, n, n]])
    reset = reset_peak_rss()
    if backward:
        model(pixels, grid_thw=grid).pooler_output.pow(2).sum().backward()
    else:
        with torch.no_grad():
            model(pixels, grid_thw=grid)
    return {"peak_rss_mb": high_water_rss_mb(), "reset": reset}


def run_worker(args, *worker_args) -> dict:
    """Runs this script as a worker subprocess and returns its JSON (or the error it printed)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *map(str, worker_args), "--depth", str(args.depth),
           "--hidden", str(args.hidden), "--heads", str(args.heads), "--remat", args.remat]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def growth(small: dict, large: dict, key: str, scale: float) -> float | None:
    if key not in small or key not in large:
        return None
    return round((large[key] - small[key]) * scale / GIB, 3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs=2, default=[1008, 2016], help="small and large image side (px)")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--implementations", nargs="+", default=["auto", "reference"])
    parser.add_argument("--remat", default="none", help="our tower's remat policy (layers.REMAT_POLICIES)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--torch-backward", action="store_true")
    parser.add_argument("--run-dense", action="store_true")
    parser.add_argument("--worker", nargs=4, metavar=("SIDE", "WHO", "IMPL", "BACKWARD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dims = vision_dims(args)
    if args.worker:
        side, who, impl, backward = int(args.worker[0]), args.worker[1], args.worker[2], args.worker[3] == "1"
        if who == "torch":
            out = worker_torch(dims, side, backward)
        else:
            out = worker_jax(dims, side, impl, backward, args.remat)
        print(json.dumps(out))
        return

    import jax

    small, large = args.sides
    result = {"vision": dims, "remat": args.remat, "sides": args.sides,
              "patches": [(s // PATCH) ** 2 for s in args.sides], "backend": jax.default_backend(),
              "compiled": {}, "run": {}, "growth_gib": {}}
    for impl in args.implementations:
        for backward in (False, True):
            name = f"jax_{impl}_{'forward_backward' if backward else 'forward'}"
            per_side = {s: compiled_memory(dims, s, impl, backward, args.remat) for s in args.sides}
            result["compiled"][name] = {str(s): v for s, v in per_side.items()}
            result["growth_gib"][f"compiled_peak:{name}"] = growth(per_side[small], per_side[large], "peak_bytes", 1)
            print(f"compiled {name}: {json.dumps(result['compiled'][name])}", file=sys.stderr, flush=True)
    runs = [("jax_auto_forward", ("jax", "auto", 0)), ("jax_auto_forward_backward", ("jax", "auto", 1))]
    if args.run_dense:
        runs += [("jax_reference_forward", ("jax", "reference", 0)),
                 ("jax_reference_forward_backward", ("jax", "reference", 1))]
    if not args.skip_torch:
        runs.append(("torch_eager_forward", ("torch", "eager", 0)))
        if args.torch_backward:
            runs.append(("torch_eager_forward_backward", ("torch", "eager", 1)))
    for name, (who, impl, backward) in runs:
        per_side = {s: run_worker(args, s, who, impl, backward) for s in args.sides}
        result["run"][name] = {str(s): v for s, v in per_side.items()}
        result["growth_gib"][f"run_peak_rss:{name}"] = growth(per_side[small], per_side[large], "peak_rss_mb", 2**20)
        print(f"run {name}: {json.dumps(result['run'][name])}", file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
