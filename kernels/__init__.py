"""Pallas kernels shipped as ``jaxenc.kernels``: the fused Encoding op and involution.

Each op: Pallas forward and backward kernels under ``jax.custom_vjp``, a pure-jnp twin (the XLA
implementation) and ``impl="auto"|"pallas"|"xla"`` dispatch (README, Pallas kernels).

- :func:`encoding` (x (B, N, D), codewords (K, D), scale (K) -> (B, K, D)); Deep TEN, CVPR 2017.
- :func:`involution` (x (B, H, W, C), weights (B, H', W', G, K, K) -> (B, H', W', C)); CVPR 2021.
"""

from jaxenc.kernels.encoding_op import encoding, encoding_reference
from jaxenc.kernels.involution_op import involution, involution_reference

__all__ = ["encoding", "encoding_reference", "involution", "involution_reference"]
