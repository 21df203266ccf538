"""jaxenc.nn.grouped_conv: every strategy computes torch's grouped / pointwise conv2d (values, input
and kernel gradients), ``auto`` picks the per-backend form, and the override / error paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import F, torch
from parity import assert_close, nchw, nhwc

from jaxenc.nn import Conv2d
from jaxenc.nn.grouped_conv import IMPLS, conv2d_grouped, grouped_conv_impl, resolve_grouped_impl

# (x shape NHWC, C_out, kernel, groups, stride, padding, dilation): ResNeSt's radix-2 conv, ResNeXt's
# 32 narrow groups, wide groups (chunk cap), depthwise with and without a channel multiplier, grouped
# 1x1; then dense 1x1 convolutions (the "dot" form) with strides that do and do not divide the size.
# fmt: off
CASES = [
    ((2, 9, 11, 8), 6, 3, 2, (1, 1), (1, 1), (1, 1)),
    ((2, 9, 11, 64), 64, 3, 32, (2, 1), (1, 2), (2, 1)),
    ((1, 6, 6, 512), 512, 3, 16, (1, 1), (2, 2), (2, 2)),
    ((2, 9, 11, 8), 8, 3, 8, (2, 2), (1, 1), (1, 1)),
    ((2, 9, 11, 8), 16, 3, 8, (2, 2), (2, 1), (1, 2)),
    ((2, 5, 5, 6), 12, 1, 3, (1, 1), (0, 0), (1, 1)),
    ((2, 9, 11, 8), 6, 1, 1, (1, 1), (0, 0), (1, 1)),
    ((2, 9, 11, 8), 6, 1, 1, (2, 2), (0, 0), (2, 2)),
    ((2, 9, 11, 8), 5, 1, 1, (3, 2), (0, 0), (1, 1)),
]
# fmt: on


def _kernel(shape, c_out, k, groups, seed=1):
    return (
        np.random.default_rng(seed)
        .normal(size=(k, k, shape[-1] // groups, c_out))
        .astype(np.float32)
    )


def _conv(impl, stride, padding, dilation, groups):
    return lambda x, w: conv2d_grouped(
        x, w, stride=stride, padding=padding, dilation=dilation, groups=groups, impl=impl
    )


def _strategy(case):
    """The CPU form ``auto`` picks for a case."""
    shape, _, k, groups, _, padding, _ = case
    if groups == 1:
        assert k == 1 and padding == (0, 0)
        return "dot"
    return "taps" if shape[-1] == groups else "chunks"


@pytest.mark.parametrize("case", CASES)
def test_strategies_match_torch_values_and_gradients(case):
    shape, c_out, k, groups, stride, padding, dilation = case
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=shape).astype(np.float32), _kernel(shape, c_out, k, groups)
    xt = torch.tensor(nchw(x), requires_grad=True)
    wt = torch.tensor(np.transpose(w, (3, 2, 0, 1)).copy(), requires_grad=True)
    yt = F.conv2d(xt, wt, stride=stride, padding=padding, dilation=dilation, groups=groups)
    ct = rng.normal(size=tuple(yt.shape)).astype(np.float32)
    yt.backward(torch.tensor(ct))
    for impl in ("xla", _strategy(case)):
        y, vjp = jax.vjp(
            _conv(impl, stride, padding, dilation, groups), jnp.asarray(x), jnp.asarray(w)
        )
        gx, gw = vjp(jnp.asarray(nhwc(ct)))
        assert_close(y, nhwc(yt.detach().numpy()), what=f"{impl} output")
        assert_close(gx, nhwc(xt.grad.numpy()), what=f"{impl} input gradient")
        assert_close(
            gw, np.transpose(wt.grad.numpy(), (2, 3, 1, 0)), what=f"{impl} kernel gradient"
        )


@pytest.mark.parametrize("case", CASES)
def test_strategies_match_the_grouped_xla_conv(case):
    """Runs without torch too (stack B): the CPU forms against XLA's own grouped convolution."""
    shape, c_out, k, groups, stride, padding, dilation = case
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    w = jnp.asarray(_kernel(shape, c_out, k, groups))
    ref, fast = (
        _conv("xla", stride, padding, dilation, groups),
        _conv(_strategy(case), stride, padding, dilation, groups),
    )
    np.testing.assert_allclose(
        fast(x, w), ref(x, w), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref(x, w))))
    )
    grads = [jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), (0, 1))(x, w) for f in (ref, fast)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(a))))


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[7]])
def test_bfloat16_jit_and_vmap(case):
    shape, c_out, k, groups, stride, padding, dilation = case
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    w = jnp.asarray(_kernel(shape, c_out, k, groups))
    ref, fast = (
        _conv("xla", stride, padding, dilation, groups),
        _conv(_strategy(case), stride, padding, dilation, groups),
    )
    yb = jax.jit(fast)(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16
    expected = ref(x, w)
    np.testing.assert_allclose(
        yb.astype(jnp.float32), expected, atol=0.05 * float(jnp.max(jnp.abs(expected)))
    )
    batched = jax.vmap(fast, in_axes=(0, None))(x[:, None], w)
    np.testing.assert_allclose(
        batched[:, 0], expected, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(expected)))
    )


def _conv_primitives(fn, *args):
    return [e for e in jax.make_jaxpr(fn)(*args).eqns if e.primitive.name == "conv_general_dilated"]


def test_auto_on_cpu_never_emits_a_grouped_convolution():
    """The module path (Conv2d) on this CPU backend: no feature_group_count > 1 reaches XLA:CPU."""
    assert jax.default_backend() == "cpu"
    x = jnp.ones((1, 8, 8, 64))
    for groups in (2, 32, 64):
        conv = Conv2d(64, 3, padding=1, groups=groups)
        params = conv.init(jax.random.key(0), x)
        convs = _conv_primitives(lambda p: conv.apply(p, x), params)
        assert all(e.params["feature_group_count"] == 1 for e in convs), groups
    with grouped_conv_impl("xla"):
        convs = _conv_primitives(lambda p: conv.apply(p, x), params)
    assert [e.params["feature_group_count"] for e in convs] == [64]


def test_auto_on_cpu_runs_1x1_convolutions_as_matmuls():
    x = jnp.ones((1, 7, 7, 16))
    for stride in (1, 2):
        conv = Conv2d(8, 1, stride=stride, bias=False)
        params = conv.init(jax.random.key(0), x)
        eqns = jax.make_jaxpr(lambda p: conv.apply(p, x))(params).eqns
        assert not _conv_primitives(lambda p: conv.apply(p, x), params)
        assert [e.primitive.name for e in eqns].count("dot_general") == 1
        assert conv.apply(params, x).shape == (
            1,
            7 if stride == 1 else 4,
            7 if stride == 1 else 4,
            8,
        )
    padded = Conv2d(8, 1, padding=1)  # zero padding is not a matmul: the XLA convolution stays
    assert (
        len(_conv_primitives(lambda p: padded.apply(p, x), padded.init(jax.random.key(0), x))) == 1
    )


def test_resolution_rule():
    assert resolve_grouped_impl(64, 1, backend="cpu") == "xla"
    assert resolve_grouped_impl(64, 1, backend="cpu", pointwise=True) == "dot"
    assert resolve_grouped_impl(64, 2, backend="cpu", pointwise=True) == "chunks"
    assert resolve_grouped_impl(64, 1, backend="gpu", pointwise=True) == "xla"
    assert resolve_grouped_impl(64, 2, backend="cpu") == "chunks"
    assert resolve_grouped_impl(64, 64, backend="cpu") == "taps"
    for backend in ("gpu", "tpu"):
        assert resolve_grouped_impl(64, 2, backend=backend) == "xla"
        assert resolve_grouped_impl(64, 64, backend=backend) == "xla"
    assert resolve_grouped_impl(64, 2, "chunks", backend="gpu") == "chunks"
    with grouped_conv_impl("chunks"):
        assert resolve_grouped_impl(64, 64, backend="cpu") == "chunks"
    assert (
        resolve_grouped_impl(64, 64, backend="cpu") == "taps"
    )  # the override ended with the block


def test_errors():
    x, w = jnp.ones((1, 4, 4, 8)), jnp.ones((3, 3, 4, 8))
    with pytest.raises(
        ValueError,
        match=r"impl must be one of \('auto', 'xla', 'taps', 'chunks', 'dot'\), got 'fast'",
    ):
        conv2d_grouped(x, w, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2, impl="fast")
    with pytest.raises(
        ValueError,
        match="impl='taps' needs one input channel per group, got 8 channels in 2 groups",
    ):
        conv2d_grouped(x, w, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2, impl="taps")
    with pytest.raises(
        ValueError,
        match="impl='dot' needs a 1x1 kernel, no padding and groups=1, got groups=2, pointwise=False",
    ):
        conv2d_grouped(x, w, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2, impl="dot")
    with pytest.raises(
        ValueError,
        match="impl='dot' needs a 1x1 kernel, no padding and groups=1, got groups=1, pointwise=False",
    ):
        conv2d_grouped(
            x,
            jnp.ones((1, 1, 8, 8)),
            stride=(1, 1),
            padding=(1, 1),
            dilation=(1, 1),
            groups=1,
            impl="dot",
        )
    with pytest.raises(ValueError, match="grouped_conv_impl: impl must be one of"):
        with grouped_conv_impl("cudnn"):
            pass
    assert IMPLS == ("auto", "xla", "taps", "chunks", "dot")
