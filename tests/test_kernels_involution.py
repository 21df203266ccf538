"""jaxenc.kernels.involution: the Pallas kernels (run in the Pallas interpreter on CPU) against the
XLA reference twin, and the twin against upstream's torch formula.

Why each part:
- Pallas vs XLA over many geometries: the kernels tile output columns (tw <= 32), split each group's
  channels into power-of-two blocks (bc <= 64), pad both, and compute the input gradient as a
  mirrored gather over stride-dilated operands. Every one of those paddings and crops has an
  off-by-one to get wrong, so the shapes below put each of them at a boundary: several column
  tiles, several channel blocks, channels per group that are not a power of two, one channel per
  group, one group, padding 0 and padding wider than the kernel, odd sizes under stride 2, unequal
  stride/padding/dilation pairs. Values and both gradients, float32 at 1e-5 and a bfloat16 subset.
- XLA twin vs torch unfold (holocron.nn.Involution2d's formula, and holocron's own forward with the
  kernel generator replaced by given weights): the twin is the reference the kernels are held to,
  so it must itself be upstream's semantics.
- jit / vmap / grad-under-jit of the Pallas path: pallas_call's batching rule and the custom VJP
  under transformations.
- Dispatch and errors: "auto" must stay on XLA on a CPU backend (no pallas_call in the program),
  and the error messages are part of the API.
- Involution2d(impl=...): the module forwards ``impl`` to the kernel.
- Mixed dtypes: the result is the promoted dtype and each gradient has its input's dtype.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import F, torch
from parity import assert_close, random_input

from jaxenc.kernels.involution_op import involution, involution_reference
from jaxenc.nn import Involution2d

inv_mod = importlib.import_module("jaxenc.kernels.involution_op")
# jaxenc.nn re-exports the function ``involution``; the module comes from the import system.
nn_conv = importlib.import_module("jaxenc.nn.conv")

BF16_RTOL = 2e-2


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _out_hw(h, w, k, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    return (h + 2 * ph - dh * (k - 1) - 1) // sh + 1, (w + 2 * pw - dw * (k - 1) - 1) // sw + 1


# (B, H, W, C, G, K, stride, padding, dilation)
# fmt: off
CASES = {
    # The required shapes: H = W = 13, C = 20, G = 4, K = 3 / 5 / 7, stride 1 and 2, dilation 2.
    "k3-s1-p1": (2, 13, 13, 20, 4, 3, 1, 1, 1),
    "k5-s2-p2": (2, 13, 13, 20, 4, 5, 2, 2, 1),
    # K = 7 is the slowest in the interpreter (49 taps in three kernels): batch 1.
    "k7-s1-p6-d2": (1, 13, 13, 20, 4, 7, 1, 6, 2),
    "k3-s2-p2-d2": (1, 13, 13, 20, 4, 3, 2, 2, 2),
    # Non-square, odd sizes under stride 2.
    "nonsquare-13x11-s2": (1, 13, 11, 20, 4, 3, 2, 1, 1),
    # One channel per group, padding 0.
    "G=C-p0": (1, 9, 9, 8, 8, 3, 1, 0, 1),
    # One group.
    "G=1": (2, 7, 9, 6, 1, 3, 1, 1, 1),
    # 12 channels per group: padded to a 16-channel block.
    "cg12": (1, 9, 7, 24, 2, 3, 1, 1, 1),
    # 80 channels per group: two 64-channel blocks, the second mostly padding.
    "cg80-two-blocks": (1, 5, 6, 160, 2, 3, 1, 1, 1),
    # 70 output columns: three 32-column tiles, the last one mostly padding.
    "wo70-three-tiles": (1, 3, 70, 4, 2, 3, 1, 1, 1),
    # Two output column tiles with a column stride and dilation of 2: the tile's start column is
    # t * tw * stride_w, which a single-tile case never exercises (t = 0).
    "wo35-two-tiles-stride(1,2)-dil(1,2)": (1, 4, 70, 4, 2, 3, (1, 2), (1, 2), (1, 2)),
    # Padding wider than the kernel's reach: border outputs see only zeros.
    "pad-larger-than-needed": (1, 6, 7, 8, 2, 3, 1, 3, 1),
    # Unequal pairs.
    "stride(1,2)-pad(1,0)": (1, 9, 11, 8, 2, 3, (1, 2), (1, 0), 1),
    "stride(2,1)-dil(1,2)": (1, 11, 9, 12, 3, 5, (2, 1), 2, (1, 2)),
    # Kernel 1 with stride 3 (stride wider than the kernel: inputs skipped entirely).
    "k1-s3": (2, 10, 8, 8, 2, 1, 3, 0, 1),
    # Kernel covering the whole input: a 1x1 output.
    "k5-whole-input": (1, 5, 5, 4, 1, 5, 1, 0, 1),
}
# fmt: on
BF16_CASES = ["k3-s1-p1", "k5-s2-p2", "cg80-two-blocks", "stride(1,2)-pad(1,0)"]


def _inputs(case, dtype=np.float32, seed=0):
    b, h, w, c, g, k, stride, padding, dilation = case
    ho, wo = _out_hw(h, w, k, stride, padding, dilation)
    x = jnp.asarray(random_input((b, h, w, c), seed=seed)).astype(dtype)
    weights = jnp.asarray(random_input((b, ho, wo, g, k, k), seed=seed + 1)).astype(dtype)
    cot = jnp.asarray(random_input((b, ho, wo, c), seed=seed + 2))
    kwargs = dict(kernel_size=k, stride=stride, padding=padding, dilation=dilation)
    return x, weights, cot, kwargs


@functools.cache
def _grad_fn(impl: str, kernel_size, stride, padding, dilation):
    """jit(grad) of sum(out * cot) w.r.t. (x, weights), returning the output as aux: one compile per
    geometry and impl (dtype and shapes re-trace inside the same jit when they change)."""
    interpret = impl == "pallas"

    def loss(x, weights, cot):
        out = involution(
            x,
            weights,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            impl=impl,
            interpret=interpret,
        )
        return jnp.sum(out.astype(jnp.float32) * cot), out

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def _run(impl, x, weights, cot, kwargs):
    (dx, dw), out = _grad_fn(
        impl, kwargs["kernel_size"], kwargs["stride"], kwargs["padding"], kwargs["dilation"]
    )(x, weights, cot)
    return out, dx, dw


def _check_pallas_vs_xla(name, dtype, rtol):
    x, weights, cot, kwargs = _inputs(CASES[name], dtype)
    got = _run("pallas", x, weights, cot, kwargs)
    want = _run("xla", x, weights, cot, kwargs)
    for what, a, e, like in zip(("output", "d/dx", "d/dweights"), got, want, (x, x, weights)):
        assert a.dtype == e.dtype == like.dtype, f"{name} {what}: dtype {a.dtype} vs {e.dtype}"
        assert_close(a.astype(jnp.float32), e.astype(jnp.float32), rtol, what=f"{name} {what}")
    # A zero tensor would pass any relative check against another zero tensor.
    assert float(jnp.max(jnp.abs(want[0].astype(jnp.float32)))) > 0


# --------------------------------------------------------------------------------------------------
# Pallas (interpreted) vs XLA twin


@pytest.mark.parametrize("name", list(CASES))
def test_pallas_matches_xla_float32(name):
    _check_pallas_vs_xla(name, jnp.float32, 1e-5)


@pytest.mark.parametrize("name", BF16_CASES)
def test_pallas_matches_xla_bfloat16(name):
    _check_pallas_vs_xla(name, jnp.bfloat16, BF16_RTOL)


@pytest.mark.parametrize(
    "name, channel_blocks, column_tiles",
    [
        ("cg80-two-blocks", 2, 1),
        ("wo70-three-tiles", 1, 3),
        ("wo35-two-tiles-stride(1,2)-dil(1,2)", 1, 2),
        ("cg12", 1, 1),
        ("G=C-p0", 1, 1),
    ],
)
def test_geometry_of_the_boundary_cases(name, channel_blocks, column_tiles):
    """The cases above exercise several channel blocks / column tiles only if the plan says so."""
    b, h, w, c, g, k, stride, padding, dilation = CASES[name]
    geo = inv_mod._geometry((b, h, w, c), g, k, _pair(stride), _pair(padding), _pair(dilation))
    assert geo.cgp // geo.bc == channel_blocks, geo
    assert geo.wop // geo.tw == column_tiles, geo
    assert geo.cg == c // g and geo.cgp >= geo.cg and geo.wop >= geo.wo


# --------------------------------------------------------------------------------------------------
# XLA twin vs upstream's torch formula


def _torch_involution(x_nchw, weights, k, stride, padding, dilation, groups):
    """holocron.nn.Involution2d's unfold -> multiply -> sum with the kernels given.

    weights: torch (B, G, K*K, H', W') layout."""
    b, c = x_nchw.shape[:2]
    ho, wo = weights.shape[-2:]
    cols = F.unfold(x_nchw, k, dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(b, groups, c // groups, k * k, ho, wo)
    return (cols * weights.view(b, groups, 1, k * k, ho, wo)).sum(dim=3).view(b, c, ho, wo)


def _torch_grads(x, weights, cot, kwargs, groups):
    """Output and (d/dx, d/dweights) from torch autograd, converted back to jaxenc's layouts."""
    k = kwargs["kernel_size"]
    xt = torch.tensor(np.transpose(np.asarray(x), (0, 3, 1, 2))).requires_grad_()
    # (B, H', W', G, K, K) -> (B, G, K*K, H', W')
    w_np = np.asarray(weights)
    wt = torch.tensor(
        np.transpose(w_np.reshape(*w_np.shape[:4], k * k), (0, 3, 4, 1, 2)).copy()
    ).requires_grad_()
    yt = _torch_involution(
        xt,
        wt,
        k,
        _pair(kwargs["stride"]),
        _pair(kwargs["padding"]),
        _pair(kwargs["dilation"]),
        groups,
    )
    yt.backward(torch.tensor(np.transpose(np.asarray(cot), (0, 3, 1, 2)).copy()))
    out = np.transpose(yt.detach().numpy(), (0, 2, 3, 1))
    dx = np.transpose(xt.grad.numpy(), (0, 2, 3, 1))
    dw = np.transpose(wt.grad.numpy(), (0, 3, 4, 1, 2)).reshape(w_np.shape)
    return out, dx, dw


@pytest.mark.parametrize("name", ["k5-s2-p2", "nonsquare-13x11-s2", "stride(2,1)-dil(1,2)"])
def test_xla_twin_matches_torch_unfold(name):
    case = CASES[name]
    x, weights, cot, kwargs = _inputs(case, seed=5)
    got = _run("xla", x, weights, cot, kwargs)
    want = _torch_grads(x, weights, cot, kwargs, groups=case[4])
    for what, a, e in zip(("output", "d/dx", "d/dweights"), got, want):
        assert_close(a, e, 1e-5, what=f"{name} {what}")


def test_xla_twin_matches_holocron_forward(hnn):
    """holocron's own Involution2d.forward, with its kernel generator (pool/reduce/span) replaced by
    given weights, so the comparison covers upstream's view/reshape order and not only our restatement."""
    b, h, w, c, g, k, s, p, d = 2, 8, 6, 12, 3, 3, 2, 1, 1
    module = hnn.Involution2d(c, k, padding=p, stride=s, groups=g, dilation=d)
    ho, wo = h // s, w // s
    x = random_input((b, h, w, c), seed=21)
    weights = random_input((b, ho, wo, g, k, k), seed=22)
    wt = torch.tensor(np.transpose(weights.reshape(b, ho, wo, g * k * k), (0, 3, 1, 2)).copy())

    class _Given(torch.nn.Module):
        def forward(self, _):
            return wt

    module.reduce = torch.nn.Identity()
    module.span = _Given()
    with torch.no_grad():
        expected = module(torch.tensor(np.transpose(x, (0, 3, 1, 2)).copy())).numpy()
    got = involution_reference(jnp.asarray(x), jnp.asarray(weights), k, (s, s), (p, p), (d, d))
    assert_close(got, np.transpose(expected, (0, 2, 3, 1)), 1e-5, what="holocron forward")


# --------------------------------------------------------------------------------------------------
# Transformations of the Pallas path

_SMALL = (2, 7, 9, 8, 2, 3, 2, 1, 1)


def test_pallas_under_jit_and_vmap():
    """vmap over an extra leading axis (pallas_call's batching rule adds a grid axis) under jit."""
    b, h, w, c, g, k, s, p, d = _SMALL
    kwargs = dict(kernel_size=k, stride=s, padding=p, dilation=d)
    ho, wo = _out_hw(h, w, k, s, p, d)
    x = jnp.asarray(random_input((3, b, h, w, c), seed=31))
    weights = jnp.asarray(random_input((3, b, ho, wo, g, k, k), seed=32))
    got = jax.jit(
        jax.vmap(lambda a, bb: involution(a, bb, impl="pallas", interpret=True, **kwargs))
    )(x, weights)
    want = jnp.stack([involution(x[i], weights[i], impl="xla", **kwargs) for i in range(3)])
    assert_close(got, want, 1e-5, what="vmap output")


def test_pallas_gradients_under_jit_of_vmap():
    b, h, w, c, g, k, s, p, d = _SMALL
    kwargs = dict(kernel_size=k, stride=s, padding=p, dilation=d)
    ho, wo = _out_hw(h, w, k, s, p, d)
    x = jnp.asarray(random_input((2, b, h, w, c), seed=33))
    weights = jnp.asarray(random_input((2, b, ho, wo, g, k, k), seed=34))
    cot = jnp.asarray(random_input((2, b, ho, wo, c), seed=35))

    def loss(impl):
        f = jax.vmap(
            lambda a, bb: involution(a, bb, impl=impl, interpret=impl == "pallas", **kwargs)
        )
        return lambda a, bb: jnp.sum(f(a, bb) * cot)

    got = jax.jit(jax.grad(loss("pallas"), argnums=(0, 1)))(x, weights)
    want = jax.grad(loss("xla"), argnums=(0, 1))(x, weights)
    for what, a, e in zip(("d/dx", "d/dweights"), got, want):
        assert_close(a, e, 1e-5, what=what)
    # grad of a jitted function (the custom VJP traced inside jit) as well as jit of grad.
    got_x = jax.grad(lambda a: jax.jit(loss("pallas"))(a, weights))(x)
    assert_close(got_x, want[0], 1e-5, what="grad of jit, d/dx")


# --------------------------------------------------------------------------------------------------
# Dispatch


def _jaxpr_text(impl, interpret=False, grad=False):
    x = jnp.zeros((1, 6, 6, 4))
    weights = jnp.zeros((1, 6, 6, 2, 3, 3))

    def f(a, b):
        return involution(a, b, kernel_size=3, padding=1, impl=impl, interpret=interpret)

    if grad:
        return str(jax.make_jaxpr(jax.grad(lambda a, b: f(a, b).sum(), argnums=(0, 1)))(x, weights))
    return str(jax.make_jaxpr(f)(x, weights))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="'auto' picks Pallas on a GPU")
def test_auto_on_cpu_is_xla():
    x, weights, _, kwargs = _inputs(CASES["k3-s1-p1"])
    np.testing.assert_array_equal(
        involution(x, weights, **kwargs), involution(x, weights, impl="xla", **kwargs)
    )
    assert "pallas_call" not in _jaxpr_text("auto")
    assert "pallas_call" not in _jaxpr_text("auto", grad=True)
    assert "pallas_call" not in _jaxpr_text("xla")


def test_pallas_and_auto_interpret_trace_to_pallas_call():
    # Tracing only: impl="pallas" without interpret is not runnable on CPU, but its program is.
    assert "pallas_call" in _jaxpr_text("pallas")
    assert "pallas_call" in _jaxpr_text("auto", interpret=True)
    # Forward, input-gradient and weight-gradient kernels.
    assert _jaxpr_text("pallas", grad=True).count("pallas_call") == 3


# --------------------------------------------------------------------------------------------------
# Errors


def _ok():
    return jnp.zeros((1, 5, 5, 8)), jnp.zeros((1, 5, 5, 2, 3, 3))


def test_bad_impl_and_interpret():
    x, weights = _ok()
    with pytest.raises(
        ValueError,
        match=r"involution: impl must be one of \('auto', 'pallas', 'xla'\), got 'triton'",
    ):
        involution(x, weights, kernel_size=3, padding=1, impl="triton")
    with pytest.raises(TypeError, match=r"involution: interpret must be a bool, got 1"):
        involution(x, weights, kernel_size=3, padding=1, impl="pallas", interpret=1)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_shape_errors(impl):
    kw = dict(impl=impl, interpret=impl == "pallas")
    x, weights = _ok()
    with pytest.raises(
        ValueError,
        match=r"involution: weights must have shape \(B, H_out, W_out, G, K, K\) = \(1, 3, 3, 2, 3, 3\)",
    ):
        involution(x, weights, kernel_size=3, **kw)  # no padding: 3x3 output
    with pytest.raises(ValueError, match=r"got \(1, 5, 5, 2, 3, 3\)"):
        involution(x, weights, kernel_size=3, stride=2, padding=1, **kw)
    with pytest.raises(
        ValueError,
        match=r"involution: channels=8 is not divisible by weight groups \(weights.shape\[3\]\)=3",
    ):
        involution(x, jnp.zeros((1, 5, 5, 3, 3, 3)), kernel_size=3, padding=1, **kw)
    with pytest.raises(
        ValueError,
        match=r"involution: the input \(H, W\)=\(5, 5\) is smaller than the dilated kernel",
    ):
        involution(x, weights, kernel_size=3, dilation=3, **kw)
    with pytest.raises(
        ValueError,
        match=r"involution: the input \(H, W\)=\(5, 5\) is smaller than the dilated kernel",
    ):
        involution(x, jnp.zeros((1, 1, 1, 2, 7, 7)), kernel_size=7, padding=0, **kw)
    with pytest.raises(
        ValueError,
        match=r"involution: expected x of rank 4 \(B, H, W, C\), got shape \(5, 5, 8\) \(rank 3\)",
    ):
        involution(x[0], weights, kernel_size=3, padding=1, **kw)
    with pytest.raises(
        ValueError,
        match=r"involution: expected weights of rank 6 \(B, H_out, W_out, G, K, K\), got shape \(1, 5, 5, 2, 9\)",
    ):
        involution(x, weights.reshape(1, 5, 5, 2, 9), kernel_size=3, padding=1, **kw)
    with pytest.raises(
        ValueError, match=r"involution: kernel_size must be a positive integer, got 0"
    ):
        involution(x, weights, kernel_size=0, **kw)
    with pytest.raises(ValueError, match=r"involution: padding must be >= 0, got \(-1, -1\)"):
        involution(x, weights, kernel_size=3, padding=-1, **kw)
    with pytest.raises(
        ValueError, match=r"involution: stride must be an int or a pair of ints, got \(1, 1, 1\)"
    ):
        involution(x, weights, kernel_size=3, padding=1, stride=(1, 1, 1), **kw)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_integer_inputs_are_rejected(impl):
    kw = dict(kernel_size=3, padding=1, impl=impl, interpret=impl == "pallas")
    x, weights = _ok()
    with pytest.raises(
        TypeError, match=r"involution: x and weights must be floating point, got int32 and int32"
    ):
        involution(x.astype(jnp.int32), weights.astype(jnp.int32), **kw)


# --------------------------------------------------------------------------------------------------
# Involution2d(impl=...)


_MODULE_ARGS = dict(
    in_channels=8, kernel_size=3, padding=1, stride=2, groups=2, dilation=1, reduction_ratio=2
)


def _module_setup():
    x = jnp.asarray(random_input((2, 8, 6, 8), seed=41))
    variables = Involution2d(**_MODULE_ARGS).init(jax.random.key(0), x)
    return x, variables


def test_involution2d_impl_reaches_the_kernel():
    x, variables = _module_setup()
    pallas = str(
        jax.make_jaxpr(lambda v, a: Involution2d(**_MODULE_ARGS, impl="pallas").apply(v, a))(
            variables, x
        )
    )
    xla = str(
        jax.make_jaxpr(lambda v, a: Involution2d(**_MODULE_ARGS, impl="xla").apply(v, a))(
            variables, x
        )
    )
    assert "pallas_call" in pallas
    assert "pallas_call" not in xla
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(
            Involution2d(**_MODULE_ARGS, impl="xla").apply(variables, x),
            Involution2d(**_MODULE_ARGS).apply(variables, x),
        )


def test_involution2d_pallas_runs_interpreted(monkeypatch):
    """The module's Pallas path end to end (kernel generation + kernels), through the interpreter."""
    x, variables = _module_setup()
    want = Involution2d(**_MODULE_ARGS, impl="xla").apply(variables, x)
    monkeypatch.setattr(nn_conv, "involution", functools.partial(involution, interpret=True))
    got = jax.jit(lambda v, a: Involution2d(**_MODULE_ARGS, impl="pallas").apply(v, a))(
        variables, x
    )
    assert_close(got, want, 1e-5, what="Involution2d pallas vs xla")


# --------------------------------------------------------------------------------------------------
# Mixed dtypes


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize(
    "x_dtype, w_dtype", [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16)]
)
def test_mixed_dtypes_promote_and_gradients_follow_inputs(impl, x_dtype, w_dtype):
    x, weights, cot, kwargs = _inputs(CASES["G=1"])
    x, weights = x.astype(x_dtype), weights.astype(w_dtype)
    out, dx, dw = _run(impl, x, weights, cot, kwargs)
    assert out.dtype == jnp.float32
    assert dx.dtype == x_dtype and dw.dtype == w_dtype
    # The same as promoting by hand: the bf16 operand is exactly representable in float32.
    ref, ref_dx, ref_dw = _run(
        "xla", x.astype(jnp.float32), weights.astype(jnp.float32), cot, kwargs
    )
    assert_close(out, ref, 1e-5, what="output")
    # Gradients are rounded to their input's dtype.
    assert_close(
        dx.astype(jnp.float32),
        ref_dx.astype(x_dtype).astype(jnp.float32),
        1e-5 if x_dtype == jnp.float32 else BF16_RTOL,
        what="d/dx",
    )
    assert_close(
        dw.astype(jnp.float32),
        ref_dw.astype(w_dtype).astype(jnp.float32),
        1e-5 if w_dtype == jnp.float32 else BF16_RTOL,
        what="d/dw",
    )
