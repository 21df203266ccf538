"""PSPNet's pyramid pooling module (PyTorch-Encoding's PyramidPooling), NHWC.

Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017. ``norm_layer`` arguments of jaxenc's
PyTorch-Encoding layers are callables ``norm_layer(num_features, *, name, dtype, param_dtype)``
returning a module called as ``norm(x, train=train)``, e.g. :class:`jaxenc.nn.BatchNorm` or
``functools.partial(BatchNorm, axis_name="data")`` (upstream's SyncBatchNorm).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxenc.nn.conv_bn_act import ConvNormReLU
from jaxenc.nn.fields import DtypeFields
from jaxenc.nn.module_utils import check_width
from jaxenc.nn.norm import BatchNorm
from jaxenc.nn.resample import adaptive_avg_pool2d, interpolate_bilinear
from jaxenc.validation import check_channels, check_rank

Dtype = Any

__all__ = ["PyramidPooling"]  # check_up_kwargs: for jaxenc.models, not re-exported


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


class PyramidPooling(DtypeFields):
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

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        where = "PyramidPooling"
        reason = "each level has in_channels // 4 channels"
        check_width(self.in_channels, "in_channels", 4, reason, where)
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
