"""Convert model weights between a transformers checkpoint and the trainer's Orbax layout.

    python tools/convert_checkpoint.py hf2orbax HF_DIR ORBAX_DIR [--dtype bf16|fp32] [--overwrite]
    python tools/convert_checkpoint.py orbax2hf ORBAX_DIR HF_DIR [--dtype bf16|fp32] [--max-shard-size 5GB]
                                                                 [--overwrite]

hf2orbax streams one parameter at a time (host memory ~ one stacked parameter, not the model); orbax2hf restores
one parameter at a time and streams it into safetensors. Without --dtype each tensor keeps its stored dtype. The
Orbax layout is documented in medee_jax/models/orbax_io.py. DST is written beside itself and renamed into place
when complete. An existing DST is replaced only if this tool (or another medee_jax export) wrote it and nothing was
added to it since (a marker file, .medee_jax_export.json, lists what it wrote); any other existing DST — a training
workdir, a transformers checkpoint, an export with a README added — needs --overwrite, and the files that were not
ours are then named on stderr before they are removed. A DST that is or contains SRC is always refused. A staging
directory left by a killed conversion is removed by the next conversion to the same DST. Prints one JSON line on
success; on bad input prints one error line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=("hf2orbax", "orbax2hf"))
    p.add_argument("src", help="source directory")
    p.add_argument("dst", help="destination directory (created; an existing one is replaced only if medee_jax "
                               "wrote it, else with --overwrite)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="stored dtype of the output (default: keep each tensor's dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="orbax2hf: largest safetensors shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DST that medee_jax did not write (its other files are removed)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from medee_jax.models import orbax_io
    except ImportError:  # run from a checkout without installing the package
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from medee_jax.models import orbax_io
    from medee_jax.models.hf import CheckpointError

    import ml_dtypes
    import numpy as np

    dtype = None if args.dtype is None else np.dtype(getattr(ml_dtypes, DTYPES[args.dtype], None) or DTYPES[args.dtype])
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        print(f"error: SRC and DST are the same directory ({args.src})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")  # what a replacement removes
    start = time.perf_counter()
    try:
        if args.direction == "hf2orbax":
            summary = orbax_io.hf_to_orbax(args.src, args.dst, dtype=dtype, overwrite=args.overwrite)
        else:
            summary = orbax_io.orbax_to_hf(args.src, args.dst, dtype=dtype, max_shard_size=args.max_shard_size,
                                           overwrite=args.overwrite)
    except (CheckpointError, orbax_io.OrbaxCheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {args.direction} {args.src} -> {args.dst}: {e}", file=sys.stderr)
        return 2
    summary = {"direction": args.direction, "src": args.src, "dst": args.dst,
               "seconds": round(time.perf_counter() - start, 3), **summary}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
