"""Pieces shared by the Pallas kernels: implementation dispatch, block-size arithmetic, Triton settings.

Dispatch: ``impl="auto"`` runs a Pallas kernel only where ``verified.json`` (beside this file)
records that kernel as checked against its XLA twin and faster than it on this device kind and
jax minor version (``python -m benchmarks.gpu_check`` writes such records); everywhere else,
including every GPU without a record, it runs XLA. The kernels are written for the Pallas Triton
backend, which jax deprecated in 0.11 (Mosaic GPU is its successor on Hopper and newer).

The GPU kernels use ``pl.pallas_call`` with a grid and BlockSpecs and no backend-specific
primitives, so one kernel body runs three ways: compiled by the Pallas Triton backend on a GPU,
interpreted on any backend (``interpret=True``, how the tests run them on CPU), and cross-lowered
for CUDA on a CPU-only machine (tests/test_kernels_lowering.py). The Triton backend requires every
array a kernel loads, stores or computes with to have a power-of-two number of elements, and
matmul operands to be at least 16 x 16; the block sizes chosen here respect both, and the wrappers
pad the operands to whole blocks (padding is masked out inside the kernels).
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
from jax.experimental.pallas import triton as pl_triton

IMPLS = ("auto", "pallas", "xla")

# f32 matmuls inside a Triton kernel default to TF32 (10-bit mantissa); the Encoding distances
# subtract terms of size ||x||², which TF32 would turn into visible logit errors.
HIGHEST = jax.lax.Precision.HIGHEST


VERIFIED_PATH = pathlib.Path(__file__).with_name("verified.json")


@functools.cache
def verified_records() -> tuple[dict, ...]:
    """The kernel verification records (``verified.json``), as a tuple of dicts.

    Each record: op, backend, device_kind, jax (version measured on), shapes, max_rel_err,
    speedup_fwd and speedup_fwd_bwd (XLA time / Pallas time), date.
    """
    return tuple(json.loads(VERIFIED_PATH.read_text())["records"])


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def kernel_is_verified(
    op: str, device_kind: str, jax_version: str | None = None, records=None
) -> bool:
    """True when a record shows ``op``'s kernels verified and faster than XLA (forward and
    forward+backward) on ``device_kind`` with the same jax minor version."""
    jax_version = jax_version or jax.__version__
    for rec in verified_records() if records is None else records:
        if (
            rec["op"] == op
            and rec["device_kind"] == device_kind
            and _minor(rec["jax"]) == _minor(jax_version)
            and rec.get("verified", False)
            and min(rec["speedup_fwd"], rec["speedup_fwd_bwd"]) > 1.0
        ):
            return True
    return False


def resolve_impl(impl: str, interpret: bool, where: str, op: str) -> str:
    """'auto' -> 'pallas' when ``interpret`` asks for the kernel or when :func:`kernel_is_verified`
    holds for the default device; else 'xla'. 'pallas' and 'xla' are returned as given."""
    if impl not in IMPLS:
        raise ValueError(f"{where}: impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(interpret, bool):
        raise TypeError(f"{where}: interpret must be a bool, got {interpret!r}")
    if impl != "auto":
        return impl
    if interpret:
        return "pallas"
    if jax.default_backend() != "gpu":
        return "xla"
    return "pallas" if kernel_is_verified(op, jax.devices()[0].device_kind) else "xla"


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
