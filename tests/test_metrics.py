"""jaxenc.metrics against hand-computed cases and a numpy restatement of PyTorch-Encoding's metrics."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxenc import metrics as M

EPS = np.spacing(1)


# ---------------------------------------------------------------------------------------------------
# numpy restatement of upstream encoding/utils/metrics.py


def upstream_batch_pix_accuracy(logits, target):
    """``batch_pix_accuracy``: argmax over classes, +1 shift, labeled = target > 0 after the shift."""
    predict = np.argmax(logits, axis=-1).astype(np.int64) + 1
    target = target.astype(np.int64) + 1
    pixel_labeled = np.sum(target > 0)
    pixel_correct = np.sum((predict == target) * (target > 0))
    return pixel_correct, pixel_labeled


def _histc(values, nbins, lo, hi):
    """torch.histc: nbins equal bins over [lo, hi], last bin closed, values outside dropped."""
    values = values.astype(np.float64).ravel()
    values = values[(values >= lo) & (values <= hi)]
    idx = np.floor((values - lo) * nbins / (hi - lo)).astype(np.int64)
    idx = np.minimum(idx, nbins - 1)
    return np.bincount(idx, minlength=nbins)[:nbins]


def upstream_batch_intersection_union(logits, target, nclass):
    """``batch_intersection_union``: zero predictions at ignored pixels, histc over classes 1..nclass."""
    predict = (np.argmax(logits, axis=-1) + 1).astype(np.float64)
    target = target.astype(np.float64) + 1
    predict = predict * (target > 0)
    intersection = predict * (predict == target)
    area_inter = _histc(intersection, nclass, 1, nclass)
    area_pred = _histc(predict, nclass, 1, nclass)
    area_lab = _histc(target, nclass, 1, nclass)
    area_union = area_pred + area_lab - area_inter
    return area_inter, area_union


def upstream_scores(batches, nclass):
    """Upstream SegmentationMetric over a list of (logits, target): dataset-level sums."""
    correct = labeled = 0
    inter = np.zeros(nclass)
    union = np.zeros(nclass)
    for logits, target in batches:
        c, lab = upstream_batch_pix_accuracy(logits, target)
        i, u = upstream_batch_intersection_union(logits, target, nclass)
        correct, labeled, inter, union = correct + c, labeled + lab, inter + i, union + u
    pix_acc = 1.0 * correct / (EPS + labeled)
    iou = 1.0 * inter / (EPS + union)
    return pix_acc, iou.mean(), iou


def _one_hot_logits(pred, num_classes):
    return jax.nn.one_hot(jnp.asarray(pred), num_classes) * 5.0


def _metric_from(logits, target, num_classes, valid=None):
    metric = M.SegmentationMetric(num_classes)
    metric.update(**jax.device_get(M.segmentation_counts(logits, target, num_classes, valid=valid)))
    return metric


# ---------------------------------------------------------------------------------------------------
# crafted cases


def test_hand_computed_three_class_example():
    target = np.array([[[0, 0, 1], [1, 2, -1]]])  # (1, 2, 3); one ignored pixel
    pred = np.array([[[0, 1, 1], [2, 2, 0]]])
    correct, labeled = M.pixel_accuracy_counts(pred, target)
    assert (int(correct), int(labeled)) == (3, 5)
    inter, area_pred, area_label = M.intersection_union_counts(pred, target, 3)
    # pred at the ignored pixel (class 0) is not counted
    np.testing.assert_array_equal(inter, [1, 1, 1])
    np.testing.assert_array_equal(area_pred, [1, 2, 2])
    np.testing.assert_array_equal(area_label, [2, 2, 1])
    result = _metric_from(_one_hot_logits(pred, 3), target, 3).result()
    iou = np.array([1 / 2, 1 / 3, 1 / 2])
    np.testing.assert_allclose(result["IoU"], iou, rtol=1e-12)
    np.testing.assert_allclose(result["mIoU"], iou.mean(), rtol=1e-12)
    np.testing.assert_allclose(result["pixAcc"], 3 / 5, rtol=1e-12)


def test_absent_class_counts_zero_in_miou():
    target = np.array([[[0, 0], [1, 1]]])
    metric = _metric_from(_one_hot_logits(target, 4), target, 4)  # perfect on 0 and 1; 2, 3 absent
    result = metric.result()
    np.testing.assert_allclose(result["IoU"], [1, 1, 0, 0], atol=1e-12)
    assert result["mIoU"] == pytest.approx(0.5)
    assert result["pixAcc"] == pytest.approx(1.0)


def test_perfect_prediction():
    target = np.random.randint(0, 5, size=(2, 6, 7))
    result = _metric_from(_one_hot_logits(target, 5), target, 5).result()
    assert result["pixAcc"] == pytest.approx(1.0)
    assert result["mIoU"] == pytest.approx(1.0)


def test_all_ignored():
    target = -np.ones((2, 3, 3), np.int32)
    target[1, 0, 0] = -7  # any negative value is ignored
    logits = np.random.randn(2, 3, 3, 4).astype(np.float32)
    counts = jax.device_get(M.segmentation_counts(logits, target, 4))
    assert int(counts["correct"]) == 0 and int(counts["labeled"]) == 0
    for key in ("inter", "pred_area", "label_area"):
        np.testing.assert_array_equal(counts[key], 0)
    result = _metric_from(logits, target, 4).result()
    assert result["pixAcc"] == 0.0 and result["mIoU"] == 0.0


def test_label_out_of_range_follows_upstream():
    # label 3 with 3 classes: labeled, never correct, no label area, prediction area counted.
    target = np.array([[3, 0]])
    pred = np.array([[1, 0]])
    correct, labeled = M.pixel_accuracy_counts(pred, target)
    assert (int(correct), int(labeled)) == (1, 2)
    inter, area_pred, area_label = M.intersection_union_counts(pred, target, 3)
    np.testing.assert_array_equal(inter, [1, 0, 0])
    np.testing.assert_array_equal(area_pred, [1, 1, 0])
    np.testing.assert_array_equal(area_label, [1, 0, 0])
    logits = np.asarray(_one_hot_logits(pred, 3))
    c_up, l_up = upstream_batch_pix_accuracy(logits, target)
    i_up, u_up = upstream_batch_intersection_union(logits, target, 3)
    assert (c_up, l_up) == (1, 2)
    np.testing.assert_array_equal(i_up, inter)
    np.testing.assert_array_equal(
        u_up, np.asarray(area_pred) + np.asarray(area_label) - np.asarray(inter)
    )


# ---------------------------------------------------------------------------------------------------
# parity with the upstream restatement


@pytest.mark.parametrize("nclass", [2, 5, 21])
def test_matches_upstream_on_random_batches(nclass):
    rs = np.random.RandomState(nclass)
    batches = []
    for _ in range(3):
        logits = rs.randn(2, 9, 11, nclass).astype(np.float32)
        target = rs.randint(
            -1, nclass + 1, size=(2, 9, 11)
        )  # includes ignore and out-of-range labels
        agree = (
            rs.rand(*target.shape) < 0.5
        )  # make half the pixels correct so intersections are large
        target[agree] = np.argmax(logits, -1)[agree]
        batches.append((logits, target))
    metric = M.SegmentationMetric(nclass)
    for logits, target in batches:
        c, lab = M.pixel_accuracy_counts(logits, target)
        c_up, lab_up = upstream_batch_pix_accuracy(logits, target)
        assert (int(c), int(lab)) == (c_up, lab_up)
        inter, area_pred, area_label = M.intersection_union_counts(logits, target, nclass)
        i_up, u_up = upstream_batch_intersection_union(logits, target, nclass)
        np.testing.assert_array_equal(inter, i_up)
        np.testing.assert_array_equal(
            np.asarray(area_pred) + np.asarray(area_label) - np.asarray(inter), u_up
        )
        metric.update(c, lab, inter, area_pred, area_label)
    pix_acc, miou, iou = upstream_scores(batches, nclass)
    result = metric.result()
    assert result["pixAcc"] == pytest.approx(pix_acc, rel=1e-12)
    assert result["mIoU"] == pytest.approx(miou, rel=1e-12)
    np.testing.assert_allclose(result["IoU"], iou, rtol=1e-12)


def test_accumulation_is_dataset_level_not_per_image_mean():
    rs = np.random.RandomState(1)
    nclass = 4
    images = [(rs.randn(1, 5, 5, nclass), rs.randint(-1, nclass, size=(1, 5, 5))) for _ in range(6)]
    metric = M.SegmentationMetric(nclass)
    per_image = []
    for logits, target in images:
        metric.update(**jax.device_get(M.segmentation_counts(logits, target, nclass)))
        per_image.append(_metric_from(logits, target, nclass).miou())
    whole = _metric_from(
        np.concatenate([x for x, _ in images]), np.concatenate([t for _, t in images]), nclass
    ).result()
    assert metric.result() == whole  # identical integer sums
    assert metric.miou() == pytest.approx(upstream_scores(images, nclass)[1], rel=1e-12)
    assert metric.miou() != pytest.approx(
        np.mean(per_image), rel=1e-9
    )  # per-image averaging differs
    # crafted: image A one pixel of class 0 predicted right, image B three pixels of class 0 predicted 1
    crafted = M.SegmentationMetric(2)
    for pred, target in (
        (np.array([[0]]), np.array([[0]])),
        (np.array([[1, 1, 1]]), np.array([[0, 0, 0]])),
    ):
        crafted.update(
            *M.pixel_accuracy_counts(pred, target), *M.intersection_union_counts(pred, target, 2)
        )
    # class 0: inter 1, union 1 + 4 - 1 = 4; class 1: inter 0 -> 0. Per-image average would be 0.25.
    np.testing.assert_allclose(crafted.iou(), [0.25, 0.0], rtol=1e-12)
    assert crafted.miou() == pytest.approx(0.125, rel=1e-12)
    assert crafted.pixel_accuracy() == pytest.approx(0.25, rel=1e-12)


def test_state_merge_and_from_state_sum_like_processes():
    rs = np.random.RandomState(2)
    nclass = 3
    parts = [(rs.randn(2, 4, 4, nclass), rs.randint(-1, nclass, size=(2, 4, 4))) for _ in range(2)]
    shards = [_metric_from(x, t, nclass) for x, t in parts]
    summed = {
        k: shards[0].state()[k] + shards[1].state()[k] for k in shards[0].state()
    }  # an all-reduce
    whole = _metric_from(
        np.concatenate([x for x, _ in parts]), np.concatenate([t for _, t in parts]), nclass
    )
    assert M.SegmentationMetric.from_state(summed).result() == whole.result()
    merged = M.SegmentationMetric(nclass).merge(shards[0]).merge(shards[1].state())
    assert merged.result() == whole.result()
    assert all(v.dtype == np.int64 for v in merged.state().values())
    merged.reset()
    assert merged.state()["labeled"] == 0


# ---------------------------------------------------------------------------------------------------
# jit, valid mask, top-k


def test_jit_matches_eager():
    rs = np.random.RandomState(3)
    logits = jnp.asarray(rs.randn(2, 6, 6, 4), jnp.float32)
    target = jnp.asarray(rs.randint(-1, 4, size=(2, 6, 6)), jnp.int32)
    fn = jax.jit(functools.partial(M.segmentation_counts, num_classes=4))
    jitted, eager = (
        jax.device_get(fn(logits, target)),
        jax.device_get(M.segmentation_counts(logits, target, 4)),
    )
    for key in eager:
        np.testing.assert_array_equal(jitted[key], eager[key])
    iu = jax.jit(M.intersection_union_counts, static_argnums=2)(logits, target, 4)
    np.testing.assert_array_equal(iu[0], eager["inter"])
    pa = jax.jit(M.pixel_accuracy_counts)(logits.astype(jnp.bfloat16), target)
    assert int(pa[1]) == int(eager["labeled"])


def test_valid_mask_drops_padded_examples():
    rs = np.random.RandomState(4)
    logits = rs.randn(4, 5, 5, 3).astype(np.float32)
    target = rs.randint(-1, 4, size=(4, 5, 5))
    valid = np.array([True, True, True, False])
    padded = jax.device_get(M.segmentation_counts(logits, target, 3, valid=valid))
    real = jax.device_get(M.segmentation_counts(logits[:3], target[:3], 3))
    for key in real:
        np.testing.assert_array_equal(padded[key], real[key])
    c, lab = M.pixel_accuracy_counts(logits, target, valid=valid)
    assert (int(c), int(lab)) == (int(real["correct"]), int(real["labeled"]))
    top = M.topk_correct(logits[:, 0, 0], target[:, 0, 0].clip(0), ks=(1,), valid=valid)
    assert int(top[1]) == int(
        M.topk_correct(logits[:3, 0, 0], target[:3, 0, 0].clip(0), ks=(1,))[1]
    )


def test_topk_correct_matches_torch_style_reference():
    rs = np.random.RandomState(5)
    logits = rs.randn(32, 10).astype(np.float32)
    labels = rs.randint(0, 10, size=(32,))
    order = np.argsort(-logits, axis=1)
    counts = jax.jit(M.topk_correct, static_argnames="ks")(logits, labels, ks=(1, 5))
    for k in (1, 5):
        expected = int(np.sum(np.any(order[:, :k] == labels[:, None], axis=1)))
        assert int(counts[k]) == expected
    soft = (
        0.8 * np.eye(10)[labels] + 0.2 * np.eye(10)[rs.randint(0, 10, size=32)] * 0.5
    )  # mixup-like
    soft_counts = M.topk_correct(logits, soft, ks=(1, 5))
    assert {k: int(v) for k, v in soft_counts.items()} == {k: int(v) for k, v in counts.items()}
    # k beyond the number of classes: the label is always among all classes
    assert int(M.topk_correct(logits[:, :3], labels % 3, ks=(5,))[5]) == 32


# ---------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise_clear_errors():
    logits = np.zeros((2, 4, 4, 3), np.float32)
    target = np.zeros((2, 4, 4), np.int32)
    with pytest.raises(ValueError, match="trailing class axis"):
        M.pixel_accuracy_counts(logits, target[:, :3])
    with pytest.raises(ValueError, match="prediction shape"):
        M.pixel_accuracy_counts(target[:, :3], target)
    with pytest.raises(TypeError, match="target must be an integer"):
        M.intersection_union_counts(logits, target.astype(np.float32), 3)
    with pytest.raises(TypeError, match="integer class ids"):
        M.intersection_union_counts(target.astype(np.float32), target, 3)
    with pytest.raises(ValueError, match="num_classes=4"):
        M.intersection_union_counts(logits, target, 4)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        M.segmentation_counts(logits, target, 0)
    with pytest.raises(ValueError, match="valid must have shape"):
        M.segmentation_counts(logits, target, 3, valid=np.ones(3, bool))
    with pytest.raises(ValueError, match="rank 2"):
        M.topk_correct(logits, target)
    with pytest.raises(ValueError, match="ks must be"):
        M.topk_correct(logits[:, 0, 0], target[:, 0, 0], ks=(0,))
    metric = M.SegmentationMetric(3)
    with pytest.raises(ValueError, match="inter must have shape"):
        metric.update(1, 2, np.zeros(4, np.int64), np.zeros(3, np.int64), np.zeros(3, np.int64))
    with pytest.raises(TypeError, match="integer counts"):
        metric.update(1.5, 2, np.zeros(3, np.int64), np.zeros(3, np.int64), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="num_classes differ"):
        metric.merge(M.SegmentationMetric(4))
