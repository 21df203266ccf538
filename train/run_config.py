"""A run's config in its workdir: stored on the first start, checked on every restart.

:func:`check_config` writes ``workdir/config.json`` on the first start and refuses a restart whose
config differs in anything but :data:`RESUMABLE_CONFIG_KEYS` (unless the user allows it). In
multi-process runs only process 0 writes; every process checks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
from etils import epath

__all__ = ["CONFIG_FILE", "PREVIOUS_CONFIG_FILE", "RESUMABLE_CONFIG_KEYS", "check_config"]

CONFIG_FILE = "config.json"
PREVIOUS_CONFIG_FILE = "config.previous.json"

#: Config keys that may change when a run resumes: they set how long and how verbosely the run
#: goes on or how the input is read, not what is being trained. Note that ``train.num_steps`` also
#: sets the length of a poly/cosine schedule, so extending a run changes the learning rate from the
#: resumed step on (that is usually what "train longer" means).
RESUMABLE_CONFIG_KEYS = frozenset(
    {
        "train.num_steps",
        "train.log_every",
        "train.eval_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.sample_predictions",
        "train.allow_config_change",
        "train.compile_cache",
        "input.worker_count",
        # What to do with unreadable input files; a run stopped by "error" resumes with "skip".
        "input.bad_examples",
        # Memory for compute; the same results (tests/test_models_remat.py).
        "model.remat",
    }
)

#: Keys declared in the recipes after runs had been started without them, with the value their
#: readers used when they were absent: a config that lacks one compares as holding it.
ADDED_CONFIG_KEYS = {"dataset.seed": 0, "input.bad_examples": "error"}

_ABSENT = "<absent>"


def _path(p: str | os.PathLike) -> epath.Path:
    """An absolute epath (local paths are made absolute: orbax resolves relative ones differently)."""
    s = os.fspath(p)
    return epath.Path(s if "://" in s else os.path.abspath(s))


def _atomic_write_text(path: epath.Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)  # overwrites (epath rename refuses an existing destination)


def _config_dict(config: Any) -> dict:
    """The config as plain JSON data (tuples become lists, as they are stored)."""
    if hasattr(config, "to_json_best_effort"):  # ml_collections ConfigDict / FrozenConfigDict
        return json.loads(config.to_json_best_effort(sort_keys=True))
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(
            f"check_config: config must be a ConfigDict or a dict, got {type(config).__name__}"
        )
    return json.loads(json.dumps(config, sort_keys=True, default=repr))


def _flatten_config(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def check_config(
    workdir: str | os.PathLike,
    config: Any,
    *,
    allow_change: bool = False,
    resumable_keys: Iterable[str] = RESUMABLE_CONFIG_KEYS,
    write: bool | None = None,
) -> str | None:
    """Store the run's config on the first start; on a restart check that it has not changed.

    The config (ConfigDict or dict) is written as sorted JSON to ``workdir/config.json``. On a
    restart the stored config is compared with ``config`` key by key (dotted names such as
    ``optim.lr``). Keys in ``resumable_keys`` (:data:`RESUMABLE_CONFIG_KEYS`) may change; any other
    difference raises ValueError listing each key with its old and new value, unless
    ``allow_change`` (``--config.train.allow_config_change=True``).

    Returns None when the config is new or unchanged; otherwise a message (for the log) listing the
    changes, after writing the new config to ``config.json`` and keeping the old one as
    ``config.previous.json``. ``write``: whether this process writes the files (default: only
    process 0); every process checks.
    """
    workdir = _path(workdir)
    path = workdir / CONFIG_FILE
    new = _config_dict(config)
    text = json.dumps(new, sort_keys=True, indent=2) + "\n"
    writer = jax.process_index() == 0 if write is None else bool(write)

    if not path.exists():
        if writer:
            workdir.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(path, text)
        return None
    try:
        old = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(
            f"check_config: {path} is not valid JSON ({exc}); remove it or use a fresh --workdir"
        ) from exc

    old_flat, new_flat = _flatten_config(old), _flatten_config(new)
    for key, default in ADDED_CONFIG_KEYS.items():
        old_flat.setdefault(key, default)
        new_flat.setdefault(key, default)
    allowed = frozenset(resumable_keys)
    changed = sorted(
        k
        for k in set(old_flat) | set(new_flat)
        if old_flat.get(k, _ABSENT) != new_flat.get(k, _ABSENT)
    )
    if not changed:
        return None

    def line(k):
        return f"{k}: {old_flat.get(k, _ABSENT)!r} -> {new_flat.get(k, _ABSENT)!r}"

    incompatible = [k for k in changed if k not in allowed]
    if incompatible and not allow_change:
        raise ValueError(
            f"check_config: the config differs from the one this run was started with ({path}) in keys "
            f"that may not change on resume:\n  "
            + "\n  ".join(line(k) for k in incompatible)
            + "\n"
            "Pass --config.train.allow_config_change=True to resume anyway, or use a fresh --workdir."
        )
    if writer:
        _atomic_write_text(workdir / PREVIOUS_CONFIG_FILE, path.read_text())
        _atomic_write_text(path, text)
    if incompatible:
        msg = "WARNING: resuming with a changed config (allow_config_change=True):\n  "
        msg += "\n  ".join(line(k) for k in incompatible)
        rest = [k for k in changed if k in allowed]
        if rest:
            msg += "\nand resumable keys:\n  " + "\n  ".join(line(k) for k in rest)
    else:
        msg = "config changed in resumable keys:\n  " + "\n  ".join(line(k) for k in changed)
    return msg + f"\n(old config kept as {workdir / PREVIOUS_CONFIG_FILE})"
