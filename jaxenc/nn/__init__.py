"""Flax linen layers (NHWC images, (B, N, D) tokens), torch-compatible numerics."""
from jaxenc.nn.norm import BatchNorm, batch_moments
from jaxenc.nn.torch_compat import Conv2d, pad_nhwc

__all__ = ["BatchNorm", "batch_moments", "Conv2d", "pad_nhwc"]
