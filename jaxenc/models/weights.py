"""One way for weights to enter a model: :func:`load_weights`, and :func:`resolve_checkpoint`.

A source is a model-store name, an upstream PyTorch file (``.pth``/``.pt``/``.zip``, converted with
:func:`jaxenc.port.torch_to_flax`), a native ``.msgpack`` (:func:`jaxenc.models.save_checkpoint`) or
a checkpoint of the trainer (``train.checkpoint.Checkpointer``: a workdir, a manager directory or a
step directory, read-only through orbax). Whatever the source, the result has the structure, dtypes
and shardings of the target variables, and differences are reported by
:func:`jaxenc.models.native.tree_differences`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.traverse_util import empty_node, flatten_dict, unflatten_dict

from jaxenc.models import native, store

__all__ = ["load_weights", "resolve_checkpoint"]

log = logging.getLogger(__name__)

# The trainer's checkpoint layout (train.checkpoint): workdir/{checkpoints,best}/<step>/state.
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
STATE_ITEM = "state"


def _as_path(path: str | os.PathLike):
    """A local path made absolute (orbax resolves relative ones differently), or an epath for a URL."""
    text = os.fspath(path)
    if "://" in text:
        from etils import epath

        return epath.Path(text)
    return Path(text).expanduser().resolve()


def _steps_in(manager_dir) -> list[int]:
    """Complete steps of an orbax manager directory (a half-written step keeps its tmp name)."""
    if not manager_dir.is_dir():
        return []
    return sorted(
        int(d.name) for d in manager_dir.iterdir() if d.name.isdigit() and (d / STATE_ITEM).is_dir()
    )


def resolve_checkpoint(path: str | os.PathLike, *, use_best: bool | None = False) -> tuple:
    """``(step directory, step, workdir)`` of the trainer checkpoint ``path`` designates.

    ``path``: a step directory (or its ``state`` item), a manager directory (``workdir/checkpoints``
    or ``workdir/best``: its newest complete step) or a workdir: its latest periodic checkpoint, its
    best one with ``use_best=True``, the best if there is one else the latest with ``use_best=None``.
    A ``checkpoints`` directory with ``use_best=True`` gives its sibling ``best``. Raises
    FileNotFoundError naming the path when it does not exist or holds no complete checkpoint.
    """
    p = _as_path(path)
    if not p.exists():
        raise FileNotFoundError(f"resolve_checkpoint: {p} does not exist")
    if p.name == STATE_ITEM and p.is_dir():
        p = p.parent
    if (p / STATE_ITEM).is_dir():  # a step directory
        return p, int(p.name) if p.name.isdigit() else None, p.parent.parent
    if (p / CHECKPOINT_DIR).is_dir() or (p / BEST_DIR).is_dir():  # a workdir
        workdir = p
        order = {True: [BEST_DIR], False: [CHECKPOINT_DIR], None: [BEST_DIR, CHECKPOINT_DIR]}
        managers = [p / sub for sub in order[use_best]]
    else:  # a manager directory
        workdir = p.parent
        managers = [p.parent / BEST_DIR if use_best and p.name != BEST_DIR else p]
    for manager in managers:
        steps = _steps_in(manager)
        if steps:
            return manager / str(steps[-1]), steps[-1], workdir
    raise FileNotFoundError(
        f"resolve_checkpoint: no complete checkpoint under {managers[-1]} "
        f"(expected <step>/{STATE_ITEM} written by train.checkpoint.Checkpointer)"
    )


def _read_orbax(state_dir, collections: list[str], use_ema: bool) -> dict:
    """The target's ``collections`` of a saved train state (``ema_params`` as ``params`` with use_ema)."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    stored = checkpointer.metadata(state_dir).item_metadata.tree
    if not isinstance(stored, Mapping):
        raise ValueError(f"load_weights: {state_dir} does not hold a dict-like train state")
    names = {c: c for c in collections if c in stored}
    if use_ema:
        if not stored.get("ema_params"):
            raise ValueError(
                f"load_weights: use_ema=True but {state_dir} has no (non-empty) ema_params"
            )
        names["params"] = "ema_params"
    if not names:
        raise ValueError(
            f"load_weights: {state_dir} holds none of the target's collections {collections}; "
            f"its state has {sorted(stored)}"
        )
    # Abstract tree from the stored metadata (no sharding: restored as host numpy arrays), so that
    # mismatches with the target are reported by tree_differences, not by orbax.
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


def _from_torch(path: Path, model, example_input, backbone: bool) -> dict:
    """An upstream state_dict converted for ``model``; as a backbone: traced with
    ``return_features=True`` and without the classifier ``fc``."""
    if model is None:
        raise ValueError(
            f"load_weights: {path} is a PyTorch file; converting it needs model= (the flax module it is "
            "for), or load it with jaxenc.models.load_pretrained"
        )
    from jaxenc.port import torch_to_flax

    _, state_dict = store.read_weights(path)
    if example_input is None:
        example_input = jnp.zeros((1, 224, 224, 3), jnp.float32)
    if not backbone:
        return torch_to_flax(model, state_dict, example_input)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    return torch_to_flax(model, state_dict, example_input, return_features=True)


def _read_source(source, collections, *, use_ema, model, example_input, backbone) -> Any:
    if isinstance(source, str) and source in store.pretrained_model_list():
        if use_ema:
            raise ValueError(
                f"load_weights: use_ema=True applies to trainer checkpoints, not {source!r}"
            )
        return store.load_pretrained(source, model=model, example_input=example_input)[1]
    path = store._resolve(None, source) if store._is_url(source) else _as_path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"load_weights: {path} does not exist (and {str(source)!r} is not a model-store name; "
            "see jaxenc.models.pretrained_model_list())"
        )
    if path.is_dir():
        step_dir, _, _ = resolve_checkpoint(path, use_best=None)
        return _read_orbax(step_dir / STATE_ITEM, collections, use_ema)
    if use_ema:
        raise ValueError(f"load_weights: use_ema=True applies to trainer checkpoints, not {path}")
    kind = store._kind(Path(path))
    if kind == "jaxenc":
        return native.load_checkpoint(path)
    if kind in ("torch", "zip") and path.suffix.lower() in (*store._TORCH_SUFFIXES, ".zip"):
        return _from_torch(Path(path), model, example_input, backbone)
    raise ValueError(
        f"load_weights: {path} is neither a trainer checkpoint directory, a jaxenc .msgpack nor a "
        "PyTorch .pth/.pt/.zip file"
    )


def _merge(source: Any, target: Any, *, strict: bool, where: str) -> Any:
    """``source``'s leaves in ``target``'s structure, dtypes and shardings (see load_weights)."""
    flat_t, flat_s = native.flat_leaves(target), native.flat_leaves(source)
    missing, mismatched, _ = native.split_differences(flat_t, flat_s)
    problems = native.tree_differences(target, source)
    if problems and strict:
        raise ValueError(
            f"load_weights: {where} does not match the target variables ({len(problems)} differences; "
            f"strict=False keeps the target's values for missing/mis-shaped leaves):\n  "
            + "\n  ".join(problems)
        )
    kept = set(missing) | set(mismatched)
    abstract = sorted("/".join(k) for k in kept if isinstance(flat_t[k], jax.ShapeDtypeStruct))
    if abstract:
        raise ValueError(
            f"load_weights: strict=False keeps the target's values for {abstract}, but the target "
            "gives only shapes there (jax.ShapeDtypeStruct); pass initialised variables"
        )
    out = {}
    for k, t in flat_t.items():
        if k in kept:
            out[k] = t
            continue
        value = np.asarray(flat_s[k])
        if value.dtype != np.dtype(t.dtype):
            value = value.astype(t.dtype)
        sharding = getattr(t, "sharding", None)
        out[k] = jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)
    if problems:
        log.warning(
            "load_weights: %s: kept the target's values for %d leaves:\n  %s",
            where,
            len(kept),
            "\n  ".join(problems),
        )
    # Empty sub-dicts of the target (e.g. a model without batch_stats) are kept as they are.
    flat_all = flatten_dict(serialization.to_state_dict(target), keep_empty_nodes=True)
    out.update({k: v for k, v in flat_all.items() if v is empty_node})
    return serialization.from_state_dict(target, unflatten_dict(out))


def load_weights(
    source: str | os.PathLike,
    target_variables: Any,
    *,
    subtree: str | None = None,
    strict: bool = True,
    use_ema: bool = False,
    model=None,
    example_input=None,
) -> Any:
    """Weights from ``source`` in the structure, dtypes and shardings of ``target_variables``.

    Args:
      source: a model-store name (read from the local cache, digest-checked, see
        :func:`jaxenc.models.load_pretrained`); an upstream ``.pth``/``.pt``/``.zip`` (converted for
        ``model``); a native ``.msgpack`` (verified against its ``.sha256`` sidecar when present); or
        a trainer checkpoint (see :func:`resolve_checkpoint`; a workdir gives its best checkpoint if
        any, else its latest), of which only the target's collections are read.
      target_variables: e.g. ``{"params": ..., "batch_stats": ...}``, arrays or ``jax.eval_shape``.
      subtree: load ``source`` into ``target[collection][subtree]`` for each collection that has it
        (e.g. ``"pretrained"``, a segmentation model's backbone); the source's classifier ``fc`` is
        dropped and a torch file is traced with ``model(..., return_features=True)``.
      strict: True: any missing, unexpected or mis-shaped leaf raises ValueError listing them all.
        False: missing and mis-shaped leaves keep the target's value (the target must then hold
        arrays there, not shapes), unexpected ones are dropped, and a warning lists them.
      use_ema: read the saved state's ``ema_params`` as ``params`` (trainer checkpoints only).
      model: the flax module a torch file is for (for a store name: default its registered model).
      example_input: an input with which ``model`` can be traced (only its shape is used); default
        (1, 224, 224, 3) float32.
    """
    target_sd = serialization.to_state_dict(target_variables)
    if not isinstance(target_sd, Mapping):
        raise TypeError(
            f"load_weights: target_variables must be a dict of collections, got {type(target_variables).__name__}"
        )
    target = target_variables
    if subtree is not None:
        target = {c: tree[subtree] for c, tree in target_sd.items() if subtree in tree}
        if "params" not in target:
            raise ValueError(f"load_weights: the target's params have no {subtree!r} submodule")
    source_vars = _read_source(
        source,
        list(serialization.to_state_dict(target)),
        use_ema=use_ema,
        model=model,
        example_input=example_input,
        backbone=subtree is not None,
    )
    if subtree is not None:
        source_vars = {
            c: {k: v for k, v in tree.items() if k != "fc"}
            for c, tree in serialization.to_state_dict(source_vars).items()
        }
    merged = _merge(source_vars, target, strict=strict, where=str(source))
    if subtree is None:
        return merged
    return {
        c: {**tree, subtree: merged[c]} if c in merged else tree for c, tree in target_sd.items()
    }
