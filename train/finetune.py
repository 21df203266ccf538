"""Fine-tuning starts: ``params``/``batch_stats`` from a checkpoint of this trainer or a native ``.msgpack``.

The weights are merged into a (possibly different) model's variables; upstream PyTorch ``.pth``
weights go through :func:`jaxenc.models.load_pretrained` instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization
from flax.traverse_util import empty_node, flatten_dict, unflatten_dict

from train.checkpoint import _STATE, _TORCH_SUFFIXES, BEST_DIR, CHECKPOINT_DIR, _path

__all__ = ["load_params_for_finetune"]

log = logging.getLogger(__name__)


def _orbax_state_dir(path: epath.Path) -> epath.Path:
    """The ``state`` item directory of the checkpoint that ``path`` designates (see load_params_for_finetune)."""
    if path.name == _STATE and (path / "_METADATA").exists():  # the item directory itself
        return path
    if (path / _STATE).is_dir():
        return path / _STATE
    # A workdir: the best checkpoint if there is one, else the latest periodic one.
    for sub in (BEST_DIR, CHECKPOINT_DIR):
        if (path / sub).is_dir():
            try:
                return _orbax_state_dir(path / sub)
            except FileNotFoundError:
                continue
    # A manager directory (workdir/checkpoints or workdir/best): its newest complete step.
    manager = ocp.CheckpointManager(
        path, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
    )
    step = manager.latest_step()
    manager.close()
    if step is not None and (path / str(step) / _STATE).is_dir():
        return path / str(step) / _STATE
    raise FileNotFoundError(
        f"load_params_for_finetune: no checkpoint written by Checkpointer under {path}"
    )


def _read_orbax_collections(path: epath.Path, collections: list[str], use_ema: bool) -> dict:
    state_dir = _orbax_state_dir(path)
    checkpointer = ocp.PyTreeCheckpointer()
    stored = checkpointer.metadata(state_dir).item_metadata.tree
    if not isinstance(stored, Mapping):
        raise ValueError(
            f"load_params_for_finetune: {state_dir} does not hold a dict-like train state"
        )
    names = {c: c for c in collections if c in stored}
    if use_ema:
        if not stored.get("ema_params"):
            raise ValueError(
                f"load_params_for_finetune: use_ema=True but {state_dir} has no (non-empty) ema_params"
            )
        names["params"] = "ema_params"
    if not names:
        raise ValueError(
            f"load_params_for_finetune: {state_dir} holds none of the target's collections {collections}; "
            f"its state has {sorted(stored)}"
        )
    # Abstract tree from the stored metadata (no sharding: restored as host numpy arrays), so that
    # mismatches with the target are reported by _merge_into_target, not by orbax.
    is_meta_leaf = lambda x: not isinstance(x, (dict, list, tuple)) and x is not None  # noqa: E731
    item = {
        src: jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
            stored[src],
            is_leaf=is_meta_leaf,
        )
        for src in names.values()
    }
    restored = checkpointer.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        ),
    )
    return {dst: restored[src] for dst, src in names.items()}


def _merge_into_target(source: Mapping, target: Any, *, strict: bool, where: str) -> Any:
    target_sd = serialization.to_state_dict(target)
    flat_t = flatten_dict(target_sd, keep_empty_nodes=True)
    flat_s = {
        k: v
        for k, v in flatten_dict(serialization.to_state_dict(source), keep_empty_nodes=True).items()
        if v is not empty_node
    }
    name = "/".join
    missing, mismatched = [], []
    out = {}
    for k, t in flat_t.items():
        if t is empty_node:
            out[k] = t
            continue
        if k not in flat_s:
            missing.append(k)
            continue
        s = flat_s[k]
        if tuple(np.shape(s)) != tuple(np.shape(t)):
            mismatched.append(k)
            continue
        value = (
            np.asarray(s).astype(t.dtype)
            if np.dtype(t.dtype) != np.asarray(s).dtype
            else np.asarray(s)
        )
        sharding = getattr(t, "sharding", None)
        out[k] = jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)
    unexpected = sorted(k for k in flat_s if k not in flat_t)
    problems = [f"{name(k)}: missing in the checkpoint" for k in missing]
    problems += [
        f"{name(k)}: shape {tuple(np.shape(flat_s[k]))} in the checkpoint, {tuple(np.shape(flat_t[k]))} in the target"
        for k in mismatched
    ]
    problems += [f"{name(k)}: in the checkpoint but not in the target" for k in unexpected]
    if problems and strict:
        raise ValueError(
            f"load_params_for_finetune: {where} does not match the target variables ({len(problems)} differences; "
            f"strict=False keeps the target's values for missing/mis-shaped leaves):\n  "
            + "\n  ".join(problems)
        )
    kept = missing + mismatched
    abstract = [name(k) for k in kept if isinstance(flat_t[k], jax.ShapeDtypeStruct)]
    if abstract:
        raise ValueError(
            f"load_params_for_finetune: strict=False keeps the target's values for {abstract}, but the target "
            "gives only shapes there (jax.ShapeDtypeStruct); pass initialised variables"
        )
    for k in kept:
        out[k] = flat_t[k]
    if problems:
        log.warning(
            "load_params_for_finetune: %s: kept the target's values for %d leaves:\n  %s",
            where,
            len(kept),
            "\n  ".join(problems),
        )
    return serialization.from_state_dict(target, unflatten_dict(out))


def load_params_for_finetune(
    path: str | os.PathLike,
    target_variables: Any,
    *,
    strict: bool = True,
    use_ema: bool = False,
) -> Any:
    """Load weights for fine-tuning into the structure of ``target_variables``.

    Args:
      path: one of
        * a checkpoint written by :class:`Checkpointer`: a step directory
          (``workdir/checkpoints/1000``), a manager directory (``workdir/checkpoints`` or
          ``workdir/best``: its latest step) or a workdir (its best checkpoint if any, else the
          latest). The state's ``params`` and ``batch_stats`` (top-level entries of the saved
          state) are read; nothing else (optimizer state, step) is.
        * a native jaxenc checkpoint (``.msgpack``, :func:`jaxenc.models.store.save_checkpoint`),
          verified against its ``.sha256`` sidecar when present.
        Upstream PyTorch ``.pth`` weights are loaded by the trainer through
        :func:`jaxenc.models.load_pretrained` (``config.model.pretrained``), not here.
      target_variables: the model's variables, e.g. ``{"params": ..., "batch_stats": ...}`` (arrays
        or ``jax.eval_shape`` output); the result has its structure, dtypes and shardings.
      strict: True: any missing, unexpected or mis-shaped leaf raises ValueError listing them all.
        False: missing and mis-shaped leaves keep the target's value (e.g. a new classifier head
        with another number of classes; the target must then hold arrays, not shapes), unexpected
        ones are dropped, and a warning lists them.
      use_ema: read the state's ``ema_params`` instead of ``params`` (Checkpointer format only).

    Returns:
      variables shaped like ``target_variables``.
    """
    p = _path(path)
    if not p.exists():
        raise FileNotFoundError(f"load_params_for_finetune: {p} does not exist")
    if not isinstance(serialization.to_state_dict(target_variables), Mapping):
        raise TypeError(
            f"load_params_for_finetune: target_variables must be a dict of collections, got {type(target_variables).__name__}"
        )
    collections = list(serialization.to_state_dict(target_variables))
    if p.is_dir():
        source = _read_orbax_collections(p, collections, use_ema)
    elif p.suffix == ".msgpack":
        if use_ema:
            raise ValueError(
                "load_params_for_finetune: use_ema=True applies to Checkpointer checkpoints, not .msgpack files"
            )
        from jaxenc.models.store import load_checkpoint

        source = load_checkpoint(p)
    elif p.suffix in _TORCH_SUFFIXES:
        raise ValueError(
            f"load_params_for_finetune: {p} looks like a PyTorch file; load it with jaxenc.models.load_pretrained "
            "(config.model.pretrained), which converts upstream state_dicts"
        )
    else:
        raise ValueError(
            f"load_params_for_finetune: {p} is neither a Checkpointer directory nor a jaxenc .msgpack checkpoint"
        )
    return _merge_into_target(source, target_variables, strict=strict, where=str(p))
