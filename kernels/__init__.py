"""Pallas kernels shipped as ``jaxenc.kernels`` (the fused Encoding op and involution; issue 5)."""
