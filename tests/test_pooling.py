"""jaxenc.nn.pooling vs holocron.nn 0.3.0: ConcatDownsample2d, GlobalAvg/MaxPool2d, BlurPool2d, SPP,
ZPool."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import torch
from parity import assert_close, check_module_parity, nchw, nhwc, random_input

from jaxenc.nn.pooling import (
    SPP,
    BlurPool2d,
    ConcatDownsample2d,
    GlobalAvgPool2d,
    GlobalMaxPool2d,
    ZPool,
    binomial_taps,
    concat_downsample2d,
    z_pool,
)


def _apply(module, x, **kwargs):
    return module.apply({}, jnp.asarray(x), **kwargs)


# --- ConcatDownsample2d -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scale,shape", [(1, (2, 5, 7, 3)), (2, (2, 6, 8, 3)), (3, (1, 9, 6, 4)), (4, (2, 8, 4, 2))]
)
def test_concat_downsample_parity(hnn, scale, shape):
    check_module_parity(
        hnn.ConcatDownsample2d(scale), ConcatDownsample2d(scale), random_input(shape, seed=scale)
    )


def test_concat_downsample_upstream_hard_values():
    # Upstream: x = arange(2*4*16) viewed as torch (2, 4, 4, 4); we build NCHW then go to NHWC.
    x_nchw = np.arange(2 * 4 * 16, dtype=np.float32).reshape(2, 4, 4, 4)
    out = nchw(np.asarray(concat_downsample2d(jnp.asarray(nhwc(x_nchw)), 2)))  # back to torch terms
    assert out.shape == (2, 16, 2, 2)
    np.testing.assert_array_equal(out[0][0], [[0, 2], [8, 10]])
    np.testing.assert_array_equal(out[0][-4], [[5, 7], [13, 15]])
    np.testing.assert_array_equal(
        np.asarray(_apply(ConcatDownsample2d(2), nhwc(x_nchw))), nhwc(out)
    )
    with pytest.raises(
        ValueError, match=r"concat_downsample2d: height=4 is not divisible by scale_factor=3"
    ):
        concat_downsample2d(jnp.asarray(nhwc(x_nchw)), 3)


@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_concat_downsample_index_version(s):
    c = 4
    x_nchw = np.arange(2 * c * (2 * s) ** 2, dtype=np.float32).reshape(2, c, 2 * s, 2 * s)
    x = jnp.asarray(nhwc(x_nchw))
    with pytest.raises(ValueError, match="not divisible by scale_factor"):
        concat_downsample2d(x, 2 * s + 1)
    out = nchw(np.asarray(concat_downsample2d(x, s)))
    assert out.shape == (2, c * s * s, 2, 2)
    np.testing.assert_array_equal(out[0][0], x_nchw[0, 0, ::s, ::s])
    np.testing.assert_array_equal(out[0][-c], x_nchw[0, 0, s - 1 :: s, s - 1 :: s])
    # The full channel map: NHWC channel (i*s + j)*C + c holds x[:, i::s, j::s, c].
    y = np.asarray(concat_downsample2d(x, s))
    for i in range(s):
        for j in range(s):
            block = y[..., (i * s + j) * c : (i * s + j + 1) * c]
            np.testing.assert_array_equal(block, np.asarray(x)[:, i::s, j::s, :])


# --- global pooling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (3, 1, 5, 2), (1, 16, 16, 8)])
def test_global_pool_parity(hnn, flatten, shape):
    x = random_input(shape, seed=11)
    check_module_parity(hnn.GlobalAvgPool2d(flatten), GlobalAvgPool2d(flatten), x)
    check_module_parity(hnn.GlobalMaxPool2d(flatten), GlobalMaxPool2d(flatten), x)


def test_global_pool_exact_against_adaptive_pools():
    # Upstream asserts torch.equal with AdaptiveAvg/MaxPool2d(1). Max is exact on any input. For the
    # mean, integer-valued inputs make every partial sum exact, and H*W = 64 makes the final division
    # exact too: XLA:CPU's float32 division is not correctly rounded (1 ulp off torch for n = 63).
    x_max = random_input((2, 7, 9, 4), seed=12)
    x_avg = np.random.default_rng(12).integers(-50, 50, (2, 8, 8, 4)).astype(np.float32)
    t_max = torch.nn.AdaptiveMaxPool2d(1)(torch.tensor(nchw(x_max))).numpy()
    t_avg = torch.nn.AdaptiveAvgPool2d(1)(torch.tensor(nchw(x_avg))).numpy()
    np.testing.assert_array_equal(np.asarray(_apply(GlobalMaxPool2d(), x_max)), nhwc(t_max))
    np.testing.assert_array_equal(np.asarray(_apply(GlobalAvgPool2d(), x_avg)), nhwc(t_avg))
    assert _apply(GlobalMaxPool2d(flatten=True), x_max).shape == (2, 4)
    assert _apply(GlobalAvgPool2d(flatten=True), x_avg).shape == (2, 4)
    np.testing.assert_array_equal(
        np.asarray(_apply(GlobalMaxPool2d(flatten=True), x_max)), t_max[:, :, 0, 0]
    )


# --- BlurPool2d -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 5, 5, 2), (2, 11, 6, 4)])
def test_blurpool_parity(hnn, kernel_size, stride, shape):
    torch_module = hnn.BlurPool2d(shape[-1], kernel_size, stride)
    check_module_parity(
        torch_module, BlurPool2d(shape[-1], kernel_size, stride), random_input(shape, seed=13)
    )


def test_blurpool_upstream_properties():
    x = random_input((2, 5, 5, 8), seed=14)
    out = np.asarray(_apply(BlurPool2d(8, stride=2), x))
    assert out.shape == (2, 3, 3, 8)
    kernel = np.array([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]])
    expected = np.einsum("nhwc,hw->nc", x[:, 1:-1, 1:-1, :].astype(np.float64), kernel)
    np.testing.assert_allclose(out[:, 1, 1, :], expected, rtol=0, atol=1e-7)
    assert _apply(BlurPool2d(3, 5, 2), random_input((1, 6, 6, 3))).shape == (1, 3, 3, 3)
    np.testing.assert_array_equal(binomial_taps(3), [0.25, 0.5, 0.25])
    np.testing.assert_array_equal(binomial_taps(5), np.array([1, 4, 6, 4, 1]) / 16)
    # No parameters or state.
    assert BlurPool2d(8).init(jax.random.key(0), x) == {}


def test_blurpool_bad_input():
    x = jnp.zeros((1, 8, 8, 4))
    for k in (0, 1):
        with pytest.raises(
            ValueError, match=rf"BlurPool2d: kernel_size must be an integer > 1, got {k}"
        ):
            _apply(BlurPool2d(4, k), x)
    with pytest.raises(ValueError, match=r"BlurPool2d: channels=3 but the input has 4 channels"):
        _apply(BlurPool2d(3), x)
    with pytest.raises(ValueError, match=r"BlurPool2d: stride must be a positive integer, got 0"):
        _apply(BlurPool2d(4, 3, 0), x)
    with pytest.raises(
        ValueError, match=r"BlurPool2d: reflection padding 3 .* needs height and width > 3"
    ):
        _apply(BlurPool2d(4, 7, 1), jnp.zeros((1, 3, 8, 4)))
    with pytest.raises(ValueError, match=r"BlurPool2d: expected x of rank 4"):
        _apply(BlurPool2d(4), x[0])


# --- SPP --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_sizes", [[5, 9, 13], [3], [1, 3]])
@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 13, 13, 2)])
def test_spp_parity(hnn, kernel_sizes, shape):
    # Shifted negative so that a zero (instead of -inf) padding would change the border maxima.
    x = random_input(shape, seed=15) - 10.0
    out = check_module_parity(hnn.SPP(kernel_sizes), SPP(kernel_sizes), x)["output"]
    assert out.shape == (*shape[:3], shape[-1] * (1 + len(kernel_sizes)))
    assert float(jnp.max(out)) < 0


def test_spp_bad_input():
    with pytest.raises(ValueError, match=r"SPP: kernel_sizes must be odd .* got \[3, 4\]"):
        _apply(SPP([3, 4]), jnp.zeros((1, 8, 8, 2)))
    with pytest.raises(
        ValueError, match=r"SPP: kernel_sizes\[\.\.\.\] must be a positive integer, got 0"
    ):
        _apply(SPP([0]), jnp.zeros((1, 8, 8, 2)))
    with pytest.raises(ValueError, match=r"SPP: expected x of rank 4"):
        _apply(SPP([3]), jnp.zeros((8, 8, 2)))


# --- ZPool ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("torch_dim,dim", [(1, -1), (1, 3), (2, 1), (3, 2)])
def test_zpool_parity(hnn, torch_dim, dim):
    # torch NCHW axis -> NHWC axis: C 1 -> 3, H 2 -> 1, W 3 -> 2.
    check_module_parity(hnn.ZPool(torch_dim), ZPool(dim), random_input((2, 7, 9, 5), seed=16))


def test_zpool_exact():
    x = jnp.asarray(random_input((2, 6, 7, 5), seed=17))
    out = z_pool(x)
    assert out.shape == (2, 6, 7, 2)
    np.testing.assert_array_equal(out[..., 0], jnp.max(x, axis=-1))
    np.testing.assert_array_equal(out[..., 1], jnp.mean(x, axis=-1))
    with pytest.raises(ValueError, match=r"ZPool: dim=4 is out of range for an input of rank 4"):
        z_pool(x, 4)


# --- bad input: downsampling and global pools -------------------------------------------------------


def test_downsample_and_global_bad_input():
    with pytest.raises(
        ValueError, match=r"concat_downsample2d: width=5 is not divisible by scale_factor=2"
    ):
        _apply(ConcatDownsample2d(2), jnp.zeros((1, 4, 5, 2)))
    with pytest.raises(
        ValueError, match=r"concat_downsample2d: scale_factor must be a positive integer, got 0"
    ):
        _apply(ConcatDownsample2d(0), jnp.zeros((1, 4, 4, 2)))
    with pytest.raises(
        ValueError,
        match=r"GlobalAvgPool2d: expected x of rank 4 \(N, H, W, C\), got shape \(4, 4, 2",
    ):
        _apply(GlobalAvgPool2d(), jnp.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match=r"GlobalMaxPool2d: expected x of rank 4"):
        _apply(GlobalMaxPool2d(), jnp.zeros((4, 4, 2)))


# --- bfloat16, jit, vmap ----------------------------------------------------------------------------

_CASES = {
    "ConcatDownsample2d": lambda dt: ConcatDownsample2d(2, dtype=dt),
    "GlobalAvgPool2d": lambda dt: GlobalAvgPool2d(dtype=dt),
    "GlobalMaxPool2d": lambda dt: GlobalMaxPool2d(flatten=True, dtype=dt),
    "BlurPool2d": lambda dt: BlurPool2d(4, 5, 2, dtype=dt),
    "SPP": lambda dt: SPP([3, 5], dtype=dt),
}


@pytest.mark.parametrize("name", [*sorted(_CASES), "ZPool"])
def test_bfloat16(name):
    x = jnp.asarray(random_input((2, 8, 6, 4), seed=18))
    if name == "ZPool":  # no dtype field: it follows its input's dtype
        ref, out = _apply(ZPool(), x), _apply(ZPool(), x.astype(jnp.bfloat16))
    else:
        ref, out = _apply(_CASES[name](None), x), _apply(_CASES[name](jnp.bfloat16), x)
    assert out.dtype == jnp.bfloat16
    assert ref.dtype == jnp.float32
    assert_close(out, ref, rtol=2e-2, what=f"{name} bf16")


@pytest.mark.parametrize("name", [*sorted(_CASES), "ZPool"])
def test_jit_and_vmap(name):
    module = ZPool() if name == "ZPool" else _CASES[name](None)
    xs = jnp.asarray(random_input((3, 2, 8, 6, 4), seed=19))
    eager = module.apply({}, xs[0])
    assert_close(jax.jit(module.apply)({}, xs[0]), eager, rtol=1e-6, what="jit")
    batched = jax.vmap(lambda v: module.apply({}, v))(xs)
    looped = jnp.stack([module.apply({}, v) for v in xs])
    assert_close(batched, looped, rtol=1e-6, what="vmap")
