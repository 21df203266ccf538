"""Flax linen layers (NHWC images, (B, N, D) tokens) with torch-compatible numerics.

One file per layer family, named for what it holds (timm's ``layers/`` layout); ``torch_compat``
holds the torch-equivalent primitives they share, ``fields`` the ``dtype``/``param_dtype`` field
mixin and ``module_utils`` the private helpers.
``customize``, ``regularization`` and the PyTorch-Encoding names in ``conv`` are old module paths
that re-export from the new files.
"""

from jaxenc.nn import customize, regularization  # noqa: F401  (old module paths)
from jaxenc.nn.activation import FReLU, HardMish, NLReLU, hard_mish, nl_relu
from jaxenc.nn.attention import (
    SAM,
    ACFModule,
    CAM_Module,
    DimAttention,
    LambdaLayer,
    MixtureOfSoftMaxACF,
    PAM_Module,
    TripletAttention,
)
from jaxenc.nn.batch_stats import (
    SyncBatchNormConverted,
    convert_sync_batchnorm,
    recompute_batch_stats,
    revert_sync_batchnorm,
)
from jaxenc.nn.containers import ConcurrentModule
from jaxenc.nn.conv import (
    Add2d,
    Involution2d,
    NormConv2d,
    PyConv2d,
    SlimConv2d,
    add2d,
    involution,
    norm_conv2d,
)
from jaxenc.nn.conv_bn_act import ConvBnAct
from jaxenc.nn.drop import DropBlock2D, DropBlock2d, Dropsample, drop_block2d, dropblock_seed_rate
from jaxenc.nn.encoding import (
    Encoding,
    EncodingCosine,
    EncodingDrop,
    aggregate,
    pairwise_cosine,
    scaled_l2,
)
from jaxenc.nn.grouped_conv import IMPLS, conv2d_grouped, grouped_conv_impl, resolve_grouped_impl
from jaxenc.nn.lp_norm import Normalize, lp_normalize
from jaxenc.nn.mbconv import MBConv, MBConvResidual
from jaxenc.nn.norm import (
    BatchNorm,
    SyncBatchNorm,
    batch_moments,
    batchnorm_axis_override,
    normalize,
)
from jaxenc.nn.pooling import (
    SPP,
    BlurPool2d,
    ConcatDownsample2d,
    GlobalAvgPool2d,
    GlobalMaxPool2d,
    ZPool,
    binomial_taps,
    concat_downsample2d,
    z_pool,
)
from jaxenc.nn.pyramid_pool import PyramidPooling
from jaxenc.nn.rectified_conv import RFConv2d
from jaxenc.nn.resample import (
    adaptive_avg_pool2d,
    adaptive_pool_weights,
    avg_pool2d,
    bilinear_weights,
    interpolate_bilinear,
    max_pool2d,
)
from jaxenc.nn.split_attn import SplAtConv2d, r_softmax, rSoftMax
from jaxenc.nn.squeeze_excite import SqueezeExcitation
from jaxenc.nn.style import GramMatrix, Inspiration, gram_matrix
from jaxenc.nn.torch_compat import (
    Conv2d,
    ConvNdFields,
    conv2d_nhwc,
    conv_args,
    conv_output_size,
    pad_nhwc,
    torch_conv_inputs,
    torch_uniform_init,
)
from jaxenc.nn.transformer import CaiTAttention, XCAttention
from jaxenc.nn.upsample import UpsampleConv2d, pixel_shuffle

# The functional Encoding op stays ``jaxenc.nn.encoding.encoding``, so that ``jaxenc.nn.encoding``
# remains the family module.
__all__ = [
    "ACFModule",
    "adaptive_avg_pool2d",
    "adaptive_pool_weights",
    "Add2d",
    "add2d",
    "aggregate",
    "avg_pool2d",
    "batch_moments",
    "BatchNorm",
    "batchnorm_axis_override",
    "bilinear_weights",
    "binomial_taps",
    "BlurPool2d",
    "CaiTAttention",
    "CAM_Module",
    "concat_downsample2d",
    "ConcatDownsample2d",
    "ConcurrentModule",
    "Conv2d",
    "conv2d_grouped",
    "conv2d_nhwc",
    "conv_args",
    "conv_output_size",
    "ConvBnAct",
    "convert_sync_batchnorm",
    "ConvNdFields",
    "DimAttention",
    "drop_block2d",
    "DropBlock2D",
    "DropBlock2d",
    "dropblock_seed_rate",
    "Dropsample",
    "Encoding",
    "EncodingCosine",
    "EncodingDrop",
    "FReLU",
    "GlobalAvgPool2d",
    "GlobalMaxPool2d",
    "gram_matrix",
    "GramMatrix",
    "grouped_conv_impl",
    "hard_mish",
    "HardMish",
    "IMPLS",
    "Inspiration",
    "interpolate_bilinear",
    "involution",
    "Involution2d",
    "LambdaLayer",
    "lp_normalize",
    "max_pool2d",
    "MBConv",
    "MBConvResidual",
    "MixtureOfSoftMaxACF",
    "nl_relu",
    "NLReLU",
    "norm_conv2d",
    "Normalize",
    "normalize",
    "NormConv2d",
    "pad_nhwc",
    "pairwise_cosine",
    "PAM_Module",
    "pixel_shuffle",
    "PyConv2d",
    "PyramidPooling",
    "r_softmax",
    "recompute_batch_stats",
    "resolve_grouped_impl",
    "revert_sync_batchnorm",
    "RFConv2d",
    "rSoftMax",
    "SAM",
    "scaled_l2",
    "SlimConv2d",
    "SplAtConv2d",
    "SPP",
    "SqueezeExcitation",
    "SyncBatchNorm",
    "SyncBatchNormConverted",
    "torch_conv_inputs",
    "torch_uniform_init",
    "TripletAttention",
    "UpsampleConv2d",
    "XCAttention",
    "z_pool",
    "ZPool",
]
