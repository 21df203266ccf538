"""jaxenc.losses against pylocron 0.3.0 (holocron.nn.functional / holocron.nn), values and gradients.

jaxenc logits carry the class axis LAST; torch gets them with the class axis moved to 1. The torch
oracle runs in float64, so the comparisons measure jaxenc's float32 error only. Where pylocron 0.3.0
crashes or is buggy (PolyLoss with -100 targets or reduction='none' on hard labels, PolyLoss soft
targets with weights on dense inputs, ComplementCrossEntropy with -100 targets) the reference is
restated from upstream's per-position values, and PolyLoss's ignore_index fix (upstream, after 0.3.0) is tested.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import F as tF
from optional_torch import torch
from parity import RTOL, assert_close, random_input

from jaxenc import losses as L

REDUCTIONS = ("none", "mean", "sum")
# (N, K), (N, L, K) and (N, H, W, K): K = 5 classes.
SHAPES = ((6, 5), (2, 7, 5), (2, 3, 4, 5))
IN_RANGE = 2  # an ignore_index inside [0, K)
# name -> (ignore_index, value planted in the targets or None)
IGNORES = {"absent": (-100, None), "minus100": (-100, -100), "in_range": (IN_RANGE, IN_RANGE)}


# ----------------------------------------------------------------------------------------------
# helpers


def to_torch(a: np.ndarray) -> torch.Tensor:
    """Class axis last -> class axis 1, float64."""
    return torch.tensor(np.moveaxis(np.asarray(a, np.float64), -1, 1).copy())


def from_torch(t: torch.Tensor) -> np.ndarray:
    return np.moveaxis(t.detach().numpy(), 1, -1)


def hard_targets(shape, num_classes, planted=None, seed=0) -> np.ndarray:
    """Random labels of ``shape``; about a quarter (at least one, never all) set to ``planted``."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, num_classes, shape)
    if planted is not None:
        flat = t.reshape(-1)
        flat[rng.random(flat.size) < 0.25] = planted
        flat[0], flat[-1] = planted, (planted + 1) % num_classes
    return t


def class_weight(k, seed=7) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 2.0, k).astype(np.float32)


def check_against_torch(jax_fn, torch_fn, x, *, rtol=RTOL, grad_rtol=RTOL, seed=11):
    """Values and input gradients (a VJP with a random cotangent) of ``jax_fn(x)`` (class axis last)
    and ``torch_fn(x_torch)`` (class axis 1, float64)."""
    y, vjp = jax.vjp(jax_fn, jnp.asarray(x))
    assert y.dtype == jnp.float32
    cot = np.asarray(random_input(y.shape, seed))
    (g,) = vjp(jnp.asarray(cot, jnp.float32))
    xt = to_torch(x).requires_grad_(True)
    yt = torch_fn(xt)
    assert tuple(yt.shape) == tuple(y.shape), f"shape {y.shape} != torch {tuple(yt.shape)}"
    yt.backward(torch.tensor(cot, dtype=torch.float64))
    assert_close(y, yt.detach().numpy(), rtol, what="loss value")
    assert_close(g, from_torch(xt.grad), grad_rtol, what="gradient w.r.t. logits")
    return y, g


def tw(w):
    return None if w is None else torch.tensor(w, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Parity with pylocron, every reduction, with/without weights and ignore_index, 2-D and dense


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ignore", list(IGNORES))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_loss_parity(hF, shape, ignore, weighted, reduction):
    ii, planted = IGNORES[ignore]
    k = shape[-1]
    x = random_input(shape, seed=1) * 2
    t = hard_targets(shape[:-1], k, planted)
    w = class_weight(k) if weighted else None
    gamma = 0.5 if weighted else 2.0  # both exponents, without doubling the case count
    check_against_torch(
        lambda a: L.focal_loss(a, t, gamma=gamma, weight=w, ignore_index=ii, reduction=reduction),
        lambda a: hF.focal_loss(a, torch.tensor(t), tw(w), ii, reduction, gamma),
        x,
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ignore", ["absent", "in_range"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_multilabel_cross_entropy_parity(hF, shape, ignore, weighted, reduction):
    ii, _ = IGNORES[ignore]
    x = random_input(shape, seed=2) * 2
    t = random_input(shape, seed=3, low=0.0)
    w = class_weight(shape[-1]) if weighted else None
    check_against_torch(
        lambda a: L.multilabel_cross_entropy(a, t, weight=w, ignore_index=ii, reduction=reduction),
        lambda a: hF.multilabel_cross_entropy(a, to_torch(t), tw(w), ii, reduction),
        x,
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ignore", list(IGNORES))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_matches_torch(shape, ignore, weighted, reduction):
    ii, planted = IGNORES[ignore]
    k = shape[-1]
    x = random_input(shape, seed=4) * 2
    t = hard_targets(shape[:-1], k, planted)
    w = class_weight(k) if weighted else None
    check_against_torch(
        lambda a: L.cross_entropy(a, t, weight=w, ignore_index=ii, reduction=reduction),
        lambda a: tF.cross_entropy(
            a, torch.tensor(t), weight=tw(w), ignore_index=ii, reduction=reduction
        ),
        x,
    )


def test_cross_entropy_all_ignored_is_zero():
    x = random_input((3, 4), seed=5)
    t = np.full((3,), -100)
    for reduction in ("mean", "sum"):
        loss, g = jax.value_and_grad(lambda a: L.cross_entropy(a, t, reduction=reduction))(
            jnp.asarray(x)
        )
        assert float(loss) == 0.0  # torch gives NaN for 'mean' here
        assert not np.any(np.asarray(g))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ignore", ["absent", "in_range"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_complement_cross_entropy_parity(hF, shape, ignore, weighted, reduction):
    ii, planted = IGNORES[ignore]
    k = shape[-1]
    x = random_input(shape, seed=6) * 2
    t = hard_targets(shape[:-1], k, planted)
    w = class_weight(k) if weighted else None
    gamma = 0.5 if weighted else -1.0
    check_against_torch(
        lambda a: L.complement_cross_entropy(
            a, t, gamma=gamma, weight=w, ignore_index=ii, reduction=reduction
        ),
        lambda a: hF.complement_cross_entropy(a, torch.tensor(t), tw(w), ii, reduction, gamma),
        x,
    )


@pytest.mark.parametrize("weighted", [False, True])
def test_complement_cross_entropy_minus100_targets(hF, weighted):
    """pylocron crashes on a -100 target; ignored positions give 0 and no gradient, the others equal
    upstream's per-position values on the valid rows."""
    x = random_input((6, 5), seed=7) * 2
    t = hard_targets((6,), 5, -100)
    valid = t != -100
    w = class_weight(5) if weighted else None
    fn = functools.partial(L.complement_cross_entropy, targets=t, weight=w)
    none, vjp = jax.vjp(lambda a: fn(a, reduction="none"), jnp.asarray(x))
    ref = hF.complement_cross_entropy(
        to_torch(x[valid]), torch.tensor(t[valid]), tw(w), -100, "none"
    )
    assert_close(np.asarray(none)[valid], ref.numpy(), what="valid rows")
    assert np.all(np.asarray(none)[~valid] == 0)
    (g,) = vjp(jnp.ones_like(none))
    assert np.all(np.asarray(g)[~valid] == 0) and np.all(np.any(np.asarray(g)[valid] != 0, axis=-1))
    ce = tF.cross_entropy(to_torch(x), torch.tensor(t), weight=tw(w), ignore_index=-100)
    complement = ref - tF.cross_entropy(
        to_torch(x[valid]), torch.tensor(t[valid]), weight=tw(w), reduction="none"
    )
    # CE: torch's weighted mean over valid rows; complement: averaged over ALL rows (as upstream).
    assert_close(fn(jnp.asarray(x)), (ce + complement.sum() / len(t)).item(), what="mean")
    assert_close(fn(jnp.asarray(x), reduction="sum"), ref.sum().item(), what="sum")


def test_complement_cross_entropy_confident_prediction_is_finite(hF):
    """Upstream evaluates p / (1 - p_t) and returns inf when p_t rounds to 1; the softmax over the
    non-target logits gives the exact value: CE ~ 0 and complement log(K-1)/(K-1)."""
    x = np.ones((2, 4), np.float32)
    x[:, 0] = 100
    t = np.zeros(2, np.int64)
    assert math.isinf(hF.complement_cross_entropy(torch.tensor(x).float(), torch.tensor(t)).item())
    assert_close(L.complement_cross_entropy(x, t), -math.log(3) / 3, what="confident")
    # Where float32 upstream is still accurate, it agrees.
    x[:, 0] = 5
    assert_close(
        L.complement_cross_entropy(x, t),
        hF.complement_cross_entropy(to_torch(x), torch.tensor(t)).item(),
    )


# (spatial shape, xi): logits (N, C), (N, L, C), (N, H, W, C) with C = K * xi.
MC_CASES = (((6,), 2), ((6,), 3), ((2, 7), 2), ((2, 3, 4), 2), ((2, 3, 4), 3))


@pytest.mark.parametrize("spatial,xi", MC_CASES)
@pytest.mark.parametrize("ignore", list(IGNORES))
@pytest.mark.parametrize("weighted", [False, True])
def test_mutual_channel_loss_eval_parity(hF, spatial, xi, ignore, weighted):
    ii, planted = IGNORES[ignore]
    k = 4
    shape = (*spatial, k * xi)
    x = random_input(shape, seed=8) * 2
    t = hard_targets(spatial, k, planted)
    w = class_weight(k) if weighted else None
    for reduction in REDUCTIONS:
        check_against_torch(
            lambda a: L.mutual_channel_loss(
                a, t, xi=xi, alpha=0.7, weight=w, ignore_index=ii, reduction=reduction
            ),
            lambda a: hF.mutual_channel_loss(
                a, torch.tensor(t), tw(w), ii, reduction, xi, 0.7, training=False
            ),
            x,
        )


def torch_perms_for(mask: np.ndarray):
    """Permutations that make upstream's ``base_mask[randperm(xi)]`` equal ``mask`` row by row."""
    k, xi = mask.shape
    keep = math.ceil(xi / 2)
    perms = []
    for row in mask:
        perm = np.empty(xi, np.int64)
        perm[row] = np.arange(keep)
        perm[~row] = np.arange(keep, xi)
        perms.append(torch.tensor(perm))
    return perms


@pytest.mark.parametrize("spatial,xi", [((6,), 2), ((2, 7), 2), ((2, 3, 4), 3)])
@pytest.mark.parametrize("ignore", ["absent", "minus100"])
def test_mutual_channel_loss_train_parity(hF, monkeypatch, spatial, xi, ignore):
    """Train mode equals upstream driven by the same channel mask (torch.randperm patched)."""
    ii, planted = IGNORES[ignore]
    k = 4
    x = random_input((*spatial, k * xi), seed=9) * 2
    t = hard_targets(spatial, k, planted)
    w = class_weight(k)
    key = jax.random.key(3)
    mask = np.asarray(L._mc_channel_mask(key, k, xi))
    assert mask.shape == (k, xi) and np.all(mask.sum(axis=1) == math.ceil(xi / 2))
    for reduction in REDUCTIONS:
        perms = iter(torch_perms_for(mask))

        def fake_randperm(n, **kwargs):
            assert n == xi
            return next(perms)

        monkeypatch.setattr(torch, "randperm", fake_randperm)
        check_against_torch(
            lambda a: L.mutual_channel_loss(
                a, t, xi=xi, train=True, rng=key, weight=w, ignore_index=ii, reduction=reduction
            ),
            lambda a: hF.mutual_channel_loss(
                a, torch.tensor(t), tw(w), ii, reduction, xi, 1.0, training=True
            ),
            x,
        )
        monkeypatch.undo()


def test_mutual_channel_loss_train_mask():
    """Each class keeps exactly ceil(xi/2) channels; masks differ across keys and classes; the key
    alone decides (deterministic); xi=1 keeps everything, so train == eval."""
    masks = [np.asarray(L._mc_channel_mask(jax.random.key(s), 6, 4)) for s in range(20)]
    assert all(np.all(m.sum(axis=1) == 2) for m in masks)
    assert len({m.tobytes() for m in masks}) > 1
    assert any(len({row.tobytes() for row in m}) > 1 for m in masks)
    x = random_input((2, 3, 4, 12), seed=10)
    t = hard_targets((2, 3, 4), 4)
    a = L.mutual_channel_loss(x, t, xi=3, train=True, rng=jax.random.key(1))
    b = L.mutual_channel_loss(x, t, xi=3, train=True, rng=jax.random.key(1))
    assert float(a) == float(b)
    x1 = random_input((6, 8), seed=10)
    t1 = hard_targets((6,), 8)
    assert float(L.mutual_channel_loss(x1, t1, xi=1, train=True, rng=jax.random.key(0))) == float(
        L.mutual_channel_loss(x1, t1, xi=1)
    )


def test_mutual_channel_loss_all_ignored(hF):
    """The upstream test's case: every target ignored -> discriminality 0, diversity 0, and
    gradients still flow (to zero)."""
    x = np.ones((6, 8), np.float32)
    x[:, 0] = 10
    t = np.zeros(6, np.int64)
    for reduction in REDUCTIONS:
        loss, vjp = jax.vjp(
            lambda a: L.mutual_channel_loss(a, t, ignore_index=0, reduction=reduction),
            jnp.asarray(x),
        )
        ref = hF.mutual_channel_loss(
            to_torch(x), torch.tensor(t), None, 0, reduction, training=False
        )
        assert_close(loss, ref.numpy(), what=reduction)
        (g,) = vjp(jnp.ones_like(loss))
        assert g.shape == x.shape and np.all(np.isfinite(np.asarray(g)))
    assert L.mutual_channel_loss(x, t, ignore_index=0, reduction="none").shape == (6,)
    # fp16 class weights are accepted (cast), as upstream's test checks.
    assert L.mutual_channel_loss(x, t, weight=jnp.ones(4, jnp.float16)).dtype == jnp.float32


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted,gamma", [(False, 1.0), (True, 1.0), (True, 2.0), (False, 0.5)])
def test_dice_loss_parity(hF, shape, weighted, gamma):
    k = shape[-1]
    probs = np.asarray(jax.nn.softmax(random_input(shape, seed=12) * 2, axis=-1))
    target = np.asarray(jax.nn.one_hot(hard_targets(shape[:-1], k, seed=13), k))
    w = class_weight(k) if weighted else None
    # Upstream flattens dims >= 2 and needs rank >= 3: give it a trailing unit axis for (N, K).
    lift = (lambda a: a[..., None]) if len(shape) == 2 else (lambda a: a)
    for t in (target, random_input(shape, seed=14, low=0.0)):
        check_against_torch(
            lambda a: L.dice_loss(a, t, gamma=gamma, weight=w),
            lambda a: hF.dice_loss(lift(a), lift(to_torch(t)), tw(w), gamma),
            probs,
        )
    # A perfect prediction gives 0 when every class occurs (an absent class has dice eps/eps = 1).
    every_class = np.asarray(
        jax.nn.one_hot(np.arange(int(np.prod(shape[:-1]))).reshape(shape[:-1]) % k, k)
    )
    assert abs(float(L.dice_loss(every_class, every_class, gamma=gamma, weight=w))) < 1e-6


def poly_hard_reference(hF, xt, t, eps, w, ii, reduction):
    """Upstream's per-position Poly-1 values (targets made safe, so it cannot crash), then the fix:
    zero and exclude positions whose target is ``ii``, keep the targets' shape for 'none'."""
    valid = torch.tensor(t != ii)
    safe = torch.tensor(np.where(t != ii, t, 0))
    per_position = hF.poly_loss(xt, safe, eps, w, -100, "none").view(t.shape)
    per_position = per_position.masked_fill(~valid, 0)
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    return per_position.sum() / valid.sum().clamp_min(1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ignore", list(IGNORES))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_poly_loss_hard_parity(hF, shape, ignore, weighted, reduction):
    ii, planted = IGNORES[ignore]
    k = shape[-1]
    x = random_input(shape, seed=15) * 2
    t = hard_targets(shape[:-1], k, planted)
    w = class_weight(k) if weighted else None
    fn = lambda a: L.poly_loss(a, t, eps=1.5, weight=w, ignore_index=ii, reduction=reduction)  # noqa: E731
    upstream_ok = reduction != "none" and ignore != "minus100"
    if upstream_ok:  # pylocron 0.3.0 itself
        check_against_torch(
            fn, lambda a: hF.poly_loss(a, torch.tensor(t), 1.5, tw(w), ii, reduction), x
        )
    check_against_torch(fn, lambda a: poly_hard_reference(hF, a, t, 1.5, tw(w), ii, reduction), x)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ignore", ["absent", "in_range"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_poly_loss_soft_parity(hF, shape, ignore, weighted, reduction):
    ii, _ = IGNORES[ignore]
    k = shape[-1]
    x = random_input(shape, seed=16) * 2
    t = random_input(shape, seed=17, low=0.0)
    w = class_weight(k) if weighted else None
    fn = lambda a: L.poly_loss(a, t, eps=1.5, weight=w, ignore_index=ii, reduction=reduction)  # noqa: E731
    if w is None or len(shape) == 2:
        check_against_torch(
            fn, lambda a: hF.poly_loss(a, to_torch(t), 1.5, tw(w), ii, reduction), x
        )
    else:
        # Upstream reshapes the weight to (1, K) and broadcasts it against the LAST axis of a dense
        # (N, K, *S) loss (a shape error unless that axis has K entries): restate it per class.
        def reference(a):
            z = to_torch(t) * torch.log_softmax(a, dim=1)
            loss = tw(w).view(1, -1, *[1] * (a.ndim - 2)) * (-z + 1.5 * (1 - z.exp()))
            loss = loss[:, torch.arange(k) != ii]
            return {"sum": loss.sum(), "mean": loss.sum(1).mean(), "none": loss.sum(1)}[reduction]

        check_against_torch(fn, reference, x)


def test_poly_loss_ignore_index_fix():
    """PolyLoss ignore_index as fixed upstream after 0.3.0 (upstream test_poly_loss_ignore_index, which fails on pylocron 0.3.0)."""
    x = jnp.asarray(random_input((4, 5), seed=18, low=0.0))
    t = np.array([0, -100, 3, 1])
    loss, g = jax.value_and_grad(lambda a: L.poly_loss(a, t))(x)
    assert np.isfinite(float(loss))
    g = np.asarray(g)
    assert np.all(g[1] == 0) and all(np.any(g[i] != 0) for i in (0, 2, 3))
    none = np.asarray(L.poly_loss(x, t, reduction="none"))
    assert none.shape == (4,) and none[1] == 0
    assert_close(loss, none[[0, 2, 3]].mean(), what="mean over valid")
    # Any ignore_index value, dense 'none' keeps the targets' shape.
    xd = random_input((2, 3, 4, 5), seed=19)
    td = hard_targets((2, 3, 4), 5, 7)
    out = np.asarray(L.poly_loss(xd, td, ignore_index=7, reduction="none"))
    assert out.shape == (2, 3, 4) and np.all(out[td == 7] == 0) and np.all(out[td != 7] > 0)


def test_class_balanced_weights(hnn):
    n = np.array([10, 100, 1000, 5])
    cb = L.class_balanced_weights(n, beta=0.99)
    assert cb.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(cb), [0.1046, 0.0158, 0.0100, 0.2040], atol=1e-4)
    # Same weights as the wrapper puts on a criterion, with and without pre-existing weights.
    for base in (None, torch.tensor([1.0, 2.0, 0.5, 1.5])):
        criterion = hnn.FocalLoss(weight=None if base is None else base.clone())
        wrapped = hnn.ClassBalancedWrapper(criterion, torch.tensor(n))
        ours = L.class_balanced_weights(n, weight=None if base is None else base.numpy())
        assert_close(ours, wrapped.criterion.weight.numpy(), what="class-balanced weights")
        x = random_input((6, 4), seed=20)
        t = hard_targets((6,), 4)
        assert_close(
            L.focal_loss(x, t, weight=ours),
            wrapped(torch.tensor(x), torch.tensor(t)).item(),
            what="wrapped loss",
        )
    with pytest.raises(ValueError, match=r"class_balanced_weights: num_samples must be a 1-D"):
        L.class_balanced_weights(np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"class_balanced_weights: weight must have shape \(4,\)"):
        L.class_balanced_weights(n, weight=np.ones(3))


# ----------------------------------------------------------------------------------------------
# Upstream test-suite properties (holocron tests/test_nn_loss.py: _test_loss_function and per-loss checks)


COMMON = {
    "focal": (L.focal_loss, False),
    "multilabel": (L.multilabel_cross_entropy, True),
    "poly_hard": (L.poly_loss, False),
    "poly_soft": (L.poly_loss, True),
    "cross_entropy": (L.cross_entropy, False),
}


@pytest.mark.parametrize("name", list(COMMON))
def test_common_loss_properties(name):
    fn, multi_label = COMMON[name]
    n, k = 2, 4
    x = np.ones((n, k), np.float32)
    x[:, 0] = 100
    target = np.zeros(n, np.int64)
    if multi_label:
        target = np.asarray(jax.nn.one_hot(target, k))
    assert abs(float(fn(x, target))) < 1e-3
    np.testing.assert_allclose(np.asarray(fn(x, target, reduction="none")), np.zeros(n), atol=1e-3)

    x = jnp.asarray(random_input((n, k), seed=21))
    target = hard_targets((n,), k, seed=22)
    target[0] = 1
    if multi_label:
        target = random_input((n, k), seed=23, low=0.0)
    loss = float(fn(x, target))
    assert loss == float(fn(x, target, weight=np.ones(k)))
    assert loss == float(fn(x, target, ignore_index=k))
    assert loss != float(fn(x, target, ignore_index=1))
    g = jax.grad(lambda a: fn(a, target, ignore_index=0))(x)
    assert g.shape == x.shape and np.all(np.isfinite(np.asarray(g)))
    none = np.asarray(fn(x, target, reduction="none"))
    total = float(fn(x, target, reduction="sum"))
    assert abs(total - none.sum()) < 1e-6
    assert abs(loss - total / n) < 1e-6


def test_focal_gamma0_is_cross_entropy():
    x = random_input((2, 20, 20, 4), seed=24)
    t = hard_targets((2, 20, 20), 4, seed=25)
    ref = tF.cross_entropy(to_torch(x), torch.tensor(t)).item()
    assert abs(float(L.focal_loss(x, t, gamma=0)) - ref) < 1e-5
    assert abs(float(L.cross_entropy(x, t)) - ref) < 1e-5
    # (1 - 1/K) FL(gamma=0) == FL(gamma=1) with uniform logits.
    u = np.zeros((2, 20, 20, 4), np.float32)
    assert (
        abs(0.75 * float(L.focal_loss(u, t, gamma=0)) - float(L.focal_loss(u, t, gamma=1))) < 1e-5
    )


def test_multilabel_one_hot_is_cross_entropy():
    x = random_input((2, 20, 20, 4), seed=26)
    t = hard_targets((2, 20, 20), 4, seed=27)
    ref = tF.cross_entropy(to_torch(x), torch.tensor(t)).item()
    assert abs(float(L.multilabel_cross_entropy(x, jax.nn.one_hot(t, 4))) - ref) < 1e-5


def test_complement_gamma0_is_cross_entropy():
    x = random_input((2, 3, 4, 5), seed=28)
    t = hard_targets((2, 3, 4), 5, seed=29)
    assert float(L.complement_cross_entropy(x, t, gamma=0)) == float(L.cross_entropy(x, t))
    g = jax.grad(lambda a: L.complement_cross_entropy(a, t, ignore_index=0))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------------------------
# jit, bfloat16, bad input

CASES = {
    "focal": (L.focal_loss, "hard", {"gamma": 2.0, "ignore_index": -100}),
    "multilabel": (L.multilabel_cross_entropy, "soft", {"ignore_index": 1}),
    "complement": (L.complement_cross_entropy, "hard", {"ignore_index": -100}),
    "cross_entropy": (L.cross_entropy, "hard", {}),
    "mc_eval": (L.mutual_channel_loss, "mc", {"xi": 2}),
    "mc_train": (L.mutual_channel_loss, "mc", {"xi": 2, "train": True, "rng": jax.random.key(0)}),
    "poly_hard": (L.poly_loss, "hard", {"ignore_index": -100}),
    "poly_soft": (L.poly_loss, "soft", {}),
    "dice": (L.dice_loss, "probs", {}),
}


def _case_inputs(kind, seed=30):
    """Dense inputs of the shapes the parity tests already use (eager ops compile once per shape)."""
    k = 4 if kind == "mc" else 5
    x = random_input((2, 3, 4, 8 if kind == "mc" else k), seed=seed) * 2
    if kind in ("hard", "mc"):
        t = hard_targets((2, 3, 4), k, -100, seed=seed + 1)
    elif kind == "soft":
        t = random_input(x.shape, seed=seed + 1, low=0.0)
    else:
        x = np.asarray(jax.nn.softmax(x, axis=-1))
        t = np.asarray(jax.nn.one_hot(hard_targets((2, 3, 4), k, seed=seed + 1), k))
    return x, t, class_weight(k)


@pytest.mark.parametrize("name", list(CASES))
def test_jit_matches_eager(name):
    fn, kind, kwargs = CASES[name]
    x, t, w = _case_inputs(kind)
    reductions = [None] if kind == "probs" else REDUCTIONS
    for reduction in reductions:
        kw = dict(kwargs) if reduction is None else {**kwargs, "reduction": reduction}
        rng = kw.pop("rng", None)
        extra = {} if rng is None else {"rng": rng}
        # weight, targets and the key are traced arguments; static options are closed over.
        jitted = jax.jit(lambda a, b, ww, **e: fn(a, b, weight=ww, **kw, **e))
        assert_close(
            jitted(x, t, w, **extra),
            fn(x, t, weight=w, **kw, **extra),
            1e-6,
            what=f"jit {reduction}",
        )
    if kind == "hard":  # ignore_index may be traced too
        jitted = jax.jit(lambda a, ii: fn(a, t, ignore_index=ii))
        assert_close(jitted(x, -100), fn(x, t, ignore_index=-100), 1e-6, what="traced ignore_index")


@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_logits(name):
    fn, kind, kwargs = CASES[name]
    x, t, w = _case_inputs(kind)
    reductions = [None] if kind == "probs" else REDUCTIONS
    for reduction in reductions:
        kw = dict(kwargs) if reduction is None else {**kwargs, "reduction": reduction}
        low = fn(jnp.asarray(x, jnp.bfloat16), t, weight=w, **kw)
        full = fn(x, t, weight=w, **kw)
        assert low.dtype == jnp.float32
        scale = float(jnp.max(jnp.abs(full)))
        np.testing.assert_allclose(np.asarray(low), np.asarray(full), rtol=2e-2, atol=2e-2 * scale)


ALL_WITH_REDUCTION = [
    (L.focal_loss, "hard"),
    (L.multilabel_cross_entropy, "soft"),
    (L.complement_cross_entropy, "hard"),
    (L.cross_entropy, "hard"),
    (L.mutual_channel_loss, "mc"),
    (L.poly_loss, "hard"),
]


@pytest.mark.parametrize("fn,kind", ALL_WITH_REDUCTION, ids=lambda v: getattr(v, "__name__", v))
def test_bad_inputs(fn, kind):
    name = fn.__name__
    x, t, w = _case_inputs(kind)
    with pytest.raises(
        ValueError, match=rf"{name}: reduction must be one of \('none', 'mean', 'sum'\), got 'avg'"
    ):
        fn(x, t, reduction="avg")
    with pytest.raises(
        ValueError, match=rf"{name}: expected logits of rank >= 2 .* got shape \(\d+,\)"
    ):
        fn(x[0, 0, 0], t[0, 0, 0])
    bad_t = t[:, :2]
    with pytest.raises(ValueError, match=rf"{name}: .*shape"):
        fn(x, bad_t)
    k = 4 if kind == "mc" else 5
    with pytest.raises(
        ValueError, match=rf"{name}: weight must have shape \({k},\) .* got shape \(3,\)"
    ):
        fn(x, t, weight=np.ones(3))
    if kind == "hard":
        with pytest.raises(TypeError, match=rf"{name}: .*integer dtype"):
            fn(x, t.astype(np.float32))


def test_bad_inputs_specific():
    x, t, _ = _case_inputs("mc")
    with pytest.raises(
        ValueError,
        match=r"mutual_channel_loss: the logits' last axis \(8 channels.*multiple of xi=3",
    ):
        L.mutual_channel_loss(x, t, xi=3)
    with pytest.raises(
        ValueError, match=r"mutual_channel_loss: xi must be a positive integer, got 0"
    ):
        L.mutual_channel_loss(x, t, xi=0)
    with pytest.raises(ValueError, match=r"mutual_channel_loss: train=True .* needs a PRNG key"):
        L.mutual_channel_loss(x, t, train=True)
    x, t, _ = _case_inputs("hard")
    with pytest.raises(TypeError, match=r"poly_loss: hard targets must have an integer dtype"):
        L.poly_loss(x, t.astype(np.float32))
    with pytest.raises(ValueError, match=r"poly_loss: invalid target shape \(2, 3, 4, 6\)"):
        L.poly_loss(x, np.zeros((2, 3, 4, 6), np.float32))
    with pytest.raises(ValueError, match=r"complement_cross_entropy: needs at least 2 classes"):
        L.complement_cross_entropy(x[..., :1], t)
    with pytest.raises(ValueError, match=r"dice_loss: expected targets of the logits' shape"):
        L.dice_loss(x, x[..., :3])
    with pytest.raises(ValueError, match=r"dice_loss: expected probs of rank >= 2"):
        L.dice_loss(x[0, 0, 0], x[0, 0, 0])
    with pytest.raises(TypeError, match=r"focal_loss: logits must be floating point"):
        L.focal_loss(t, t[..., 0])
