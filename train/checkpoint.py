"""Checkpoints for the trainer: :class:`Checkpointer`, two orbax ``CheckpointManager`` s.

``workdir/checkpoints`` holds the periodic saves (the newest ``keep`` kept; "latest" is what a
restart resumes from) and ``workdir/best`` one checkpoint, the best value of ``best_metric`` so far.
Each checkpoint step holds three items: ``state`` (the train-state pytree, ``StandardSave``),
``data`` (the input-iterator state, grain's ``CheckpointHandler``: one JSON file per process) and
``meta`` (a JSON dict, e.g. the config hash; written by process 0, so it must be the same on all
processes). Orbax writes a step into a temporary directory and renames it when complete, so a save
killed half-way never becomes "latest"; stale temporary directories are removed on the next start.

Multi-process runs: every process must call :meth:`Checkpointer.save`, :meth:`~Checkpointer.save_best`,
:meth:`~Checkpointer.restore` and :meth:`~Checkpointer.wait` at the same steps with the same
arguments (the state being global ``jax.Array`` s) except ``data_state``, each process's own. Orbax
synchronises the processes (barriers), each process writes the shards it owns and its iterator
state, process 0 writes ``meta`` and finalises the step; skipping the call on one process
deadlocks the others. The config check (:func:`check_config`) and the stop flag
(:class:`GracefulShutdown`) live in train/run_config.py and train/shutdown.py, re-exported here.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxenc.models.weights import BEST_DIR, CHECKPOINT_DIR, STATE_ITEM
from jaxenc.validation import check_positive_int, check_step
from train.run_config import (
    CONFIG_FILE,
    PREVIOUS_CONFIG_FILE,
    RESUMABLE_CONFIG_KEYS,
    _path,
    check_config,
)
from train.shutdown import GracefulShutdown

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

# Item names inside one checkpoint step; the directory names and the state item are defined once,
# beside the reader of this layout (jaxenc.models.load_weights).
_STATE = STATE_ITEM
_DATA, _META = "data", "meta"
_BEST_MODES = ("max", "min")
# The per-process file grain's CheckpointHandler writes into the data item directory.
_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


# --------------------------------------------------------------------------------------------------
# Small helpers


def _keystr(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat_with_names(tree: Any, is_leaf=None) -> dict[str, Any]:
    """{"a/b/0": leaf} for every leaf (dict keys, sequence indices and attribute names joined by "/")."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {"/".join(_keystr(e) for e in path): leaf for path, leaf in flat}


def _to_json(value: Any, where: str) -> Any:
    """A JSON-able copy of ``value`` (numpy scalars become Python ones); TypeError naming the bad entry."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"{where}: JSON keys must be strings, got {k!r} ({type(k).__name__})"
                )
            out[k] = _to_json(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"{where}: expected JSON-serialisable data (dict/list/str/number/bool/None), got {type(value).__name__}"
    )


class _IteratorState(grain.DatasetIterator):
    """One process's input-iterator state as the item grain's ``CheckpointHandler`` saves and restores.

    The trainer saves the position captured before its next read (the batches the saved train
    state consumed), not the live iterator's, so the handler gets this snapshot. The file holds the
    JSON of a ``DatasetIterator`` state, a JSON string for a ``DataLoaderIterator``'s bytes state
    (``str`` is no iterator state, so the kind comes back) and ``null`` for no state.
    """

    def __init__(self, state: Any = None):
        super().__init__()
        self.state = state

    def __next__(self):
        raise StopIteration  # holds a position, yields nothing

    def get_state(self) -> Any:
        return self.state.decode() if isinstance(self.state, bytes) else self.state

    def set_state(self, state: Any) -> None:
        self.state = state.encode() if isinstance(state, str) else state


def _data_item(data_state: Any) -> _IteratorState:
    # Checked here, not in orbax's save, so a bad value fails at the call site.
    if isinstance(data_state, (bytes, bytearray)):
        try:
            bytes(data_state).decode()
        except UnicodeDecodeError as exc:
            raise TypeError(
                f"Checkpointer.save: a bytes data_state must be UTF-8 text (grain's DataLoader state is JSON): {exc}"
            ) from exc
        return _IteratorState(bytes(data_state))
    if data_state is not None and not isinstance(data_state, Mapping):
        raise TypeError(
            f"Checkpointer.save: data_state must be a dict (grain iterator get_state()), bytes or None, "
            f"got {type(data_state).__name__}"
        )
    return _IteratorState(_to_json(data_state, "data_state"))


def _has_own_data_state(item_dir: epath.Path, where: Any, step: int) -> bool:
    """Whether a step's data item holds a state for this process (grain's per-process file)."""
    index, count = jax.process_index(), jax.process_count()
    if (item_dir / f"process_{index}-of-{count}.json").exists():
        return True
    names = [p.name for p in item_dir.iterdir()] if item_dir.is_dir() else []
    counts = sorted({int(m[2]) for m in map(_DATA_FILE.fullmatch, names) if m})
    if not counts:
        raise ValueError(
            f"Checkpointer.restore: step {step} in {where} has no valid data item (got {names!r})"
        )
    # The input is sharded by process: another process count means other shards, whose
    # positions cannot be carried over. The trainer then restarts the input pipeline.
    log.warning(
        "Checkpointer.restore: step %d was saved by %d processes, this run has %d: "
        "the input iterator state is not restored (data_state=None)",
        step,
        counts[0],
        count,
    )
    return False


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
        keep = check_positive_int(keep, "keep", "Checkpointer")
        if best_mode not in _BEST_MODES:
            raise ValueError(
                f"Checkpointer: best_mode must be one of {_BEST_MODES}, got {best_mode!r}"
            )
        if best_metric is not None and (not isinstance(best_metric, str) or not best_metric):
            raise ValueError(
                f"Checkpointer: best_metric must be a metric name (str) or None, got {best_metric!r}"
            )
        self.workdir = _path(workdir)
        self.keep = keep
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
            _DATA: grain.checkpoint.CheckpointHandler(),
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
        # Converted here, not in orbax's background thread, so a bad value fails at the call site.
        return ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state),
                _DATA: grain.checkpoint.CheckpointSave(_data_item(data_state)),
                _META: ocp.args.JsonSave(_to_json(dict(meta), "meta")),
            }
        )

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
        step = check_step(step, "step", "Checkpointer")
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
        step = check_step(step, "step", "Checkpointer")
        args = self._args(state, data_state, meta)
        if not self.is_better(metrics):
            return False
        clean = _to_json(dict(metrics), "metrics")
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
        step = check_step(step, "step", "Checkpointer")
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
        items = {_STATE: ocp.args.StandardRestore(abstract), _META: ocp.args.JsonRestore()}
        # orbax's default step directory name is the step number.
        if _has_own_data_state(manager.directory / str(step) / _DATA, where, step):
            items[_DATA] = grain.checkpoint.CheckpointRestore(_IteratorState())
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as exc:
            raise ValueError(
                f"Checkpointer.restore: could not restore step {step} from {where} into abstract_state "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        data = restored[_DATA].state if _DATA in items else None
        return restored[_STATE], data, restored[_META] or {}

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
