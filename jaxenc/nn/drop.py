"""Dropout variants, NHWC: DropBlock (two upstream flavours) and per-sample stochastic depth.

Ghiasi, Lin & Le, "DropBlock", NeurIPS 2018; Huang et al., "Deep Networks with Stochastic Depth",
ECCV 2016.

- :class:`DropBlock2d` is holocron's (``p``, one channel-shared mask per sample, no state).
- :class:`DropBlock2D` is PyTorch-Encoding's (``drop_prob``, per-channel masks by default, a step
  counter in ``batch_stats`` driving a linear drop-probability schedule).
- :class:`Dropsample` is vit-pytorch's MaxViT stochastic depth, dropping whole samples.

Both DropBlocks drop a position with probability exactly ``p`` (upstreams undershoot): seeds are
drawn on the grid extended by the block size at rate 1 - (1 - p)^(1 / block_size²), so every position
has block_size² independent candidate blocks, borders and even block sizes included.
"""

from __future__ import annotations

import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxenc.nn.fields import DtypeFields
from jaxenc.nn.module_utils import cast_input
from jaxenc.port import register_absent_in_torch
from jaxenc.validation import check_positive_int, check_probability, check_rank, check_step

Dtype = Any

__all__ = ["DropBlock2D", "DropBlock2d", "Dropsample", "drop_block2d", "dropblock_seed_rate"]


def _check_prob(drop_prob, name: str, where: str):
    """Concrete probabilities are checked and returned as a Python float; traced ones pass through."""
    if isinstance(drop_prob, jax.core.Tracer):
        return drop_prob
    if np.ndim(drop_prob) != 0:
        raise ValueError(
            f"{where}: {name} must be a scalar probability, got shape {np.shape(drop_prob)}"
        )
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
    x: jax.Array,
    rng: jax.Array,
    drop_prob,
    block_size: int,
    *,
    batch_shared: bool = False,
    per_channel: bool = False,
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
      per_channel: False (default): the mask is shared by all channels (last mask axis 1). True: an
        independent mask per channel, shape (N or 1, H, W, C) (PyTorch-Encoding's DropBlock2D without
        ``share_channel``). Every channel still drops each position with probability p.
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
    n, h, w, c = x.shape
    gamma = dropblock_seed_rate(p, bs)
    # Seeds live on the image grid extended by bs - 1 rows/columns; the VALID bs x bs window max makes
    # image row i depend on seed rows i .. i + bs - 1: exactly bs per axis, also at the borders.
    channel_axis = (c,) if per_channel else ()
    seed_shape = (1 if batch_shared else n, h + bs - 1, w + bs - 1, *channel_axis)
    window = (1, bs, bs, *(1 for _ in channel_axis))
    seeds = jax.random.bernoulli(rng, gamma, seed_shape).astype(jnp.float32)
    dropped = jax.lax.reduce_window(seeds, 0.0, jax.lax.max, window, (1,) * len(window), "VALID")
    keep = 1.0 - dropped
    # Normalise by the kept fraction over the whole mask (holocron); a fully dropped mask stays zero.
    scale = keep.size / jnp.maximum(jnp.sum(keep), 1.0)
    mask = keep * scale if per_channel else (keep * scale)[..., None]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return (x.astype(acc) * mask.astype(acc)).astype(x.dtype)


class DropBlock2d(DtypeFields):
    """holocron.nn.DropBlock2d(p=0.1, block_size=7): stateless DropBlock, dropped fraction exactly ``p``.

    Shapes: (N, H, W, C) -> (N, H, W, C). No parameters. ``__call__(x, train=False)``: identity in
    inference and when ``p == 0``; in training :func:`drop_block2d` with one mask per sample, shared
    across channels, drawn from the ``dropout`` rng stream.

    Differences from holocron 0.3.0, on purpose: the expected dropped fraction is ``p`` (holocron drops
    about p / block_size⁴: it divides p by block_size² twice), even block sizes work (holocron crashes), and
    upstream's ``inplace`` argument is not kept (no JAX meaning).
    """

    p: float = 0.1
    block_size: int = 7

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


class DropBlock2D(DtypeFields):
    """PyTorch-Encoding's ``DropBlock2D(drop_prob, block_size, share_channel=False)`` with a working schedule.

    Shapes: (N, H, W, C) -> (N, H, W, C). No parameters; ``batch_stats/i`` (int32, upstream's step
    buffer) counts the training calls and advances whenever ``batch_stats`` is mutable (not at init).
    ``__call__(x, train=False)``: identity in inference; in training :func:`drop_block2d` (``dropout``
    rng stream) with per-sample, per-channel masks, channel-shared ones with ``share_channel``, one
    mask for the batch with ``batch_shared``.

    Schedule (upstream's ``reset_steps`` as fields): with ``nr_steps > 0`` the probability is
    ``start_value`` until ``start_step``, then rises linearly to ``stop_value`` (default ``drop_prob``)
    at ``start_step + nr_steps``; computed from ``i`` inside the program, so it works under ``jit``. A
    scheduled module needs ``batch_stats`` mutable in training (ValueError otherwise).

    Deviations from upstream (docs/DESIGN.md, Decisions on upstream bugs):
    - The schedule advances (upstream returns early while drop_prob is 0 and never steps) and
      reaches ``stop_value`` (upstream stops one step short); no ``reset_steps`` call is needed.
    - The dropped fraction equals the drop probability, and even block sizes work.
    - ``share_channel`` gives a per-sample channel-shared mask (upstream broadcasts its (N, H, W)
      mask against the channel axis).
    - ``drop_prob`` is a field, not a buffer; :func:`jaxenc.port.torch_to_flax` starts ``i`` at 0.
    """

    drop_prob: float
    block_size: int
    share_channel: bool = False
    start_step: int = 0
    nr_steps: int = 0
    start_value: float = 0.0
    stop_value: float | None = None
    batch_shared: bool = False

    def drop_prob_at(self, step) -> jax.Array | float:
        """The drop probability used by the training call made when ``i == step`` (traceable).

        Without a schedule: ``drop_prob`` as a Python float. With one: a float32 scalar, exactly
        ``start_value`` up to ``start_step`` and exactly ``stop_value`` from ``start_step + nr_steps``.
        """
        where = "DropBlock2D"
        p = _check_prob(self.drop_prob, "drop_prob", where)
        nr_steps = check_step(self.nr_steps, "nr_steps", where)
        start_step = check_step(self.start_step, "start_step", where)
        if nr_steps == 0:
            return p
        start = _check_prob(self.start_value, "start_value", where)
        stop = p if self.stop_value is None else _check_prob(self.stop_value, "stop_value", where)
        progress = (jnp.asarray(step, jnp.float32) - start_step) / nr_steps
        progress = jnp.clip(progress, 0.0, 1.0)
        # start*(1 - t) + stop*t is exact at both ends (t = 0 and t = 1), unlike start + (stop - start)*t.
        return jnp.float32(start) * (1.0 - progress) + jnp.float32(stop) * progress

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "DropBlock2D"
        x = jnp.asarray(x)
        check_rank(x, 4, "N, H, W, C", where)
        block_size = check_positive_int(self.block_size, "block_size", where)
        scheduled = check_step(self.nr_steps, "nr_steps", where) > 0
        self.drop_prob_at(0)  # validates every schedule field, also in inference
        if self.dtype is not None:
            x = x.astype(self.dtype)
        mutable = self.is_mutable_collection("batch_stats")
        counter = None
        if mutable or self.has_variable("batch_stats", "i"):
            counter = self.variable("batch_stats", "i", lambda: jnp.zeros((), jnp.int32))
        if not train:
            return x
        if scheduled and (counter is None or not mutable):
            raise ValueError(
                f"{where}: a drop-probability schedule (nr_steps={self.nr_steps}) needs its step counter "
                "batch_stats/i, mutable in training: apply with the variables from init and "
                "mutable=['batch_stats']"
            )
        if scheduled:
            p = self.drop_prob_at(counter.value)
        else:
            p = _check_prob(self.drop_prob, "drop_prob", where)
        if counter is not None and mutable and not self.is_initializing():
            counter.value = counter.value + 1
        if isinstance(p, float) and p == 0.0:
            return x
        return drop_block2d(
            x,
            self.make_rng("dropout"),
            p,
            block_size,
            batch_shared=self.batch_shared,
            per_channel=not self.share_channel,
        )


class Dropsample(DtypeFields):
    """Per-sample stochastic depth (vit-pytorch ``max_vit.Dropsample``, as upstream intends).

    Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016.

    Shapes: x (B, ...) -> same shape. No parameters. ``__call__(x, train=False)``: identity in
    inference or when ``prob == 0``; in training each sample is kept when U > prob (U ~ U[0, 1), one
    draw per sample from the ``dropout`` rng stream) and kept samples are multiplied by 1 / (1 - prob),
    so the expectation is unchanged. ``prob == 1`` drops every sample (output and gradient zero).

    Deviation from upstream, on purpose (docs/DESIGN.md, Decisions on upstream bugs): upstream builds its mask
    with the legacy
    ``torch.FloatTensor((B, 1, 1, 1), device=...)`` call, which makes a 1-D tensor of the four values
    [B, 1, 1, 1] rather than a (B, 1, 1, 1) tensor. Its length-4 mask then broadcasts over the WIDTH
    axis of NCHW inputs: training raises unless W == 4 (or W == 1, which silently broadcasts to width
    4), and with W == 4 it drops image columns, not samples. Upstream's ``prob == 1`` gives NaN (0 / 0).
    """

    prob: float = 0.0

    def __post_init__(self):
        check_probability(self.prob, "prob", "Dropsample")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = cast_input(x, self.dtype)
        p = float(self.prob)
        if not train or p == 0.0:
            return x
        if x.ndim < 1:
            raise ValueError(
                f"Dropsample: expected x with a leading batch axis, got a scalar of shape {x.shape}"
            )
        if p == 1.0:
            return jnp.zeros_like(x)
        u = jax.random.uniform(self.make_rng("dropout"), (x.shape[0],) + (1,) * (x.ndim - 1))
        # multiply by the rounded 1 / (1 - p) (XLA would turn a division by a constant into this anyway)
        scale = jnp.asarray(1.0 / (1.0 - p), x.dtype)
        return jnp.where(u > p, x * scale, jnp.zeros((), x.dtype))


register_absent_in_torch(DropBlock2D, "i")
