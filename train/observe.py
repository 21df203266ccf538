"""Trainer observability: progress bar, TensorBoard scalars, a JSONL metrics log, a run summary and
segmentation prediction PNGs. No TensorFlow and no ``clu.metric_writers`` (they import TF).

Process 0 writes, under ``workdir``: ``metrics.jsonl`` (one flushed line per ``log_train`` /
``log_eval``: ``{"step", "split", "time", **metrics}``; non-finite floats are ``null``, so every line
is strict JSON), ``tb/events.out.tfevents.*`` (scalars ``train/<key>``, ``eval/<key>``; flushed on
every eval, every 30 s of logging and on close), ``summary.json`` and ``samples/step_XXXXXXX.png``.

On resume, ``metrics.jsonl`` rows with ``step > start_step`` (work lost with the killed run) and a
partial last line are dropped; TensorBoard hides the same steps with a ``SessionLog.START`` event at
``start_step + 1`` (as ``SummaryWriter(purge_step=...)``); the best eval metric is restored from the
kept rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from jaxenc.validation import check_step, is_int
from train.data.palette import voc_palette

__all__ = ["Observer", "read_metrics", "save_segmentation_samples", "voc_palette"]

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TB_DIR = "tb"
SAMPLES_DIR = "samples"
NO_PROGRESS_ENV = "JAXENC_NO_PROGRESS"
_RESERVED = ("step", "split", "time")

# Indirection so tests can drive the clock; durations use a monotonic clock, rows use wall time.
_now = time.perf_counter
_wall = time.time


def _env_disables_progress() -> bool:
    return os.environ.get(NO_PROGRESS_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _numeric_dtype(dtype: Any) -> bool:
    # bfloat16 / float8 (ml_dtypes) report kind "V", hence the name check.
    dt = np.dtype(dtype)
    return dt.kind in "biuf" or "float" in dt.name


def _is_scalar(value: Any) -> bool:
    """True for Python/NumPy numbers and 0-d numeric arrays (jax scalars included); not for str."""
    if isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
        return True
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    return shape == () and dtype is not None and _numeric_dtype(dtype)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _jsonable(value: Any, key: str) -> Any:
    """Converts a metric value to strict-JSON data: bool, int, float (non-finite -> None), str, None,
    nested lists/dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if _is_scalar(value):
        return _finite_or_none(float(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, key) for v in value]
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):  # numpy / jax arrays
        arr = np.asarray(value)
        if _numeric_dtype(arr.dtype):
            return _jsonable(arr.astype(np.float64).tolist(), key)
    raise TypeError(
        f"metric {key!r}: expected a number, a string or a (nested) list/array of numbers, "
        f"got {type(value).__name__}"
    )


def _check_metrics(metrics: Any, arg: str) -> None:
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"{arg}: expected a dict of metric name -> value, got {type(metrics).__name__}"
        )
    for k in metrics:
        if not isinstance(k, str) or not k:
            raise ValueError(f"{arg}: metric names must be non-empty strings, got {k!r}")
        if k in _RESERVED:
            raise ValueError(f"{arg}: metric name {k!r} is reserved (reserved: {_RESERVED})")


def _fmt(value: float | None) -> str:
    if value is None:
        return "nan"
    return f"{value:.4g}"


def _check_counts(counts: Any, metrics: Mapping[str, Any]) -> dict[str, int]:
    """``counts`` (None or a dict of name -> non-negative int, names apart from ``metrics``')."""
    if counts is None:
        return {}
    _check_metrics(counts, "counts")
    out = {}
    for k, v in counts.items():
        if k in metrics:
            raise ValueError(f"counts: {k!r} is also a metric name")
        if not is_int(v) or v < 0:
            raise ValueError(f"counts[{k!r}]: expected a non-negative int, got {v!r}")
        out[k] = int(v)
    return out


def _json_dumps(row: Mapping[str, Any]) -> str:
    return json.dumps(row, allow_nan=False, separators=(",", ":"))


def read_metrics(workdir: str | os.PathLike, split: str | None = None) -> list[dict]:
    """Reads ``workdir/metrics.jsonl`` back as a list of dicts in file (= step) order.

    ``split`` ("train" or "eval") keeps only those rows. A missing file gives ``[]``. A truncated last
    line (a run killed mid-write) is skipped; a malformed line elsewhere raises ValueError naming it.
    Non-finite values come back as ``None`` (see the module docstring).
    """
    if split not in (None, "train", "eval"):
        raise ValueError(f"split: expected None, 'train' or 'eval', got {split!r}")
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # partial write from a killed process
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e})") from None
        if split is None or row.get("split") == split:
            rows.append(row)
    return rows


class _ScalarEventWriter:
    """Synchronous TensorBoard scalar writer on tensorboardX's ``EventsWriter`` and protos.

    Not ``tensorboardX.SummaryWriter`` (2.6.5): its ``flush()`` leaves events queued for its writer
    thread (a killed run loses them), and two writers opened in the same second share a file name.
    Here events are written in the caller's thread and the file name carries the pid and a random tag.
    """

    FLUSH_SECS = 30.0  # also flush during long training phases so TensorBoard stays live

    def __init__(self, logdir: Path, *, purge_step: int):
        # Imported here: importing tensorboardX imports torch when installed (seconds), and non-main
        # processes never need it.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary

        self._Event, self._Summary = Event, Summary
        logdir.mkdir(parents=True, exist_ok=True)
        suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._writer = EventsWriter(str(logdir / "events"), filename_suffix=suffix)
        # SessionLog.START at step s makes TensorBoard drop older events with step >= s (what
        # SummaryWriter(purge_step=s) writes): the steps a killed run logged after its checkpoint.
        self._writer.write_event(
            Event(
                wall_time=_wall(), step=purge_step, session_log=SessionLog(status=SessionLog.START)
            )
        )
        self.flush()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        summ = self._Summary(value=[self._Summary.Value(tag=tag, simple_value=float(value))])
        self._writer.write_event(self._Event(wall_time=_wall(), step=int(step), summary=summ))
        if _now() - self._last_flush > self.FLUSH_SECS:
            self.flush()

    def flush(self) -> None:
        self._writer.flush()  # file flush + fsync
        self._last_flush = _now()

    def close(self) -> None:
        self._writer.close()


class Observer:
    """Progress bar + TensorBoard + JSONL logging for one training run; use as a context manager.

    Args:
      workdir: run directory.
      total_steps: optimiser steps of the whole run (progress bar total).
      start_step: step the run (re)starts from; > 0 on resume (see the module docstring).
      is_main: only the main process (``jax.process_index() == 0``) writes or prints; on the others
        every method is a no-op that returns the same types.
      progress: show a tqdm bar; also off when ``$JAXENC_NO_PROGRESS`` is set (1/true/yes) or
        ``stream`` is not a terminal, and then each ``log_train`` prints one line. ``log_eval`` and
        ``log_text`` always print a line.
      stream: text stream for the bar and lines (default ``sys.stderr``).
      best_metric: eval metric whose best (highest) value is tracked, e.g. "mIoU" or "top1".

    On resume only the main process reads the best metric back. ``log_train`` throughput excludes time
    spent in ``with observer.paused():`` blocks (wrap eval and checkpointing in it).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        is_main: bool = True,
        progress: bool = True,
        stream: TextIO | None = None,
        best_metric: str | None = None,
    ):
        if not is_int(total_steps) or total_steps < 1:
            raise ValueError(f"total_steps: expected a positive int, got {total_steps!r}")
        if not is_int(start_step) or not 0 <= start_step <= total_steps:
            raise ValueError(
                f"start_step: expected an int in [0, total_steps={total_steps}], got {start_step!r}"
            )
        if best_metric is not None and (not isinstance(best_metric, str) or not best_metric):
            raise ValueError(f"best_metric: expected None or a metric name, got {best_metric!r}")
        self.workdir = Path(workdir)
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.is_main = bool(is_main)
        self.best_metric = best_metric
        self._stream = stream if stream is not None else sys.stderr
        self.progress_enabled = (
            self.is_main
            and bool(progress)
            and not _env_disables_progress()
            and bool(getattr(self._stream, "isatty", lambda: False)())
        )

        # Run statistics, tracked on every process so the API returns the same values everywhere.
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.last_step = self.start_step
        self._last_train_step = self.start_step
        self._train_examples = 0
        self._train_seconds = 0.0
        self._steady_examples = 0  # excludes the first interval (jit compilation)
        self._steady_seconds = 0.0
        self._n_intervals = 0
        self._paused_seconds = 0.0
        self._t_start = self._t_last = _now()
        self._closed = False

        self._jsonl = None
        self._tb = None
        self._bar = None
        if self.is_main:
            self._open()

    # ------------------------------------------------------------------ setup / teardown
    def _open(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / METRICS_FILE
        if path.exists():
            self._truncate_and_restore(path)
        self._jsonl = open(path, "a", encoding="utf-8")
        self._tb = _ScalarEventWriter(self.workdir / TB_DIR, purge_step=self.start_step + 1)
        if self.progress_enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total_steps,
                initial=self.start_step,
                file=self._stream,
                unit="step",
                mininterval=1.0,
                dynamic_ncols=True,
                leave=True,
            )

    def _truncate_and_restore(self, path: Path) -> None:
        """Drops rows after ``start_step`` (lost work of a killed run) and restores the best metric."""
        keep = [r for r in read_metrics(self.workdir) if int(r.get("step", 0)) <= self.start_step]
        # Always rewritten (small file): this also drops a partial last line, which the next append
        # would otherwise glue to a new row.
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(_json_dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a crash here leaves the old or the new file, never half
        for r in keep:
            if r.get("split") == "eval":
                self._update_best(int(r["step"]), r)

    def close(self) -> None:
        """Flushes and closes the bar, the TensorBoard writer and the JSONL file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()  # flushes
        if self._jsonl is not None:
            self._jsonl.close()

    def __enter__(self) -> Observer:
        self._t_start = self._t_last = _now()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ output helpers
    def _print(self, msg: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(msg, file=self._stream)
        else:
            print(msg, file=self._stream, flush=True)

    def _write_row(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        row = {"step": step, "split": split, "time": _wall()}
        row.update({k: _jsonable(v, k) for k, v in metrics.items()})
        self._jsonl.write(_json_dumps(row) + "\n")
        self._jsonl.flush()  # one line per log call: cheap, and a killed run keeps every row

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"Observer.{what} called after close()")

    def _update_best(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.best_metric is None or self.best_metric not in metrics:
            return
        value = metrics[self.best_metric]
        if value is None or not _is_scalar(value) or not math.isfinite(float(value)):
            return
        if self.best_value is None or float(value) > self.best_value:
            self.best_value, self.best_step = float(value), step

    # ------------------------------------------------------------------ public logging API
    @contextlib.contextmanager
    def paused(self):
        """Excludes the time spent in the block (eval, checkpointing) from training throughput."""
        t0 = _now()
        try:
            yield
        finally:
            self._paused_seconds += _now() - t0

    def log_train(
        self,
        step: int,
        metrics: Mapping[str, Any],
        *,
        examples: int,
        counts: Mapping[str, int] | None = None,
    ) -> dict[str, float]:
        """Logs averaged training scalars for ``step`` (e.g. ``{"loss": .., "lr": ..}``).

        ``examples``: number of examples (global batch x steps) processed since the previous call.
        Adds ``examples_per_sec`` and ``steps_per_sec`` (wall time since the previous call minus
        ``paused()`` time) and returns them. Values must be scalars; steps must increase.
        ``counts`` (e.g. ``{"skipped_examples": 2}``): non-negative ints written as ints to the JSONL
        row and TensorBoard, printed only when non-zero.
        """
        self._check_open("log_train")
        step = check_step(step, "step", "Observer")
        _check_metrics(metrics, "metrics")
        counts = _check_counts(counts, metrics)
        for k, v in metrics.items():
            if not _is_scalar(v):
                raise ValueError(
                    f"metrics[{k!r}]: log_train takes scalars only, got {type(v).__name__}"
                    f"{' of shape ' + str(np.shape(v)) if hasattr(v, 'shape') else ''}"
                )
        if not is_int(examples) or examples < 0:
            raise ValueError(f"examples: expected a non-negative int, got {examples!r}")
        if self._n_intervals > 0 and step <= self._last_train_step:
            raise ValueError(
                f"step: expected > previous log_train step {self._last_train_step}, got {step}"
            )
        if step < self.start_step:
            raise ValueError(f"step: expected >= start_step {self.start_step}, got {step}")

        now = _now()
        dt = max(now - self._t_last - self._paused_seconds, 1e-9)
        n_steps = max(step - self._last_train_step, 0)
        rates = {"examples_per_sec": examples / dt, "steps_per_sec": n_steps / dt}
        if self._n_intervals > 0:
            self._steady_examples += examples
            self._steady_seconds += dt
        self._train_examples += int(examples)
        self._train_seconds += dt
        self._n_intervals += 1
        self._t_last, self._paused_seconds = now, 0.0
        self._last_train_step = step
        self.last_step = max(self.last_step, step)
        values = {k: float(v) for k, v in metrics.items()}
        values.update(rates)
        if not self.is_main:
            return rates

        self._write_row(step, "train", {**values, **counts})
        for k, v in {**values, **counts}.items():
            self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            self._bar.update(max(step - self._bar.n, 0))
            post = {k: _fmt(v) for k, v in values.items() if k in ("loss", "lr")}
            post["ex/s"] = f"{rates['examples_per_sec']:.1f}"
            post["steps/s"] = f"{rates['steps_per_sec']:.2f}"
            self._bar.set_postfix(post, refresh=False)
        else:
            parts = [f"step {step}/{self.total_steps}"]
            parts += [f"{k} {_fmt(_finite_or_none(v))}" for k, v in metrics.items()]
            parts += [f"{k} {v}" for k, v in counts.items() if v]
            parts += [
                f"{rates['examples_per_sec']:.1f} ex/s",
                f"{rates['steps_per_sec']:.2f} steps/s",
            ]
            self._print(" | ".join(parts))
        return rates

    def log_eval(
        self, step: int, metrics: Mapping[str, Any], *, counts: Mapping[str, int] | None = None
    ) -> None:
        """Logs evaluation metrics for ``step``: scalars (pixAcc, mIoU, top1, ...) go to TensorBoard,
        the JSONL and the printed line; non-scalars (per-class IoU list/array) only to the JSONL.
        ``counts`` as in ``log_train``. Flushes both files so a killed run keeps its metrics."""
        self._check_open("log_eval")
        step = check_step(step, "step", "Observer")
        _check_metrics(metrics, "metrics")
        counts = _check_counts(counts, metrics)
        scalars = {k: float(v) for k, v in metrics.items() if _is_scalar(v)}
        payload = {k: _jsonable(v, k) for k, v in metrics.items()}  # validates before writing
        self._update_best(step, scalars)
        self.last_step = max(self.last_step, step)
        if not self.is_main:
            return
        self._write_row(step, "eval", {**payload, **counts})
        for k, v in {**scalars, **counts}.items():
            self._tb.add_scalar(f"eval/{k}", v, step)
        self._tb.flush()
        parts = [f"eval step {step}"] + [
            f"{k} {_fmt(_finite_or_none(v))}" for k, v in scalars.items()
        ]
        parts += [f"{k} {v}" for k, v in counts.items() if v]
        if self.best_value is not None:
            parts.append(f"best {self.best_metric} {_fmt(self.best_value)} @ {self.best_step}")
        self._print(" | ".join(parts))

    def log_text(self, msg: str) -> None:
        """Prints a plain message on the main process (through the bar so it is not garbled)."""
        self._print(str(msg))

    def save_samples(self, step: int, images, masks, preds, **kwargs) -> Path | None:
        """``save_segmentation_samples`` to ``workdir/samples/step_XXXXXXX.png`` on the main process;
        returns the path (``None`` on other processes)."""
        step = check_step(step, "step", "Observer")
        if not self.is_main:
            return None
        path = self.workdir / SAMPLES_DIR / f"step_{step:07d}.png"
        return save_segmentation_samples(path, images, masks, preds, **kwargs)

    # ------------------------------------------------------------------ summary
    def summary(
        self,
        final: Mapping[str, Any],
        *,
        config_name: str | None = None,
        skipped_examples: Mapping[str, int] | None = None,
    ) -> str:
        """Writes ``workdir/summary.json`` and prints/returns an aligned table.

        summary.json: ``{"config", "steps", "start_step", "total_steps", "wall_time_s",
        "examples_per_sec", "examples_per_sec_steady", "best": {"metric", "value", "step"} | None,
        "final": {...}}``, plus ``"skipped_examples": {"train": n, "eval": m}`` when given (bad
        input examples skipped; the table shows them when non-zero). ``examples_per_sec`` averages over all logged training intervals (paused
        time excluded); ``..._steady`` leaves out the first interval, which holds jit compilation
        (``None`` with fewer than two intervals). ``best`` needs ``best_metric`` (constructor).
        ``final`` may hold any JSON-able values (numbers, str, bool, None, lists such as per-class
        IoU); the table shows the non-list ones. Non-finite values are ``null``.
        """
        if not isinstance(final, Mapping) or not all(isinstance(k, str) for k in final):
            raise TypeError(f"final: expected a dict with str keys, got {type(final).__name__}")
        payload = {k: _jsonable(v, k) for k, v in final.items()}
        skipped = None if skipped_examples is None else _check_counts(skipped_examples, {})
        wall = _now() - self._t_start
        info = {
            "config": config_name,
            "steps": self.last_step,
            "start_step": self.start_step,
            "total_steps": self.total_steps,
            "wall_time_s": wall,
            "examples_per_sec": (self._train_examples / self._train_seconds)
            if self._train_seconds
            else None,
            "examples_per_sec_steady": (self._steady_examples / self._steady_seconds)
            if self._steady_seconds
            else None,
            "best": None
            if self.best_value is None
            else {"metric": self.best_metric, "value": self.best_value, "step": self.best_step},
            "final": payload,
        }
        if skipped is not None:
            info["skipped_examples"] = skipped
        rows = []
        if config_name is not None:
            rows.append(("config", str(config_name)))
        rows += [
            ("steps", f"{self.last_step}/{self.total_steps}"),
            ("wall time (s)", f"{wall:.1f}"),
        ]
        if info["examples_per_sec"] is not None:
            rows.append(("examples/s", f"{info['examples_per_sec']:.1f}"))
        if info["examples_per_sec_steady"] is not None:
            rows.append(("examples/s (steady)", f"{info['examples_per_sec_steady']:.1f}"))
        if info["best"] is not None:
            rows.append(
                (f"best {self.best_metric}", f"{_fmt(self.best_value)} (step {self.best_step})")
            )
        if skipped and any(skipped.values()):
            rows.append(("skipped examples", ", ".join(f"{k} {v}" for k, v in skipped.items())))
        rows += [
            (f"final {k}", "n/a" if v is None else v if isinstance(v, str) else _fmt(v))
            for k, v in payload.items()
            if not isinstance(v, (list, dict))
        ]
        width = max(len(name) for name, _ in rows)
        table = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
        if self.is_main:
            path = self.workdir / SUMMARY_FILE
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(info, indent=2, allow_nan=False) + "\n", encoding="utf-8")
            os.replace(tmp, path)
            self._print(table)
        return table


# ---------------------------------------------------------------------- prediction PNGs
def _as_palette(palette) -> np.ndarray:
    pal = np.asarray(palette)
    if pal.ndim == 1 and pal.size % 3 == 0 and pal.size > 0:
        pal = pal.reshape(-1, 3)  # flat PIL-style [r0, g0, b0, r1, ...]
    if pal.ndim != 2 or pal.shape[1] != 3 or pal.shape[0] == 0 or pal.dtype.kind not in "iuf":
        raise ValueError(
            f"palette: expected (num_classes, 3) or a flat list of 3*num_classes RGB values, "
            f"got shape {np.shape(palette)}"
        )
    if pal.min() < 0 or pal.max() > 255:
        raise ValueError(
            f"palette: RGB values must be in [0, 255], got range [{pal.min()}, {pal.max()}]"
        )
    return pal.astype(np.uint8)


def _colorize(
    labels: np.ndarray, pal: np.ndarray, ignore_index: int, ignore_color: np.ndarray, name: str
) -> np.ndarray:
    ignore = labels == ignore_index
    bad = ~ignore & ((labels < 0) | (labels >= len(pal)))
    if bad.any():
        raise ValueError(
            f"{name}: labels must be in [0, {len(pal)}) (palette size) or "
            f"ignore_index={ignore_index}, got {int(labels[bad].flat[0])}"
        )
    out = pal[np.where(ignore, 0, labels)]
    out[ignore] = ignore_color
    return out


def save_segmentation_samples(
    path: str | os.PathLike,
    images,
    masks,
    preds,
    *,
    palette,
    mean: Sequence[float],
    std: Sequence[float],
    ignore_index: int = -1,
    max_rows: int = 8,
    ignore_color: Sequence[int] = (255, 255, 255),
) -> Path:
    """Saves one PNG with a row per sample: image | ground truth | prediction (each H x W).

    Args:
      images: (N, H, W, 3) float, normalised as ``(x - mean) / std``; de-normalised to uint8. ``mean``
        and ``std`` are per-channel; if every mean is <= 1 the source pixels are taken to be in
        [0, 1] (ImageNet defaults 0.485/0.229 style), otherwise in [0, 255].
      masks, preds: (N, H, W) integer class maps, coloured with ``palette`` ((K, 3) or flat 3K RGB);
        ``ignore_index`` pixels are drawn in ``ignore_color`` (white).
      max_rows: at most this many samples (the first ones) are drawn.
    Returns the path; the image is (rows*H, 3*W) pixels. Parent folders are created.
    """
    imgs = np.asarray(images)
    m = np.asarray(masks)
    p = np.asarray(preds)
    if imgs.ndim != 4 or imgs.shape[-1] != 3 or imgs.shape[0] == 0:
        raise ValueError(f"images: expected (N, H, W, 3) with N >= 1, got shape {imgs.shape}")
    if imgs.dtype.kind != "f":
        raise ValueError(f"images: expected a float array (normalised), got dtype {imgs.dtype}")
    for name, arr in (("masks", m), ("preds", p)):
        if arr.shape != imgs.shape[:3]:
            raise ValueError(
                f"{name}: expected shape (N, H, W) = {imgs.shape[:3]} matching images, "
                f"got {arr.shape}"
            )
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{name}: expected an integer array, got dtype {arr.dtype}")
    if not is_int(max_rows) or max_rows < 1:
        raise ValueError(f"max_rows: expected a positive int, got {max_rows!r}")
    mean_a = np.asarray(mean, np.float64)
    std_a = np.asarray(std, np.float64)
    if mean_a.shape != (3,):
        raise ValueError(f"mean: expected 3 per-channel values, got {mean!r}")
    if std_a.shape != (3,) or (std_a <= 0).any():
        raise ValueError(f"std: expected 3 positive per-channel values, got {std!r}")
    ign = np.asarray(ignore_color)
    if ign.shape != (3,) or ign.min() < 0 or ign.max() > 255:
        raise ValueError(f"ignore_color: expected an RGB triple in [0, 255], got {ignore_color!r}")
    pal = _as_palette(palette)

    n = min(imgs.shape[0], int(max_rows))
    imgs, m, p = imgs[:n].astype(np.float64), m[:n].astype(np.int64), p[:n].astype(np.int64)
    scale = 255.0 if (mean_a <= 1.0).all() else 1.0
    rgb = np.clip(np.rint((imgs * std_a + mean_a) * scale), 0, 255).astype(np.uint8)
    ign = ign.astype(np.uint8)
    gt = _colorize(m, pal, ignore_index, ign, "masks")
    pr = _colorize(p, pal, ignore_index, ign, "preds")
    grid = np.concatenate([rgb, gt, pr], axis=2)  # (n, H, 3W, 3)
    grid = grid.reshape(n * grid.shape[1], grid.shape[2], 3)

    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid, mode="RGB").save(path, format="PNG")
    return path
