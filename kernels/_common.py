"""Pieces shared by the Pallas kernels: implementation dispatch, block-size arithmetic, Triton settings.

``impl="auto"`` runs a Pallas kernel only where ``verified.json`` (beside this file) records it as
matching its XLA twin and faster on this device kind and jax minor version; XLA everywhere else.
One kernel body (``pl.pallas_call`` with BlockSpecs, no backend-specific primitives) is compiled by
the Pallas Triton backend on a GPU, interpreted anywhere (``interpret=True``) and cross-lowered for
CUDA on CPU (tests/test_kernels_lowering.py). Triton needs power-of-two element counts per tile and
matmul operands of at least 16 x 16: the block sizes here respect both, and the wrappers pad
operands to whole blocks (the padding is masked inside the kernels).
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
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


def promote_floating(x: jax.Array, other: jax.Array, names: str, where: str):
    """``x`` and ``other`` cast to their promoted dtype, which must be floating point (TypeError
    naming ``names`` otherwise); returns (x, other, dtype)."""
    dtype = jnp.result_type(x, other)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{where}: {names} must be floating point, got {x.dtype} and {other.dtype}")
    return x.astype(dtype), other.astype(dtype), dtype


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
