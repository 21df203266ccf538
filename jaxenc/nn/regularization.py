"""Structured dropout: DropBlock2d (holocron.nn), NHWC.

Ghiasi, Lin & Le, "DropBlock: A regularization method for convolutional networks", NeurIPS 2018.

Deliberate change from holocron (DESIGN.md, decisions on upstream bugs): the expected fraction of
dropped activations EQUALS ``p``. Holocron divides ``p`` by block_size² twice (module property and
functional), and even the paper's gamma = p / block_size² undershoots because blocks overlap and are
clipped at the borders. Here block seeds are drawn on the grid extended by the block size, so every
position is covered by exactly block_size² candidate blocks, each present independently with rate
gamma = 1 - (1 - p)^(1 / block_size²): P(position dropped) = p everywhere, borders included, for odd
and even block sizes alike.
"""
from __future__ import annotations

import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxenc._checks import check_positive_int, check_rank

Dtype = Any

__all__ = ["DropBlock2d", "drop_block2d", "dropblock_seed_rate"]


def _check_prob(drop_prob, name: str, where: str):
    """Concrete probabilities are checked and returned as a Python float; traced ones pass through."""
    if isinstance(drop_prob, jax.core.Tracer):
        return drop_prob
    if np.ndim(drop_prob) != 0:
        raise ValueError(f"{where}: {name} must be a scalar probability, got shape {np.shape(drop_prob)}")
    p = float(drop_prob)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{where}: {name} must be a probability in [0, 1], got {drop_prob!r}")
    return p


def dropblock_seed_rate(drop_prob, block_size: int):
    """Rate gamma at which block seeds are drawn so that a position is dropped with probability p.

    Each position has block_size² independent candidate seeds, so P(kept) = (1 - gamma)^(bs²) = 1 - p
    gives gamma = 1 - (1 - p)^(1 / bs²), computed as -expm1(log1p(-p) / bs²) to stay accurate for
    small p. p = 1 gives gamma = 1 exactly. A Python float in, a Python float out (float64 maths);
    a traced p gives a float32 array.
    """
    n = float(block_size * block_size)
    if isinstance(drop_prob, numbers.Real):
        p = float(drop_prob)
        return 1.0 if p >= 1.0 else float(-np.expm1(np.log1p(-p) / n))
    p = jnp.asarray(drop_prob, jnp.float32)
    return jnp.where(p >= 1.0, 1.0, -jnp.expm1(jnp.log1p(-jnp.minimum(p, 1.0)) / n))


def drop_block2d(
    x: jax.Array, rng: jax.Array, drop_prob, block_size: int, *, batch_shared: bool = False
) -> jax.Array:
    """DropBlock in training mode: zero random block_size x block_size squares, then rescale.

    Ghiasi et al., NeurIPS 2018 (see the module docstring for the exact-``p`` seeding).

    Args:
      x: (N, H, W, C).
      rng: PRNG key.
      drop_prob: probability that any given position is dropped, in [0, 1]. A Python number is
        checked and p == 0 returns ``x`` itself; a traced scalar (e.g. a schedule under jit) works too.
      block_size: side of the dropped squares, any positive integer (even ones included; squares
        larger than the image are clipped to it).
      batch_shared: False (holocron): one mask per sample, shared across channels, shape (N, H, W, 1).
        True (PyTorch-Encoding): one mask for the whole batch, shape (1, H, W, 1).
    Returns:
      (N, H, W, C): ``x * keep * (keep.size / keep.sum())``, with the mask and the scale computed in
      float32 (so bfloat16 inputs keep an exact mask); all zeros when every position is dropped.
    """
    where = "drop_block2d"
    x = jnp.asarray(x)
    check_rank(x, 4, "N, H, W, C", where)
    bs = check_positive_int(block_size, "block_size", where)
    p = _check_prob(drop_prob, "drop_prob", where)
    if isinstance(p, float) and p == 0.0:
        return x
    n, h, w, _ = x.shape
    gamma = dropblock_seed_rate(p, bs)
    # Seeds live on the image grid extended by bs - 1 rows/columns; the VALID bs x bs window max makes
    # image row i depend on seed rows i .. i + bs - 1: exactly bs per axis, also at the borders.
    seed_shape = (1 if batch_shared else n, h + bs - 1, w + bs - 1)
    seeds = jax.random.bernoulli(rng, gamma, seed_shape).astype(jnp.float32)
    dropped = jax.lax.reduce_window(seeds, 0.0, jax.lax.max, (1, bs, bs), (1, 1, 1), "VALID")
    keep = 1.0 - dropped
    # Normalise by the kept fraction over the whole mask (holocron); a fully dropped mask stays zero.
    scale = keep.size / jnp.maximum(jnp.sum(keep), 1.0)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return (x.astype(acc) * (keep * scale)[..., None].astype(acc)).astype(x.dtype)


class DropBlock2d(nn.Module):
    """holocron.nn.DropBlock2d(p=0.1, block_size=7): DropBlock with an exact drop fraction ``p``.

    Ghiasi, Lin & Le, "DropBlock: A regularization method for convolutional networks", NeurIPS 2018.

    Shapes: (N, H, W, C) -> (N, H, W, C). No parameters. ``__call__(x, train=False)``: identity in
    inference and when ``p == 0``; in training :func:`drop_block2d` with one mask per sample, shared
    across channels, drawn from the ``dropout`` rng stream.

    Differences from holocron 0.3.0, on purpose: the expected dropped fraction is ``p`` (holocron drops
    about p / block_size⁴, see the module docstring), even block sizes work (holocron crashes), and
    upstream's ``inplace`` argument is not kept (no JAX meaning).
    """

    p: float = 0.1
    block_size: int = 7
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "DropBlock2d"
        x = jnp.asarray(x)
        check_rank(x, 4, "N, H, W, C", where)
        check_positive_int(self.block_size, "block_size", where)
        p = _check_prob(self.p, "p", where)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        if not train or (isinstance(p, float) and p == 0.0):
            return x
        return drop_block2d(x, self.make_rng("dropout"), p, self.block_size)
