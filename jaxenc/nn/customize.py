"""Small modules from PyTorch-Encoding's ``encoding/nn/customize.py``, NHWC: Normalize,
ConcurrentModule, PyramidPooling (PyTorch-Encoding's ``encoding/nn/customize.py``).

Upstream's ``GlobalAvgPool2d`` (mean over H and W, returned as (B, C)) is
``jaxenc.nn.GlobalAvgPool2d(flatten=True)``; ``View``, ``Sum`` and ``Mean`` are one-line jnp calls
and have no module here.

``norm_layer`` arguments follow one convention in jaxenc's PyTorch-Encoding layers: a callable
``norm_layer(num_features, *, name, dtype, param_dtype)`` that returns a Flax module called as
``norm(x, train=train)``, e.g. :class:`jaxenc.nn.BatchNorm` or ``functools.partial(BatchNorm,
axis_name="data")`` for synchronised statistics (upstream's SyncBatchNorm).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn.module_utils import accepts_train, cast_input
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.resample import adaptive_avg_pool2d, interpolate_bilinear
from jaxenc.nn.torch_compat import Conv2d
from jaxenc.validation import check_channels, check_positive_int, check_rank

Dtype = Any

__all__ = ["Normalize", "lp_normalize", "ConcurrentModule", "PyramidPooling"]


# --- Normalize ------------------------------------------------------------------------------------


def lp_normalize(x: jax.Array, p: float = 2.0, dim: int = -1, eps: float = 1e-8) -> jax.Array:
    """``x / max(||x||_p, eps)`` along ``dim`` (``torch.nn.functional.normalize``).

    The norm is taken in float32 and its gradient is 0 for an all-zero vector (as in torch, where
    the clamp at ``eps`` blocks it), not NaN. ``p`` is any number >= 0 or ``inf``.
    Shapes: any x with ``dim`` in range -> the shape of x, dtype of x.
    """
    where = "lp_normalize"
    x = jnp.asarray(x)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or p < 0:
        raise ValueError(f"{where}: p must be a number >= 0 or inf, got {p!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ValueError(
            f"{where}: dim={dim!r} is out of range for an input of rank {x.ndim} (shape {tuple(x.shape)})"
        )
    v = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    a = jnp.abs(v)
    if math.isinf(p):
        norm = jnp.max(a, axis=dim, keepdims=True)
    elif p == 0:
        norm = jax.lax.stop_gradient(jnp.sum((v != 0).astype(v.dtype), axis=dim, keepdims=True))
    elif p == 1:
        norm = jnp.sum(a, axis=dim, keepdims=True)
    else:
        total = jnp.sum(v * v if p == 2 else a**p, axis=dim, keepdims=True)
        # d(total^(1/p)) is infinite at 0: route zero vectors through a constant instead.
        zero = total == 0
        norm = jnp.where(zero, 0.0, jnp.where(zero, 1.0, total) ** (1.0 / p))
    return (v / jnp.maximum(norm, eps)).astype(x.dtype)


class Normalize(nn.Module):
    """L_p normalisation over one axis: ``x / max(||x||_p, 1e-8)`` (upstream ``Normalize(p=2, dim=1)``).

    Used after the Encoding layer in Deep TEN (Zhang et al., "Deep TEN: Texture Encoding Network",
    CVPR 2017). Upstream's default ``dim=1`` is the channel axis of NCHW tensors and the feature axis of
    (B, D) matrices: both are the LAST axis in jaxenc's layouts, hence ``dim=-1`` here. ``dim`` is an
    axis of the jax array. No parameters.

    Shapes: any x -> the shape of x.
    """

    p: float = 2
    dim: int = -1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = cast_input(x, self.dtype)
        try:
            return lp_normalize(x, self.p, self.dim, eps=1e-8)
        except ValueError as err:
            raise ValueError(str(err).replace("lp_normalize", "Normalize", 1)) from None


# --- ConcurrentModule -----------------------------------------------------------------------------


class ConcurrentModule(nn.Module):
    """Apply every module in ``modules`` to the same input and concatenate the outputs on channels.

    Upstream's ``ConcurrentModule`` (an ``nn.ModuleList``), used by the ATTEN head (Zhang et al.,
    "Co-occurrent Features in Semantic Segmentation", CVPR 2019) to run global pooling and ACF side by
    side. The children are renamed "0", "1", ... (the ModuleList indices), so a torch state_dict with
    keys ``0.weight``, ``1.conv.weight``... converts unchanged.

    Shapes: x (N, H, W, C) -> (N, H, W, sum of the children's channels); every child must keep the
    leading axes. ``__call__(x, train=False)`` passes ``train`` to the children that take it.
    """

    modules: Sequence[nn.Module] = ()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "ConcurrentModule"
        if not self.modules:
            raise ValueError(f"{where}: modules is empty; give at least one module to run")
        outputs = []
        for i, module in enumerate(self.modules):
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"{where}: modules[{i}] must be a flax.linen Module, got {type(module).__name__}"
                )
            child = module.clone(parent=self, name=str(i))
            outputs.append(child(x, train=train) if accepts_train(module) else child(x))
        lead = outputs[0].shape[:-1]
        for i, y in enumerate(outputs):
            if y.ndim != outputs[0].ndim or y.shape[:-1] != lead:
                raise ValueError(
                    f"{where}: outputs must agree on every axis but the last (channels) to be concatenated; "
                    f"modules[0] gave {tuple(outputs[0].shape)}, modules[{i}] gave {tuple(y.shape)}"
                )
        dtype = self.dtype or jnp.result_type(*outputs)
        return jnp.concatenate([y.astype(dtype) for y in outputs], axis=-1)


# --- PyramidPooling -------------------------------------------------------------------------------

_DEFAULT_UP_KWARGS = {"mode": "bilinear", "align_corners": True}


def check_up_kwargs(up_kwargs: Mapping[str, Any] | None, where: str) -> bool:
    """Validate upstream's ``up_kwargs`` ({'mode': 'bilinear', 'align_corners': bool}); return align_corners."""
    kw = dict(_DEFAULT_UP_KWARGS if up_kwargs is None else up_kwargs)
    unknown = set(kw) - {"mode", "align_corners"}
    if unknown:
        raise ValueError(
            f"{where}: up_kwargs accepts 'mode' and 'align_corners', got unknown keys {sorted(unknown)}"
        )
    if kw.get("mode", "bilinear") != "bilinear":
        raise ValueError(
            f"{where}: up_kwargs['mode'] must be 'bilinear' (the only mode upstream uses), got {kw['mode']!r}"
        )
    align = kw.get("align_corners", False)
    if not isinstance(align, bool):
        raise ValueError(f"{where}: up_kwargs['align_corners'] must be a bool, got {align!r}")
    return align


class ConvNormReLU(nn.Module):
    """Upstream's ``nn.Sequential(Conv2d(in, out, k, bias=False), norm_layer(out), ReLU)``, the
    building block of PyramidPooling and of the segmentation heads (jaxenc.models.heads).

    Children are named "0" (conv) and "1" (norm) so that the torch keys read ``<name>.0.weight``,
    ``<name>.1.running_mean``. Shapes: (N, H, W, C_in) -> (N, H', W', out_channels).
    """

    out_channels: int
    kernel_size: int = 1
    padding: int = 0
    dilation: int = 1
    norm_layer: Callable[..., nn.Module] = BatchNorm
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = Conv2d(
            self.out_channels,
            self.kernel_size,
            padding=self.padding,
            dilation=self.dilation,
            bias=False,
            name="0",
            **kw,
        )
        y = conv(x)
        y = self.norm_layer(self.out_channels, name="1", **kw)(y, train=train)
        return jax.nn.relu(y)


class PyramidPooling(nn.Module):
    """The pyramid pooling module of PSPNet (Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017).

    Adaptive average pools to 1x1, 2x2, 3x3 and 6x6 (torch's overlapping bins), a 1x1 conv to
    in_channels // 4 (no bias) + norm + ReLU per level, bilinear upsampling back to H x W
    (``up_kwargs``, default align_corners=True), then ``concat(x, level1, ..., level4)`` on channels.

    Shapes: x (N, H, W, in_channels) -> (N, H, W, in_channels + 4 * (in_channels // 4)), i.e.
    2 * in_channels when 4 divides in_channels. Submodules ``conv1`` ... ``conv4``, each with children
    "0" (conv) and "1" (norm): torch keys ``conv1.0.weight``, ``conv1.1.running_var``...
    ``__call__(x, train=False)``: the norms use batch statistics when ``train``.

    Args:
      in_channels: checked against the input's last axis; must be >= 4.
      norm_layer: see the module docstring (default :class:`jaxenc.nn.BatchNorm`).
      up_kwargs: upstream's interpolation options, {'mode': 'bilinear', 'align_corners': bool};
        None means the PyTorch-Encoding models' {'mode': 'bilinear', 'align_corners': True}.
    """

    in_channels: int
    norm_layer: Callable[..., nn.Module] = BatchNorm
    up_kwargs: Mapping[str, Any] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "PyramidPooling"
        check_positive_int(self.in_channels, "in_channels", where)
        if self.in_channels < 4:
            raise ValueError(
                f"{where}: in_channels must be >= 4 (each level has in_channels // 4 channels), got {self.in_channels}"
            )
        align_corners = check_up_kwargs(self.up_kwargs, where)
        x = jnp.asarray(x)
        check_rank(x, 4, "N, H, W, C", where)
        check_channels(x, self.in_channels, where)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        _, h, w, _ = x.shape
        out_channels = self.in_channels // 4
        feats = [x]
        for i, bins in enumerate((1, 2, 3, 6), start=1):
            y = adaptive_avg_pool2d(x, bins)
            block = ConvNormReLU(
                out_channels,
                norm_layer=self.norm_layer,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"conv{i}",
            )
            y = block(y, train=train)
            feats.append(
                interpolate_bilinear(y, (h, w), align_corners=align_corners).astype(x.dtype)
            )
        return jnp.concatenate(feats, axis=-1)
