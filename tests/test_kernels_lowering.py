"""Every Pallas kernel, for every shape class, lowers for CUDA on this CPU-only machine.

Lowering for an abstract H100 (``use_abstract_mesh`` + ``lowering_platforms=("cuda",)``) runs the real Pallas -> Triton lowering:
the power-of-two tile rule, the 16x16 matmul minimum, unsupported primitives and bad index maps
all raise here, so GPU lowering errors fail CI even though no GPU is present. It stops before PTX
compilation (that happens in XLA on a GPU). The negative control at the bottom proves the
harness really runs the Triton checks.

What is checked holds on every jax version: the Triton calls are identified by kernel name (not
counted, since whether jax keeps a forward kernel whose output a gradient does not use depends on
its dead-code elimination), every kernel of the op is present exactly once where its output is
used, and none of the XLA reference's own arithmetic appears outside the kernels (no fallback).

Shape classes cover the block plans' edge cases: sizes below one block, exact multiples,
non-multiples, several feature/position/column/channel blocks, large K (small position tiles),
one channel per group (1-wide channel blocks), stride 2, dilation 2, K = 3/5/7, float32 and
bfloat16, forward and forward+backward.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from jaxenc.kernels import encoding, involution
from jaxenc.kernels._common import compiler_params
from jaxenc.kernels.encoding_op import _plan
from jaxenc.kernels.involution_op import _geometry

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
TRITON_CALL = "__gpu$xla.gpu.triton"

# Kernel names (the ``name=`` of each pallas_call) and the ops that only the XLA reference twin
# emits: in the Pallas program that arithmetic lives inside the kernels' serialized Triton IR.
ENCODING_KERNELS = ("encoding_forward", "encoding_backward_rows", "encoding_backward_codewords")
INVOLUTION_KERNELS = ("involution_forward", "involution_input_grad", "involution_weight_grad")
FALLBACK_OPS = {
    "encoding": {"exponential", "maximum", "select"},
    "involution": {"multiply", "while", "dynamic_slice"},
}


def lower_for_cuda(fn, *args) -> str:
    with use_abstract_mesh(AbstractMesh((), (), abstract_device=H100)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def triton_kernels(program: str) -> list[str]:
    """Names of the Triton kernels the program calls, one entry per call, sorted."""
    calls = [line for line in program.splitlines() if TRITON_CALL in line]
    names = sorted(n for line in calls for n in re.findall(r'name = "([^"]*)"', line))
    assert len(names) == len(calls), f"a Triton call without a kernel name: {calls}"
    return names


def xla_ops(program: str) -> set[str]:
    """StableHLO ops of the program outside the kernels (their IR is serialized, not text)."""
    return set(re.findall(r"stablehlo\.(\w+)", program))


def check_lowering(op, args, kernels, family):
    """Forward: the forward kernel alone; value and gradient: every kernel once; gradient alone:
    both backward kernels (the forward may be dropped as dead code); never the reference's ops."""
    forward = lower_for_cuda(op, *args)
    assert triton_kernels(forward) == [kernels[0]]
    both = lower_for_cuda(jax.value_and_grad(summed(op), argnums=tuple(range(len(args)))), *args)
    assert triton_kernels(both) == sorted(kernels)
    grad_only = lower_for_cuda(jax.grad(summed(op), argnums=tuple(range(len(args)))), *args)
    assert set(kernels[1:]) <= set(triton_kernels(grad_only)) <= set(kernels)
    for program in (forward, both, grad_only):
        assert not xla_ops(program) & FALLBACK_OPS[family], xla_ops(program) & FALLBACK_OPS[family]


def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def summed(fn):
    return lambda *a: jnp.sum(fn(*a).astype(jnp.float32))


ENCODING_CLASSES = {
    # (B, N, K, D)
    "below-one-block": (1, 5, 3, 7),
    "issue-shape": (2, 7 * 9, 7, 48),
    "exact-multiples": (2, 128, 16, 128),
    "several-slices": (3, 10000, 32, 200),
    "large-K": (1, 100, 300, 40),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(ENCODING_CLASSES))
def test_encoding_kernels_lower_for_cuda(case, dtype):
    b, n, k, d = ENCODING_CLASSES[case]
    args = (spec((b, n, d), dtype), spec((k, d), dtype), spec((k,), jnp.float32))
    check_lowering(functools.partial(encoding, impl="pallas"), args, ENCODING_KERNELS, "encoding")


def test_encoding_shape_classes_cover_the_plan():
    """The classes above exercise one and several feature blocks, tiles per slice and slices."""
    plans = {name: _plan(b, n, k, d) for name, (b, n, k, d) in ENCODING_CLASSES.items()}
    assert plans["below-one-block"].nd == 1 and plans["below-one-block"].tiles == 1
    assert plans["several-slices"].splits > 1 and plans["several-slices"].tiles_per_split > 1, (
        plans["several-slices"]
    )
    assert plans["several-slices"].nd > 1
    assert plans["large-K"].kp == 512 and plans["large-K"].bn == 16


# fmt: off
INVOLUTION_CLASSES = {
    # (B, H, W, C, G, K, stride, padding, dilation)
    "k3": (2, 13, 13, 20, 4, 3, 1, 1, 1),
    "k5-stride2": (2, 13, 13, 20, 4, 5, 2, 2, 1),
    "k7-dilation2": (1, 13, 11, 20, 4, 7, 1, 6, 2),
    "k3-stride2-dilation2": (1, 13, 13, 20, 4, 3, 2, 2, 2),
    "one-channel-per-group": (1, 9, 9, 8, 8, 3, 1, 1, 1),
    "two-channel-blocks-wide": (1, 6, 70, 160, 2, 3, 1, 1, 1),
    "stem-size": (2, 56, 56, 64, 4, 7, 1, 3, 1),
}
# fmt: on


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(INVOLUTION_CLASSES))
def test_involution_kernels_lower_for_cuda(case, dtype):
    b, h, w, c, g, k, s, p, d = INVOLUTION_CLASSES[case]
    ho, wo = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1
    args = (spec((b, h, w, c), dtype), spec((b, ho, wo, g, k, k), dtype))
    op = functools.partial(
        involution, kernel_size=k, stride=s, padding=p, dilation=d, impl="pallas"
    )
    check_lowering(op, args, INVOLUTION_KERNELS, "involution")


def test_fallback_detector_sees_the_xla_twins():
    """Control: the reference paths do contain the ops whose absence the checks above assert."""
    enc = (spec((2, 63, 48), jnp.float32), spec((7, 48), jnp.float32), spec((7,), jnp.float32))
    enc_prog = lower_for_cuda(
        jax.grad(summed(functools.partial(encoding, impl="xla")), argnums=(0, 1, 2)), *enc
    )
    assert xla_ops(enc_prog) >= FALLBACK_OPS["encoding"] and not triton_kernels(enc_prog)
    inv = (spec((2, 13, 13, 20), jnp.float32), spec((2, 13, 13, 4, 3, 3), jnp.float32))
    inv_op = functools.partial(involution, kernel_size=3, padding=1, impl="xla")
    inv_prog = lower_for_cuda(jax.grad(summed(inv_op), argnums=(0, 1)), *inv)
    assert xla_ops(inv_prog) >= FALLBACK_OPS["involution"] and not triton_kernels(inv_prog)


def test_involution_shape_classes_cover_the_geometry():
    geos = {}
    for name, (b, h, w, c, g, k, s, p, d) in INVOLUTION_CLASSES.items():
        geos[name] = _geometry((b, h, w, c), g, k, (s, s), (p, p), (d, d))
    assert geos["one-channel-per-group"].bc == 1
    wide = geos["two-channel-blocks-wide"]
    assert wide.cgp // wide.bc == 2 and wide.wop // wide.tw > 1
    assert geos["k3"].cg == 5 and geos["k3"].cgp == 8  # channels per group not a power of two


def test_lowering_harness_reports_triton_errors():
    """Negative control: a (24, 128) tile breaks Triton's power-of-two rule and must fail here."""

    def copy_kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    def bad(x):
        return pl.pallas_call(
            copy_kernel,
            grid=(1,),
            in_specs=[pl.BlockSpec((24, 128), lambda i: (0, 0))],
            out_specs=pl.BlockSpec((24, 128), lambda i: (0, 0)),
            out_shape=jax.ShapeDtypeStruct((24, 128), jnp.float32),
            compiler_params=compiler_params(),
        )(x)

    with pytest.raises(Exception, match="power of 2"):
        lower_for_cuda(bad, spec((24, 128), jnp.float32))
