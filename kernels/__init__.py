"""Pallas kernels shipped as ``jaxenc.kernels``: the fused Encoding op and involution.

Each op has forward and backward Pallas kernels under ``jax.custom_vjp``, a pure-jnp reference
twin (also the XLA implementation) and ``impl="auto"|"pallas"|"xla"`` dispatch: "auto" runs the
Pallas kernels on a GPU whose device kind ``kernels/verified.json`` records as verified and faster,
and XLA elsewhere; ``interpret=True`` runs the kernels in the
Pallas interpreter on any backend (how CI tests them on CPU).

- :func:`encoding` (x (B, N, D), codewords (K, D), scale (K) -> (B, K, D)); Deep TEN, CVPR 2017.
- :func:`involution` (x (B, H, W, C), weights (B, H', W', G, K, K) -> (B, H', W', C)); CVPR 2021.
"""

from jaxenc.kernels.encoding_op import encoding, encoding_reference
from jaxenc.kernels.involution_op import involution, involution_reference

__all__ = ["encoding", "encoding_reference", "involution", "involution_reference"]
