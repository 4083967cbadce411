"""Compiles the real train step ahead of time for a TPU slice (or a GPU host) on this CPU machine: abstract shapes,
no weights, no accelerator. Says whether a plan fits before a pod-hour is spent on it.

    python tools/aot_compile.py --config configs/dpo.py:qwen2_5_vl_7b --topology v5p-8 [--config.x=...]
    python tools/aot_compile.py --config configs/dpo.py:qwen2_5_vl_7b --topology h200-1 [--config.data.batch_size=2]
    python tools/aot_compile.py --all_plans=dpo      # every plan of recipes.SLICE_PLANS: the README's table

The step is the trainer's own (`training.step_memory.compile_step`: `state.split_model`, `state.abstract_train_state`,
`steps.jit_step` and the abstract batch at the config's largest buckets, images included unless ``--text-only``),
lowered for the slice's devices and compiled by its compiler: TPU slices through libtpu's ahead-of-time topology
(``jax.experimental.topologies.get_topology_desc``; needs ``pip install libtpu``, or ``jax[tpu]``), GPU hosts
(``h100-N``, ``h200-N``) by XLA's CPU backend with N simulated devices, whose memory analysis stands in for the GPU
compiler's. The model comes from the preset (``medee_jax.models.presets()``) or ``model.checkpoint``'s config.json
(weights are never read). The preset's plan for the slice (``recipes.SLICE_PLANS``) is applied before the
command line's ``--config.*`` overrides, which win.

Printed: per compiled piece the per-device bytes XLA reports (arguments, outputs, temporaries) and the collectives
in its optimized HLO; the resident state, the peak per device (state + the largest piece's transient, as
``--check`` computes it), the chip's HBM (GPU: times train.gpu_memory_fraction) and whether the peak fits; the
FLOPs of one optimizer step over all devices: ``flops_per_step`` (model FLOPs, `metrics.step_flops` at the compiled
shapes), ``hardware_flops_per_step`` (remat recompute added) and ``xla_flops_per_step`` (XLA's cost analysis of the
compiled pieces, which counts each while-loop body once, so the layer scan's 28-80 layers count as one). The last
line is one JSON object: ``topology``, ``devices``, ``mesh``, ``peak_memory_gib_per_device``,
``state_gib_per_device``, ``hbm_gib``, ``fits``, ``flops_per_step``, ``hardware_flops_per_step``,
``xla_flops_per_step``, ``collectives``, ``pieces``, ``batch_shape``, ``preset``, ``mode``, ``compile_s``. Exit
status 0 when it fits, 1 when it does not, 2 on a usage error.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from medee_jax import recipes  # noqa: E402  (ml_collections only; jax is imported after the device flags)

# Slices: name -> (platform, topology for jax.experimental.topologies or None, devices, HBM GiB per device).
# TPU names count what Cloud TPU's accelerator type counts (v5p: TensorCores, 2 per chip, one JAX device per chip;
# v5e / v6e: chips); HBM per chip from Google's published specs. GPU hosts compile on the CPU backend.
SLICES: dict[str, tuple[str, str | None, int, float]] = {
    "v5p-8": ("tpu", "v5p:2x2x1", 4, 95.0),
    "v5p-16": ("tpu", "v5p:2x2x2", 8, 95.0),
    "v5p-32": ("tpu", "v5p:2x2x4", 16, 95.0),
    "v5p-64": ("tpu", "v5p:2x4x4", 32, 95.0),
    "v5p-128": ("tpu", "v5p:4x4x4", 64, 95.0),
    "v5p-256": ("tpu", "v5p:4x4x8", 128, 95.0),
    "v5e-4": ("tpu", "v5e:2x2", 4, 16.0),
    "v5e-8": ("tpu", "v5e:2x4", 8, 16.0),
    "v5e-16": ("tpu", "v5e:4x4", 16, 16.0),
    "v6e-4": ("tpu", "v6e:2x2", 4, 32.0),
    "v6e-8": ("tpu", "v6e:2x4", 8, 32.0),
    "v6e-16": ("tpu", "v6e:4x4", 16, 32.0),
    "v6e-32": ("tpu", "v6e:4x8", 32, 32.0),
    "v6e-64": ("tpu", "v6e:8x8", 64, 32.0),
    "v6e-256": ("tpu", "v6e:16x16", 256, 32.0),
    "h100-1": ("gpu", None, 1, 80.0),
    "h100-8": ("gpu", None, 8, 80.0),
    # 141 GB of HBM3e; JAX preallocates train.gpu_memory_fraction of it (the recipe: 0.95), the budget used here.
    "h200-1": ("gpu", None, 1, 141e9 / 2**30),
    "h200-8": ("gpu", None, 8, 141e9 / 2**30),
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file with a preset, e.g. "
                                          "configs/dpo.py:qwen2_5_vl_7b", lock_config=True)
_TOPOLOGY = flags.DEFINE_enum("topology", None, list(SLICES), "The slice (or GPU host) to compile for.")
_TEXT_ONLY = flags.DEFINE_bool("text_only", False, "Batches without images (text-only SFT data).")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "Memory per device to compare the peak with (0: the slice's).")
_ALL_PLANS = flags.DEFINE_enum("all_plans", None, list(recipes.MODES), "Compile every plan of recipes.SLICE_PLANS "
                               "for this mode (one process each) and print the README's pod-plan table.")


def usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def model_config_of(c):
    """The model config: model.checkpoint's config.json when set, else the preset's size."""
    from medee_jax.models import load_config, presets

    if c.model.checkpoint:
        return load_config(c.model.checkpoint)
    if c.preset in presets():
        return presets()[c.preset]
    usage_error("name a preset (--config configs/dpo.py:PRESET) or --config.model.checkpoint=DIR (its config.json "
                "only is read)")


def devices_for(slice_name: str):
    """The slice's devices: libtpu's topology description for TPU slices, the CPU backend's for GPU hosts."""
    import jax

    platform, topology, count, _ = SLICES[slice_name]
    if platform == "tpu":
        from jax.experimental import topologies

        try:
            devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
        except Exception as e:  # noqa: BLE001 - libtpu missing or too old: say what to install
            usage_error(f"--topology {slice_name}: cannot describe TPU topology {topology} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); it needs libtpu next to jax (pip install "
                        "libtpu, or jax[tpu])")
        if len(devices) != count:
            usage_error(f"--topology {slice_name}: libtpu describes {len(devices)} devices, expected {count}")
        return list(devices)
    devices = jax.devices("cpu")
    if len(devices) < count:
        usage_error(f"--topology {slice_name}: {len(devices)} CPU devices; set XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={count} before starting")
    return devices[:count]


def collectives_of(hlo: str | None) -> dict[str, int] | None:
    """Counts of the collective ops in a piece's optimized HLO text, by kind (async pairs counted once); None
    without a text. The text is the compiler's own dump (`step_memory.optimized_hlo_text`): jax 0.10 cannot parse
    libtpu's optimized HLO back (``executable.as_text()`` fails on async ops with several operands)."""
    if hlo is None:
        return None
    counts = collections.Counter()
    for kind in COLLECTIVES:
        counts[kind] = len(re.findall(rf"= [^=\n]*\b{kind}(?:-start)?\(", hlo))
    return {k: v for k, v in counts.items() if v}


def pallas_kernel_calls(hlo: str | None) -> int | None:
    """Calls of Pallas TPU kernels (``tpu_custom_call``) in a piece's optimized HLO text: the splash attention
    kernel's forward and backward calls in the train step (0: the text attention ran blockwise or reference)."""
    if hlo is None:
        return None
    return len(re.findall(r'custom_call_target="tpu_custom_call"', hlo))


def flops_of(executable) -> float | None:
    """XLA's FLOPs of one run of a compiled executable on one device (its cost analysis), None where unreported."""
    cost = executable.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def plan_flops(c, model_cfg, batch_shape: dict, shards: int, text_only: bool) -> dict[str, float]:
    """Model and hardware FLOPs of one optimizer step at the compiled shapes, by the trainer's arithmetic
    (`metrics.step_flops`): every row a full causal sequence of the row length, every sequence with the target
    bucket's width of targets, one image of the largest vision bucket per row (SFT) or pair (DPO) through the
    frozen tower. XLA's own cost analysis is no substitute: it counts a while loop's body once (the decoder's
    layer scan: a 2- and a 4-layer model report the same FLOPs)."""
    from medee_jax.models.families import family_of
    from medee_jax.training import metrics
    from medee_jax.training.setup import target_buckets

    rows, length, units = batch_shape["rows"], batch_shape["length"], batch_shape["patches"]
    sequences = rows if not (c.mode == "dpo" and c.dpo.share_prompt) else 2 * rows
    width = min(max(target_buckets(c)), length)
    per_micro = metrics.TokenCounts(shards * rows * length, shards * rows * length * (length + 1) // 2,
                                    shards * sequences * width)
    images = shards * (rows // 2 if c.mode == "dpo" and not c.dpo.share_prompt else rows)
    vision = 0.0
    if units and not text_only:
        per_image = units // max(rows // 2 if c.mode == "dpo" and not c.dpo.share_prompt else rows, 1)
        vision = images * per_image * family_of(model_cfg).config().vision_flops_per_unit(
            model_cfg, trained=c.model.train_vision, units_per_image=per_image)
    if c.mode == "sft":
        mode = "sft"
    else:
        mode = "dpo_frozen_ref" if c.dpo.reference == "frozen" else "dpo_no_ref"
    flops = metrics.step_flops(model_cfg.text, per_micro, mode=mode, remat=c.model.remat, vision=vision)
    accum = int(c.data.grad_accum_steps)
    return {k: v * accum for k, v in flops.items()}


def compile_plan(c, slice_name: str, text_only: bool) -> dict:
    """Compiles ``c``'s step for the slice and returns the report (the JSON printed last)."""
    from medee_jax.models.attention import mesh_platform
    from medee_jax.training import setup
    from medee_jax.training.batches import run_batch_spec
    from medee_jax.training.mesh import make_mesh
    from medee_jax.training.step_memory import compile_step, memory_report, optimized_hlo_text, synthetic_batch

    platform, topology, count, hbm = SLICES[slice_name]
    model_cfg = model_config_of(c)
    mesh = make_mesh(dict(c.mesh), devices=devices_for(slice_name))
    data = setup.DataSpec(train_path="synthetic", eval_path="", tokenizer_dir=c.model.checkpoint, media_root="",
                          is_demo=False)
    spec = run_batch_spec(c, data, model_cfg)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aot_hlo_") as dump:
        compiled = compile_step(c, model_cfg, mesh, synthetic_batch(c, spec, model_cfg), spec,
                                with_images=not text_only, hlo_dump_dir=dump)
        hlo = {name: optimized_hlo_text(dump, name) for name in compiled.pieces}
    compile_s = time.perf_counter() - t0
    memory = memory_report(compiled)
    if _HBM_GIB.value:
        hbm = _HBM_GIB.value  # the caller's budget, as given
    elif platform == "gpu":
        hbm = hbm * (c.train.gpu_memory_fraction or 0.75)  # what JAX preallocates (0.75: JAX's default)
    accum = int(c.data.grad_accum_steps)
    runs = {"accumulate_first": 1, "accumulate": accum - 1, "clip": 1, "update": 1}
    pieces, xla_flops, collectives = {}, 0.0, collections.Counter()
    for name, (executable, _) in compiled.pieces.items():
        piece_flops = flops_of(executable)
        piece_collectives = collectives_of(hlo[name])
        collectives.update(piece_collectives or {})
        if piece_flops is not None:
            xla_flops += runs[name] * piece_flops * count
        pieces[name] = {**{k: v / 2**30 for k, v in memory.get(name, {}).items()},
                        "xla_flops_per_device": piece_flops, "collectives": piece_collectives,
                        "pallas_kernel_calls": pallas_kernel_calls(hlo[name])}
    peak = memory["peak_bytes_per_device"] / 2**30
    flops = plan_flops(c, model_cfg, memory["batch_shape"], int(compiled.batch["input_ids"].shape[0]), text_only)
    return {"topology": slice_name, "platform": platform, "topology_desc": topology, "devices": count,
            "device_kind": mesh.devices.flat[0].device_kind, "mesh": dict(mesh.shape), "preset": c.preset,
            "mode": c.mode, "peak_memory_gib_per_device": peak, "state_gib_per_device": memory["state"] / 2**30,
            "hbm_gib": hbm,
            "fits": bool(peak <= hbm), "flops_per_step": flops["model"], "hardware_flops_per_step": flops["hardware"],
            "xla_flops_per_step": xla_flops, "collectives": dict(collectives), "pieces": pieces,
            "collectives_counted": all(p["collectives"] is not None for p in pieces.values()),
            "text_attention": text_attention(c, mesh_platform(mesh),
                                             pieces["accumulate_first"]["pallas_kernel_calls"]),
            "batch_shape": memory["batch_shape"], "batch_size": int(c.data.batch_size),
            "grad_accum_steps": accum, "reference": c.dpo.reference if c.mode == "dpo" else None,
            "mu_dtype": c.optimizer.mu_dtype, "remat": c.model.remat, "images": not text_only,
            "compile_s": round(compile_s, 1)}


def text_attention(c, platform: str, kernel_calls: int | None) -> str:
    """What the compiled step's text attention runs: "splash" when the TPU program calls Pallas kernels, else the
    configured implementation, "auto" resolved for the compiling ``platform`` (GPU hosts compile on the CPU
    backend, whose auto picks reference or blockwise by row length)."""
    if kernel_calls:
        return "splash"
    if c.model.attention == "auto":
        return "blockwise" if platform != "cpu" else "auto (CPU: reference or blockwise by row length)"
    return c.model.attention


def describe(report: dict) -> list[str]:
    """Human-readable lines of a report."""
    lines = [f"{report['preset'] or 'config'} ({report['mode']}) on {report['topology']}: {report['devices']} x "
             f"{report['device_kind']}, mesh {report['mesh']}, batch {report['batch_shape']} per data shard"]
    for name, p in report["pieces"].items():
        lines.append(f"  {name:17s} arguments {p.get('arguments', 0):8.2f} GiB  outputs {p.get('outputs', 0):8.2f} "
                     f"GiB  temporaries {p.get('temporaries', 0):8.2f} GiB  collectives "
                     f"{'(no HLO dump)' if p['collectives'] is None else p['collectives'] or '-'}")
    calls = report["pieces"]["accumulate_first"]["pallas_kernel_calls"]
    lines.append(f"  text attention: {report['text_attention']}"
                 + (f" ({calls} Pallas kernel calls in accumulate_first)" if calls else ""))
    verdict = "fits" if report["fits"] else "does NOT fit"
    lines.append(f"  state {report['state_gib_per_device']:.2f} GiB + largest transient: peak "
                 f"{report['peak_memory_gib_per_device']:.2f} GiB per device vs {report['hbm_gib']:.1f} GiB HBM: "
                 f"{verdict}")
    lines.append(f"  FLOPs per optimizer step (all devices): model {report['flops_per_step']:.4g}, with remat "
                 f"recompute {report['hardware_flops_per_step']:.4g}; XLA's cost analysis {report['xla_flops_per_step']:.4g}"
                 f" (loop bodies counted once); compiled in {report['compile_s']} s")
    return lines


def all_plans(mode: str) -> int:
    """Compiles every (preset, slice) of recipes.SLICE_PLANS for ``mode``, each in its own process (a slice's
    devices are fixed when jax starts), and prints a Markdown table row per plan; returns 0."""
    print("| preset | slice (devices) | mesh | per data shard | reference, mu | text attention "
          "| state / peak per device | HBM | fits | model TFLOPs per step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset, plans in recipes.SLICE_PLANS.items():
        for slice_name in plans:
            env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--config",
                                   os.path.join(ROOT, "configs", f"{mode}.py:{preset}"), "--topology", slice_name],
                                  capture_output=True, text=True, env=env)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode not in (0, 1) or not lines:
                error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"| `{preset}` | {slice_name} | - | - | - | - | did not compile: {error[:200]} | - | - | - |")
                continue
            r = json.loads(lines[-1])
            mesh = " x ".join(f"{axis} {size}" for axis, size in r["mesh"].items() if size > 1) or "1 device"
            shape = r["batch_shape"]
            print(f"| `{preset}` | {slice_name} ({r['devices']}) | {mesh} | {shape['rows']} rows x {shape['length']}"
                  f" tokens, {shape['patches']} patches/tiles | {r['reference']}, {r['mu_dtype']} | "
                  f"{r['text_attention']} | "
                  f"{r['state_gib_per_device']:.1f} / {r['peak_memory_gib_per_device']:.1f} GiB | "
                  f"{r['hbm_gib']:.0f} GiB | {'yes' if r['fits'] else '**no**'} | {r['flops_per_step'] / 1e12:,.0f} |",
                  flush=True)
    return 0


def main(argv) -> int:
    del argv
    if _ALL_PLANS.value:
        return all_plans(_ALL_PLANS.value)
    c = _CONFIG.value
    if c is None:
        usage_error("--config is required (e.g. --config configs/dpo.py:qwen2_5_vl_7b)")
    if _TOPOLOGY.value is None:
        usage_error(f"--topology is required: one of {', '.join(SLICES)}")
    overridden = set(config_flags.get_override_values(flags.FLAGS["config"]))
    slice_name = _TOPOLOGY.value
    with c.unlocked():
        planned = recipes.apply_slice_plan(c, slice_name, keep=overridden)
    if c.preset and not planned:
        print(f"note: preset {c.preset} has no plan for {slice_name} (recipes.SLICE_PLANS): its defaults apply",
              file=sys.stderr)
    from medee_jax.training import setup

    try:
        setup.validate_config(c)
    except ValueError as e:
        usage_error(str(e))
    report = compile_plan(c, slice_name, _TEXT_ONLY.value)
    for line in describe(report):
        print(line)
    print(json.dumps(report))
    return 0 if report["fits"] else 1


def _prepare_devices(argv: list[str]) -> None:
    """Before jax starts: a GPU host is simulated with that many CPU devices; TPU topologies need only the CPU."""
    name = None
    for i, arg in enumerate(argv):
        if arg.startswith("--topology="):
            name = arg.split("=", 1)[1]
        elif arg == "--topology" and i + 1 < len(argv):
            name = argv[i + 1]
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) meant for processes that drive TPU chips; compiling
    # for a described topology drives none, so several of these may run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if name in SLICES and SLICES[name][0] == "gpu":
        count = SLICES[name][2]
        flag = f"--xla_force_host_platform_device_count={count}"
        if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


if __name__ == "__main__":
    _prepare_devices(sys.argv)
    app.run(main)
