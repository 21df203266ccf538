"""Checkpoints for the trainer: orbax managers, config compatibility, graceful shutdown.

* :class:`Checkpointer` wraps two ``orbax.checkpoint.CheckpointManager`` s:
  ``workdir/checkpoints`` (periodic saves, the newest ``keep`` kept; "latest" is what a restart
  resumes from) and ``workdir/best`` (one checkpoint: the best value of ``best_metric`` seen so far).
  Each checkpoint step holds three items: ``state`` (the train-state pytree, ``StandardSave``),
  ``data`` (every process's input-iterator state, JSON) and ``meta`` (a JSON dict, e.g. the config
  hash; written by process 0, so it must be the same on all processes).
  Orbax writes a step into a temporary directory and renames it when complete, so a save killed
  half-way never becomes "latest"; stale temporary directories are removed on the next start.
* :func:`check_config` stores ``workdir/config.json`` on the first start and refuses a restart whose
  config differs in anything but :data:`RESUMABLE_CONFIG_KEYS` (unless the user allows it).
* :class:`GracefulShutdown` turns SIGTERM/SIGINT into a flag the train loop polls, so a preempted or
  interrupted run saves a checkpoint and exits cleanly.

Multi-process runs: every process must call :meth:`Checkpointer.save`, :meth:`~Checkpointer.save_best`,
:meth:`~Checkpointer.restore` and :meth:`~Checkpointer.wait` at the same steps with the same
arguments (the state being global ``jax.Array`` s). Orbax synchronises the processes (barriers),
each process writes the shards it owns and process 0 writes the JSON items and finalises the step;
skipping the call on one process deadlocks the others. For the same reason the decision to stop
must be agreed on by all processes: use :meth:`GracefulShutdown.should_stop` (a collective), not
the process-local :attr:`GracefulShutdown.requested`. :func:`check_config` writes only on process 0.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = [
    "BEST_DIR",
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "PREVIOUS_CONFIG_FILE",
    "RESUMABLE_CONFIG_KEYS",
    "Checkpointer",
    "GracefulShutdown",
    "check_config",
]

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
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
        # Memory for compute; the same results (tests/test_models_remat.py).
        "model.remat",
    }
)

# Item names inside one checkpoint step.
_STATE, _DATA, _META = "state", "data", "meta"
# Tag of a bytes value inside JSON (grain's DataLoader iterators return their state as bytes).
_BYTES_TAG = "__bytes_base64__"
_BEST_MODES = ("max", "min")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".zip")


# --------------------------------------------------------------------------------------------------
# Small helpers


def _path(p: str | os.PathLike) -> epath.Path:
    """An absolute epath (local paths are made absolute: orbax resolves relative ones differently)."""
    s = os.fspath(p)
    return epath.Path(s if "://" in s else os.path.abspath(s))


def _keystr(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat_with_names(tree: Any, is_leaf=None) -> dict[str, Any]:
    """{"a/b/0": leaf} for every leaf (dict keys, sequence indices and attribute names joined by "/")."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {"/".join(_keystr(e) for e in path): leaf for path, leaf in flat}


def _encode_json(value: Any, where: str) -> Any:
    """A JSON-able copy of ``value``: bytes become ``{_BYTES_TAG: base64}``, numpy scalars Python ones."""
    if isinstance(value, (bytes, bytearray)):
        return {_BYTES_TAG: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"{where}: JSON keys must be strings, got {k!r} ({type(k).__name__})"
                )
            out[k] = _encode_json(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_encode_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"{where}: expected JSON-serialisable data (dict/list/str/number/bool/None/bytes), got {type(value).__name__}"
    )


def _decode_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_BYTES_TAG}:
            return base64.b64decode(value[_BYTES_TAG])
        return {k: _decode_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_json(v) for v in value]
    return value


def _gather_json(value: Any) -> list:
    """``[value of process 0, value of process 1, ...]`` on every process (a collective when multi-process).

    Orbax writes JSON items from process 0 only, while each process has its own input-iterator
    state (its shard of the data): all of them are gathered so that each gets its own back.
    """
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def _own_data_state(data: Any, where: Any, step: int) -> Any:
    """This process's entry of a stored ``data`` item (see _gather_json)."""
    if not isinstance(data, Mapping) or "data_states" not in data:
        raise ValueError(
            f"Checkpointer.restore: step {step} in {where} has no valid data item (got {data!r})"
        )
    states, count = data["data_states"], data.get("process_count", 1)
    if count != jax.process_count():
        # The input is sharded by process: another process count means other shards, whose
        # positions cannot be carried over. The trainer then restarts the input pipeline.
        log.warning(
            "Checkpointer.restore: step %d was saved by %d processes, this run has %d: "
            "the input iterator state is not restored (data_state=None)",
            step,
            count,
            jax.process_count(),
        )
        return None
    return _decode_json(states[jax.process_index()])


def _atomic_write_text(path: epath.Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)  # overwrites (epath rename refuses an existing destination)


def _abstract(leaf: Any) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    return ocp.utils.to_shape_dtype_struct(leaf)


# --------------------------------------------------------------------------------------------------
# Checkpointer


class Checkpointer:
    """Periodic, latest and best checkpoints of a training run under ``workdir``.

    Args:
      workdir: the run's directory; checkpoints go to ``workdir/checkpoints`` and ``workdir/best``.
      keep: how many periodic checkpoints to keep (the newest ones; ``max_to_keep``).
      best_metric: name of the metric in the ``metrics`` dicts that selects the best checkpoint
        (e.g. ``"mIoU"``); None disables ``workdir/best``.
      best_mode: ``"max"`` (larger is better) or ``"min"``.
      async_save: let orbax write in a background thread. ``save`` still copies the arrays to the
        host before it returns, so the caller may donate/overwrite its buffers right away.

    The state is any pytree of ``jax.Array`` / numpy arrays / scalars (the trainer's ``TrainState``:
    step, params, batch_stats, opt_state, ema_params, rng key *data* as uint32). Typed PRNG keys must
    be stored as ``jax.random.key_data``. See the module docstring for multi-process use.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 1:
            raise ValueError(f"Checkpointer: keep must be an integer >= 1, got {keep!r}")
        if best_mode not in _BEST_MODES:
            raise ValueError(
                f"Checkpointer: best_mode must be one of {_BEST_MODES}, got {best_mode!r}"
            )
        if best_metric is not None and (not isinstance(best_metric, str) or not best_metric):
            raise ValueError(
                f"Checkpointer: best_metric must be a metric name (str) or None, got {best_metric!r}"
            )
        self.workdir = _path(workdir)
        self.keep = int(keep)
        self.best_metric = best_metric
        self.best_mode = best_mode

        def options(prefix, **kw):
            return ocp.CheckpointManagerOptions(
                create=True,
                # Both managers may save the same step at once; multi-process barriers are keyed by
                # step, so without distinct prefixes their barriers collide and the save hangs.
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=prefix
                ),
                # A save killed half-way leaves a "<step>.orbax-checkpoint-tmp-*" directory; it is
                # never listed as a step and is removed when a manager is opened again.
                cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save,
                **kw,
            )

        self._periodic = ocp.CheckpointManager(
            self.workdir / CHECKPOINT_DIR,
            options=options(CHECKPOINT_DIR, max_to_keep=self.keep),
            item_handlers=self._handlers(),
        )
        self._best = None
        self._best_cache: tuple[int | None, float | None] | None = None
        if best_metric is not None:
            # best_fn lets orbax keep the best of {old best, new} when it prunes to max_to_keep=1;
            # whether to save at all is decided in save_best (a worse checkpoint is never written).
            self._best = ocp.CheckpointManager(
                self.workdir / BEST_DIR,
                options=options(
                    BEST_DIR, max_to_keep=1, best_fn=self._metric_value, best_mode=best_mode
                ),
                item_handlers=self._handlers(),
            )

    @staticmethod
    def _handlers() -> dict[str, Any]:
        # Registered up front so that a fresh manager (a restart) can read item metadata.
        return {
            _STATE: ocp.StandardCheckpointHandler(),
            _DATA: ocp.JsonCheckpointHandler(),
            _META: ocp.JsonCheckpointHandler(),
        }

    # ---- queries

    def latest_step(self) -> int | None:
        """The newest periodic checkpoint's step, or None when there is none.

        Includes a step still being written by this process (async); after a restart only complete
        steps count (a save killed half-way is never listed).
        """
        return self._periodic.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the periodic checkpoints (as :meth:`latest_step`), ascending."""
        return sorted(self._periodic.all_steps())

    def best_step(self) -> int | None:
        """Step of the best checkpoint (None when there is none or best is disabled)."""
        return self._best_record()[0]

    def best_value(self) -> float | None:
        """``best_metric`` of the best checkpoint (read from ``workdir/best`` at start, so it survives restarts)."""
        return self._best_record()[1]

    def _best_record(self) -> tuple[int | None, float | None]:
        # Kept in memory after the first read: an async save_best is not listed by the manager until
        # it is finalised, so re-reading the directory could compare against a stale best.
        if self._best is None:
            return None, None
        if self._best_cache is None:
            step, value = None, None
            if self._best.all_steps():
                step = self._best.best_step()
                metrics = self._best.metrics(step)
                value = None if metrics is None else self._metric_value(metrics)
            self._best_cache = (step, value)
        return self._best_cache

    def is_better(self, metrics: Mapping[str, Any]) -> bool:
        """Whether ``metrics`` beats the stored best (a NaN/inf value never does)."""
        value = self._metric_value(metrics)
        if not math.isfinite(value):
            return False
        best = self.best_value()
        if best is None:
            return True
        return value > best if self.best_mode == "max" else value < best

    def _metric_value(self, metrics: Mapping[str, Any]) -> float:
        if self.best_metric is None:
            raise ValueError("Checkpointer: best_metric is None, so there is no best checkpoint")
        if not isinstance(metrics, Mapping) or self.best_metric not in metrics:
            keys = sorted(metrics) if isinstance(metrics, Mapping) else type(metrics).__name__
            raise ValueError(
                f"Checkpointer: metrics lack best_metric {self.best_metric!r}; got keys {keys}"
            )
        value = metrics[self.best_metric]
        try:
            return float(np.asarray(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"Checkpointer: metric {self.best_metric!r} must be a number, got {value!r}"
            ) from exc

    # ---- saving

    @staticmethod
    def _args(state, data_state, meta) -> ocp.args.Composite:
        if not isinstance(meta, Mapping):
            raise TypeError(
                f"Checkpointer.save: meta must be a JSON dict, got {type(meta).__name__}"
            )
        if data_state is not None and not isinstance(data_state, (Mapping, bytes, bytearray)):
            raise TypeError(
                f"Checkpointer.save: data_state must be a dict (grain iterator get_state()), bytes or None, "
                f"got {type(data_state).__name__}"
            )
        keys = [
            k
            for k, leaf in _flat_with_names(state).items()
            if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        ]
        if keys:
            raise TypeError(
                f"Checkpointer.save: typed PRNG keys cannot be stored, save jax.random.key_data(key) instead: {keys}"
            )
        # Encoded here, not in orbax's background thread, so a bad value fails at the call site.
        data = {
            "process_count": jax.process_count(),
            "data_states": _gather_json(_encode_json(data_state, "data_state")),
        }
        meta = _encode_json(dict(meta), "meta")
        json.dumps(meta)
        return ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state),
                _DATA: ocp.args.JsonSave(data),
                _META: ocp.args.JsonSave(meta),
            }
        )

    @staticmethod
    def _check_step(step) -> int:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"Checkpointer: step must be an integer >= 0, got {step!r}")
        return int(step)

    def save(
        self,
        step: int,
        *,
        state: Any,
        data_state: Mapping | bytes | None,
        meta: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save a periodic checkpoint at ``step``; returns whether it was written.

        A step at or before the latest checkpoint is skipped (False), e.g. the final save of a run
        whose last periodic save fell on the same step. ``force=True`` writes it anyway (a run
        resumed from an older step), replacing a checkpoint of the same step. With ``metrics`` (and a
        ``best_metric``), :meth:`save_best` is called too. Orbax prunes to the newest ``keep``.
        Every process must call this (see the module docstring).
        """
        step = self._check_step(step)
        args = self._args(state, data_state, meta)
        if force and step in self._periodic.all_steps():
            log.warning("Checkpointer: replacing the existing checkpoint of step %d", step)
            self._periodic.delete(step)
        newer = [s for s in self._periodic.all_steps() if s > step]
        if force and newer:
            log.warning(
                "Checkpointer: saving step %d although newer checkpoints %s exist (latest stays %d)",
                step,
                newer,
                max(newer),
            )
        saved = bool(self._periodic.save(step, args=args, force=force))
        if metrics is not None and self._best is not None:
            self.save_best(step, state=state, data_state=data_state, meta=meta, metrics=metrics)
        return saved

    def save_best(
        self,
        step: int,
        *,
        state: Any,
        data_state: Mapping | bytes | None,
        meta: Mapping[str, Any],
        metrics: Mapping[str, Any],
    ) -> bool:
        """Save into ``workdir/best`` if ``metrics[best_metric]`` beats the stored best; returns whether it did.

        The previous best is then deleted (one checkpoint is kept). The comparison is strict, so a tie
        keeps the earlier checkpoint. All processes must call this with the same (global) metrics.
        """
        if self._best is None:
            raise ValueError(
                "Checkpointer.save_best: the Checkpointer was created with best_metric=None"
            )
        step = self._check_step(step)
        args = self._args(state, data_state, meta)
        if not self.is_better(metrics):
            return False
        clean = _encode_json(dict(metrics), "metrics")
        if step in self._best.all_steps():  # re-evaluated after a restart and better now
            self._best.delete(step)
        # force: the best may be a step before the stored one (restarted from an older checkpoint).
        saved = bool(self._best.save(step, args=args, metrics=clean, force=True))
        if saved:
            self._best_cache = (step, self._metric_value(metrics))
        return saved

    # ---- restoring

    def _state_problems(self, manager, step: int, abstract: Any) -> list[str]:
        """Differences between the stored state's tree and ``abstract``: missing/unexpected leaves, shapes, dtypes."""
        try:
            stored = manager.item_metadata(step)[_STATE].tree
        except Exception:  # metadata layout is orbax-internal: fall back on orbax's own checks
            return []
        is_meta_leaf = lambda x: not isinstance(x, (dict, list, tuple)) and x is not None  # noqa: E731
        have = _flat_with_names(stored, is_leaf=is_meta_leaf)
        want = _flat_with_names(abstract)
        problems = [f"{k}: missing in the checkpoint" for k in sorted(set(want) - set(have))]
        problems += [
            f"{k}: in the checkpoint but not in abstract_state"
            for k in sorted(set(have) - set(want))
        ]
        for k in sorted(set(want) & set(have)):
            w, h = want[k], have[k]
            h_shape = tuple(getattr(h, "shape", None) or ())
            if tuple(w.shape) != h_shape:
                problems.append(
                    f"{k}: shape {h_shape} in the checkpoint, {tuple(w.shape)} in abstract_state"
                )
            elif (
                isinstance(h, ocp.metadata.ArrayMetadata)
                # Python scalars are stored as 64-bit and come back in the abstract (weak) dtype.
                and not isinstance(h, ocp.metadata.ScalarMetadata)
                and np.dtype(h.dtype) != np.dtype(w.dtype)
            ):
                # Orbax would cast silently; a dtype change means the model/config changed.
                problems.append(
                    f"{k}: dtype {np.dtype(h.dtype).name} in the checkpoint, {np.dtype(w.dtype).name} in abstract_state"
                )
        return problems

    def restore(self, step: int | None = None, *, abstract_state: Any, best: bool = False):
        """Restore ``(state, data_state, meta)`` from ``step`` (None: the latest, or the best with ``best=True``).

        ``abstract_state``: the state's structure with shapes/dtypes (and shardings, which the
        restored arrays get), e.g. ``jax.eval_shape(init_fn)`` or
        ``jax.tree.map(ocp.utils.to_shape_dtype_struct, state)``; concrete arrays are accepted too.
        Raises FileNotFoundError when there is no checkpoint, ValueError for an unknown step or a
        state that does not fit (listing each differing leaf: missing, unexpected, shape, dtype).
        Python scalars in the state come back as 0-d numpy arrays. ``data_state`` is this
        process's own (each process saves the state of its input shard), as saved except that
        tuples become lists (JSON); it is None when the checkpoint was written by a different number
        of processes (the shards differ, so the input pipeline must start afresh; a warning is logged).
        """
        manager = self._best if best else self._periodic
        where = self.workdir / (BEST_DIR if best else CHECKPOINT_DIR)
        if manager is None:
            raise ValueError(
                "Checkpointer.restore: best=True but the Checkpointer was created with best_metric=None"
            )
        manager.wait_until_finished()  # a step being saved asynchronously is not listed yet
        steps = sorted(manager.all_steps())
        if step is None:
            if not steps:
                raise FileNotFoundError(f"Checkpointer.restore: no checkpoint in {where}")
            step = self.best_step() if best else steps[-1]
        step = self._check_step(step)
        if step not in steps:
            raise ValueError(
                f"Checkpointer.restore: no checkpoint of step {step} in {where}; available steps: {steps}"
            )
        abstract = jax.tree.map(_abstract, abstract_state)
        problems = self._state_problems(manager, step, abstract)
        if problems:
            raise ValueError(
                f"Checkpointer.restore: the checkpoint of step {step} in {where} does not fit abstract_state "
                f"({len(problems)} differences):\n  " + "\n  ".join(problems)
            )
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardRestore(abstract),
                _DATA: ocp.args.JsonRestore(),
                _META: ocp.args.JsonRestore(),
            }
        )
        try:
            restored = manager.restore(step, args=args)
        except Exception as exc:
            raise ValueError(
                f"Checkpointer.restore: could not restore step {step} from {where} into abstract_state "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        return (
            restored[_STATE],
            _own_data_state(restored[_DATA], where, step),
            _decode_json(restored[_META] or {}),
        )

    # ---- lifecycle

    def wait(self) -> None:
        """Block until every pending (async) save is on disk (``wait_until_finished``)."""
        self._periodic.wait_until_finished()
        if self._best is not None:
            self._best.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the managers."""
        self.wait()
        self._periodic.close()
        if self._best is not None:
            self._best.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Config compatibility


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


_ABSENT = "<absent>"


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


# --------------------------------------------------------------------------------------------------
# Graceful shutdown


class GracefulShutdown:
    """Context manager turning SIGTERM/SIGINT into a stop request the train loop polls.

    Inside the context the signals set :attr:`requested` (and :attr:`signal_name`, the first signal
    received) instead of killing the process; the loop then saves a checkpoint and exits. A second
    SIGINT while a stop is pending raises KeyboardInterrupt (force quit). On exit the previous
    handlers are restored. Signal handlers can only be installed from the main thread; elsewhere
    the context installs nothing (:attr:`installed` is False) and only :meth:`request` sets the flag.

    Example::

        with GracefulShutdown() as stop:
            for step in ...:
                ...
                if stop.should_stop():
                    ckpt.save(step, ...); break
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.requested = False
        self.signal_name: str | None = None
        self.installed = False
        self._previous: dict[signal.Signals, Any] = {}

    def request(self, reason: str = "request") -> None:
        """Ask for a stop without a signal (``signal_name`` is set to ``reason`` if none came yet)."""
        if not self.requested:
            self.signal_name = reason
        self.requested = True

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name} while a stop ({self.signal_name}) was pending")
        if not self.requested:
            log.warning(
                "%s received: stopping after the current step (send SIGINT again to force quit)",
                name,
            )
        self.request(name)

    def should_stop(self) -> bool:
        """Whether any process has a stop request; a collective in multi-process runs.

        Every process must call it at the same steps (it all-gathers the flags), so that all of
        them save the final checkpoint together. With one process it is just :attr:`requested`.
        """
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))

    def __enter__(self) -> GracefulShutdown:
        if threading.current_thread() is not threading.main_thread():
            log.warning("GracefulShutdown: not in the main thread, signal handlers not installed")
            return self
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)
        self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            # getsignal gives None for a handler not installed from Python: fall back on the default.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
        self.installed = False
