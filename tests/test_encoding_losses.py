"""jaxenc.losses: PyTorch-Encoding's losses (encoding/nn/loss.py).

PyTorch-Encoding does not install (CUDA extensions), so the oracles below restate upstream's
``LabelSmoothing``, ``NLLMultiLabelSmooth`` and ``SegmentationLosses`` with torch.nn.functional, in
float64 (the comparisons measure jaxenc's float32 error only). Values and gradients w.r.t. every
logits input are compared. The label-smoothing oracles keep jaxenc's class-last layout (upstream
applies ``log_softmax(dim=-1)``, i.e. class last, too); the segmentation oracle takes NCHW as upstream.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import F as tF
from optional_torch import torch
from parity import RTOL, assert_close, random_input

from jaxenc import losses as L

REDUCTIONS = ("none", "mean", "sum")
K = 5
SHAPES = ((6, K), (2, 3, 4, K))  # (N, K) and dense (N, H, W, K)


# ----------------------------------------------------------------------------------------------
# torch oracles (restated from upstream)


class TorchLabelSmoothing(torch.nn.Module):
    """Upstream LabelSmoothing; ``reduction`` added ('mean' is upstream's), gather on the last axis so
    dense class-last logits work (upstream's ``unsqueeze(1)`` is the same for (N, K))."""

    def __init__(self, smoothing=0.1, reduction="mean"):
        super().__init__()
        self.smoothing, self.reduction = smoothing, reduction

    def forward(self, x, target):
        logprobs = tF.log_softmax(x, dim=-1)
        nll = -torch.gather(logprobs, -1, target.unsqueeze(-1)).squeeze(-1)
        loss = (1.0 - self.smoothing) * nll + self.smoothing * (-logprobs.mean(dim=-1))
        return reduce_torch(loss, self.reduction)


class TorchNLLMultiLabelSmooth(torch.nn.Module):
    """Upstream NLLMultiLabelSmooth: soft targets in training, F.cross_entropy in eval."""

    def __init__(self, smoothing=0.1, reduction="mean"):
        super().__init__()
        self.smoothing, self.reduction = smoothing, reduction

    def forward(self, x, target):
        if not self.training:
            return tF.cross_entropy(x, target)
        logprobs = tF.log_softmax(x, dim=-1)
        nll = (-logprobs * target).sum(-1)
        loss = (1.0 - self.smoothing) * nll + self.smoothing * (-logprobs.mean(dim=-1))
        return reduce_torch(loss, self.reduction)


def reduce_torch(loss, reduction):
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def torch_se_target(target, nclass):
    """Upstream _get_batch_label_vector: per image, histc over [0, nclass-1] > 0."""
    rows = [torch.histc(t.double(), bins=nclass, min=0, max=nclass - 1) > 0 for t in target]
    return torch.stack(rows).double()


class TorchSegmentationLosses(torch.nn.CrossEntropyLoss):
    """Upstream SegmentationLosses (NCHW): CE(ignore_index) + aux CE + BCE(sigmoid(se), se_target)."""

    def __init__(
        self,
        se_loss=False,
        se_weight=0.2,
        nclass=-1,
        aux=False,
        aux_weight=0.4,
        weight=None,
        ignore_index=-1,
    ):
        super().__init__(weight=weight, ignore_index=ignore_index)
        self.se_loss, self.se_weight, self.nclass = se_loss, se_weight, nclass
        self.aux, self.aux_weight = aux, aux_weight
        self.bce = torch.nn.BCELoss(weight)

    def forward(self, *inputs):
        *preds, target = inputs
        ce = super().forward
        if not self.se_loss and not self.aux:
            (pred,) = preds
            return ce(pred, target)
        if not self.se_loss:
            pred, aux_pred = preds
            return ce(pred, target) + self.aux_weight * ce(aux_pred, target)
        se_target = torch_se_target(target, self.nclass).type_as(preds[0])
        if not self.aux:
            pred, se_pred = preds
            return ce(pred, target) + self.se_weight * self.bce(torch.sigmoid(se_pred), se_target)
        pred, se_pred, aux_pred = preds
        return (
            ce(pred, target)
            + self.aux_weight * ce(aux_pred, target)
            + self.se_weight * self.bce(torch.sigmoid(se_pred), se_target)
        )


# ----------------------------------------------------------------------------------------------
# helpers


def t64(a):
    return torch.tensor(np.asarray(a, np.float64))


def nchw64(a):
    """Class-last (N, *S, K) -> torch float64 (N, K, *S)."""
    return t64(np.moveaxis(np.asarray(a), -1, 1).copy())


def check_parity(jax_fn, torch_fn, arrays, to_torch, from_torch, *, rtol=RTOL, seed=11):
    """Values and VJPs (random cotangent) of ``jax_fn(*arrays)`` vs ``torch_fn(*torch_arrays)``.

    ``to_torch[i]`` converts arrays[i] to a float64 leaf; ``from_torch[i]`` maps its grad back."""
    y, vjp = jax.vjp(jax_fn, *[jnp.asarray(a) for a in arrays])
    assert y.dtype == jnp.float32
    cot = np.asarray(random_input(y.shape, seed))
    grads = vjp(jnp.asarray(cot, jnp.float32))
    leaves = [conv(a).requires_grad_(True) for conv, a in zip(to_torch, arrays)]
    yt = torch_fn(*leaves)
    assert tuple(yt.shape) == tuple(y.shape), f"shape {y.shape} != torch {tuple(yt.shape)}"
    yt.backward(torch.tensor(cot, dtype=torch.float64))
    assert_close(y, yt.detach().numpy(), rtol, what="loss value")
    for i, (g, leaf, back) in enumerate(zip(grads, leaves, from_torch)):
        assert_close(g, back(leaf.grad), rtol, what=f"gradient w.r.t. input {i}")
    return y


def class_last(t):
    return t.detach().numpy()


def nhwc_grad(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


def labels(shape, num_classes=K, seed=0):
    return np.random.default_rng(seed).integers(0, num_classes, shape)


def soft_labels(shape, seed=0, mixup=True):
    """Mixup targets λ·onehot(a) + (1-λ)·onehot(b), or Dirichlet rows."""
    rng = np.random.default_rng(seed)
    k = shape[-1]
    if not mixup:
        return rng.dirichlet(np.ones(k), shape[:-1]).astype(np.float32)
    eye = np.eye(k, dtype=np.float32)
    lam = np.float32(rng.beta(0.2, 0.2))
    return (
        lam * eye[rng.integers(0, k, shape[:-1])] + (1 - lam) * eye[rng.integers(0, k, shape[:-1])]
    )


def class_weight(k=K, seed=7):
    return np.random.default_rng(seed).uniform(0.2, 2.0, k).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# label_smoothing_cross_entropy (LabelSmoothing)


@pytest.mark.parametrize("shape", SHAPES, ids=("2d", "dense"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", (0.1, 0.0, 0.35))
def test_label_smoothing_parity(shape, reduction, smoothing):
    x = random_input(shape, seed=1) * 2
    t = labels(shape[:-1])
    ref = TorchLabelSmoothing(smoothing, reduction)
    check_parity(
        lambda a: L.label_smoothing_cross_entropy(a, t, smoothing=smoothing, reduction=reduction),
        lambda a: ref(a, torch.tensor(t)),
        [x],
        [t64],
        [class_last],
    )


def test_label_smoothing_properties():
    x = random_input((8, K), seed=2)
    t = labels((8,))
    # ε = 0 is the cross-entropy; uniform logits give log K for any ε.
    assert_close(L.label_smoothing_cross_entropy(x, t, smoothing=0.0), L.cross_entropy(x, t), 1e-6)
    uniform = L.label_smoothing_cross_entropy(
        np.zeros((3, K), np.float32), t[:3], smoothing=0.3, reduction="none"
    )
    assert_close(uniform, np.full(3, np.log(K)), 1e-6, what="log K")
    # The default ε is upstream's 0.1.
    assert_close(
        L.label_smoothing_cross_entropy(x, t),
        L.label_smoothing_cross_entropy(x, t, smoothing=0.1),
        0,
    )


# ----------------------------------------------------------------------------------------------
# soft_target_cross_entropy (NLLMultiLabelSmooth)


@pytest.mark.parametrize("shape", SHAPES, ids=("2d", "dense"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mixup", (True, False), ids=("mixup", "dirichlet"))
def test_soft_target_parity(shape, reduction, mixup):
    x = random_input(shape, seed=3) * 2
    y = soft_labels(shape, seed=4, mixup=mixup)
    ref = TorchNLLMultiLabelSmooth(0.1, reduction).train()
    check_parity(
        lambda a: L.soft_target_cross_entropy(a, y, reduction=reduction),
        lambda a: ref(a, t64(y)),
        [x],
        [t64],
        [class_last],
    )


def test_soft_target_properties():
    x = random_input((6, K), seed=5)
    t = labels((6,))
    onehot = np.eye(K, dtype=np.float32)[t]
    # One-hot targets reduce to LabelSmoothing; smoothing=0 to multilabel CE.
    assert_close(
        L.soft_target_cross_entropy(x, onehot, smoothing=0.2),
        L.label_smoothing_cross_entropy(x, t, smoothing=0.2),
        1e-6,
    )
    y = soft_labels((6, K), seed=6)
    assert_close(
        L.soft_target_cross_entropy(x, y, smoothing=0.0), L.multilabel_cross_entropy(x, y), 1e-6
    )
    # Upstream's eval branch is F.cross_entropy on hard targets: jaxenc's cross_entropy.
    ref = TorchNLLMultiLabelSmooth().eval()
    assert_close(
        L.cross_entropy(x, t), ref(t64(x), torch.tensor(t)).numpy(), RTOL, what="eval fallback"
    )
    # Integer-valued (e.g. multi-hot int) targets are upcast like upstream's target.float().
    assert L.soft_target_cross_entropy(x, onehot.astype(np.int32)).dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# se_targets


def test_se_targets_crafted_masks():
    masks = np.array(
        [
            [[0, 0, 2], [2, -1, -1]],  # classes 0, 2; ignore pixels
            [[-1, -1, -1], [-1, -1, -1]],  # only ignored pixels: nothing present
            [
                [3, 255, 4],
                [4, 4, 5],
            ],  # K-1 = 3 is the last histc bin; 4, 5 and 255 are out of range
        ]
    )
    expected = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]], np.float32)
    got = L.se_targets(masks, 4)
    assert got.dtype == jnp.float32 and got.shape == (3, 4)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(torch_se_target(torch.tensor(masks), 4).numpy(), expected)
    # An ignore_index inside [0, K) does not count (upstream's histc would count it: deviation).
    np.testing.assert_array_equal(L.se_targets(masks, 4, ignore_index=2)[0], [1, 0, 0, 0])
    np.testing.assert_array_equal(L.se_targets(masks, 4, ignore_index=255), expected)


@pytest.mark.parametrize("num_classes", (1, 2, 7, 150))
def test_se_targets_match_histc(num_classes):
    rng = np.random.default_rng(num_classes)
    # Sparse masks so that some classes are absent; -1 and 255 pixels planted.
    masks = (
        rng.integers(0, num_classes, (4, 9, 11))
        if num_classes < 7
        else rng.choice(rng.integers(0, num_classes, 5), (4, 9, 11))
    )
    masks[rng.random(masks.shape) < 0.2] = -1
    masks[rng.random(masks.shape) < 0.1] = 255
    masks[1] = -1  # one image with only ignored pixels
    expected = torch_se_target(torch.tensor(masks), num_classes).numpy()
    if num_classes == 1:
        # torch.histc with min == max uses the data's range, so every pixel would count; jaxenc
        # counts class-0 pixels only (documented in se_targets).
        expected = (masks == 0).any(axis=(1, 2))[:, None].astype(np.float64)
    np.testing.assert_array_equal(L.se_targets(masks, num_classes), expected)
    np.testing.assert_array_equal(
        jax.jit(L.se_targets, static_argnums=1)(masks, num_classes), expected
    )


# ----------------------------------------------------------------------------------------------
# segmentation_loss (SegmentationLosses)

# fmt: off
FORMS = {  # (se_loss, aux) -> names of the outputs, upstream's argument order
    "plain": (False, False),
    "aux": (False, True),
    "se": (True, False),
    "se_aux": (True, True),
}
# fmt: on
SEG_SHAPE = (2, 5, 7, 4)  # (N, H, W, K), odd spatial sizes


def seg_case(form, ignore_index=-1, seed=0):
    se, aux = FORMS[form]
    n, h, w, k = SEG_SHAPE
    rng = np.random.default_rng(seed)
    pred = random_input(SEG_SHAPE, seed + 1) * 2
    t = rng.integers(0, k - 1, (n, h, w))  # class k-1 absent: its se target is 0
    t[0, :, 0] = k - 1  # ... except in image 0
    t[rng.random(t.shape) < 0.25] = ignore_index
    arrays = [pred]
    if se:
        arrays.append(random_input((n, k), seed + 2) * 2)
    if aux:
        arrays.append(random_input(SEG_SHAPE, seed + 3) * 2)
    to_t = [nchw64] + ([t64] if se else []) + ([nchw64] if aux else [])
    back = [nhwc_grad] + ([class_last] if se else []) + ([nhwc_grad] if aux else [])
    return se, aux, arrays, t, to_t, back


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("weighted", (False, True), ids=("unweighted", "weighted"))
@pytest.mark.parametrize("ignore_index", (-1, 255))
def test_segmentation_loss_parity(form, weighted, ignore_index):
    se, aux, arrays, t, to_t, back = seg_case(form, ignore_index)
    k = SEG_SHAPE[-1]
    w = class_weight(k) if weighted else None
    kw = dict(
        se_loss=se, aux=aux, se_weight=0.3, aux_weight=0.2, weight=w, ignore_index=ignore_index
    )
    ref = TorchSegmentationLosses(
        nclass=k,
        weight=None if w is None else t64(w),
        se_weight=0.3,
        aux_weight=0.2,
        se_loss=se,
        aux=aux,
        ignore_index=ignore_index,
    )
    check_parity(
        lambda *outs: L.segmentation_loss(outs, t, num_classes=k if se else None, **kw),
        lambda *outs: ref(*outs, torch.tensor(t)),
        arrays,
        to_t,
        back,
    )


def test_segmentation_loss_forms_and_defaults():
    _, _, (pred, se_pred, aux_pred), t, _, _ = seg_case("se_aux")
    k = SEG_SHAPE[-1]
    # A bare array or a list is accepted for the plain form; lists for the others.
    plain = L.segmentation_loss((pred,), t)
    assert_close(L.segmentation_loss(pred, t), plain, 0)
    assert_close(plain, L.cross_entropy(pred, t, ignore_index=-1), 0, what="plain = CE(ignore -1)")
    full = L.segmentation_loss([pred, se_pred, aux_pred], t, se_loss=True, aux=True, num_classes=k)
    # Upstream constructor defaults: se_weight 0.2, aux_weight 0.4.
    ref = TorchSegmentationLosses(se_loss=True, aux=True, nclass=k)
    expected = ref(nchw64(pred), t64(se_pred), nchw64(aux_pred), torch.tensor(t))
    assert_close(full, expected.numpy(), RTOL, what="upstream defaults")
    ce = L.cross_entropy(pred, t, ignore_index=-1)
    ce_aux = L.cross_entropy(aux_pred, t, ignore_index=-1)
    bce = L.segmentation_loss((pred, se_pred), t, se_loss=True, num_classes=k, se_weight=1.0) - ce
    assert_close(full, ce + 0.4 * ce_aux + 0.2 * bce, 1e-6, what="term decomposition")
    # weight=ones is the unweighted loss.
    ones = L.segmentation_loss(
        [pred, se_pred, aux_pred],
        t,
        se_loss=True,
        aux=True,
        num_classes=k,
        weight=np.ones(k, np.float32),
    )
    assert_close(ones, full, 1e-7)


def test_segmentation_loss_all_ignored_and_saturated_se():
    n, h, w, k = SEG_SHAPE
    pred = random_input(SEG_SHAPE, 4)
    t = np.full((n, h, w), -1)
    # All pixels ignored: CE is 0 (torch: NaN), gradient 0.
    val, grad = jax.value_and_grad(lambda p: L.segmentation_loss(p, t))(jnp.asarray(pred))
    assert float(val) == 0.0 and not np.any(np.asarray(grad))
    # Saturated se logits: exact BCE (|s| where wrong) and gradient w·(σ(s) - y)/(N·K), where torch's
    # BCELoss(sigmoid) clamps the log to -100 and its gradient vanishes.
    t = np.zeros((n, h, w), np.int64)  # only class 0 present
    se_pred = np.full((n, k), 40.0, np.float32)
    f = lambda s: L.segmentation_loss((pred, s), t, se_loss=True, num_classes=k, se_weight=1.0)
    val, grad = jax.value_and_grad(f)(jnp.asarray(se_pred))
    ce = float(L.cross_entropy(pred, t))
    assert_close(float(val) - ce, 40.0 * (k - 1) / k, 1e-5, what="saturated BCE value")
    expected_grad = np.where(np.arange(k) == 0, 0.0, 1.0) * np.ones((n, 1)) / (n * k)
    assert_close(grad, expected_grad, 1e-5, what="saturated BCE gradient")


# ----------------------------------------------------------------------------------------------
# jit, bfloat16


def test_jit_matches_eager():
    x = random_input((2, 3, 4, K), seed=8)
    t = labels((2, 3, 4))
    y = soft_labels((2, 3, 4, K), seed=9)
    for reduction in REDUCTIONS:
        f = functools.partial(L.label_smoothing_cross_entropy, reduction=reduction)
        assert_close(
            jax.jit(f)(x, t, smoothing=0.2), f(x, t, smoothing=0.2), 1e-6, what=f"LS {reduction}"
        )
        g = functools.partial(L.soft_target_cross_entropy, reduction=reduction)
        assert_close(jax.jit(g)(x, y), g(x, y), 1e-6, what=f"soft {reduction}")
    # smoothing may be traced
    assert_close(
        jax.jit(lambda e: L.label_smoothing_cross_entropy(x, t, smoothing=e))(0.2),
        L.label_smoothing_cross_entropy(x, t, smoothing=0.2),
        1e-6,
    )
    for form, (se, aux) in FORMS.items():
        _, _, arrays, tt, _, _ = seg_case(form)
        kw = dict(
            se_loss=se, aux=aux, num_classes=SEG_SHAPE[-1], weight=class_weight(SEG_SHAPE[-1])
        )
        eager = L.segmentation_loss(tuple(arrays), tt, **kw)
        jitted = jax.jit(
            lambda outs, targ, ii: L.segmentation_loss(outs, targ, ignore_index=ii, **kw)
        )
        assert_close(
            jitted(tuple(arrays), tt, -1), eager, 1e-6, what=f"jit {form} (traced ignore_index)"
        )


def test_bfloat16_logits():
    x = random_input((2, 3, 4, K), seed=10)
    t = labels((2, 3, 4))
    y = soft_labels((2, 3, 4, K), seed=11)
    cases = {
        "label_smoothing": lambda a: L.label_smoothing_cross_entropy(a, t),
        "soft_target": lambda a: L.soft_target_cross_entropy(a, y),
    }
    for name, fn in cases.items():
        low, high = fn(jnp.asarray(x, jnp.bfloat16)), fn(jnp.asarray(x))
        assert low.dtype == jnp.float32, name
        assert_close(low, high, 2e-2, what=name)
    _, _, arrays, tt, _, _ = seg_case("se_aux")
    kw = dict(se_loss=True, aux=True, num_classes=SEG_SHAPE[-1])
    low = L.segmentation_loss(tuple(jnp.asarray(a, jnp.bfloat16) for a in arrays), tt, **kw)
    assert low.dtype == jnp.float32
    assert_close(low, L.segmentation_loss(tuple(arrays), tt, **kw), 2e-2, what="segmentation_loss")


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs():
    x = random_input((4, K))
    t = labels((4,))
    with pytest.raises(
        ValueError, match=r"label_smoothing_cross_entropy: smoothing must lie in \[0, 1\], got 1.5"
    ):
        L.label_smoothing_cross_entropy(x, t, smoothing=1.5)
    with pytest.raises(
        ValueError, match=r"label_smoothing_cross_entropy: expected integer targets of shape \(4,\)"
    ):
        L.label_smoothing_cross_entropy(x, t[:3])
    with pytest.raises(
        TypeError, match="label_smoothing_cross_entropy: hard targets must have an integer dtype"
    ):
        L.label_smoothing_cross_entropy(x, t.astype(np.float32))
    with pytest.raises(ValueError, match="label_smoothing_cross_entropy: reduction must be one of"):
        L.label_smoothing_cross_entropy(x, t, reduction="avg")
    with pytest.raises(
        ValueError,
        match=r"soft_target_cross_entropy: expected targets of the logits' shape \(4, 5\)",
    ):
        L.soft_target_cross_entropy(x, t)
    with pytest.raises(ValueError, match="soft_target_cross_entropy: smoothing must lie in"):
        L.soft_target_cross_entropy(x, np.eye(K)[t], smoothing=-0.1)

    with pytest.raises(
        ValueError, match="se_targets: num_classes must be a positive integer, got 0"
    ):
        L.se_targets(np.zeros((2, 3, 3), int), 0)
    with pytest.raises(
        TypeError, match="se_targets: targets must have an integer dtype, got float32"
    ):
        L.se_targets(np.zeros((2, 3, 3), np.float32), 4)
    with pytest.raises(ValueError, match="se_targets: expected integer targets of shape"):
        L.se_targets(np.int32(3), 4)

    _, _, (pred, se_pred, aux_pred), seg_t, _, _ = seg_case("se_aux")
    k = SEG_SHAPE[-1]
    with pytest.raises(
        ValueError,
        match=r"se_loss=True, aux=True expected 3 outputs \(pred, se_pred, aux_pred\), got 2",
    ):
        L.segmentation_loss((pred, se_pred), seg_t, se_loss=True, aux=True, num_classes=k)
    with pytest.raises(
        ValueError, match=r"se_loss=False, aux=False expected 1 outputs \(pred\), got 2"
    ):
        L.segmentation_loss((pred, aux_pred), seg_t)
    with pytest.raises(
        ValueError,
        match=r"se_loss=False, aux=True expected outputs \(pred, aux_pred\), got a single",
    ):
        L.segmentation_loss(pred, seg_t, aux=True)
    with pytest.raises(ValueError, match="segmentation_loss: se_loss=True needs num_classes"):
        L.segmentation_loss((pred, se_pred), seg_t, se_loss=True)
    with pytest.raises(
        ValueError, match="segmentation_loss: num_classes=3 must equal the class count of pred"
    ):
        L.segmentation_loss((pred, se_pred), seg_t, se_loss=True, num_classes=3)
    with pytest.raises(
        ValueError,
        match=r"segmentation_loss: expected se_pred of shape \(N, num_classes\) = \(2, 4\)",
    ):
        L.segmentation_loss((pred, se_pred[:, :3]), seg_t, se_loss=True, num_classes=k)
    with pytest.raises(
        ValueError, match=r"segmentation_loss: expected aux_pred of pred's shape \(2, 5, 7, 4\)"
    ):
        L.segmentation_loss((pred, aux_pred[:, :4]), seg_t, aux=True)
    with pytest.raises(
        ValueError, match=r"segmentation_loss: expected integer targets of shape \(2, 5, 7\)"
    ):
        L.segmentation_loss(pred, seg_t[:, :4])
    with pytest.raises(ValueError, match=r"segmentation_loss: weight must have shape \(4,\)"):
        L.segmentation_loss(pred, seg_t, weight=np.ones(3))
