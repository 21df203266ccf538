"""Losses as pure functions: logits with the class axis LAST, integer targets without it.

JAX re-implementations of the ``holocron.nn`` losses (pylocron 0.3.0)
and of PyTorch-Encoding's ``encoding.nn`` losses (``encoding/nn/loss.py``). Shapes follow
docs/DESIGN.md, Public conventions:

- logits (and probabilities) are ``(N, K)`` or dense ``(N, *S, K)`` (any number of spatial axes);
- integer (hard) targets are ``(N,)`` / ``(N, *S)``: the logits' shape minus the class axis;
- soft or multi-label targets have the logits' shape.

Common keywords, where upstream has them: ``weight`` (per-class weights, shape ``(K,)``),
``ignore_index`` (a target value, or for soft/multi-label targets a class column, that does not
contribute) and ``reduction`` ('none' | 'mean' | 'sum'). Everything is computed in float32
(bfloat16/float16 logits are upcast, as upstream does) and returned in float32. Every function is
jit-compatible: ``ignore_index`` is handled with masks, never with data-dependent Python control
flow, so it may be traced. ``reduction``, ``xi`` and ``train`` are static (Python values).

Hard targets must lie in ``[0, K)`` or equal ``ignore_index``; other values cannot be checked under
jit and give undefined results.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxenc.validation import check_positive_int, check_reduction

__all__ = [
    "class_balanced_weights",
    "complement_cross_entropy",
    "cross_entropy",
    "dice_loss",
    "focal_loss",
    "label_smoothing_cross_entropy",
    "multilabel_cross_entropy",
    "mutual_channel_loss",
    "poly_loss",
    "se_targets",
    "segmentation_loss",
    "soft_target_cross_entropy",
]

_F32 = jnp.float32


# ----------------------------------------------------------------------------------------------
# Validation and shared pieces


def _logits(logits, where: str, name: str = "logits") -> tuple[jax.Array, int]:
    """float32 logits of rank >= 2 and their class count K (last axis)."""
    x = jnp.asarray(logits)
    if x.ndim < 2:
        raise ValueError(
            f"{where}: expected {name} of rank >= 2 ((N, K) or (N, *S, K), class axis last), "
            f"got shape {tuple(x.shape)} (rank {x.ndim})"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{where}: {name} must be floating point, got dtype {x.dtype}")
    return x.astype(_F32), int(x.shape[-1])


def _hard_targets(targets, x: jax.Array, where: str) -> jax.Array:
    """Integer targets of shape ``x.shape[:-1]``."""
    t = jnp.asarray(targets)
    if t.shape != x.shape[:-1]:
        raise ValueError(
            f"{where}: expected integer targets of shape {tuple(x.shape[:-1])} (the logits' shape "
            f"{tuple(x.shape)} without the class axis), got shape {tuple(t.shape)}"
        )
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"{where}: hard targets must have an integer dtype, got {t.dtype}")
    return t


def _soft_targets(targets, x: jax.Array, where: str, name: str = "targets") -> jax.Array:
    """float32 targets of the logits' shape."""
    t = jnp.asarray(targets)
    if t.shape != x.shape:
        raise ValueError(
            f"{where}: expected {name} of the logits' shape {tuple(x.shape)} (class axis last), "
            f"got shape {tuple(t.shape)}"
        )
    return t.astype(_F32)


def _class_weights(weight, num_classes: int, where: str) -> jax.Array:
    """Per-class weights as a float32 (K,) vector; ones when ``weight`` is None.

    Materialising the ones keeps ``loss(weight=None)`` and ``loss(weight=ones)`` bit-identical, as
    the upstream tests require.
    """
    if weight is None:
        return jnp.ones((num_classes,), _F32)
    w = jnp.asarray(weight, dtype=_F32)
    if w.shape != (num_classes,):
        raise ValueError(
            f"{where}: weight must have shape ({num_classes},) (one value per class), "
            f"got shape {tuple(w.shape)}"
        )
    return w


def _class_inputs(
    logits, targets, weight, where: str, as_targets=_hard_targets, name: str = "logits"
) -> tuple[jax.Array, int, jax.Array, jax.Array]:
    """(x, K, targets, class weights): :func:`_logits`, then ``as_targets`` (hard or soft) and
    :func:`_class_weights`, validated in that order."""
    x, k = _logits(logits, where, name=name)
    return x, k, as_targets(targets, x, where), _class_weights(weight, k, where)


def _mask_targets(targets: jax.Array, ignore_index) -> tuple[jax.Array, jax.Array]:
    """(valid, safe): valid = target != ignore_index for ANY ignore_index; ignored targets -> class 0."""
    valid = targets != ignore_index
    return valid, jnp.where(valid, targets, 0)


def _take_class(values: jax.Array, classes: jax.Array) -> jax.Array:
    """``values[..., classes]`` per position: (N, *S, K) x (N, *S) -> (N, *S)."""
    return jnp.take_along_axis(values, classes[..., None], axis=-1)[..., 0]


def _column_mask(num_classes: int, ignore_index) -> jax.Array:
    """False at class column ``ignore_index`` (no column removed when it is outside [0, K))."""
    return jnp.arange(num_classes) != ignore_index


def _reduce_over_valid(loss: jax.Array, valid: jax.Array, reduction: str) -> jax.Array:
    """``loss`` is already 0 at invalid positions; 'mean' divides by max(#valid, 1)."""
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    return total / jnp.maximum(jnp.sum(valid), 1).astype(_F32)


def _reduce_columns(loss: jax.Array, columns: jax.Array, reduction: str) -> jax.Array:
    """Per-class losses (N, *S, K): drop masked columns, then 'sum' = total, else sum over classes
    -> (N, *S), averaged by 'mean' (holocron's multi-label reduction)."""
    per_position = jnp.sum(jnp.where(columns, loss, 0.0), axis=-1)
    if reduction == "sum":
        return jnp.sum(per_position)
    if reduction == "mean":
        return jnp.mean(per_position)
    return per_position


# ----------------------------------------------------------------------------------------------
# Losses


def cross_entropy(
    logits, targets, *, weight=None, ignore_index=-100, reduction="mean"
) -> jax.Array:
    """Cross-entropy with hard labels, with ``torch.nn.functional.cross_entropy`` semantics.

    ℓ_i = -w[t_i] · log softmax(x_i)[t_i], 0 where t_i == ignore_index (any value). 'mean' is
    torch's weighted mean Σ ℓ_i / Σ_{valid} w[t_i]; unlike torch it returns 0 (not NaN) when no
    target is valid.

    Args:
        logits: (N, K) or (N, *S, K).
        targets: integer (N,) or (N, *S).
        weight: optional (K,) class weights.
        ignore_index: target value that does not contribute.
        reduction: 'none' -> (N, *S); 'mean' | 'sum' -> scalar.
    """
    where = "cross_entropy"
    check_reduction(reduction, where)
    x, k, t, w = _class_inputs(logits, targets, weight, where)
    valid, safe = _mask_targets(t, ignore_index)
    w_t = jnp.where(valid, w[safe], 0.0)
    loss = jnp.where(valid, -w_t * _take_class(jax.nn.log_softmax(x, axis=-1), safe), 0.0)
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    denominator = jnp.sum(w_t)
    return total / jnp.where(denominator == 0, 1.0, denominator)


def focal_loss(
    logits, targets, *, gamma=2.0, weight=None, ignore_index=-100, reduction="mean"
) -> jax.Array:
    """Focal loss, "Focal Loss for Dense Object Detection" (Lin et al., 2017, arXiv:1708.02002).

    ℓ_i = -(1 - p_t)^γ · w[t] · log p_t with p_t = softmax(x_i)[t_i] (pylocron 0.3.0: the weight
    scales the log term only, after p_t is taken). Positions with target == ignore_index (any value,
    -100 included) give 0. 'mean' = Σ ℓ / max(#valid, 1): NOT divided by the sum of weights (unlike
    torch's weighted cross-entropy).

    Args:
        logits: (N, K) or (N, *S, K).
        targets: integer (N,) or (N, *S).
        gamma: focusing exponent γ >= 0.
        weight: optional (K,) class weights.
        ignore_index: target value that does not contribute.
        reduction: 'none' -> (N, *S) with 0 at ignored positions; 'mean' | 'sum' -> scalar.
    """
    where = "focal_loss"
    check_reduction(reduction, where)
    x, k, t, w = _class_inputs(logits, targets, weight, where)
    valid, safe = _mask_targets(t, ignore_index)
    logp_t = _take_class(jax.nn.log_softmax(x, axis=-1), safe)
    p_t = jnp.exp(logp_t)
    # γ = 0 must be the plain CE (and its gradient) even where p_t == 1: skip the 0**0 factor.
    modulation = 1.0 if isinstance(gamma, (int, float)) and gamma == 0 else (1.0 - p_t) ** gamma
    loss = jnp.where(valid, -modulation * (w[safe] * logp_t), 0.0)
    return _reduce_over_valid(loss, valid, reduction)


def multilabel_cross_entropy(
    logits, targets, *, weight=None, ignore_index=-100, reduction="mean"
) -> jax.Array:
    """Cross-entropy for multi-label (multi-hot or soft) targets, as holocron's.

    ℓ_{i,k} = -t_{i,k} · w_k · log softmax(x_i)_k. ``ignore_index`` in [0, K) removes that class
    COLUMN (it does not remove samples). 'sum' = total; otherwise summed over classes -> (N, *S),
    averaged over all positions by 'mean'. With one-hot targets this is the cross-entropy.

    Args:
        logits: (N, K) or (N, *S, K).
        targets: (N, K) or (N, *S, K), same shape as logits.
        weight: optional (K,) class weights.
        ignore_index: class column to drop.
        reduction: 'none' -> (N, *S); 'mean' | 'sum' -> scalar.
    """
    where = "multilabel_cross_entropy"
    check_reduction(reduction, where)
    x, k, t, w = _class_inputs(logits, targets, weight, where, _soft_targets)
    loss = -t * (jax.nn.log_softmax(x, axis=-1) * w)
    return _reduce_columns(loss, _column_mask(k, ignore_index), reduction)


def complement_cross_entropy(
    logits, targets, *, gamma=-1.0, weight=None, ignore_index=-100, reduction="mean"
) -> jax.Array:
    """Complement cross-entropy, "Imbalanced Image Classification with Complement Cross Entropy"
    (Kim et al., 2020, arXiv:2009.02189).

    Returns CE + γ · C, where CE is :func:`cross_entropy` (torch semantics: ignore_index per
    position, weighted mean) and C is the complement entropy
    C_i = Σ_{j ≠ t_i} -(1/(K-1)) · w_j · q_j log q_j with q_j = p_j / (1 - p_{t_i}), i.e. the softmax
    over the non-target classes. As upstream, ``ignore_index`` in [0, K) removes that class column
    from C (positions whose target is ignore_index still contribute through the other columns), and
    C is reduced like :func:`multilabel_cross_entropy` ('mean' averages over ALL positions).

    Differences from pylocron 0.3.0 (same formula, better defined):
    - q is evaluated as a softmax over the non-target logits instead of p / (1 - p_t), so a
      confident prediction (p_t rounding to 1 in float32) gives a finite loss instead of inf.
    - positions whose target is outside [0, K) (an out-of-range ``ignore_index`` such as -100,
      where upstream crashes) contribute 0 to C.
    - when no target is valid, CE is 0 instead of NaN.

    Args:
        logits: (N, K) or (N, *S, K) with K >= 2.
        targets: integer (N,) or (N, *S).
        gamma: complement factor; a Python 0 returns CE alone. The default -1 maximises the
            complement entropy.
        weight: optional (K,) class weights.
        ignore_index: target value ignored by CE; class column dropped from C.
        reduction: 'none' -> (N, *S); 'mean' | 'sum' -> scalar.
    """
    where = "complement_cross_entropy"
    check_reduction(reduction, where)
    x, k = _logits(logits, where)
    if k < 2:
        raise ValueError(
            f"{where}: needs at least 2 classes on the logits' last axis, got shape {tuple(x.shape)}"
        )
    t = _hard_targets(targets, x, where)
    w = _class_weights(weight, k, where)
    ce = cross_entropy(x, t, weight=w, ignore_index=ignore_index, reduction=reduction)
    if isinstance(gamma, (int, float)) and gamma == 0:
        return ce

    has_class = (t >= 0) & (t < k)
    is_target = jax.nn.one_hot(jnp.where(has_class, t, 0), k, dtype=jnp.bool_)
    log_q = jax.nn.log_softmax(jnp.where(is_target, -jnp.inf, x), axis=-1)
    # The target column is -inf in log_q: replace it BEFORE q log q so neither value nor gradient is NaN.
    log_q = jnp.where(is_target, 0.0, log_q)
    entropy = jnp.where(is_target, 0.0, -jnp.exp(log_q) * log_q) / (k - 1)
    entropy = jnp.where(has_class[..., None], entropy * w, 0.0)
    complement = _reduce_columns(entropy, _column_mask(k, ignore_index), reduction)
    return ce + gamma * complement


def _mc_channel_mask(rng, num_classes: int, xi: int) -> jax.Array:
    """Boolean (K, ξ) mask keeping a uniformly random ⌈ξ/2⌉ of the ξ channels of every class."""
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (num_classes, xi)), axis=-1), axis=-1)
    return ranks < math.ceil(xi / 2)


def mutual_channel_loss(
    logits,
    targets,
    *,
    xi=2,
    alpha=1.0,
    train=False,
    rng=None,
    weight=None,
    ignore_index=-100,
    reduction="mean",
) -> jax.Array:
    """Mutual-channel loss, "The Devil is in the Channels: Mutual-Channel Loss for Fine-Grained
    Image Classification" (Chang et al., 2020, arXiv:2002.04264), with pylocron 0.3.0 semantics.

    The C = K·ξ channels of the last axis are grouped per class (channel k·ξ + j is feature j of
    class k, the NHWC analogue of upstream's NCHW order). Returns L_dis - α·L_div:

    - L_dis: :func:`cross_entropy` (weight, ignore_index, reduction) of the channel-wise max over
      each class's ξ features (CCMP). With ``train=True`` a random ⌈ξ/2⌉ of each class's features
      are kept (mask drawn from ``rng``, shared over the batch and positions; dropped features are
      set to the float32 minimum); 0 when no target is valid.
    - L_div: per sample and feature, softmax over the spatial positions (ignored positions set to the
      float32 minimum), max over the ξ features, mean over classes -> (N, *S), 0 at ignored
      positions. 'mean' = Σ / max(#valid, 1). For 2-D logits it is 1 at every valid sample.

    Args:
        logits: (N, C) or (N, *S, C) with C = K·ξ.
        targets: integer (N,) or (N, *S).
        xi: features per class ξ (static).
        alpha: diversity factor α.
        train: draw the channel mask (upstream's ``training``).
        rng: jax PRNG key for the mask; required when ``train``.
        weight: optional (K,) class weights.
        ignore_index: target value that does not contribute.
        reduction: 'none' -> (N, *S); 'mean' | 'sum' -> scalar.
    """
    where = "mutual_channel_loss"
    check_reduction(reduction, where)
    check_positive_int(xi, "xi", where)
    x, channels = _logits(logits, where)
    if channels % xi != 0:
        raise ValueError(
            f"{where}: the logits' last axis ({channels} channels, shape {tuple(x.shape)}) must be a "
            f"multiple of xi={xi} (K classes x xi features)"
        )
    if train and rng is None:
        raise ValueError(
            f"{where}: train=True draws a random channel mask and needs a PRNG key, got rng=None"
        )
    t = _hard_targets(targets, x, where)
    k = channels // xi
    w = _class_weights(weight, k, where)
    n, spatial = x.shape[0], x.shape[1:-1]
    lowest = jnp.finfo(_F32).min
    grouped = x.reshape(n, -1, k, xi)  # (N, L, K, ξ)

    features = grouped
    if train:
        features = jnp.where(_mc_channel_mask(rng, k, xi), grouped, lowest)
    pooled = jnp.max(features, axis=-1).reshape(*x.shape[:-1], k)
    discriminality = cross_entropy(
        pooled, t, weight=w, ignore_index=ignore_index, reduction=reduction
    )

    valid = (t != ignore_index).reshape(n, -1)  # (N, L)
    attention = jax.nn.softmax(jnp.where(valid[..., None, None], grouped, lowest), axis=1)
    diversity = jnp.where(valid, jnp.mean(jnp.max(attention, axis=-1), axis=-1), 0.0)
    diversity = _reduce_over_valid(diversity, valid, reduction)
    if reduction == "none":
        diversity = diversity.reshape(n, *spatial)
    return discriminality - alpha * diversity


def dice_loss(probs, targets, *, gamma=1.0, eps=1e-8, weight=None) -> jax.Array:
    """Soft Dice loss, "V-Net: Fully Convolutional Neural Networks for Volumetric Medical Image
    Segmentation" (Milletari et al., 2016, arXiv:1606.04797), with holocron's γ generalisation.

    Per class k, summed over the batch and spatial positions: dice_k = (γ·Σ p·t + ε) / (Σ (p + γ·t) + ε);
    loss = 1 - (1 + 1/γ) · Σ_k w_k dice_k / Σ_k w_k (a plain mean over classes without weights).
    γ > 1 favours recall, γ < 1 precision; p == t gives 0.

    Args:
        probs: predicted probabilities (N, K) or (N, *S, K).
        targets: target probabilities, same shape.
        gamma: recall/precision balance γ.
        eps: smoothing ε.
        weight: optional (K,) class weights.

    Returns:
        A float32 scalar (no ``reduction``: the loss is global over the batch).
    """
    where = "dice_loss"
    p, k, t, w = _class_inputs(probs, targets, weight, where, _soft_targets, name="probs")
    axes = tuple(range(p.ndim - 1))
    intersection = gamma * jnp.sum(p * t, axis=axes)
    cardinality = jnp.sum(p + gamma * t, axis=axes)
    dice = (intersection + eps) / (cardinality + eps)
    return 1.0 - (1.0 + 1.0 / gamma) * jnp.sum(w * dice) / jnp.sum(w)


def poly_loss(
    logits, targets, *, eps=2.0, weight=None, ignore_index=-100, reduction="mean"
) -> jax.Array:
    """Poly-1 loss, "PolyLoss: A Polynomial Expansion Perspective of Classification Loss Functions"
    (Leng et al., 2022, arXiv:2204.12511).

    Hard labels (targets of the logits' shape minus the class axis, integer dtype; a float hard
    target raises TypeError): ℓ_i = w[t_i] · (-log p_t + ε·(1 - p_t)). Positions with
    target == ignore_index give 0 for ANY ignore_index (-100 included); 'mean' = Σ ℓ / max(#valid, 1)
    (no weight normalisation); 'none' returns the targets' shape (N, *S) with exact zeros (and zero
    gradient) at ignored positions. Both are fixes of pylocron 0.3.0, which crashes on a -100 target
    and returns a flattened, un-zeroed (N·∏S,) vector for 'none' (upstream issue #211).

    Soft targets (the logits' shape), holocron's per-class form: z = t ⊙ log p,
    ℓ = -z + ε·(1 - exp z) per class, times w_k; ``ignore_index`` in [0, K) removes that class
    column; 'sum' = total, otherwise summed over classes -> (N, *S) and averaged by 'mean'.

    Args:
        logits: (N, K) or (N, *S, K).
        targets: integer (N,) / (N, *S), or soft (N, K) / (N, *S, K).
        eps: the Poly-1 coefficient ε₁.
        weight: optional (K,) class weights.
        ignore_index: ignored target value (hard) or class column (soft).
        reduction: 'none' -> (N, *S); 'mean' | 'sum' -> scalar.
    """
    where = "poly_loss"
    check_reduction(reduction, where)
    x, k = _logits(logits, where)
    w = _class_weights(weight, k, where)
    t = jnp.asarray(targets)
    log_p = jax.nn.log_softmax(x, axis=-1)
    if t.ndim == x.ndim - 1:
        t = _hard_targets(t, x, where)
        valid, safe = _mask_targets(t, ignore_index)
        logp_t = _take_class(log_p, safe)
        loss = jnp.where(valid, w[safe] * (-logp_t + eps * (1.0 - jnp.exp(logp_t))), 0.0)
        return _reduce_over_valid(loss, valid, reduction)
    if t.shape != x.shape:
        raise ValueError(
            f"{where}: invalid target shape {tuple(t.shape)}: expected integer targets of shape "
            f"{tuple(x.shape[:-1])} or soft targets of the logits' shape {tuple(x.shape)}"
        )
    z = t.astype(_F32) * log_p
    loss = w * (-z + eps * (1.0 - jnp.exp(z)))
    return _reduce_columns(loss, _column_mask(k, ignore_index), reduction)


def class_balanced_weights(num_samples, beta=0.99, weight=None) -> jax.Array:
    """Class-balanced weights, "Class-Balanced Loss Based on Effective Number of Samples"
    (Cui et al., 2019, arXiv:1901.05555): cb_k = (1 - β) / (1 - β^{n_k}).

    The functional form of holocron's ``ClassBalancedWrapper``: pass the result as ``weight=`` to any
    loss. When ``weight`` is given the result is ``weight * cb`` (upstream multiplies the wrapped
    criterion's weight in place; here nothing is mutated).

    Args:
        num_samples: (K,) number of training samples per class.
        beta: rebalancing exponent β in [0, 1).
        weight: optional (K,) weights to multiply.

    Returns:
        float32 (K,) weights. Example: β=0.99, n=[10, 100, 1000, 5] -> [0.1046, 0.0158, 0.0100, 0.2040].
    """
    where = "class_balanced_weights"
    n = jnp.asarray(num_samples, dtype=_F32)
    if n.ndim != 1:
        raise ValueError(
            f"{where}: num_samples must be a 1-D (K,) vector, got shape {tuple(n.shape)}"
        )
    cb = (1.0 - beta) / (1.0 - jnp.power(jnp.asarray(beta, _F32), n))
    if weight is None:
        return cb
    return _class_weights(weight, n.shape[0], where) * cb


# ----------------------------------------------------------------------------------------------
# PyTorch-Encoding losses (encoding/nn/loss.py)


def _check_smoothing(smoothing, where: str) -> None:
    """A Python ε must lie in [0, 1]; traced values cannot be checked and are taken as given."""
    if isinstance(smoothing, (int, float)) and not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"{where}: smoothing must lie in [0, 1], got {smoothing!r}")


def _reduce_all(loss: jax.Array, reduction: str) -> jax.Array:
    if reduction == "sum":
        return jnp.sum(loss)
    if reduction == "mean":
        return jnp.mean(loss)
    return loss


def _smoothing_inputs(logits, targets, smoothing, reduction, where: str, as_targets):
    """Validate the label-smoothing losses' arguments; return (targets, log softmax(logits))."""
    check_reduction(reduction, where)
    _check_smoothing(smoothing, where)
    x, _ = _logits(logits, where)
    return as_targets(targets, x, where), jax.nn.log_softmax(x, axis=-1)


def _smoothed(log_p: jax.Array, data_term: jax.Array, smoothing) -> jax.Array:
    """(1 - ε)·data_term + ε·mean_k(-log p_k): the uniform-prior part of label smoothing."""
    return (1.0 - smoothing) * data_term - smoothing * jnp.mean(log_p, axis=-1)


def label_smoothing_cross_entropy(logits, targets, *, smoothing=0.1, reduction="mean") -> jax.Array:
    """Cross-entropy with label smoothing, PyTorch-Encoding's ``LabelSmoothing``
    ("Rethinking the Inception Architecture for Computer Vision", Szegedy et al., 2016,
    arXiv:1512.00567).

    ℓ_i = (1 - ε)·(-log p_i[t_i]) + ε·mean_k(-log p_i[k]) with p = softmax over the last axis, i.e.
    the cross-entropy against the target (1 - ε)·onehot(t) + ε/K. Upstream averages over the batch
    (its 'mean'); 'none' and 'sum' are additions. Upstream only handles (N, K) logits; dense
    (N, *S, K) logits (class axis last) give the same per-position formula. There is no
    ``ignore_index`` or ``weight`` (upstream has none).

    Shapes: logits (N, K) or (N, *S, K); targets integer (N,) or (N, *S) in [0, K); 'none' gives
    float32 (N, *S), 'mean' | 'sum' a float32 scalar. ``smoothing`` ε in [0, 1].
    """
    where = "label_smoothing_cross_entropy"
    t, log_p = _smoothing_inputs(logits, targets, smoothing, reduction, where, _hard_targets)
    return _reduce_all(_smoothed(log_p, -_take_class(log_p, t), smoothing), reduction)


def soft_target_cross_entropy(logits, targets, *, smoothing=0.1, reduction="mean") -> jax.Array:
    """Label-smoothed cross-entropy with soft (e.g. mixup) targets, PyTorch-Encoding's
    ``NLLMultiLabelSmooth`` in training mode.

    ℓ_i = (1 - ε)·Σ_k(-t_ik log p_ik) + ε·mean_k(-log p_ik), computed in float32 (logits and targets
    are upcast, as upstream does). Upstream's 'mean' over the batch; 'none' and 'sum' are additions.

    Upstream's module switches on ``self.training``: in eval mode it returns
    ``F.cross_entropy(x, target)`` on hard targets instead. A function has no mode, so here the caller
    chooses: for hard (integer) targets use :func:`cross_entropy` (upstream's eval branch) or
    :func:`label_smoothing_cross_entropy`.

    Shapes: logits (N, K) or (N, *S, K); soft targets of the logits' shape (rows normally sum to 1);
    reductions as :func:`label_smoothing_cross_entropy`.
    """
    where = "soft_target_cross_entropy"
    t, log_p = _smoothing_inputs(logits, targets, smoothing, reduction, where, _soft_targets)
    return _reduce_all(_smoothed(log_p, -jnp.sum(t * log_p, axis=-1), smoothing), reduction)


def se_targets(targets, num_classes, ignore_index=-1) -> jax.Array:
    """Semantic-Encoding-loss targets of EncNet ("Context Encoding for Semantic Segmentation",
    Zhang et al., 2018, arXiv:1803.08904): which classes occur in each image's mask.

    ``out[n, k] = 1`` when some position of ``targets[n]`` equals k, for k in [0, num_classes).
    As upstream's ``torch.histc(..., bins=num_classes, min=0, max=num_classes - 1)``, values outside
    [0, num_classes) (-1, 255, ...) do not count. Unlike upstream, pixels equal to ``ignore_index``
    do not count even when ``ignore_index`` lies in [0, num_classes) (an ignored pixel is not evidence
    that its class is present), and for ``num_classes=1`` only class-0 pixels count (upstream's
    ``histc`` with min == max falls back to the data's range and counts every pixel). Computed with a
    scatter-add, O(N·∏S) memory, jit-compatible.

    Args:
        targets: integer (N, *S) masks, e.g. (N, H, W).
        num_classes: K (static Python int >= 1).
        ignore_index: target value that does not count.

    Returns:
        float32 (N, num_classes) of 0/1.
    """
    where = "se_targets"
    check_positive_int(num_classes, "num_classes", where)
    t = jnp.asarray(targets)
    if t.ndim < 1:
        raise ValueError(
            f"{where}: expected integer targets of shape (N, *S) (e.g. (N, H, W)), got a scalar"
        )
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"{where}: targets must have an integer dtype, got {t.dtype}")
    n = t.shape[0]
    flat = t.reshape(n, -1)
    counted = (flat >= 0) & (flat < num_classes) & (flat != ignore_index)
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], flat.shape)
    counts = jnp.zeros((n, num_classes), jnp.int32)
    counts = counts.at[rows, jnp.where(counted, flat, 0)].add(counted.astype(jnp.int32))
    return (counts > 0).astype(_F32)


def _segmentation_outputs(outputs, se_loss: bool, aux: bool, where: str):
    """(pred, se_pred, aux_pred) from the model's output tuple, in upstream's argument order."""
    names = ("pred",) + (("se_pred",) if se_loss else ()) + (("aux_pred",) if aux else ())
    if not isinstance(outputs, (tuple, list)):
        if len(names) == 1:
            return outputs, None, None
        raise ValueError(
            f"{where}: with se_loss={se_loss}, aux={aux} expected outputs ({', '.join(names)}), "
            f"got a single array of shape {tuple(jnp.shape(outputs))}"
        )
    if len(outputs) != len(names):
        raise ValueError(
            f"{where}: with se_loss={se_loss}, aux={aux} expected {len(names)} outputs "
            f"({', '.join(names)}), got {len(outputs)}"
        )
    named = dict(zip(names, outputs))
    return named["pred"], named.get("se_pred"), named.get("aux_pred")


def _binary_cross_entropy_with_sigmoid(
    scores: jax.Array, targets: jax.Array, weight: jax.Array
) -> jax.Array:
    """mean(-w·(y log σ(s) + (1 - y) log(1 - σ(s)))) over all elements, from the logits s."""
    loss = -(targets * jax.nn.log_sigmoid(scores) + (1.0 - targets) * jax.nn.log_sigmoid(-scores))
    return jnp.mean(weight * loss)


def segmentation_loss(
    outputs,
    targets,
    *,
    se_loss=False,
    se_weight=0.2,
    aux=False,
    aux_weight=0.4,
    num_classes=None,
    weight=None,
    ignore_index=-1,
) -> jax.Array:
    """PyTorch-Encoding's ``SegmentationLosses``: pixel cross-entropy plus the optional auxiliary-head
    and Semantic Encoding (SE) terms of EncNet ("Context Encoding for Semantic Segmentation",
    Zhang et al., 2018, arXiv:1803.08904).

    ``outputs`` is the model's output tuple in upstream's order: ``(pred, [se_pred], [aux_pred])``
    (a bare ``pred`` when neither term is on); the loss is CE(pred) [+ aux_weight·CE(aux_pred)]
    [+ se_weight·BCE].

    - CE is :func:`cross_entropy` with ``weight`` and ``ignore_index``: the mean over non-ignored
      pixels (torch's weighted mean Σ w[t]·ℓ / Σ w[t] when ``weight`` is given).
    - BCE = mean over N×num_classes of -w_k·(y log σ(s) + (1 - y) log(1 - σ(s))) with s = se_pred,
      y = :func:`se_targets` (classes present in each mask). As upstream (``nn.BCELoss(weight)``) the
      same class ``weight`` multiplies each class column, and the mean is NOT normalised by the weights.

    Upstream's constructor default is ``aux_weight=0.4``; its training scripts pass 0.2
    (``--aux-weight 0.2``), and so do jaxenc's segmentation configs.

    Differences from upstream (same formula, better defined):
    - BCE is evaluated from the logits with log-sigmoid. torch's ``BCELoss(sigmoid(s))`` saturates in
      float32 beyond |s| ≈ 17 (the log term is clamped to -100 and the gradient vanishes); here it
      is exact for every s and the gradient is w·(σ(s) - y)/(N·K). Identical elsewhere.
    - :func:`se_targets` does not count pixels equal to an ``ignore_index`` inside [0, num_classes).
    - When no pixel is valid CE is 0, not NaN. ``num_classes`` must equal the logits' class count.

    Args:
        outputs: as above. pred and aux_pred (N, *S, K), e.g. (N, H, W, K), already resized to the
            targets' spatial shape (upstream models upsample first); se_pred (N, num_classes).
        targets: integer (N, *S) masks.
        se_loss: add the SE term (needs ``num_classes``).
        se_weight: factor of the SE term.
        aux: add the auxiliary-head term.
        aux_weight: factor of the auxiliary term (upstream default 0.4; scripts use 0.2).
        num_classes: K, upstream's ``nclass``; required when ``se_loss``.
        weight: optional (K,) class weights for CE and BCE.
        ignore_index: target value that does not contribute (-1 as upstream).

    Returns:
        A float32 scalar.
    """
    where = "segmentation_loss"
    pred, se_pred, aux_pred = _segmentation_outputs(outputs, se_loss, aux, where)
    x, k, t, w = _class_inputs(pred, targets, weight, where, name="pred")
    if aux:
        a, _ = _logits(aux_pred, where, name="aux_pred")
        if a.shape != x.shape:
            raise ValueError(
                f"{where}: expected aux_pred of pred's shape {tuple(x.shape)} (resized to the targets' "
                f"spatial shape, class axis last), got shape {tuple(a.shape)}"
            )
    if se_loss:
        if num_classes is None:
            raise ValueError(
                f"{where}: se_loss=True needs num_classes (upstream's nclass), got None"
            )
        check_positive_int(num_classes, "num_classes", where)
        if num_classes != k:
            raise ValueError(
                f"{where}: num_classes={num_classes} must equal the class count of pred "
                f"(last axis of shape {tuple(x.shape)}, K={k})"
            )
        s, _ = _logits(se_pred, where, name="se_pred")
        if s.shape != (x.shape[0], num_classes):
            raise ValueError(
                f"{where}: expected se_pred of shape (N, num_classes) = {(x.shape[0], num_classes)}, "
                f"got shape {tuple(s.shape)}"
            )

    loss = cross_entropy(x, t, weight=w, ignore_index=ignore_index)
    if aux:
        loss = loss + aux_weight * cross_entropy(a, t, weight=w, ignore_index=ignore_index)
    if se_loss:
        present = se_targets(t, num_classes, ignore_index)
        loss = loss + se_weight * _binary_cross_entropy_with_sigmoid(s, present, w)
    return loss
