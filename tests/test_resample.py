"""jaxenc.nn.resample against torch.nn.functional: interpolate(mode='bilinear'), adaptive_avg_pool2d,
avg_pool2d, max_pool2d. Values and input gradients on odd sizes, up- and down-sampling (torch semantics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import HAVE_TORCH, F, torch
from parity import assert_close, nchw, nhwc, random_input

from jaxenc.nn.resample import (
    adaptive_avg_pool2d,
    adaptive_pool_weights,
    avg_pool2d,
    bilinear_weights,
    interpolate_bilinear,
    max_pool2d,
)


def check_against_torch(jax_fn, torch_fn, x: np.ndarray, rtol: float = 1e-5, seed: int = 0):
    """Compare ``jax_fn`` (NHWC) with ``torch_fn`` (NCHW) on ``x``: values and a vector-Jacobian product."""
    xt = torch.tensor(nchw(x), requires_grad=True)
    yt = torch_fn(xt)
    cot = random_input(tuple(yt.shape), seed=seed + 99)
    yt.backward(torch.tensor(cot))

    @jax.jit  # one compiled program per case: cheaper than compiling every eager op
    def value_and_vjp(v, c):
        y, vjp = jax.vjp(jax_fn, v)
        return y, vjp(c)[0]

    y, g = value_and_vjp(jnp.asarray(x), jnp.asarray(nhwc(cot)))
    assert y.shape == nhwc(yt.detach().numpy()).shape
    assert_close(y, nhwc(yt.detach().numpy()), rtol, what="output")
    assert_close(g, nhwc(xt.grad.numpy()), rtol * 10, what="input gradient")
    return y


# --- interpolate_bilinear ---------------------------------------------------------------------------

_IN_SIZES = [(7, 5), (13, 11), (1, 1), (2, 3)]
_OUT_SIZES = [(1, 1), (3, 2), (13, 17), (29, 6), (60, 45)]


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("in_size", _IN_SIZES)
def test_interpolate_parity(in_size, align_corners):
    x = random_input((2, *in_size, 3), seed=sum(in_size))
    for size in _OUT_SIZES + [in_size]:
        check_against_torch(
            lambda v: interpolate_bilinear(v, size, align_corners=align_corners),
            lambda t: F.interpolate(t, size, mode="bilinear", align_corners=align_corners),
            x,
        )


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("scale_factor", [0.5, 1.7, 2, (3.3, 0.75)])
def test_interpolate_scale_factor_parity(scale_factor, align_corners):
    # With a scale factor (and no recompute_scale_factor) torch scales source coordinates by 1/s,
    # which differs from in/out when H*s is not an integer.
    x = random_input((2, 9, 7, 2), seed=3)
    check_against_torch(
        lambda v: interpolate_bilinear(
            v, None, align_corners=align_corners, scale_factor=scale_factor
        ),
        lambda t: F.interpolate(
            t, scale_factor=scale_factor, mode="bilinear", align_corners=align_corners
        ),
        x,
    )


def test_interpolate_hard_values():
    x = jnp.asarray(np.arange(12, dtype=np.float32).reshape(1, 3, 4, 1))
    y = interpolate_bilinear(x, (5, 7), align_corners=True)
    # align_corners maps corners onto corners exactly, and the middle row/column are exact midpoints.
    np.testing.assert_array_equal(
        np.asarray(y)[0, [0, 0, -1, -1], [0, -1, 0, -1], 0], [0, 3, 8, 11]
    )
    np.testing.assert_allclose(np.asarray(y)[0, 2, :, 0], np.linspace(4, 7, 7), rtol=1e-6)
    # Same size: the identity, bit for bit, in both modes.
    for ac in (True, False):
        np.testing.assert_array_equal(
            np.asarray(interpolate_bilinear(x, (3, 4), align_corners=ac)), np.asarray(x)
        )
    # Rows of the weight matrices sum to one and hold at most two taps.
    for n_in, n_out in [(7, 13), (13, 7), (1, 5), (5, 1)]:
        for ac in (True, False):
            w = bilinear_weights(n_in, n_out, ac)
            np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
            assert ((w != 0).sum(1) <= 2).all()


def test_interpolate_has_no_gather():
    x = jnp.ones((1, 7, 5, 2))
    for ac in (True, False):
        jaxpr = str(
            jax.make_jaxpr(jax.grad(lambda v: interpolate_bilinear(v, (11, 13), ac).sum()))(x)
        )
        assert "gather" not in jaxpr and "scatter" not in jaxpr


# --- adaptive_avg_pool2d ----------------------------------------------------------------------------


@pytest.mark.parametrize("in_size", [(13, 11), (7, 5), (1, 1), (60, 45)])
def test_adaptive_avg_pool_parity(in_size):
    x = random_input((2, *in_size, 3), seed=in_size[0])
    for out in [1, 2, 3, 6, (4, 5), (None, 2), (2 * in_size[0] + 1, 3)]:
        torch_out = tuple(o for o in out) if isinstance(out, tuple) else out
        check_against_torch(
            lambda v: adaptive_avg_pool2d(v, out), lambda t: F.adaptive_avg_pool2d(t, torch_out), x
        )


def test_adaptive_pool_overlapping_bins():
    # 5 -> 3: torch's bins [0, 2), [1, 4), [3, 5) overlap on rows 1 and 3.
    w = adaptive_pool_weights(5, 3)
    expected = np.array(
        [[1 / 2, 1 / 2, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, 1 / 2, 1 / 2]], np.float32
    )
    np.testing.assert_allclose(w, expected, rtol=1e-7)
    x = jnp.asarray(np.arange(5, dtype=np.float32).reshape(1, 5, 1, 1))
    np.testing.assert_allclose(
        np.asarray(adaptive_avg_pool2d(x, (3, 1)))[0, :, 0, 0], [0.5, 2.0, 3.5], rtol=1e-7
    )
    # 1x1 output is the global mean.
    x = random_input((2, 13, 11, 4), seed=1)
    assert_close(adaptive_avg_pool2d(x, 1)[:, 0, 0], x.mean(axis=(1, 2)), 1e-6)


# --- avg_pool2d -------------------------------------------------------------------------------------

# fmt: off
_POOL_ARGS = [
    (3, 2, 1),  # ACF pooling / ResNeSt avd
    (2, 2, 0),  # ResNet-D avg_down
    (3, 1, 1),
    (3, 3, 1),
    (5, 3, 2),
    ((3, 2), (2, 1), (1, 0)),
    (2, None, 1),
]
# fmt: on


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("in_size", [(13, 11), (7, 5), (8, 6), (2, 3)])
def test_avg_pool_parity(in_size, count_include_pad, ceil_mode):
    x = random_input((2, *in_size, 3), seed=in_size[1])
    for k, s, p in _POOL_ARGS:
        kwargs = dict(ceil_mode=ceil_mode, count_include_pad=count_include_pad)
        try:
            F.avg_pool2d(torch.zeros(1, 1, *in_size), k, s, p, **kwargs)
        except RuntimeError:
            with pytest.raises(ValueError, match="avg_pool2d: output (height|width) would be"):
                avg_pool2d(x, k, s, p, **kwargs)
            continue
        check_against_torch(
            lambda v: avg_pool2d(v, k, s, p, **kwargs),
            lambda t: F.avg_pool2d(t, k, s, p, **kwargs),
            x,
        )


def test_avg_pool_divisor_override_and_hard_values():
    x = random_input((1, 7, 6, 2), seed=5)
    check_against_torch(
        lambda v: avg_pool2d(v, 3, 2, 1, divisor_override=4),
        lambda t: F.avg_pool2d(t, 3, 2, 1, divisor_override=4),
        x,
    )
    ones = jnp.ones((1, 4, 4, 1))
    # count_include_pad=True counts the zero padding: a corner window of 3x3/p1 sees 4 ones of 9.
    assert float(avg_pool2d(ones, 3, 2, 1)[0, 0, 0, 0]) == pytest.approx(4 / 9)
    assert float(avg_pool2d(ones, 3, 2, 1, count_include_pad=False)[0, 0, 0, 0]) == 1.0
    # ceil_mode adds the partial last window: 5 -> 3 with k2 s2 (torch: [0,2), [2,4), [4,5)).
    x5 = jnp.asarray(np.arange(5, dtype=np.float32).reshape(1, 5, 1, 1))
    np.testing.assert_allclose(
        np.asarray(avg_pool2d(x5, (2, 1), (2, 1), ceil_mode=True))[0, :, 0, 0],
        [0.5, 2.5, 4.0],
        rtol=1e-7,
    )


# --- max_pool2d -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, s, p", [(3, 2, 1), (2, 2, 0), (3, 1, 1), ((3, 2), (2, 1), (1, 0))])
@pytest.mark.parametrize("in_size", [(7, 5), (12, 12), (3, 3)])
def test_max_pool_parity(in_size, k, s, p):
    x = random_input((2, *in_size, 3), seed=5)
    check_against_torch(lambda v: max_pool2d(v, k, s, p), lambda t: F.max_pool2d(t, k, s, p), x)


def test_max_pool_ties_follow_torch_and_xla():
    """Ties (ReLU zeros, equal integers): the gradient goes to the first maximum of each window in
    row-major order, as torch's index and XLA's select-and-scatter do (runs without torch too)."""
    import flax.linen as nn

    x = np.maximum(np.random.default_rng(0).integers(-3, 3, size=(2, 11, 12, 5)), 0).astype(
        np.float32
    )
    ref = lambda v: nn.max_pool(v, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # noqa: E731
    new = lambda v: max_pool2d(v, 3, 2, 1)  # noqa: E731
    ct = jnp.asarray(random_input(ref(jnp.asarray(x)).shape, seed=1))
    np.testing.assert_array_equal(new(x), ref(x))
    np.testing.assert_allclose(
        jax.vjp(new, x)[1](ct)[0], jax.vjp(ref, x)[1](ct)[0], rtol=1e-6, atol=1e-6
    )
    if HAVE_TORCH:
        xt = torch.tensor(nchw(x), requires_grad=True)
        F.max_pool2d(xt, 3, 2, 1).backward(torch.tensor(nchw(np.asarray(ct))))
        np.testing.assert_allclose(
            jax.vjp(new, x)[1](ct)[0], nhwc(xt.grad.numpy()), rtol=1e-6, atol=1e-6
        )


def test_max_pool_propagates_nan():
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, 1, 1, 0] = np.nan
    assert np.isnan(np.asarray(max_pool2d(x, 2, 2))[0, 0, 0, 0])


# --- dtype, jit, vmap -------------------------------------------------------------------------------

_FNS = {
    "interpolate_true": lambda v: interpolate_bilinear(v, (17, 9), align_corners=True),
    "interpolate_false": lambda v: interpolate_bilinear(v, (5, 14), align_corners=False),
    "adaptive": lambda v: adaptive_avg_pool2d(v, (3, 6)),
    "avg_pool": lambda v: avg_pool2d(v, 3, 2, 1, ceil_mode=True, count_include_pad=False),
    "max_pool": lambda v: max_pool2d(v, 3, 2, 1),
}


@pytest.mark.parametrize("name", sorted(_FNS))
def test_bfloat16(name):
    x = random_input((2, 13, 11, 4), seed=2)
    ref = _FNS[name](jnp.asarray(x))
    out = _FNS[name](jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert_close(out.astype(jnp.float32), ref, rtol=2e-2, what=name)


@pytest.mark.parametrize("name", sorted(_FNS))
def test_jit_and_vmap(name):
    fn = _FNS[name]
    xs = jnp.asarray(random_input((3, 2, 13, 11, 4), seed=4))
    eager = fn(xs[0])
    assert_close(jax.jit(fn)(xs[0]), eager, rtol=1e-6, what="jit")
    assert_close(jax.vmap(fn)(xs), jnp.stack([fn(v) for v in xs]), rtol=1e-6, what="vmap")


# --- bad input --------------------------------------------------------------------------------------


def test_bad_inputs():
    x = jnp.ones((2, 7, 5, 3))
    with pytest.raises(
        ValueError,
        match=r"interpolate_bilinear: expected x of rank 4 \(N, H, W, C\), got shape \(7, 5, 3\)",
    ):
        interpolate_bilinear(x[0], (3, 3))
    with pytest.raises(
        ValueError, match="interpolate_bilinear: give exactly one of size and scale_factor"
    ):
        interpolate_bilinear(x, (3, 3), scale_factor=2.0)
    with pytest.raises(
        ValueError, match="interpolate_bilinear: give exactly one of size and scale_factor"
    ):
        interpolate_bilinear(x)
    with pytest.raises(
        ValueError,
        match=r"interpolate_bilinear: size must be an int or a pair of positive ints, got \(0, 3\)",
    ):
        interpolate_bilinear(x, (0, 3))
    with pytest.raises(
        ValueError,
        match=r"interpolate_bilinear: size must be an int or a pair \(H, W\), got \(1, 2, 3\)",
    ):
        interpolate_bilinear(x, (1, 2, 3))
    with pytest.raises(
        ValueError, match="interpolate_bilinear: scale_factor=0.1 gives an empty output"
    ):
        interpolate_bilinear(x, scale_factor=0.1)
    with pytest.raises(
        TypeError, match="interpolate_bilinear: align_corners must be a bool, got 'yes'"
    ):
        interpolate_bilinear(x, 3, align_corners="yes")
    with pytest.raises(
        ValueError,
        match=r"adaptive_avg_pool2d: output_size must be an int or a pair of positive ints \(or None",
    ):
        adaptive_avg_pool2d(x, (2, -1))
    with pytest.raises(ValueError, match=r"adaptive_avg_pool2d: expected x of rank 4"):
        adaptive_avg_pool2d(jnp.ones((7, 5)), 2)
    with pytest.raises(
        ValueError,
        match=r"avg_pool2d: padding must be between 0 and half the kernel size .* padding=2 for kernel_size=3",
    ):
        avg_pool2d(x, 3, 1, 2)
    with pytest.raises(
        ValueError, match=r"avg_pool2d: output height would be 0 \(input height=7, kernel_size=9"
    ):
        avg_pool2d(x, (9, 3))
    with pytest.raises(ValueError, match="avg_pool2d: kernel_size and stride must be positive"):
        avg_pool2d(x, 3, 0)
    with pytest.raises(
        ValueError, match="avg_pool2d: divisor_override must be a non-zero int or None, got 0"
    ):
        avg_pool2d(x, 3, divisor_override=0)
    with pytest.raises(
        ValueError, match=r"max_pool2d: padding must be between 0 and half the kernel size"
    ):
        max_pool2d(x, 3, 1, 2)
    with pytest.raises(ValueError, match="max_pool2d: kernel_size and stride must be positive"):
        max_pool2d(x, 3, 0)
    with pytest.raises(
        ValueError, match=r"max_pool2d: input \(2, 7, 5, 3\) is smaller than the kernel \(9, 3\)"
    ):
        max_pool2d(x, (9, 3))
    with pytest.raises(ValueError, match=r"max_pool2d: expected x of rank 4"):
        max_pool2d(jnp.ones((7, 5)), 2)
