"""Pieces shared by the Pallas kernels: implementation dispatch, block-size arithmetic, Triton settings.

The GPU kernels use ``pl.pallas_call`` with a grid and BlockSpecs and no backend-specific
primitives, so one kernel body runs three ways: compiled by the Pallas Triton backend on a GPU,
interpreted on any backend (``interpret=True``, how the tests run them on CPU), and cross-lowered
for CUDA on a CPU-only machine (tests/test_kernels_lowering.py). The Triton backend requires every
array a kernel loads, stores or computes with to have a power-of-two number of elements, and
matmul operands to be at least 16 x 16; the block sizes chosen here respect both, and the wrappers
pad the operands to whole blocks (padding is masked out inside the kernels).
"""
from __future__ import annotations

import jax
from jax.experimental.pallas import triton as pl_triton

IMPLS = ("auto", "pallas", "xla")

# f32 matmuls inside a Triton kernel default to TF32 (10-bit mantissa); the Encoding distances
# subtract terms of size ||x||², which TF32 would turn into visible logit errors.
HIGHEST = jax.lax.Precision.HIGHEST


def resolve_impl(impl: str, interpret: bool, where: str) -> str:
    """'auto' -> 'pallas' on a GPU backend (or when ``interpret`` asks for the kernel), else 'xla'."""
    if impl not in IMPLS:
        raise ValueError(f"{where}: impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(interpret, bool):
        raise TypeError(f"{where}: interpret must be a bool, got {interpret!r}")
    if impl != "auto":
        return impl
    return "pallas" if interpret or jax.default_backend() == "gpu" else "xla"


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` >= n."""
    return -(-n // multiple) * multiple


def pow2_block(n: int, *, lo: int, hi: int) -> int:
    """A power-of-two block covering ``n`` when it can, clamped to [lo, hi] (both powers of two)."""
    return min(max(next_pow2(n), lo), hi)


def compiler_params(num_warps: int = 4, num_stages: int = 2):
    """Triton compiler parameters (ignored by the interpreter)."""
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
