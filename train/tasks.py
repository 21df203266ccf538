"""Task losses for the data-parallel train step, written so that sharding never changes the result.

A mean over examples or pixels is split into a local numerator (the sum over this device's rows)
and a global denominator (the count over the whole batch), so ``psum`` of the gradients is the
global-batch mean's gradient; a mean of per-device means would overweight devices with few labelled
pixels. Segmentation (upstream ``SegmentationLosses``, ``encoding/nn/loss.py``): pixel cross-entropy
(ignore -1) + ``aux_weight`` x aux cross-entropy + ``se_weight`` x EncNet's SE BCE. Recognition:
cross-entropy with optional label smoothing, or soft targets (mixup).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from jaxenc import losses

IGNORE = -1

__all__ = [
    "IGNORE",
    "LossTerm",
    "mixup",
    "recognition_terms",
    "segmentation_terms",
    "total_loss",
    "unpack_outputs",
]

# A loss term: (weight, local sum, global-count key). Counts are computed from labels only.
LossTerm = tuple[float, jax.Array, str]


def unpack_outputs(
    outputs, *, aux: bool, se_loss: bool
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(main, se, aux) from a segmentation model's output tuple in upstream's order (main, [se], [aux])."""
    outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    expected = 1 + int(aux) + int(se_loss)
    if len(outputs) < expected:
        raise ValueError(
            f"segmentation loss: the model returned {len(outputs)} outputs, expected {expected} "
            f"(main{', se' if se_loss else ''}{', aux' if aux else ''}); check config.model aux / se_loss"
        )
    main = outputs[0]
    se = outputs[1] if se_loss else None
    aux_out = outputs[1 + int(se_loss)] if aux else None
    return main, se, aux_out


def _pixel_ce_sum(logits: jax.Array, masks: jax.Array) -> jax.Array:
    labelled = masks >= 0
    safe = jnp.where(labelled, masks, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    return jnp.sum(jnp.where(labelled, ce, 0.0))


def segmentation_counts(masks: jax.Array, nclass: int) -> dict[str, jax.Array]:
    """Local denominators: labelled pixels and SE-loss entries (batch x classes)."""
    return {
        "pixels": jnp.sum(masks >= 0).astype(jnp.float32),
        "se_entries": jnp.asarray(masks.shape[0] * nclass, jnp.float32),
    }


def segmentation_terms(
    outputs,
    masks: jax.Array,
    *,
    nclass: int,
    aux: bool,
    se_loss: bool,
    aux_weight: float,
    se_weight: float,
) -> dict[str, LossTerm]:
    """Loss terms of one device's batch. outputs: (main (B,H,W,C), [se (B,C)], [aux (B,H,W,C)]);
    masks (B,H,W) int, -1 = ignore."""
    main, se, aux_out = unpack_outputs(outputs, aux=aux, se_loss=se_loss)
    terms = {"ce": (1.0, _pixel_ce_sum(main, masks), "pixels")}
    if aux:
        terms["aux"] = (aux_weight, _pixel_ce_sum(aux_out, masks), "pixels")
    if se_loss:
        target = losses.se_targets(masks, nclass, ignore_index=IGNORE)
        bce = optax.sigmoid_binary_cross_entropy(se.astype(jnp.float32), target.astype(jnp.float32))
        terms["se"] = (se_weight, jnp.sum(bce), "se_entries")
    return terms


def recognition_counts(labels: jax.Array) -> dict[str, jax.Array]:
    """Local denominator: the number of examples."""
    return {"examples": jnp.asarray(labels.shape[0], jnp.float32)}


def recognition_terms(
    logits: jax.Array, labels: jax.Array, *, label_smoothing: float
) -> dict[str, LossTerm]:
    """Cross-entropy terms. labels: int (B,) or soft targets (B, C) (mixup)."""
    if labels.ndim == logits.ndim:
        ce = losses.soft_target_cross_entropy(
            logits, labels, smoothing=label_smoothing, reduction="sum"
        )
    else:
        ce = losses.label_smoothing_cross_entropy(
            logits, labels, smoothing=label_smoothing, reduction="sum"
        )
    return {"ce": (1.0, ce, "examples")}


def total_loss(
    terms: Mapping[str, LossTerm], global_counts: Mapping[str, jax.Array]
) -> tuple[jax.Array, dict]:
    """Σ weight · local_sum / global_count, and each term's local contribution (for logging)."""
    parts = {
        name: weight * s / jnp.maximum(global_counts[key], 1.0)
        for name, (weight, s, key) in terms.items()
    }
    return sum(parts.values()), parts


def mixup(images: jax.Array, labels: jax.Array, num_classes: int, alpha: float, key: jax.Array):
    """Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018 (upstream ``MixUpWrapper``):
    λ ~ Beta(α, α), a random permutation of this device's batch; returns mixed images and soft
    targets (B, num_classes)."""
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, alpha, alpha)
    perm = jax.random.permutation(k_perm, images.shape[0])
    onehot = jax.nn.one_hot(labels, num_classes)
    mixed = lam * images + (1.0 - lam) * images[perm]
    return mixed.astype(images.dtype), lam * onehot + (1.0 - lam) * onehot[perm]
