"""Native jaxenc checkpoints (flax msgpack + JSON metadata), their digests, and tree differences.

The file layer under :mod:`jaxenc.models.store`: SHA digests and ``.sha256`` sidecars, atomic writes,
:func:`save_checkpoint` / :func:`load_checkpoint`, and :func:`tree_differences`, the one report of how
a variable tree read from a checkpoint differs from the tree it should fill.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.traverse_util import empty_node, flatten_dict

__all__ = ["load_checkpoint", "save_checkpoint", "shape_problems", "tree_differences"]

_CHECKPOINT_FORMAT = "jaxenc.checkpoint"
_CHECKPOINT_VERSION = 1
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------
# Digests, sidecars, atomic writes (shared with the store's cache)


def _file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest_mismatch(path: Path, expected: list[tuple[str, str, str]]) -> str | None:
    """None if ``path`` matches every expected digest, else a message naming both digests."""
    for algorithm, label, want in expected:
        got = _file_digest(path, algorithm)
        if got != want:
            return f"{label} mismatch for {path}: expected {want}, got {got}"
    return None


def _read_sidecar(path: Path) -> str | None:
    sidecar = Path(str(path) + ".sha256")
    if not sidecar.exists():
        return None
    text = sidecar.read_text().strip()
    digest = text.split()[0].lower() if text else ""
    if not re.fullmatch("[0-9a-f]{64}", digest):
        raise ValueError(
            f"{sidecar}: not a SHA-256 digest file (expected '<64 hex digits>  <file name>')"
        )
    return digest


def _temp_in(directory: Path, final_name: str) -> Path:
    """A new empty temporary file beside ``final_name`` (``.{final_name}.<random>.part``)."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=f".{final_name}.", suffix=".part")
    os.close(fd)
    return Path(name)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_in(path.parent, path.name)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_sidecar(path: Path, digest: str) -> None:
    _atomic_write_bytes(Path(str(path) + ".sha256"), f"{digest}  {path.name}\n".encode())


# --------------------------------------------------------------------------------------------------
# Tree differences


def flat_leaves(tree: Any) -> dict[tuple[str, ...], Any]:
    """``{path tuple: leaf}`` of a variable tree (flax state dict; empty sub-dicts dropped)."""
    flat = flatten_dict(serialization.to_state_dict(tree), keep_empty_nodes=True)
    return {k: v for k, v in flat.items() if v is not empty_node}


def split_differences(expected: Mapping, actual: Mapping) -> tuple[list, list, list]:
    """(missing, mis-shaped, unexpected) keys of the flat trees ``expected`` / ``actual``, sorted."""
    missing = sorted(k for k in expected if k not in actual)
    unexpected = sorted(k for k in actual if k not in expected)
    mismatched = sorted(
        k
        for k in expected
        if k in actual and tuple(np.shape(expected[k])) != tuple(np.shape(actual[k]))
    )
    return missing, mismatched, unexpected


def tree_differences(expected: Any, actual: Any, *, target: str = "the target") -> list[str]:
    """How the variable tree ``actual`` (read from a checkpoint) differs from ``expected``; empty when
    they fit. One line per leaf, by path: ``"a/b: missing in the checkpoint"``, ``"a/b: shape (4, 3)
    in the checkpoint, (4, 5) in the target"``, ``"a/b: in the checkpoint but not in the target"``
    (``target`` names the expected tree)."""
    exp, act = flat_leaves(expected), flat_leaves(actual)
    missing, mismatched, unexpected = split_differences(exp, act)
    name = "/".join
    lines = [f"{name(k)}: missing in the checkpoint" for k in missing]
    lines += [
        f"{name(k)}: shape {tuple(np.shape(act[k]))} in the checkpoint, "
        f"{tuple(np.shape(exp[k]))} in {target}"
        for k in mismatched
    ]
    lines += [f"{name(k)}: in the checkpoint but not in {target}" for k in unexpected]
    return lines


#: The former name of :func:`tree_differences` (same lines).
shape_problems = tree_differences


# --------------------------------------------------------------------------------------------------
# Native checkpoints


def save_checkpoint(
    path: str | os.PathLike, variables: Mapping, *, metadata: Mapping | None = None
) -> str:
    """Write ``variables`` (e.g. ``{"params", "batch_stats"}``) as a native jaxenc checkpoint.

    The file is flax.serialization msgpack holding the variables and a JSON metadata record
    (``jaxenc_version`` plus the caller's ``metadata``, e.g. ``{"model": "resnest50"}``; it must be
    JSON-serialisable). ``path + ".sha256"`` receives the file's SHA-256 (``sha256sum`` format).
    Both are written atomically. Returns the SHA-256 hex digest (for :class:`PretrainedEntry`).
    """
    from jaxenc import __version__

    meta = {"jaxenc_version": __version__, **dict(metadata or {})}
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"save_checkpoint: metadata must be JSON-serialisable ({exc})") from exc
    state = jax.tree.map(np.asarray, serialization.to_state_dict(jax.device_get(variables)))
    data = serialization.msgpack_serialize(
        {
            "format": _CHECKPOINT_FORMAT,
            "format_version": _CHECKPOINT_VERSION,
            "metadata": meta_json,
            "variables": state,
        }
    )
    path = Path(path).expanduser()
    digest = hashlib.sha256(data).hexdigest()
    _atomic_write_bytes(path, data)
    _write_sidecar(path, digest)
    return digest


def load_checkpoint(path: str | os.PathLike, target: Any = None, *, with_metadata: bool = False):
    """Read a native checkpoint written by :func:`save_checkpoint`.

    Verifies ``path + ".sha256"`` when present (ValueError naming both digests on a mismatch).
    ``target``: variables (or their ``jax.eval_shape``) of the expected structure; the result is
    checked against it (ValueError listing missing/unexpected/mis-shaped leaves) and restored into
    its container types. Returns the variables (jax arrays, dtypes as saved), or
    ``(variables, metadata)`` when ``with_metadata``.
    """
    path = Path(path).expanduser()
    want = _read_sidecar(path)
    if want is not None:
        problem = _digest_mismatch(path, [("sha256", "SHA-256", want)])
        if problem is not None:
            raise ValueError(f"load_checkpoint: {problem}")
    try:
        record = serialization.msgpack_restore(path.read_bytes())
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(
            f"load_checkpoint: {path} is not a jaxenc checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(record, dict) or record.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(
            f"load_checkpoint: {path} is not a jaxenc checkpoint (no {_CHECKPOINT_FORMAT!r} record)"
        )
    if record.get("format_version", 0) > _CHECKPOINT_VERSION:
        raise ValueError(
            f"load_checkpoint: {path} has format version {record['format_version']}, "
            f"this jaxenc reads up to {_CHECKPOINT_VERSION}"
        )
    variables = record["variables"]
    if target is not None:
        problems = tree_differences(target, variables)
        if problems:
            raise ValueError(
                f"load_checkpoint: {path} does not match the target: " + "; ".join(problems)
            )
        variables = serialization.from_state_dict(target, variables)
    variables = jax.tree.map(jnp.asarray, variables)
    if with_metadata:
        return variables, json.loads(record.get("metadata") or "{}")
    return variables
