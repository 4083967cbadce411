"""Orbax checkpoints of a training run: train state + the data iterator's state, async, keeping the last N.

Layout under ``workdir/checkpoints/<step>/``:
  ``state/``  the train state (`state.TrainState.checkpoint_items`) as a dict: trainable ``params``, ``frozen``
              params, ``opt_state``, ``step``, ``nonfinite_in_a_row``, ``nonfinite_total`` (not the frozen
              reference copy, rebuilt from the initial weights). The layout is the one every checkpoint has had;
              a restore casts each array to the running state's dtype, so a checkpoint saved with fp32 frozen
              parameters resumes a run that keeps them in bf16 (``model.frozen_dtype``), and back;
  ``data/``   one JSON file per process with its input iterator's state (grain's checkpoint handler).
and in its metadata (``_CHECKPOINT_METADATA``'s custom metadata) the run config it was saved under, so a resume
can say which settings changed. ``workdir/model_config.json`` holds the model's config.json so a later stage can
rebuild the model (``--config.model.init_from=<workdir>`` makes a Stage-I run the Stage-II policy and reference).
Nothing in a checkpoint names an absolute path: a copied or moved workdir resumes.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint

log = logging.getLogger(__name__)


class IteratorSnapshot:
    """The state of a data iterator captured at a step boundary (async saves must not see later batches)."""

    def __init__(self, state=None):
        self.state = state

    def get_state(self) -> bytes:
        state = self.state
        return state if isinstance(state, bytes) else json.dumps(state).encode()

    def set_state(self, state) -> None:
        self.state = state

    def start_prefetch(self) -> None:  # called by grain's handler after restore
        pass


def _decode_iterator_state(state):
    if isinstance(state, bytes):
        state = state.decode()
    if isinstance(state, str):
        return json.loads(state)
    return state


class RunCheckpointer:
    """Saves and restores a run's state and data-iterator state with an Orbax CheckpointManager."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        """``keep``: the newest checkpoints kept (-1: all). 0 would delete every checkpoint, the final one too."""
        if keep == 0 or keep < -1:
            raise ValueError(f"train.keep_checkpoints={keep}: must be >= 1 (or -1 to keep every checkpoint)")
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=None if keep == -1 else keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, iterator_state, *, force: bool = False, config: dict | None = None) -> bool:
        """Starts saving ``state`` and the iterator state (captured now) at ``step``; returns whether it saved.
        ``config``: the run config (JSON data) stored in the checkpoint's metadata."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain_checkpoint.CheckpointSave(IteratorSnapshot(iterator_state)),
        )
        metadata = {"config": config} if config is not None else None
        return self.manager.save(step, args=args, force=force, custom_metadata=metadata)

    def saved_config(self, step: int) -> dict | None:
        """Returns the run config stored with checkpoint ``step`` (None for a checkpoint saved without one)."""
        try:
            metadata = self.manager.metadata(step).custom_metadata or {}
        except (FileNotFoundError, ValueError, KeyError):
            return None
        return metadata.get("config")

    def restore_state(self, step: int, state):
        """Returns (``state`` (a `state.TrainState`) with the checkpointed fields of ``step`` restored onto its
        shardings and dtypes, the iterator state)."""
        restored, iterator_state = self.restore(step, abstract_like(state.checkpoint_items()))
        return state.with_checkpoint_items(restored), iterator_state

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, object]:
        """Returns (state placed like ``abstract_state``'s shardings, the iterator state) of checkpoint ``step``."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain_checkpoint.CheckpointRestore(IteratorSnapshot()),
        )
        restored = self.manager.restore(step, args=args)
        return restored["state"], _decode_iterator_state(restored["data"].state)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings=None):
    """Returns ShapeDtypeStructs (with shardings when given) describing ``tree`` for a restore."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_model_params(workdir: str, abstract_params: dict, step: int | None = None) -> dict:
    """Returns the full model params (trainable + frozen merged) of a training run's checkpoint.

    ``abstract_params`` is the pure dict of the model's params (ShapeDtypeStructs with shardings); only the
    ``params`` and ``frozen`` parts of the saved state are read (not the optimizer state).
    """
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []
    if step is None:
        if not steps:
            raise FileNotFoundError(f"{directory}: no checkpoint to initialise from")
        step = steps[-1]
    path = os.path.join(directory, str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(path)
    saved = getattr(saved, "item_metadata", saved)
    saved = getattr(saved, "tree", saved)
    target = {part: _subset(abstract_params, saved[part]) for part in ("params", "frozen")}
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    return _merge(restored["params"], restored["frozen"])


def _subset(full: dict, like: dict) -> dict:
    return {k: _subset(full[k], v) if isinstance(v, dict) else full[k] for k, v in like.items()}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if k in out and isinstance(v, dict) else v
    return out
