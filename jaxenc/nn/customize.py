"""Old path of PyTorch-Encoding's ``encoding/nn/customize.py`` layers.

They live in :mod:`~jaxenc.nn.lp_norm` (Normalize, lp_normalize), :mod:`~jaxenc.nn.containers`
(ConcurrentModule), :mod:`~jaxenc.nn.pyramid_pool` (PyramidPooling, check_up_kwargs) and
:mod:`~jaxenc.nn.conv_bn_act` (ConvNormReLU). Upstream's ``GlobalAvgPool2d`` is
``jaxenc.nn.GlobalAvgPool2d(flatten=True)``; ``View``, ``Sum`` and ``Mean`` are one jnp call each.
"""

from jaxenc.nn.containers import ConcurrentModule
from jaxenc.nn.conv_bn_act import ConvNormReLU as ConvNormReLU
from jaxenc.nn.lp_norm import Normalize, lp_normalize
from jaxenc.nn.pyramid_pool import PyramidPooling
from jaxenc.nn.pyramid_pool import check_up_kwargs as check_up_kwargs

__all__ = ["Normalize", "lp_normalize", "ConcurrentModule", "PyramidPooling"]
