"""jaxenc.nn.conv (holocron.nn NormConv2d, Add2d, SlimConv2d, PyConv2d, Involution2d): parity with
pylocron 0.3.0 (values, input and parameter gradients, BN statistics), grouped NormConv2d/Add2d
against a restated torch reference, the upstream shape tests (holocron's tests/test_nn_conv.py), memory of involution,
bfloat16, jit, vmap and error messages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import F, torch
from parity import assert_close, check_module_parity, nchw, nhwc, random_input, randomise_batchnorm

from jaxenc.nn.conv import (
    Add2d,
    Involution2d,
    NormConv2d,
    PyConv2d,
    SlimConv2d,
    add2d,
    involution,
    norm_conv2d,
)

# --------------------------------------------------------------------------------------------------
# Torch references


def _window_reference(m: torch.nn.Module, x: torch.Tensor, *, adder: bool) -> torch.Tensor:
    """NormConv2d / Add2d restated in torch without upstream's in-place normalisation, groups working.

    Upstream normalises the unfolded windows in place, so autograd cannot give the INPUT gradient
    (it raises "modified by an inplace operation"); this reference computes the same arithmetic
    out of place. For groups > 1 each group's channels are unfolded, normalised and matched with
    that group's filters (the jaxenc design decision; upstream fails for groups > 1).
    """
    weight, padding = m.weight, m.padding
    if m.padding_mode != "zeros":
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        padding = (0, 0)
    n, c, h, w = x.shape
    g = m.groups
    cg, og = c // g, weight.shape[0] // g
    normalise = (not adder) or m.normalize_slices
    outs = []
    for gi in range(g):
        v = F.unfold(
            x[:, gi * cg : (gi + 1) * cg], weight.shape[-2:], m.dilation, padding, m.stride
        ).transpose(1, 2)
        if normalise:
            v = (v - v.mean(-1, keepdim=True)) * (
                v.var(-1, unbiased=False, keepdim=True) + m.eps
            ).rsqrt()
        wg = weight[gi * og : (gi + 1) * og].reshape(og, -1)
        outs.append(-(v.unsqueeze(2) - wg).abs().sum(-1) if adder else v @ wg.t())
    y = torch.cat(outs, -1)
    if m.bias is not None:
        y = y + m.bias
    size = [
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, p, d, k, st in zip((h, w), padding, m.dilation, weight.shape[-2:], m.stride)
    ]
    return y.transpose(1, 2).reshape(n, -1, *size)


def _window_parity(hnn, name, kwargs, shape, seed=0):
    """check_module_parity through the restated reference, plus the output against upstream itself."""
    adder = name == "Add2d"
    torch_module = getattr(hnn, name)(**kwargs)
    flax_module = (Add2d if adder else NormConv2d)(**kwargs)
    x = random_input(shape, seed=seed)
    result = check_module_parity(
        torch_module,
        flax_module,
        x,
        torch_forward=lambda m, xt: _window_reference(m, xt, adder=adder),
    )
    if kwargs.get("groups", 1) == 1:
        torch_module.eval()
        with torch.no_grad():
            upstream = torch_module(torch.tensor(nchw(x)))
        assert_close(result["output"], nhwc(upstream.numpy()), what=f"{name} vs pylocron")
    return result


# --------------------------------------------------------------------------------------------------
# NormConv2d / Add2d

WINDOW_CASES = [
    # (constructor kwargs, NHWC input shape)
    (dict(in_channels=8, out_channels=16, kernel_size=3, padding=1), (2, 7, 9, 8)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2), (1, 13, 13, 4)),
    (dict(in_channels=4, out_channels=8, kernel_size=3, dilation=2, padding=2), (2, 9, 7, 4)),
    (
        dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, padding_mode="reflect"),
        (2, 7, 9, 8),
    ),
    (
        dict(
            in_channels=6,
            out_channels=5,
            kernel_size=(3, 5),
            stride=(2, 1),
            padding=(1, 2),
            bias=False,
        ),
        (1, 9, 8, 6),
    ),
    (dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, groups=4), (2, 7, 9, 8)),
    (
        dict(
            in_channels=8,
            out_channels=4,
            kernel_size=3,
            stride=2,
            padding=1,
            groups=2,
            padding_mode="reflect",
        ),
        (1, 13, 11, 8),
    ),
]


@pytest.mark.parametrize("kwargs,shape", WINDOW_CASES)
def test_norm_conv2d_parity(hnn, kwargs, shape):
    _window_parity(hnn, "NormConv2d", kwargs, shape)


@pytest.mark.parametrize("normalize_slices", [False, True])
@pytest.mark.parametrize("kwargs,shape", WINDOW_CASES)
def test_add2d_parity(hnn, kwargs, shape, normalize_slices):
    _window_parity(hnn, "Add2d", {**kwargs, "normalize_slices": normalize_slices}, shape, seed=1)


def test_add2d_upstream_gradients_directly(hnn):
    # Without normalize_slices upstream backpropagates to its input, so compare with it directly.
    m = hnn.Add2d(4, 6, 3, stride=2, padding=1)
    check_module_parity(m, Add2d(4, 6, 3, stride=2, padding=1), random_input((2, 9, 7, 4), seed=2))


def test_functional_forms_match_upstream(hF):
    x = random_input((2, 9, 8, 5), seed=3)
    w = random_input((7, 5, 3, 3), seed=4)
    b = random_input((7,), seed=5)
    xt, wt, bt = torch.tensor(nchw(x)), torch.tensor(w), torch.tensor(b)
    kernel = np.transpose(w, (2, 3, 1, 0))
    args = dict(stride=2, padding=1, dilation=1)
    with torch.no_grad():
        assert_close(
            norm_conv2d(x, kernel, b, **args), nhwc(hF.norm_conv2d(xt, wt, bt, **args).numpy())
        )
        for norm in (False, True):
            expected = hF.add2d(xt, wt, bt, normalize_slices=norm, **args).numpy()
            assert_close(add2d(x, kernel, b, normalize_slices=norm, **args), nhwc(expected))


@pytest.mark.parametrize("cls", [NormConv2d, Add2d])
def test_groups_equal_independent_convolutions_per_group(cls):
    # The design decision in one line: groups=G is G independent layers on the channel slices.
    x = random_input((2, 7, 6, 8), seed=6)
    grouped = cls(8, 6, 3, padding=1, groups=2)
    v = grouped.init(jax.random.key(0), x)
    y = grouped.apply(v, x)
    single = cls(4, 3, 3, padding=1)
    kernel, bias = v["params"]["kernel"], v["params"]["bias"]
    for g in range(2):
        params = {"kernel": kernel[..., 3 * g : 3 * (g + 1)], "bias": bias[3 * g : 3 * (g + 1)]}
        part = single.apply({"params": params}, x[..., 4 * g : 4 * (g + 1)])
        assert_close(y[..., 3 * g : 3 * (g + 1)], part, what=f"group {g}")


def test_norm_conv2d_all_zero_windows_give_the_bias(hnn):
    # Windows made only of zeros have variance 0: torch gives exactly 0 * rsqrt(eps) + bias.
    m = hnn.NormConv2d(3, 4, 3, padding=1)
    x = np.zeros((1, 5, 5, 3), np.float32)
    out = check_module_parity(
        m,
        NormConv2d(3, 4, 3, padding=1),
        x,
        torch_forward=lambda m, xt: _window_reference(m, xt, adder=False),
    )
    np.testing.assert_array_equal(
        np.asarray(out["output"]), np.broadcast_to(m.bias.detach().numpy(), (1, 5, 5, 4))
    )


def test_norm_conv2d_large_mean_keeps_precision(hnn):
    # An input far from zero (mean 300, spread 1) against a float64 reference: two-pass window
    # statistics keep the spread's precision. The bound is the float32 rounding of the window mean
    # itself (ulp(300) = 3e-5, i.e. ~3e-5 relative on each centred value, seen again in the dot
    # product), which torch's float32 computation carries too; a one-pass E[v^2] - E[v]^2 variance
    # loses ~2e-2 here (measured).
    kwargs = dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="replicate")
    m = hnn.NormConv2d(**kwargs)
    x = random_input((2, 7, 7, 4), seed=7) + 300.0
    from jaxenc.port import torch_to_flax

    module = NormConv2d(**kwargs)
    y = module.apply(torch_to_flax(module, m.state_dict(), x), x)
    with torch.no_grad():
        exact = _window_reference(m.double(), torch.tensor(nchw(x)).double(), adder=False).numpy()
    assert_close(y, nhwc(exact), rtol=2e-4, what="float32 vs float64")


# --------------------------------------------------------------------------------------------------
# SlimConv2d

SLIM_CASES = [
    (dict(in_channels=8, kernel_size=3, padding=1), (2, 7, 9, 8)),
    (
        dict(in_channels=16, kernel_size=3, stride=2, dilation=2, padding=2, groups=2, r=4, L=2),
        (3, 13, 13, 16),
    ),
    (
        dict(
            in_channels=12,
            kernel_size=3,
            stride=2,
            padding=1,
            padding_mode="reflect",
            bias=False,
            L=5,
        ),
        (2, 9, 11, 12),
    ),
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kwargs,shape", SLIM_CASES)
def test_slim_conv2d_parity(hnn, kwargs, shape, train):
    m = hnn.SlimConv2d(**kwargs)
    randomise_batchnorm(m.bn)
    check_module_parity(m, SlimConv2d(**kwargs), random_input(shape, seed=8), train=train)


# --------------------------------------------------------------------------------------------------
# PyConv2d

# pylocron 0.3.0 PyConv2d levels, in=8, out=16, k=3, padding=1: (out_channels, kernel, groups) per level
# fmt: off
PYCONV_TABLE = {
    1: [(16, 3, 1)],
    2: [(8, 3, 1), (8, 5, 4)],
    3: [(4, 3, 1), (4, 5, 4), (8, 7, 8)],
    4: [(4, 3, 1), (4, 5, 4), (4, 7, 4), (4, 9, 4)],
    5: [(2, 3, 1), (2, 5, 2), (4, 7, 4), (4, 9, 4), (4, 11, 4)],
}
# fmt: on


@pytest.mark.parametrize("num_levels", [1, 2, 3, 4, 5])
def test_pyconv2d_parity_and_level_table(hnn, num_levels):
    m = hnn.PyConv2d(8, 16, 3, num_levels, padding=1)
    result = check_module_parity(
        m, PyConv2d(8, 16, 3, num_levels, padding=1), random_input((2, 7, 9, 8), seed=9)
    )
    params = result["variables"]["params"]
    assert sorted(params) == [str(i) for i in range(num_levels)]
    state = m.state_dict()
    for i, (out, k, groups) in enumerate(PYCONV_TABLE[num_levels]):
        kh, kw, in_per_group, o = params[str(i)]["kernel"].shape
        assert (o, kh, 8 // in_per_group) == (out, k, groups), f"level {i}"
        assert tuple(state[f"{i}.weight"].shape) == (out, 8 // groups, k, k)
        assert tuple(state[f"{i}.bias"].shape) == (out,)
    assert result["output"].shape == (2, 7, 9, 16)  # padding + i keeps the size at every level


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        (dict(num_levels=3, padding=1, stride=2), (1, 13, 13, 8)),
        (dict(num_levels=1, padding=2, stride=2, dilation=2), (1, 11, 12, 8)),
        (dict(num_levels=3, padding=0, groups=[1, 2, 4], bias=False), (2, 11, 9, 8)),
        (dict(num_levels=2, padding=1, stride=2, padding_mode="reflect"), (2, 9, 7, 8)),
    ],
)
def test_pyconv2d_parity_kwargs(hnn, kwargs, shape):
    m = hnn.PyConv2d(8, 16, 3, **kwargs)
    check_module_parity(m, PyConv2d(8, 16, 3, **kwargs), random_input(shape, seed=10))


# --------------------------------------------------------------------------------------------------
# Involution2d

INVOLUTION_CASES = [
    (dict(kernel_size=3, padding=1), (2, 7, 9, 8)),
    (dict(kernel_size=3, padding=1, stride=2, groups=4, reduction_ratio=2), (2, 8, 12, 8)),
    (dict(kernel_size=5, padding=2, groups=4, reduction_ratio=4), (1, 13, 13, 16)),
    (dict(kernel_size=5, padding=4, dilation=2, groups=2), (1, 9, 7, 8)),
    (dict(kernel_size=7, padding=3, stride=2, groups=4, reduction_ratio=2), (1, 14, 10, 16)),
    (dict(kernel_size=7, padding=3, groups=1), (2, 9, 9, 4)),
    # Odd size with stride 2: upstream's floor pooling lines up with padding 0 (13 -> 6).
    (dict(kernel_size=3, padding=0, stride=2, groups=2), (2, 13, 13, 4)),
]


@pytest.mark.parametrize("kwargs,shape", INVOLUTION_CASES)
def test_involution2d_parity(hnn, kwargs, shape):
    m = hnn.Involution2d(shape[-1], **kwargs)
    check_module_parity(m, Involution2d(shape[-1], **kwargs), random_input(shape, seed=11))


def _involution_unfolded(x, weights, k, stride, padding, dilation):
    """Naive reference that DOES build the unfolded tensor (small sizes only)."""
    b, h, w, c = x.shape
    g = weights.shape[3]
    xp = jnp.pad(x, ((0, 0), (padding[0],) * 2, (padding[1],) * 2, (0, 0)))
    ho, wo = weights.shape[1:3]
    cols = jnp.stack(
        [
            xp[:, i * dilation[0] :: stride[0], j * dilation[1] :: stride[1]][:, :ho, :wo]
            for i in range(k)
            for j in range(k)
        ],
        axis=-1,
    ).reshape(b, ho, wo, g, c // g, k * k)
    return jnp.einsum("bhwgck,bhwgk->bhwgc", cols, weights.reshape(b, ho, wo, g, k * k)).reshape(
        b, ho, wo, c
    )


@pytest.mark.parametrize(
    "k,stride,padding,dilation,shape,groups",
    [
        (3, (2, 2), (1, 1), (1, 1), (2, 9, 8, 8), 4),
        (3, (1, 2), (2, 0), (2, 1), (1, 7, 9, 6), 3),
        (5, (3, 3), (1, 2), (1, 1), (2, 11, 10, 4), 1),
    ],
)
def test_involution_function_values_and_custom_vjp(k, stride, padding, dilation, shape, groups):
    x = jnp.asarray(random_input(shape, seed=12))
    ho = (shape[1] + 2 * padding[0] - dilation[0] * (k - 1) - 1) // stride[0] + 1
    wo = (shape[2] + 2 * padding[1] - dilation[1] * (k - 1) - 1) // stride[1] + 1
    w = jnp.asarray(random_input((shape[0], ho, wo, groups, k, k), seed=13))
    args = dict(kernel_size=k, stride=stride, padding=padding, dilation=dilation)
    y = involution(x, w, **args)
    assert_close(y, _involution_unfolded(x, w, k, stride, padding, dilation), what="values")
    cot = jnp.asarray(random_input(y.shape, seed=14))
    grads = jax.vjp(lambda a, b: involution(a, b, **args), x, w)[1](cot)
    expected = jax.vjp(lambda a, b: _involution_unfolded(a, b, k, stride, padding, dilation), x, w)[
        1
    ](cot)
    assert_close(grads[0], expected[0], what="input gradient")
    assert_close(grads[1], expected[1], what="kernel gradient")


@pytest.mark.parametrize("stride", [1, 2])
def test_involution_never_materialises_the_unfolded_tensor(stride):
    b, c, h, w, k, g = 2, 64, 56, 56, 7, 4
    ho, wo = h // stride, w // stride
    x = jax.ShapeDtypeStruct((b, h, w, c), jnp.float32)
    weights = jax.ShapeDtypeStruct((b, ho, wo, g, k, k), jnp.float32)

    def loss(x, weights):
        return jnp.sum(involution(x, weights, kernel_size=k, stride=stride, padding=3) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, weights).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    unfolded = b * c * k * k * ho * wo * 4
    # Half the unfolded size: storing it in any float dtype of >= 16 bits would exceed this.
    assert temp < unfolded / 2, (
        f"forward+backward temporaries {temp} B vs unfolded tensor {unfolded} B"
    )


def test_involution2d_module_memory():
    module = Involution2d(64, 7, padding=3, groups=4)
    x = jnp.zeros((2, 56, 56, 64))
    variables = module.init(jax.random.key(0), x)

    def loss(params, x):
        return jnp.sum(module.apply({"params": params}, x) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables["params"], x).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 2 * 64 * 49 * 56 * 56 * 4 / 2


# --------------------------------------------------------------------------------------------------
# Upstream test_nn_conv.py shapes, NHWC, gradients flow


def _shape_after_backward(module, x):
    variables = module.init(jax.random.key(0), x)
    grad_fn = jax.jit(
        jax.grad(
            lambda p, xx: jnp.sum(module.apply({**variables, "params": p}, xx)), argnums=(0, 1)
        )
    )
    grads = grad_fn(variables["params"], x)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    return module.apply(variables, x).shape


@pytest.mark.parametrize(
    "module,expected",
    [
        (NormConv2d(8, 16, 3, padding=1), (2, 16, 16, 16)),
        (NormConv2d(8, 16, 3, padding=1, padding_mode="reflect"), (2, 16, 16, 16)),
        (Add2d(8, 16, 3, padding=1), (2, 16, 16, 16)),
        (Add2d(8, 16, 3, padding=1, padding_mode="reflect"), (2, 16, 16, 16)),
        (SlimConv2d(8, 3, padding=1, r=32, L=2), (2, 16, 16, 6)),
        *[(PyConv2d(8, 16, 3, n, padding=1), (2, 16, 16, 16)) for n in range(1, 5)],
        (Involution2d(8, 3, 1, reduction_ratio=2), (2, 16, 16, 8)),
        (Involution2d(8, 3, 1, 2, reduction_ratio=2), (2, 8, 8, 8)),
    ],
)
def test_upstream_shapes(module, expected):
    assert (
        _shape_after_backward(module, jnp.asarray(random_input((2, 16, 16, 8), seed=15)))
        == expected
    )


def test_slim_conv2d_state_dict_shapes(hnn):
    # pylocron 0.3.0 SlimConv2d: the torch keys and shapes the converter must accept for C=8, k=3.
    m = hnn.SlimConv2d(8, 3, padding=1)
    # fmt: off
    expected = {
        "fc1.weight": (2, 8, 1, 1), "fc2.weight": (8, 2, 1, 1), "conv_top.weight": (4, 4, 3, 3),
        "conv_bot1.weight": (2, 4, 1, 1), "conv_bot2.weight": (2, 2, 3, 3), "bn.running_var": (2,),
    }
    # fmt: on
    state = m.state_dict()
    assert {k: tuple(state[k].shape) for k in expected} == expected
    from jaxenc.port import torch_to_flax

    variables = torch_to_flax(
        SlimConv2d(8, 3, padding=1), state, np.zeros((1, 5, 5, 8), np.float32)
    )
    assert variables["params"]["conv_bot2"]["kernel"].shape == (3, 3, 2, 2)


# --------------------------------------------------------------------------------------------------
# bfloat16, jit, vmap

ALL_MODULES = [
    (
        NormConv2d,
        dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, groups=2),
        (2, 9, 7, 8),
    ),
    (
        Add2d,
        dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, normalize_slices=True),
        (2, 9, 7, 8),
    ),
    (Add2d, dict(in_channels=8, out_channels=6, kernel_size=3, padding=1), (2, 9, 7, 8)),
    (SlimConv2d, dict(in_channels=8, kernel_size=3, padding=1), (2, 9, 7, 8)),
    (
        PyConv2d,
        dict(in_channels=8, out_channels=16, kernel_size=3, num_levels=3, padding=1),
        (2, 9, 7, 8),
    ),
    (
        Involution2d,
        dict(in_channels=8, kernel_size=5, padding=2, stride=2, groups=4),
        (2, 10, 8, 8),
    ),
]
_IDS = ["NormConv2d", "Add2d-norm", "Add2d", "SlimConv2d", "PyConv2d", "Involution2d"]


@pytest.mark.parametrize("cls,kwargs,shape", ALL_MODULES, ids=_IDS)
def test_bfloat16(cls, kwargs, shape):
    x = random_input(shape, seed=16)
    variables = cls(**kwargs).init(jax.random.key(0), x)
    y32 = cls(**kwargs).apply(variables, x)
    y16 = cls(**kwargs, dtype=jnp.bfloat16).apply(variables, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(y32)))
    np.testing.assert_allclose(
        np.asarray(y16, np.float32), np.asarray(y32), rtol=0, atol=2e-2 * scale
    )
    bf16 = cls(**kwargs, dtype=jnp.bfloat16)
    grad_fn = jax.jit(jax.grad(lambda p: jnp.sum(bf16.apply({**variables, "params": p}, x))))
    grads = grad_fn(variables["params"])
    assert all(
        g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
        for g in jax.tree_util.tree_leaves(grads)
    )


@pytest.mark.parametrize("cls,kwargs,shape", ALL_MODULES, ids=_IDS)
def test_jit_and_vmap(cls, kwargs, shape):
    module = cls(**kwargs)
    xs = random_input((3, *shape), seed=17)
    variables = module.init(jax.random.key(0), xs[0])
    eager = module.apply(variables, xs[0])
    assert_close(jax.jit(module.apply)(variables, xs[0]), eager, what="jit")
    batched = jax.vmap(module.apply, in_axes=(None, 0))(variables, xs)
    for i in range(3):
        assert_close(batched[i], module.apply(variables, xs[i]), what=f"vmap item {i}")


# --------------------------------------------------------------------------------------------------
# Bad input


def _raises(module, x, match, **kwargs):
    with pytest.raises(ValueError, match=match):
        module.init(jax.random.key(0), jnp.zeros(x), **kwargs)


@pytest.mark.parametrize("cls", [NormConv2d, Add2d])
def test_window_conv_errors(cls):
    _raises(cls(8, 16, 3), (8, 8, 8), r"rank 4 \(N, H, W, C\)")
    _raises(cls(8, 16, 3), (1, 8, 8, 4), r"in_channels=8 but the input has 4 channels")
    _raises(cls(8, 16, 3, groups=3), (1, 8, 8, 8), r"in_channels=8 is not divisible by groups=3")
    _raises(cls(8, 6, 3, groups=4), (1, 8, 8, 8), r"out_channels=6 is not divisible by groups=4")
    _raises(cls(8, 16, 0), (1, 8, 8, 8), r"kernel_size must be positive")
    _raises(cls(8, 16, 3, stride=0), (1, 8, 8, 8), r"stride must be positive")
    _raises(cls(8, 16, 5), (1, 3, 8, 8), r"smaller than the dilated kernel")
    _raises(
        cls(8, 16, 3, padding=1, padding_mode="mirror"),
        (1, 8, 8, 8),
        r"padding_mode must be one of",
    )


def test_functional_errors():
    with pytest.raises(ValueError, match=r"norm_conv2d: weight has 4 input channels per group"):
        norm_conv2d(jnp.zeros((1, 5, 5, 8)), jnp.zeros((3, 3, 4, 6)))
    with pytest.raises(ValueError, match=r"add2d: bias must have shape \(6,\)"):
        add2d(jnp.zeros((1, 5, 5, 8)), jnp.zeros((3, 3, 4, 6)), jnp.zeros(5), groups=2)
    with pytest.raises(
        ValueError,
        match=r"involution: weights must have shape \(B, H_out, W_out, G, K, K\) = \(1, 5, 5, 2",
    ):
        involution(jnp.zeros((1, 5, 5, 8)), jnp.zeros((1, 3, 3, 2, 3, 3)), kernel_size=3, padding=1)
    with pytest.raises(
        ValueError, match=r"involution: channels=6 is not divisible by weight groups"
    ):
        involution(jnp.zeros((1, 5, 5, 6)), jnp.zeros((1, 5, 5, 4, 3, 3)), kernel_size=3, padding=1)


def test_slim_conv2d_errors():
    _raises(
        SlimConv2d(8, 3), (1, 8, 8, 6), r"SlimConv2d: in_channels=8 but the input has 6 channels"
    )
    _raises(SlimConv2d(7, 3), (1, 8, 8, 7), r"SlimConv2d: in_channels must be even and >= 4")
    _raises(
        SlimConv2d(8, 3, groups=4), (1, 8, 8, 8), r"in_channels // 4=2 is not divisible by groups=4"
    )
    _raises(SlimConv2d(8, 3), (8, 8, 8), r"SlimConv2d: expected x of rank 4")
    _raises(SlimConv2d(8, 3), (1, 8, 8, 8), r"training needs a batch of at least 2", train=True)


def test_pyconv2d_errors():
    _raises(
        PyConv2d(8, 16, 3, 3, groups=[1, 2]),
        (1, 8, 8, 8),
        r"groups must be None or a list of num_levels=3",
    )
    _raises(PyConv2d(8, 16, 3, 1, groups=[1, 2]), (1, 8, 8, 8), r"num_levels=1")
    _raises(
        PyConv2d(8, 10, 3, 3),
        (1, 8, 8, 8),
        r"out_channels=10 cannot be split over num_levels=3.*\[2, 2, 5\]",
    )
    _raises(
        PyConv2d(6, 16, 3, 2),
        (1, 8, 8, 6),
        r"level 1 has in_channels=6, not divisible by its groups=4",
    )
    _raises(
        PyConv2d(8, 16, 3, 2, padding=1, dilation=2),
        (1, 9, 9, 8),
        r"different output sizes \[\(7, 7\), \(5, 5\)\]",
    )
    _raises(PyConv2d(8, 16, 0), (1, 8, 8, 8), r"kernel_size must be positive")
    _raises(PyConv2d(8, 16, 3, stride=-1), (1, 8, 8, 8), r"stride must be positive")
    _raises(
        PyConv2d(8, 16, 3, num_levels=0), (1, 8, 8, 8), r"num_levels must be a positive integer"
    )
    _raises(
        PyConv2d(8, 16, 3), (1, 8, 8, 4), r"PyConv2d: in_channels=8 but the input has 4 channels"
    )


def test_involution2d_errors():
    _raises(
        Involution2d(8, 3, 1, groups=3), (1, 8, 8, 8), r"in_channels=8 is not divisible by groups=3"
    )
    _raises(
        Involution2d(8, 3, 1, reduction_ratio=3),
        (1, 8, 8, 8),
        r"reduction_ratio must be .* dividing in_channels=8",
    )
    _raises(
        Involution2d(8, 3, 1, stride=2),
        (1, 9, 8, 8),
        r"output is 5x4 but the kernels are generated at 4x4 \(floor\(H/stride\)",
    )
    _raises(
        Involution2d(8, 3, 0),
        (1, 8, 8, 8),
        r"output is 6x6 but the kernels are generated at 8x8.*use padding=1",
    )
    _raises(Involution2d(8, 5, 1, dilation=2), (1, 8, 8, 8), r"use padding=4")
    _raises(
        Involution2d(8, 3, 1),
        (1, 8, 8, 4),
        r"Involution2d: in_channels=8 but the input has 4 channels",
    )
    _raises(Involution2d(8, 0), (1, 8, 8, 8), r"kernel_size must be a positive integer")
    _raises(Involution2d(8, 3, 1), (8, 8, 8), r"Involution2d: expected x of rank 4")
