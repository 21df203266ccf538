"""Activations from holocron.nn (HardMish, NLReLU, FReLU), NHWC.

Upstream's ``inplace`` argument is not kept: JAX arrays are immutable, so there is nothing to do in
place (XLA reuses buffers on its own).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn.fields import DtypeFields
from jaxenc.nn.module_utils import cast_input
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.torch_compat import Conv2d
from jaxenc.validation import check_channels, check_positive_int, check_rank

Dtype = Any

__all__ = ["FReLU", "HardMish", "NLReLU", "hard_mish", "nl_relu"]


def hard_mish(x: jax.Array) -> jax.Array:
    """Hard Mish: f(x) = x / 2 * clip(x + 2, 0, 2).

    Misra, "H-Mish" (https://github.com/digantamisra98/H-Mish). Elementwise, any shape; the output has
    the shape and dtype of ``x``. (Upstream's ``inplace`` has no JAX meaning and is not taken.)
    """
    x = jnp.asarray(x)
    # clip written as selects so the gradient at the kinks (x = -2, x = 0) is torch's: clamp passes
    # the gradient on the closed interval, where jnp.clip would halve it.
    gate = jnp.where(x < -2, jnp.zeros_like(x), jnp.where(x > 0, jnp.full_like(x, 2), x + 2))
    return 0.5 * x * gate


def nl_relu(x: jax.Array, beta: float = 1.0) -> jax.Array:
    """Natural-logarithm ReLU: f(x) = log(1 + beta * max(x, 0)).

    Liu et al., "Natural-Logarithm-Rectified Activation Function in Convolutional Neural Networks",
    2019 (arXiv:1908.03682). Elementwise, any shape; output has the shape and dtype of ``x``.
    ``log1p`` is used: it equals upstream's ``log(1 + .)`` up to rounding and is more accurate near 0.
    (Upstream's ``inplace`` has no JAX meaning and is not taken.)
    """
    x = jnp.asarray(x)
    return jnp.log1p(beta * jax.nn.relu(x)).astype(x.dtype)


class HardMish(DtypeFields):
    """holocron.nn.HardMish: f(x) = x / 2 * clip(x + 2, 0, 2) (see :func:`hard_mish`).

    Shapes: any -> same. No parameters. Upstream's ``inplace=False`` argument is not kept (no JAX
    meaning). ``dtype``: compute/output dtype (default: the input's).
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return hard_mish(cast_input(x, self.dtype))


class NLReLU(DtypeFields):
    """holocron.nn.NLReLU(beta=1.0): f(x) = log(1 + beta * max(x, 0)) (see :func:`nl_relu`).

    Liu et al., arXiv:1908.03682. Shapes: any -> same. No parameters. Upstream's ``inplace``
    argument is not kept (no JAX meaning). ``dtype``: compute/output dtype (default: the input's).
    """

    beta: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nl_relu(cast_input(x, self.dtype), self.beta)


class FReLU(DtypeFields):
    """holocron.nn.FReLU: funnel activation f(x) = max(x, BN(depthwise_conv_k(x))).

    Ma et al., "Funnel Activation for Visual Recognition", ECCV 2020 (arXiv:2007.11824).

    Shapes: (N, H, W, C) -> (N, H, W, C), C == ``in_channels``.
    Submodules (torch names): ``conv`` — depthwise k x k :class:`Conv2d` with bias, padding k // 2,
    kernel (k, k, 1, C); ``bn`` — :class:`BatchNorm` (torch defaults). ``__call__(x, train=False)``:
    only the BatchNorm differs between training (batch statistics, ``batch_stats`` mutable) and
    inference (running statistics). ``kernel_size`` must be odd: an even one changes the spatial
    size with padding k // 2 (upstream then fails in ``torch.max``).
    """

    in_channels: int
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "FReLU"
        check_rank(x, 4, "N, H, W, C", where)
        check_positive_int(self.in_channels, "in_channels", where)
        k = check_positive_int(self.kernel_size, "kernel_size", where)
        if k % 2 == 0:
            raise ValueError(
                f"{where}: kernel_size must be odd (padding kernel_size // 2 keeps the spatial size only "
                f"for odd kernels), got {k}"
            )
        check_channels(x, self.in_channels, where)
        x = cast_input(x, self.dtype)
        t = Conv2d(
            self.in_channels,
            k,
            padding=k // 2,
            groups=self.in_channels,
            in_channels=self.in_channels,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)
        t = BatchNorm(self.in_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(
            t, train=train
        )
        return jnp.maximum(x, t.astype(x.dtype))
