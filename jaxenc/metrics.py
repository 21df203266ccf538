"""Evaluation metrics: pixel accuracy, mIoU and top-k accuracy (PyTorch-Encoding ``encoding/utils/metrics.py``).

Jit-friendly batch functions return **integer counts** (summable over devices, batches and
processes); :class:`SegmentationMetric` accumulates them on the host (int64) and scores the whole
dataset, as upstream: ``mIoU`` is the mean over **all** classes, absent ones scoring 0.
Class axis last (logits ``(B, H, W, C)``), integer targets ``(B, H, W)``, negative targets ignored;
``valid`` ``(B,)`` masks the padded tail of the last batch. Labels ``>= num_classes`` behave as
upstream: labeled, never correct, added to the predicted class's area (an error); map them to -1 in
the pipeline to ignore them. Batch counts are int32 (x64 off): at most 2**31 - 1 pixels per batch.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "pixel_accuracy_counts",
    "intersection_union_counts",
    "segmentation_counts",
    "topk_correct",
    "SegmentationMetric",
]

EPS = np.spacing(1)  # upstream's epsilon in every ratio
_STATE_KEYS = ("correct", "labeled", "inter", "pred_area", "label_area")


# ---------------------------------------------------------------------------------------------------
# input checks (static shapes/dtypes: run at trace time, free inside jit)


def _check_num_classes(num_classes, where: str) -> int:
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or num_classes < 1
    ):
        raise ValueError(f"{where}: num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _check_target(target, where: str, name: str = "target") -> jax.Array:
    target = jnp.asarray(target)
    if not jnp.issubdtype(target.dtype, jnp.integer):
        raise TypeError(
            f"{where}: {name} must be an integer array (class ids, negative = ignore), got dtype {target.dtype}"
        )
    if target.ndim < 1:
        raise ValueError(
            f"{where}: {name} must have a leading batch axis, got shape {tuple(target.shape)}"
        )
    return target


def _as_prediction(
    pred_or_logits, target: jax.Array, where: str, num_classes: int | None = None
) -> jax.Array:
    """Integer prediction with the target's shape: argmax over the last axis of logits, or the int input."""
    x = jnp.asarray(pred_or_logits)
    if x.ndim == target.ndim + 1:
        if x.shape[:-1] != target.shape:
            raise ValueError(
                f"{where}: logits {tuple(x.shape)} must be the target's shape {tuple(target.shape)} plus a "
                f"trailing class axis"
            )
        if num_classes is not None and x.shape[-1] != num_classes:
            raise ValueError(
                f"{where}: num_classes={num_classes} but the logits have {x.shape[-1]} classes on their last "
                f"axis (shape {tuple(x.shape)})"
            )
        return jnp.argmax(x, axis=-1)
    if x.ndim == target.ndim:
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(
                f"{where}: a prediction with the target's rank must be integer class ids, got dtype {x.dtype} "
                f"(logits need a trailing class axis: target shape {tuple(target.shape)} + (C,))"
            )
        if x.shape != target.shape:
            raise ValueError(
                f"{where}: prediction shape {tuple(x.shape)} does not match target shape {tuple(target.shape)}"
            )
        return x
    raise ValueError(
        f"{where}: expected logits of shape {tuple(target.shape)} + (C,) or an integer prediction of shape "
        f"{tuple(target.shape)}, got shape {tuple(x.shape)}"
    )


def _apply_valid(target: jax.Array, valid, where: str) -> jax.Array:
    """Mark every pixel of the invalid (padded) examples as ignored (-1)."""
    if valid is None:
        return target
    valid = jnp.asarray(valid)
    if valid.shape != target.shape[:1]:
        raise ValueError(
            f"{where}: valid must have shape (B,) = {tuple(target.shape[:1])} (one flag per example), got "
            f"shape {tuple(valid.shape)}"
        )
    keep = valid.astype(bool).reshape(valid.shape + (1,) * (target.ndim - 1))
    return jnp.where(keep, target, jnp.asarray(-1, target.dtype))


def _class_histogram(cls: jax.Array, keep: jax.Array, num_classes: int) -> jax.Array:
    """Exact count of each class id in [0, num_classes) among ``keep`` positions; others dropped.

    Dropped positions go to an overflow bin (index num_classes) that is sliced off, because
    ``jnp.bincount`` clips negative ids into bin 0 instead of dropping them.
    """
    inside = keep & (cls >= 0) & (cls < num_classes)
    idx = jnp.where(inside, cls, num_classes).astype(jnp.int32).reshape(-1)
    return jnp.bincount(idx, length=num_classes + 1)[:num_classes]


# ---------------------------------------------------------------------------------------------------
# per-batch counts


def pixel_accuracy_counts(logits_or_pred, target, valid=None) -> tuple[jax.Array, jax.Array]:
    """Upstream ``batch_pix_accuracy``: ``(correct, labeled)`` integer scalars for one batch.

    Args:
      logits_or_pred: logits ``(B, H, W, C)`` (argmax over the last axis) or an integer prediction
        ``(B, H, W)``. Any target shape works as long as the batch axis leads.
      target: integer ``(B, H, W)``; negative values are ignored.
      valid: optional ``(B,)`` flags; examples with False contribute nothing.
    Returns:
      ``correct`` = #(pred == target among labeled pixels), ``labeled`` = #(target >= 0).
    """
    where = "pixel_accuracy_counts"
    target = _apply_valid(_check_target(target, where), valid, where)
    pred = _as_prediction(logits_or_pred, target, where)
    labeled = target >= 0
    correct = jnp.sum(labeled & (pred == target))
    return correct, jnp.sum(labeled)


def intersection_union_counts(pred_or_logits, target, num_classes: int, valid=None):
    """Upstream ``batch_intersection_union`` as exact per-class counts over labeled pixels.

    Args:
      pred_or_logits: logits ``(B, H, W, C)`` with ``C == num_classes`` or an integer prediction
        ``(B, H, W)`` (ids outside ``[0, num_classes)`` are counted in no class).
      target: integer ``(B, H, W)``; negative = ignored (the prediction there is not counted).
      num_classes: number of classes (static under jit).
      valid: optional ``(B,)`` flags; examples with False contribute nothing.
    Returns:
      ``(area_inter, area_pred, area_label)``, each int ``(num_classes,)``. The union is
      ``area_pred + area_label - area_inter``. Labels ``>= num_classes``: see the module docstring.
    """
    where = "intersection_union_counts"
    num_classes = _check_num_classes(num_classes, where)
    target = _apply_valid(_check_target(target, where), valid, where)
    pred = _as_prediction(pred_or_logits, target, where, num_classes)
    labeled = target >= 0
    area_inter = _class_histogram(pred, labeled & (pred == target), num_classes)
    area_pred = _class_histogram(pred, labeled, num_classes)
    area_label = _class_histogram(target, labeled, num_classes)
    return area_inter, area_pred, area_label


def segmentation_counts(
    pred_or_logits, target, num_classes: int, valid=None
) -> dict[str, jax.Array]:
    """Both segmentation counts in one pass (one argmax), keyed like :meth:`SegmentationMetric.update`.

    Returns ``dict(correct=(), labeled=(), inter=(C,), pred_area=(C,), label_area=(C,))`` so that
    ``metric.update(**jax.device_get(counts))`` works; shapes and arguments as
    :func:`intersection_union_counts`.
    """
    where = "segmentation_counts"
    num_classes = _check_num_classes(num_classes, where)
    target = _apply_valid(_check_target(target, where), valid, where)
    pred = _as_prediction(pred_or_logits, target, where, num_classes)
    correct, labeled = pixel_accuracy_counts(pred, target)
    inter, pred_area, label_area = intersection_union_counts(pred, target, num_classes)
    return dict(
        correct=correct, labeled=labeled, inter=inter, pred_area=pred_area, label_area=label_area
    )


def topk_correct(logits, labels, ks: Sequence[int] = (1, 5), valid=None) -> dict[int, jax.Array]:
    """Upstream ``accuracy(output, target, topk)`` as counts: ``{k: #examples whose label is in the top k}``.

    Args:
      logits: ``(B, C)`` scores, class axis last.
      labels: integer ``(B,)``, or soft/one-hot targets ``(B, C)`` (mixup), reduced by argmax.
        Labels outside ``[0, C)`` are never correct.
      ks: positive ints (static). ``k >= C`` counts every (valid) example: the label is always among
        all C classes (torch's ``topk`` would raise instead).
      valid: optional ``(B,)`` flags; examples with False are never counted.
    Ties are broken like ``jax.lax.top_k`` (lower class index first).
    """
    where = "topk_correct"
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(
            f"{where}: expected logits of rank 2 (B, C), got shape {tuple(logits.shape)}"
        )
    labels = jnp.asarray(labels)
    if labels.ndim == 2:
        if labels.shape != logits.shape:
            raise ValueError(
                f"{where}: soft labels must have the logits' shape {tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
        labels = jnp.argmax(labels, axis=-1)
    else:
        labels = _check_target(labels, where, "labels")
        if labels.shape != logits.shape[:1]:
            raise ValueError(
                f"{where}: labels must have shape (B,) = {tuple(logits.shape[:1])} or (B, C) = "
                f"{tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
    if isinstance(ks, (int, np.integer)):
        ks = (ks,)
    ks = tuple(ks)
    if not ks or any(
        isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks
    ):
        raise ValueError(f"{where}: ks must be a non-empty sequence of positive ints, got {ks!r}")
    num_classes = logits.shape[1]
    _, top = jax.lax.top_k(logits, min(max(ks), num_classes))  # (B, maxk) class ids, best first
    hit_rank = top == labels[:, None]
    if valid is not None:
        valid = jnp.asarray(valid)
        if valid.shape != labels.shape:
            raise ValueError(
                f"{where}: valid must have shape (B,) = {tuple(labels.shape)}, got {tuple(valid.shape)}"
            )
        hit_rank = hit_rank & valid.astype(bool)[:, None]
    return {int(k): jnp.sum(jnp.any(hit_rank[:, : min(int(k), num_classes)], axis=-1)) for k in ks}


# ---------------------------------------------------------------------------------------------------
# host-side accumulator


class SegmentationMetric:
    """Dataset-level pixAcc / IoU / mIoU from summed counts (upstream ``SegmentationMetric``).

    ``update(correct, labeled, inter, pred_area, label_area)`` adds one batch's counts (numpy or jax
    integers: scalars and ``(num_classes,)`` arrays, e.g. from :func:`segmentation_counts`); sums are
    int64. :meth:`state` returns those sums as a dict of numpy arrays (keys = the ``update`` argument
    names), which is what a trainer all-reduces across processes; :meth:`from_state` / :meth:`merge`
    rebuild / add them. Thread-safe (one lock), like upstream's.

    Scores (float64): :meth:`pixel_accuracy` ``Σcorrect/(eps+Σlabeled)``; :meth:`iou` per class
    ``Σinter/(eps+Σunion)``, ``union = pred + label - inter``; :meth:`miou` the mean over all
    ``num_classes`` classes (a class absent from both prediction and labels scores 0, exactly as
    upstream); :meth:`result` ``{"pixAcc", "mIoU", "IoU"}``.
    """

    def __init__(self, num_classes: int):
        self.num_classes = _check_num_classes(num_classes, "SegmentationMetric")
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Zero every sum."""
        with self._lock:
            self._sums = {
                "correct": np.zeros((), np.int64),
                "labeled": np.zeros((), np.int64),
                "inter": np.zeros((self.num_classes,), np.int64),
                "pred_area": np.zeros((self.num_classes,), np.int64),
                "label_area": np.zeros((self.num_classes,), np.int64),
            }

    def _checked(self, counts: Mapping) -> dict[str, np.ndarray]:
        where = "SegmentationMetric.update"
        missing = [k for k in _STATE_KEYS if k not in counts]
        extra = [k for k in counts if k not in _STATE_KEYS]
        if missing or extra:
            raise KeyError(
                f"{where}: expected keys {_STATE_KEYS}, missing {missing}, unexpected {extra}"
            )
        out = {}
        for key in _STATE_KEYS:
            value = np.asarray(jax.device_get(counts[key]))
            if not np.issubdtype(value.dtype, np.integer):
                raise TypeError(f"{where}: {key} must hold integer counts, got dtype {value.dtype}")
            shape = () if key in ("correct", "labeled") else (self.num_classes,)
            if value.shape != shape:
                raise ValueError(f"{where}: {key} must have shape {shape}, got {value.shape}")
            if np.any(value < 0):
                raise ValueError(f"{where}: {key} must be non-negative counts, got {value}")
            out[key] = value.astype(np.int64)
        return out

    def update(self, correct, labeled, inter, pred_area, label_area) -> None:
        """Add one batch's counts (see the class docstring for shapes)."""
        counts = self._checked(
            dict(
                correct=correct,
                labeled=labeled,
                inter=inter,
                pred_area=pred_area,
                label_area=label_area,
            )
        )
        with self._lock:
            for key, value in counts.items():
                self._sums[key] = self._sums[key] + value

    def merge(self, other: SegmentationMetric | Mapping) -> SegmentationMetric:
        """Add another accumulator (or a :meth:`state` dict) into this one; returns self."""
        if isinstance(other, SegmentationMetric):
            if other.num_classes != self.num_classes:
                raise ValueError(
                    f"SegmentationMetric.merge: num_classes differ ({self.num_classes} vs {other.num_classes})"
                )
            other = other.state()
        self.update(**other)
        return self

    def state(self) -> dict[str, np.ndarray]:
        """A copy of the int64 sums: ``correct``, ``labeled`` (scalars) and ``inter``, ``pred_area``,
        ``label_area`` ``(num_classes,)``. Sum these across processes, then :meth:`from_state`."""
        with self._lock:
            return {k: v.copy() for k, v in self._sums.items()}

    @classmethod
    def from_state(cls, state: Mapping) -> SegmentationMetric:
        """Accumulator holding the sums of a :meth:`state` dict (num_classes from its ``inter``)."""
        if "inter" not in state:
            raise KeyError(
                f"SegmentationMetric.from_state: expected keys {_STATE_KEYS}, got {list(state)}"
            )
        metric = cls(int(np.shape(state["inter"])[0]))
        metric.update(**state)
        return metric

    def pixel_accuracy(self) -> float:
        """``Σcorrect / (eps + Σlabeled)`` (0.0 when nothing was labeled)."""
        with self._lock:
            return float(self._sums["correct"] / (EPS + self._sums["labeled"]))

    def iou(self) -> np.ndarray:
        """Per-class ``Σinter / (eps + Σunion)``, float64 ``(num_classes,)``."""
        with self._lock:
            s = self._sums
            union = s["pred_area"] + s["label_area"] - s["inter"]
            return s["inter"] / (EPS + union)

    def miou(self) -> float:
        """Mean of :meth:`iou` over all classes (absent classes count 0, as upstream)."""
        return float(np.mean(self.iou()))

    def result(self) -> dict:
        """``{"pixAcc": float, "mIoU": float, "IoU": [float] * num_classes}``."""
        iou = self.iou()
        return {
            "pixAcc": self.pixel_accuracy(),
            "mIoU": float(np.mean(iou)),
            "IoU": [float(v) for v in iou],
        }

    def __repr__(self) -> str:
        r = self.result()
        return f"SegmentationMetric(num_classes={self.num_classes}, pixAcc={r['pixAcc']:.4f}, mIoU={r['mIoU']:.4f})"
