"""Flax linen layers (NHWC images, (B, N, D) tokens) with torch-compatible numerics.

One module per family: ``activation``, ``attention``, ``batch_stats`` (SyncBN conversion, precise
BN), ``conv``, ``customize``, ``encoding``, ``grouped_conv`` (per-backend grouped/depthwise conv),
``norm``, ``pooling``, ``regularization``, ``resample``, ``transformer``; ``torch_compat`` holds the
torch-equivalent primitives they share. Every public name of those modules (their ``__all__``) is
available here.
"""

from jaxenc.nn import activation as _activation
from jaxenc.nn import attention as _attention
from jaxenc.nn import batch_stats as _batch_stats
from jaxenc.nn import conv as _conv
from jaxenc.nn import customize as _customize
from jaxenc.nn import encoding as _encoding
from jaxenc.nn import grouped_conv as _grouped_conv
from jaxenc.nn import norm as _norm
from jaxenc.nn import pooling as _pooling
from jaxenc.nn import regularization as _regularization
from jaxenc.nn import resample as _resample
from jaxenc.nn import torch_compat as _torch_compat
from jaxenc.nn import transformer as _transformer
from jaxenc.nn.activation import *  # noqa: F401,F403
from jaxenc.nn.attention import *  # noqa: F401,F403
from jaxenc.nn.batch_stats import *  # noqa: F401,F403
from jaxenc.nn.conv import *  # noqa: F401,F403
from jaxenc.nn.customize import *  # noqa: F401,F403
from jaxenc.nn.encoding import *  # noqa: F401,F403
from jaxenc.nn.grouped_conv import *  # noqa: F401,F403
from jaxenc.nn.norm import *  # noqa: F401,F403
from jaxenc.nn.pooling import *  # noqa: F401,F403
from jaxenc.nn.regularization import *  # noqa: F401,F403
from jaxenc.nn.resample import *  # noqa: F401,F403
from jaxenc.nn.torch_compat import *  # noqa: F401,F403
from jaxenc.nn.transformer import *  # noqa: F401,F403

# The functional Encoding op stays ``jaxenc.nn.encoding.encoding`` (not re-exported), so that
# ``jaxenc.nn.encoding`` remains the family module.
__all__ = [
    name
    for family in (
        _activation,
        _attention,
        _batch_stats,
        _conv,
        _customize,
        _encoding,
        _grouped_conv,
        _norm,
        _pooling,
        _regularization,
        _resample,
        _torch_compat,
        _transformer,
    )
    for name in family.__all__
]
