"""Torch-equivalent primitives in NHWC: Conv2d with torch's arguments and initialisation, padding modes.

Every jaxenc layer that mirrors a torch ``nn.Conv2d`` uses :class:`Conv2d` here, so parameter names
(``kernel`` (kh, kw, C_in/groups, C_out), ``bias`` (C_out)) and the torch -> Flax layout mapping
stay uniform; :mod:`jaxenc.port` relies on that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jaxenc.nn.fields import DtypeFields, dtype_kwargs
from jaxenc.nn.grouped_conv import conv2d_grouped
from jaxenc.validation import (  # noqa: F401  (conv_args, conv_output_size re-exported)
    check_channels,
    check_divisible,
    check_positive_int,
    check_rank,
    conv_args,
    conv_output_size,
)

Dtype = Any

__all__ = [
    "Conv2d",
    "ConvNdFields",
    "conv2d_nhwc",
    "conv_args",
    "conv_options",
    "conv_output_size",
    "pad_nhwc",
    "torch_conv_inputs",
    "torch_uniform_init",
]

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def pad_nhwc(
    x: jax.Array, padding: tuple[int, int], mode: str = "zeros", where: str = "pad"
) -> jax.Array:
    """Pad H and W of an NHWC tensor symmetrically with a torch ``padding_mode``.

    Args:
      x: (N, H, W, C).
      padding: (pad_h, pad_w), applied on both sides.
      mode: 'zeros', 'reflect', 'replicate' or 'circular' (torch names).
    Returns:
      (N, H + 2 pad_h, W + 2 pad_w, C).
    """
    if mode not in _PAD_MODES:
        raise ValueError(f"{where}: padding_mode must be one of {tuple(_PAD_MODES)}, got {mode!r}")
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    return jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), mode=_PAD_MODES[mode])


def torch_uniform_init(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's default for conv/linear weights and biases."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_conv_inputs(module: nn.Module, x: jax.Array):
    """Validate ``x`` against a module with torch ``_ConvNd`` fields and create its parameters.

    ``module`` has ``in_channels`` (None: inferred), ``out_channels``, ``kernel_size``, ``stride``,
    ``padding``, ``dilation``, ``groups``, ``bias``, ``padding_mode``, ``dtype``, ``param_dtype``;
    call from its compact ``__call__``. Creates ``kernel`` (kh, kw, C_in/groups, out_channels) and
    ``bias`` (out_channels) with torch's initialisation (or the module's ``kernel_init`` when it has
    one and it is not None), applies a non-'zeros' padding mode, and
    promotes to the compute dtype.

    Returns:
      (x, kernel, bias or None, dict(stride, padding, dilation, groups)) ready for the convolution;
      ``padding`` is (0, 0) when the padding mode was applied here.
    """
    where = type(module).__name__
    check_rank(x, 4, "N, H, W, C", where)
    c_in = check_channels(x, module.in_channels, where)
    (kh, kw), stride, padding, dilation = conv_args(
        module.kernel_size, module.stride, module.padding, module.dilation, where
    )
    groups = check_positive_int(module.groups, "groups", where)
    check_positive_int(module.out_channels, "out_channels", where)
    check_divisible(c_in, groups, "in_channels", "groups", where)
    check_divisible(module.out_channels, groups, "out_channels", "groups", where)
    fan_in = (c_in // groups) * kh * kw
    kernel_init = getattr(module, "kernel_init", None) or torch_uniform_init(fan_in)
    kernel = module.param(
        "kernel", kernel_init, (kh, kw, c_in // groups, module.out_channels), module.param_dtype
    )
    bias = None
    if module.bias:
        bias = module.param(
            "bias", torch_uniform_init(fan_in), (module.out_channels,), module.param_dtype
        )
    if module.padding_mode != "zeros":
        x = pad_nhwc(x, padding, module.padding_mode, where)
        padding = (0, 0)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=module.dtype)
    return x, kernel, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def conv2d_nhwc(x, kernel, bias, *, stride, padding, dilation, groups) -> jax.Array:
    """torch's conv2d on NHWC / HWIO arrays (the arguments :func:`torch_conv_inputs` returns).

    x (N, H, W, C_in), kernel (kh, kw, C_in/groups, C_out), bias (C_out) or None; stride, padding
    (symmetric zero padding) and dilation are pairs -> (N, H_out, W_out, C_out). groups > 1 goes
    through :func:`jaxenc.nn.grouped_conv.conv2d_grouped` (per-backend strategy, same numbers).
    """
    y = conv2d_grouped(x, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return y if bias is None else y + bias


_CONV_OPTIONS = ("stride", "padding", "dilation", "groups", "bias", "padding_mode")


def conv_options(module: nn.Module, **overrides: Any) -> dict[str, Any]:
    """The keywords a conv wrapper passes on to its inner conv: ``module``'s torch conv options
    (stride, padding, dilation, groups, bias, padding_mode) and its dtype, param_dtype fields,
    with ``overrides`` replacing or adding entries."""
    return {
        **{name: getattr(module, name) for name in _CONV_OPTIONS},
        **dtype_kwargs(module),
        **overrides,
    }


class ConvGeometry(nn.Module):
    """The leading constructor fields of torch's conv modules, in torch's positional order."""

    in_channels: int
    out_channels: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1


class ConvNdFields(ConvGeometry):
    """torch ``_ConvNd``'s constructor fields, ``in_channels`` first, for conv variants that mirror
    an upstream ``nn.Conv2d`` subclass (their torch ``weight``/``bias`` become ``kernel``/``bias``
    through :func:`torch_conv_inputs`). Subclasses add their own fields and ``__call__``."""

    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"


class Conv2d(DtypeFields):
    """``torch.nn.Conv2d`` in NHWC with the same arguments, defaults and initialisation.

    Shapes: x (N, H, W, C_in) -> (N, H_out, W_out, out_channels), H_out as torch computes it.
    Parameters: ``kernel`` (kh, kw, C_in // groups, out_channels), ``bias`` (out_channels).
    ``in_channels`` is inferred; when given it is checked against the input. ``kernel_init``
    replaces torch's default U(±1/sqrt(fan_in)) kernel initialisation (for upstream modules that
    re-initialise, e.g. with ``nn.init.normal_``); the bias keeps torch's default.
    """

    out_channels: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    in_channels: int | None = None
    kernel_init: Callable | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias, args = torch_conv_inputs(self, x)
        return conv2d_nhwc(x, kernel, bias, **args)
