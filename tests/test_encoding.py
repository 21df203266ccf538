"""jaxenc.nn.encoding (PyTorch-Encoding Encoding, EncodingDrop, EncodingCosine, Inspiration, GramMatrix,
UpsampleConv2d and the functional ops): parity with torch references restated from upstream's code
(PyTorch-Encoding is not installable), the sign convention of the smoothing factors, memory of the
residual encoding, bfloat16, jit, vmap and error messages."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import F, torch
from parity import assert_close, check_module_parity, random_input

from jaxenc.nn.encoding import (
    Encoding,
    EncodingCosine,
    EncodingDrop,
    aggregate,
    encoding,
    pairwise_cosine,
    scaled_l2,
)
from jaxenc.nn.style import GramMatrix, Inspiration, gram_matrix
from jaxenc.nn.upsample import UpsampleConv2d, pixel_shuffle
from jaxenc.port import torch_to_flax

# --------------------------------------------------------------------------------------------------
# Torch references, restated from upstream encoding/nn (encoding.py, customize.py) and encoding.functions with upstream's
# parameter names and shapes. Plain autograd gives the gradients (so d/ds has no division by s, the
# jaxenc decision). They take torch layouts: B x D x H x W or B x D x N for the encoders.


def torch_scaled_l2(x, c, s):
    """SL[b, i, k] = s_k ||x_bi - c_k||², through the explicit residuals."""
    return s * (x.unsqueeze(2) - c).pow(2).sum(-1)


def torch_aggregate(a, x, c):
    """E[b, k] = Σ_i A[b, i, k] (x_bi - c_k), through the explicit residuals."""
    return (a.unsqueeze(3) * (x.unsqueeze(2) - c)).sum(1)


def _torch_tokens(x, d):
    """Upstream's input handling: B x D x N or B x D x H x W -> B x N x D."""
    assert x.size(1) == d
    if x.dim() == 3:
        return x.transpose(1, 2)
    if x.dim() == 4:
        return x.reshape(x.size(0), d, -1).transpose(1, 2)
    raise RuntimeError("Encoding Layer unknown input dims!")


class TorchEncoding(torch.nn.Module):
    """Encoding: codewords (K, D) ~ U(±1/sqrt(KD)), scale (K) ~ U[-1, 0); softmax over +s_k ||r||²."""

    def __init__(self, D, K):
        super().__init__()
        self.D, self.K = D, K
        self.codewords = torch.nn.Parameter(
            torch.empty(K, D).uniform_(-1 / math.sqrt(K * D), 1 / math.sqrt(K * D))
        )
        self.scale = torch.nn.Parameter(torch.empty(K).uniform_(-1, 0))

    def smoothing(self):
        return self.scale

    def forward(self, x):
        x = _torch_tokens(x, self.D)
        a = F.softmax(torch_scaled_l2(x, self.codewords, self.smoothing()), dim=2)
        return torch_aggregate(a, x, self.codewords)


class TorchEncodingDrop(TorchEncoding):
    """EncodingDrop as it behaves: the forward uses -0.5 in eval and a fresh U[-1, 0) draw in training; the
    ``scale`` parameter's value never matters. ``drawn`` is the training draw (set by the test)."""

    drawn = None

    def smoothing(self):
        return self.drawn if self.training else torch.full_like(self.scale, -0.5).detach()


class TorchEncodingCosine(torch.nn.Module):
    """EncodingCosine: codewords only; A = softmax_k(x · c_k) (pairwise_cosine with normalize=False)."""

    def __init__(self, D, K):
        super().__init__()
        self.D, self.K = D, K
        self.codewords = torch.nn.Parameter(
            torch.empty(K, D).uniform_(-1 / math.sqrt(K * D), 1 / math.sqrt(K * D))
        )

    def forward(self, x):
        x = _torch_tokens(x, self.D)
        a = F.softmax(torch.matmul(x, self.codewords.t()), dim=2)
        return torch_aggregate(a, x, self.codewords)


class TorchGramMatrix(torch.nn.Module):
    """GramMatrix: F Fᵀ / (C H W) per sample of B x C x H x W features."""

    def forward(self, y):
        b, ch, h, w = y.size()
        f = y.reshape(b, ch, h * w)
        return f.bmm(f.transpose(1, 2)) / (ch * h * w)


class TorchInspiration(torch.nn.Module):
    """Inspiration: weight (1, C, C) ~ U(0, 0.02); P = W G (batched), Y = Pᵀ X_flat, G set by setTarget."""

    def __init__(self, C, B=1):
        super().__init__()
        self.C = C
        self.weight = torch.nn.Parameter(torch.empty(1, C, C).uniform_(0.0, 0.02))
        self.G = torch.zeros(B, C, C)

    def setTarget(self, target):
        self.G = target

    def forward(self, x):
        p = torch.bmm(self.weight.expand_as(self.G), self.G)
        b = x.size(0)
        return torch.bmm(
            p.transpose(1, 2).expand(b, self.C, self.C), x.reshape(b, self.C, -1)
        ).view_as(x)


class TorchUpsampleConv2d(torch.nn.Module):
    """UpsampleConv2d as intended upstream (its own reset_parameters raises NameError: ``math`` is not imported):
    weight (out s², in/groups, kh, kw) and bias (out s²) ~ U(±1/sqrt(in kh kw)), conv, then
    pixel_shuffle(s)."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        scale_factor=1,
        bias=True,
    ):
        super().__init__()
        ks = torch.nn.modules.utils._pair(kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.scale_factor = groups, scale_factor
        bound = 1.0 / math.sqrt(in_channels * ks[0] * ks[1])
        n = out_channels * scale_factor * scale_factor
        self.weight = torch.nn.Parameter(
            torch.empty(n, in_channels // groups, *ks).uniform_(-bound, bound)
        )
        self.bias = torch.nn.Parameter(torch.empty(n).uniform_(-bound, bound)) if bias else None

    def forward(self, x):
        y = F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        return F.pixel_shuffle(y, self.scale_factor)


# --------------------------------------------------------------------------------------------------
# Parity for modules whose parameters are all raw torch parameters (kept in torch layout, so they
# copy across unchanged; test_port_converts_encoding_state_dict checks torch_to_flax gives the same),
# with any number of inputs (Inspiration takes two): values and vector-Jacobian products for every
# input and parameter.


def _raw_parity(torch_module, torch_forward, flax_apply, inputs, *, rtol=1e-5, seed=0):
    """``torch_forward(module, *tensors)`` and ``flax_apply(params, *arrays)`` take the same arrays."""
    params = {k: jnp.asarray(v.detach().numpy()) for k, v in torch_module.named_parameters()}
    tensors = [torch.tensor(a, requires_grad=True) for a in inputs]
    yt = torch_forward(torch_module, *tensors)
    cot = random_input(tuple(yt.shape), seed=seed + 1000)
    torch_module.zero_grad()
    yt.backward(torch.tensor(cot))

    yj, vjp_fn = jax.vjp(flax_apply, params, *map(jnp.asarray, inputs))
    g_params, *g_inputs = vjp_fn(jnp.asarray(cot))
    assert_close(yj, yt.detach().numpy(), rtol, what="output")
    for i, (g, t) in enumerate(zip(g_inputs, tensors)):
        assert_close(g, t.grad.numpy(), 10 * rtol, what=f"gradient of input {i}")
    expected = {
        k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
        for k, p in torch_module.named_parameters()
    }
    scale = max(float(np.max(np.abs(v))) for v in expected.values())
    assert set(g_params) == set(expected)
    for k, g in g_params.items():
        assert_close(g, expected[k], 10 * rtol, what=f"gradient of params/{k}", scale=scale)
    return yj


def _to_torch_layout(x):
    """Our NHWC / (B, N, D) input -> upstream's B x D x H x W / B x D x N, differentiably."""
    return x.permute(0, 3, 1, 2) if x.dim() == 4 else x.transpose(1, 2)


def _spread(m, positive=False):
    """Codewords comparable to the inputs and smoothing factors that give non-uniform assignments."""
    with torch.no_grad():
        m.codewords.normal_(0.0, 0.5)
        if hasattr(m, "scale"):
            m.scale.uniform_(0.0, 0.2) if positive else m.scale.uniform_(-0.2, 0.0)
    return m


SHAPES = [(2, 7, 9, 48), (3, 13, 48), (1, 1, 1, 48)]
_SHAPE_IDS = ["nhwc-7x9", "tokens-13", "single"]


# --------------------------------------------------------------------------------------------------
# Encoding


ENCODING_CASES = [
    (SHAPES[0], "upstream"),
    (SHAPES[0], "spread"),
    (SHAPES[0], "positive"),
    (SHAPES[1], "upstream"),
    (SHAPES[1], "spread"),
    (SHAPES[2], "spread"),
]


@pytest.mark.parametrize(
    "shape,init",
    ENCODING_CASES,
    ids=[f"{_SHAPE_IDS[SHAPES.index(s)]}-{i}" for s, i in ENCODING_CASES],
)
def test_encoding_parity(shape, init):
    torch_module = TorchEncoding(48, 7)
    if init != "upstream":
        _spread(torch_module, positive=init == "positive")
    module = Encoding(48, 7)
    y = _raw_parity(
        torch_module,
        lambda m, x: m(_to_torch_layout(x)),
        lambda p, x: module.apply({"params": p}, x),
        [random_input(shape, seed=1)],
    )
    assert y.shape == (shape[0], 7, 48)


def test_encoding_function_parity_and_dtypes():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 11, 5)).astype(np.float32)
    c = (0.7 * rng.standard_normal((3, 5))).astype(np.float32)
    s = np.array(
        [-0.3, 0.0, 0.25], np.float32
    )  # s = 0 included: the gradient needs no division by s
    xt, ct, st = (torch.tensor(v, requires_grad=True) for v in (x, c, s))
    sl = torch_scaled_l2(xt, ct, st)
    assert_close(
        scaled_l2(jnp.asarray(x), jnp.asarray(c), jnp.asarray(s)),
        sl.detach().numpy(),
        what="scaled_l2",
    )
    a = F.softmax(sl, dim=2)
    a_np = a.detach().numpy()
    assert_close(
        aggregate(jnp.asarray(a_np), jnp.asarray(x), jnp.asarray(c)),
        torch_aggregate(torch.tensor(a_np), torch.tensor(x), torch.tensor(c)).numpy(),
        what="aggregate",
    )
    e = torch_aggregate(a, xt, ct)
    cot = random_input(tuple(e.shape), seed=3)
    e.backward(torch.tensor(cot))
    ej, vjp_fn = jax.vjp(encoding, jnp.asarray(x), jnp.asarray(c), jnp.asarray(s))
    assert_close(ej, e.detach().numpy(), what="encoding")
    for g, t, name in zip(vjp_fn(jnp.asarray(cot)), (xt, ct, st), ("x", "codewords", "scale")):
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert_close(g, t.grad.numpy(), 1e-4, what=f"d/d{name}")
    bf = [jnp.asarray(v, jnp.bfloat16) for v in (x, c)]
    assert (
        scaled_l2(*bf, jnp.asarray(s)).dtype == jnp.float32
    )  # logits (and hence the softmax) in float32
    assert pairwise_cosine(*bf).dtype == jnp.float32
    assert encoding(*bf, jnp.asarray(s)).dtype == jnp.bfloat16


def test_encoding_cancellation_is_guarded():
    # x equal to a codeword of large norm: the expansion ||x||² - 2x·c + ||c||² cancels to ~0 and
    # may round below zero; the clamp keeps the distance (hence the logit) >= 0 · s.
    c = jnp.asarray(np.random.default_rng(4).uniform(30, 40, (3, 64)), jnp.float32)
    x = jnp.broadcast_to(c[1], (1, 5, 64))
    sl = scaled_l2(x, c, jnp.ones(3))
    assert float(sl[0, 0, 1]) >= 0.0
    assert float(sl[0, 0, 1]) <= 1e-6 * float(jnp.sum(c[1] ** 2))


def test_encoding_sign_convention():
    # The softmax is over +s_k ||x - c_k||²: negative s favours the NEAR codeword, positive s the FAR one.
    c = jnp.asarray([[0.0, 0.0], [3.0, 4.0]])  # ||c_0 - c_1||² = 25
    x = jnp.zeros((1, 1, 2))  # x = c_0
    near = encoding(x, c, jnp.asarray([-1.0, -1.0]))  # A = softmax([0, -25]) ≈ (1, 0)
    far = encoding(x, c, jnp.asarray([1.0, 1.0]))  # A = softmax([0, 25]) ≈ (0, 1)
    a_far = 1.0 / (1.0 + math.exp(-25.0))
    np.testing.assert_allclose(
        near, [[[0.0, 0.0], [-3.0 * (1 - a_far), -4.0 * (1 - a_far)]]], atol=1e-6
    )
    np.testing.assert_allclose(far, [[[0.0, 0.0], [-3.0 * a_far, -4.0 * a_far]]], atol=1e-6)


def test_encoding_init():
    d, k = 48, 7
    p = Encoding(d, k).init(jax.random.key(0), jnp.zeros((1, 4, d)))["params"]
    assert p["codewords"].shape == (k, d) and p["scale"].shape == (k,)
    bound = 1.0 / math.sqrt(k * d)
    assert float(jnp.max(jnp.abs(p["codewords"]))) <= bound
    assert float(jnp.max(jnp.abs(p["codewords"]))) > 0.9 * bound
    assert bool(jnp.all((p["scale"] >= -1.0) & (p["scale"] < 0.0)))
    c = EncodingCosine(d, k).init(jax.random.key(0), jnp.zeros((1, 4, d)))["params"]
    assert set(c) == {"codewords"} and c["codewords"].shape == (k, d)


def test_port_converts_encoding_state_dict():
    for cls in (Encoding, EncodingDrop):
        torch_module = TorchEncoding(48, 7)
        variables = torch_to_flax(
            cls(48, 7), torch_module.state_dict(), np.zeros((1, 3, 48), np.float32)
        )
        np.testing.assert_array_equal(
            variables["params"]["scale"], torch_module.scale.detach().numpy()
        )
        np.testing.assert_array_equal(
            variables["params"]["codewords"], torch_module.codewords.detach().numpy()
        )


def test_port_converts_other_state_dicts():
    # Everything without a raw 'scale' converts with the generic rules (names and torch layouts).
    cos = TorchEncodingCosine(48, 7)
    v = torch_to_flax(EncodingCosine(48, 7), cos.state_dict(), np.zeros((1, 3, 48), np.float32))
    np.testing.assert_array_equal(v["params"]["codewords"], cos.codewords.detach().numpy())
    up = TorchUpsampleConv2d(8, 6, 3, groups=2, scale_factor=2)
    assert {k: tuple(t.shape) for k, t in up.state_dict().items()} == {
        "weight": (24, 4, 3, 3),
        "bias": (24,),
    }
    v = torch_to_flax(
        UpsampleConv2d(8, 6, 3, groups=2, scale_factor=2),
        up.state_dict(),
        np.zeros((1, 5, 5, 8), np.float32),
    )
    assert v["params"]["kernel"].shape == (3, 3, 4, 24)


# --------------------------------------------------------------------------------------------------
# EncodingDrop


@pytest.mark.parametrize("shape", SHAPES[:2], ids=_SHAPE_IDS[:2])
def test_encoding_drop_eval_parity(shape):
    torch_module = _spread(TorchEncodingDrop(48, 7)).eval()
    module = EncodingDrop(48, 7)
    _raw_parity(
        torch_module,
        lambda m, x: m(_to_torch_layout(x)),
        lambda p, x: module.apply({"params": p}, x, train=False),
        [random_input(shape, seed=5)],
    )
    # The stored scale is irrelevant in inference: -0.5 is used.
    p = {"codewords": jnp.asarray(torch_module.codewords.detach().numpy()), "scale": jnp.zeros(7)}
    x = jnp.asarray(random_input(shape, seed=5))
    assert_close(
        module.apply({"params": p}, x),
        encoding(x.reshape(shape[0], -1, 48), p["codewords"], jnp.full(7, -0.5)),
    )


def test_encoding_drop_train():
    module = EncodingDrop(48, 7)
    x = random_input((2, 7, 9, 48), seed=6)
    variables = module.init(jax.random.key(0), x)

    def run(key):
        y, state = module.apply(
            variables, x, train=True, rngs={"dropout": key}, mutable=["intermediates"]
        )
        return y, state["intermediates"]["scale_used"][0]

    y1, s1 = run(jax.random.key(1))
    y2, s2 = run(jax.random.key(2))
    for s in (s1, s2):
        assert s.shape == (7,) and bool(jnp.all((s >= -1.0) & (s < 0.0)))
    assert not np.allclose(s1, s2) and not np.allclose(y1, y2)
    assert not np.allclose(s1, variables["params"]["scale"])
    np.testing.assert_array_equal(run(jax.random.key(1))[0], y1)  # same rng, same draw

    # Recomputed with the drawn factors, the torch reference gives the same values and gradients
    # (codewords and input); the stored scale gets zero gradient.
    torch_module = TorchEncodingDrop(48, 7).train()
    torch_module.drawn = torch.tensor(np.asarray(s1))
    with torch.no_grad():
        torch_module.codewords.copy_(torch.tensor(np.asarray(variables["params"]["codewords"])))
        torch_module.scale.copy_(torch.tensor(np.asarray(variables["params"]["scale"])))
    _raw_parity(
        torch_module,
        lambda m, xx: m(_to_torch_layout(xx)),
        lambda p, xx: module.apply(
            {"params": p}, xx, train=True, rngs={"dropout": jax.random.key(1)}
        ),
        [x],
    )


# --------------------------------------------------------------------------------------------------
# EncodingCosine


@pytest.mark.parametrize("shape", SHAPES[:2], ids=_SHAPE_IDS[:2])
@pytest.mark.parametrize("init", ["upstream", "spread"])
def test_encoding_cosine_parity(shape, init):
    torch_module = TorchEncodingCosine(48, 7)
    if init == "spread":
        with torch.no_grad():
            torch_module.codewords.normal_(0.0, 0.1)
    forward = None if len(shape) == 4 else (lambda m, x: m(x.transpose(1, 2)))
    check_module_parity(
        torch_module, EncodingCosine(48, 7), random_input(shape, seed=7), torch_forward=forward
    )


def test_pairwise_cosine_normalize():
    x = random_input((2, 6, 5), seed=8)
    c = random_input((4, 5), seed=9)
    c[0] = 0.0  # a zero codeword: torch's eps keeps it at zero instead of NaN
    expected = torch.matmul(
        F.normalize(torch.tensor(x), dim=2, eps=1e-8),
        F.normalize(torch.tensor(c), dim=1, eps=1e-8).t(),
    )
    assert_close(pairwise_cosine(jnp.asarray(x), jnp.asarray(c), normalize=True), expected.numpy())
    assert_close(
        pairwise_cosine(jnp.asarray(x), jnp.asarray(c)), torch.tensor(x) @ torch.tensor(c).t()
    )


# --------------------------------------------------------------------------------------------------
# GramMatrix and Inspiration


@pytest.mark.parametrize("shape", [(2, 7, 9, 6), (1, 1, 1, 3)])
def test_gram_matrix_parity(shape):
    result = check_module_parity(TorchGramMatrix(), GramMatrix(), random_input(shape, seed=10))
    assert result["output"].shape == (shape[0], shape[-1], shape[-1])
    assert_close(gram_matrix(jnp.asarray(random_input(shape, seed=10))), result["output"])


@pytest.mark.parametrize("gram_batch", [1, 3])
def test_inspiration_parity(gram_batch):
    c = 6
    torch_module = TorchInspiration(c, gram_batch)
    module = Inspiration(c, gram_batch)

    def torch_forward(m, x, g):
        m.setTarget(g)
        return m(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    x = random_input((3, 7, 9, c), seed=11)
    g = random_input((gram_batch, c, c), seed=12)
    y = _raw_parity(
        torch_module, torch_forward, lambda p, xx, gg: module.apply({"params": p}, xx, gg), [x, g]
    )
    assert y.shape == x.shape


def test_inspiration_with_gram_of_style_features():
    # MSG-Net usage: G = GramMatrix(style features), then Inspiration on the content features;
    # gradients flow to both feature maps and to the weight.
    c = 5
    torch_module = TorchInspiration(c)
    module = Inspiration(c)

    def torch_forward(m, x, style):
        m.setTarget(TorchGramMatrix()(style.permute(0, 3, 1, 2)))
        return m(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def flax_apply(p, x, style):
        return module.apply({"params": p}, x, GramMatrix().apply({}, style))

    _raw_parity(
        torch_module,
        torch_forward,
        flax_apply,
        [random_input((1, 6, 7, c), seed=13), random_input((1, 9, 5, c), seed=14)],
    )


def test_inspiration_init():
    p = Inspiration(8).init(jax.random.key(0), jnp.zeros((2, 3, 3, 8)), jnp.zeros((1, 8, 8)))[
        "params"
    ]
    assert set(p) == {"weight"} and p["weight"].shape == (1, 8, 8)
    assert bool(jnp.all((p["weight"] >= 0.0) & (p["weight"] < 0.02)))


# --------------------------------------------------------------------------------------------------
# UpsampleConv2d

UPSAMPLE_CASES = [
    (dict(in_channels=8, out_channels=6, kernel_size=3, padding=1), (2, 9, 7, 8)),
    (
        dict(in_channels=8, out_channels=6, kernel_size=3, stride=2, padding=1, scale_factor=2),
        (2, 9, 7, 8),
    ),
    (
        dict(
            in_channels=8,
            out_channels=6,
            kernel_size=(3, 5),
            stride=(2, 1),
            padding=(1, 2),
            groups=2,
            scale_factor=2,
        ),
        (2, 9, 7, 8),
    ),
    (
        dict(
            in_channels=4,
            out_channels=4,
            kernel_size=3,
            dilation=2,
            groups=4,
            scale_factor=3,
            bias=False,
        ),
        (1, 8, 9, 4),
    ),
]
_UP_IDS = ["s1", "s2-stride2", "s2-groups2", "s3-dilated-depthwise-nobias"]


@pytest.mark.parametrize("kwargs,shape", UPSAMPLE_CASES, ids=_UP_IDS)
def test_upsample_conv2d_parity(kwargs, shape):
    result = check_module_parity(
        TorchUpsampleConv2d(**kwargs), UpsampleConv2d(**kwargs), random_input(shape, seed=15)
    )
    s = kwargs.get("scale_factor", 1)
    torch_shape = result["torch_output"].shape
    assert result["output"].shape == (
        shape[0],
        torch_shape[2],
        torch_shape[3],
        kwargs["out_channels"],
    )
    assert torch_shape[2] % s == 0 and torch_shape[3] % s == 0


def test_pixel_shuffle_channel_order():
    x = np.arange(2 * 3 * 4 * 12, dtype=np.float32).reshape(2, 3, 4, 12)  # NHWC, C = 3 * 2²
    expected = F.pixel_shuffle(torch.tensor(x).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(pixel_shuffle(jnp.asarray(x), 2), expected)
    # channel c·s² + i·s + j -> output (c, h·s + i, w·s + j)
    y = np.asarray(pixel_shuffle(jnp.asarray(x), 2))
    assert y[1, 2 * 2 + 1, 3 * 2 + 0, 2] == x[1, 2, 3, 2 * 4 + 1 * 2 + 0]


def test_upsample_conv2d_init():
    p = UpsampleConv2d(8, 6, 3, groups=2, scale_factor=2).init(
        jax.random.key(0), jnp.zeros((1, 5, 5, 8))
    )["params"]
    bound = 1.0 / math.sqrt(8 * 9)  # upstream's fan-in ignores groups
    assert p["kernel"].shape == (3, 3, 4, 24) and p["bias"].shape == (24,)
    assert 0.9 * bound < float(jnp.max(jnp.abs(p["kernel"]))) <= bound
    assert float(jnp.max(jnp.abs(p["bias"]))) <= bound


# --------------------------------------------------------------------------------------------------
# Memory: the (B, N, K, D) residual tensor is never formed


_B, _N, _K, _D = 8, 64 * 64, 32, 512
_RESIDUAL_BYTES = _B * _N * _K * _D * 4  # 2 GiB in float32


def _abstract_inputs():
    return (
        jax.ShapeDtypeStruct((_B, _N, _D), jnp.float32),
        jax.ShapeDtypeStruct((_K, _D), jnp.float32),
        jax.ShapeDtypeStruct((_K,), jnp.float32),
    )


@pytest.mark.parametrize("loss", ["sum", "sum_of_squares"])
def test_encoding_forward_backward_memory(loss):
    reduce = jnp.sum if loss == "sum" else (lambda e: jnp.sum(e * e))
    grad_fn = jax.grad(lambda x, c, s: reduce(encoding(x, c, s)), argnums=(0, 1, 2))
    temp = (
        jax.jit(grad_fn).lower(*_abstract_inputs()).compile().memory_analysis().temp_size_in_bytes
    )
    assert temp < _RESIDUAL_BYTES, (
        f"forward+backward temporaries {temp} B vs residual tensor {_RESIDUAL_BYTES} B"
    )
    # An eighth of it: even a bfloat16 residual tensor, or half of a float32 one, would exceed this.
    assert temp < _RESIDUAL_BYTES / 8, f"forward+backward temporaries {temp} B"


def test_encoding_forward_memory():
    temp = (
        jax.jit(encoding).lower(*_abstract_inputs()).compile().memory_analysis().temp_size_in_bytes
    )
    assert temp < _RESIDUAL_BYTES
    # Less than one copy of the input: only (B, N, K)-sized temporaries are needed.
    assert temp < _B * _N * _D * 4, f"forward temporaries {temp} B"


# --------------------------------------------------------------------------------------------------
# bfloat16, jit, vmap

ALL_MODULES = [
    (Encoding, dict(D=48, K=7), [(2, 7, 9, 48)], {}),
    (Encoding, dict(D=48, K=7), [(2, 13, 48)], {}),
    (EncodingDrop, dict(D=48, K=7), [(2, 7, 9, 48)], {}),
    (EncodingCosine, dict(D=48, K=7), [(2, 7, 9, 48)], {}),
    (GramMatrix, dict(), [(2, 7, 9, 6)], {}),
    (Inspiration, dict(C=6), [(2, 7, 9, 6), (1, 6, 6)], {}),
    (
        UpsampleConv2d,
        dict(
            in_channels=8,
            out_channels=6,
            kernel_size=3,
            stride=2,
            padding=1,
            groups=2,
            scale_factor=2,
        ),
        [(2, 9, 7, 8)],
        {},
    ),
]
_IDS = [
    "Encoding",
    "Encoding-tokens",
    "EncodingDrop",
    "EncodingCosine",
    "GramMatrix",
    "Inspiration",
    "UpsampleConv2d",
]


def _inputs(shapes, seed, dtype=np.float32):
    return [random_input(s, seed=seed + i).astype(dtype) for i, s in enumerate(shapes)]


def _spread_params(cls, params):
    """Spread codewords (as in the parity tests) so the bfloat16 check is not on near-uniform assignments."""
    if "codewords" in params:
        params = {
            **params,
            "codewords": 0.5 * jax.random.normal(jax.random.key(3), params["codewords"].shape),
        }
    if "scale" in params:
        params = {**params, "scale": jnp.linspace(-0.2, -0.01, params["scale"].shape[0])}
    return params


@pytest.mark.parametrize("cls,kwargs,shapes,_", ALL_MODULES, ids=_IDS)
def test_bfloat16(cls, kwargs, shapes, _):
    inputs = _inputs(shapes, seed=20)
    variables = cls(**kwargs).init(jax.random.key(0), *inputs)
    variables = {**variables, "params": _spread_params(cls, variables.get("params", {}))}
    y32 = cls(**kwargs).apply(variables, *inputs)
    bf16 = cls(**kwargs, dtype=jnp.bfloat16)
    y16 = bf16.apply(variables, *[jnp.asarray(a, jnp.bfloat16) for a in inputs])
    assert y16.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(y32)))
    np.testing.assert_allclose(
        np.asarray(y16, np.float32), np.asarray(y32), rtol=0, atol=2e-2 * scale
    )
    if variables["params"]:
        grads = jax.jit(
            jax.grad(lambda p: jnp.sum(bf16.apply({"params": p}, *inputs).astype(jnp.float32)))
        )(variables["params"])
        assert all(
            g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
            for g in jax.tree_util.tree_leaves(grads)
        )


@pytest.mark.parametrize("cls,kwargs,shapes,_", ALL_MODULES, ids=_IDS)
def test_jit_and_vmap(cls, kwargs, shapes, _):
    module = cls(**kwargs)
    batched_inputs = [random_input((3, *s), seed=30 + i) for i, s in enumerate(shapes)]
    first = [a[0] for a in batched_inputs]
    variables = module.init(jax.random.key(0), *first)
    eager = module.apply(variables, *first)
    assert_close(jax.jit(module.apply)(variables, *first), eager, what="jit")
    batched = jax.vmap(module.apply, in_axes=(None, *[0] * len(shapes)))(variables, *batched_inputs)
    for i in range(3):
        assert_close(
            batched[i],
            module.apply(variables, *[a[i] for a in batched_inputs]),
            what=f"vmap item {i}",
        )


def test_encoding_drop_train_under_jit():
    module = EncodingDrop(48, 7)
    x = random_input((2, 13, 48), seed=40)
    variables = module.init(jax.random.key(0), x)
    apply = lambda v, xx, key: module.apply(v, xx, train=True, rngs={"dropout": key})  # noqa: E731
    key = jax.random.key(5)
    assert_close(jax.jit(apply)(variables, x, key), apply(variables, x, key), what="jit train")


# --------------------------------------------------------------------------------------------------
# Bad input


def _raises(module, inputs, match, **kwargs):
    with pytest.raises(ValueError, match=match):
        module.init(jax.random.key(0), *[jnp.zeros(s) for s in inputs], **kwargs)


@pytest.mark.parametrize("cls", [Encoding, EncodingDrop, EncodingCosine])
def test_encoding_errors(cls):
    name = cls.__name__
    _raises(
        cls(48, 7), [(2, 5, 5, 32)], rf"{name}: D=48 but the input has 32 channels on its last axis"
    )
    _raises(cls(48, 7), [(2, 13, 32)], rf"{name}: D=48 but the input has 32 channels")
    _raises(
        cls(48, 7),
        [(2, 48)],
        rf"{name}: expected x of rank 3 \(B, N, D\) or rank 4 \(B, H, W, D\), got shape \(2, 48\)",
    )
    _raises(cls(48, 7), [(1, 2, 2, 2, 48)], rf"{name}: expected x of rank 3 .* \(rank 5\)")
    _raises(cls(48, 0), [(2, 13, 48)], rf"{name}: K must be a positive integer, got 0")


def test_encoding_function_errors():
    x, c, s = jnp.zeros((2, 5, 4)), jnp.zeros((3, 4)), jnp.zeros(3)
    with pytest.raises(
        ValueError, match=r"encoding: expected x of rank 3 \(B, N, D\), got shape \(5, 4\)"
    ):
        encoding(x[0], c, s)
    with pytest.raises(ValueError, match=r"encoding: expected codewords of rank 2 \(K, D\)"):
        encoding(x, c[0], s)
    with pytest.raises(ValueError, match=r"encoding: x has D=4 .* codewords have D=5"):
        encoding(x, jnp.zeros((3, 5)), s)
    with pytest.raises(
        ValueError, match=r"encoding: scale has 2 entries but there are K=3 codewords"
    ):
        encoding(x, c, jnp.zeros(2))
    with pytest.raises(ValueError, match=r"scaled_l2: expected scale of rank 1 \(K\)"):
        scaled_l2(x, c, jnp.zeros((3, 1)))
    with pytest.raises(
        ValueError,
        match=r"aggregate: assignments must have shape \(B, N, K\)=\(2, 5, 3\), got \(2, 5, 2\)",
    ):
        aggregate(jnp.zeros((2, 5, 2)), x, c)
    with pytest.raises(
        ValueError, match=r"pixel_shuffle: channels=6 is not divisible by upscale_factor²=4"
    ):
        pixel_shuffle(jnp.zeros((1, 2, 2, 6)), 2)
    with pytest.raises(ValueError, match=r"gram_matrix: expected x of rank 4 \(B, H, W, C\)"):
        gram_matrix(jnp.zeros((2, 3, 4)))


def test_inspiration_errors():
    m = Inspiration(6)
    _raises(m, [(2, 4, 4, 5), (1, 6, 6)], r"Inspiration: C=6 but the input has 5 channels")
    _raises(m, [(2, 4, 4, 6), (6, 6)], r"Inspiration: expected target_gram of rank 3")
    _raises(
        m,
        [(2, 4, 4, 6), (3, 6, 6)],
        r"Inspiration: target_gram must have shape \(1 or 2, 6, 6\) .* got \(3, 6, 6\)",
    )
    _raises(m, [(2, 4, 4, 6), (1, 5, 5)], r"target_gram must have shape")
    _raises(m, [(2, 16, 6), (1, 6, 6)], r"Inspiration: expected x of rank 4 \(B, H, W, C\)")


def test_upsample_conv2d_errors():
    _raises(
        UpsampleConv2d(8, 6, 3),
        [(1, 5, 5, 4)],
        r"UpsampleConv2d: in_channels=8 but the input has 4 channels",
    )
    _raises(
        UpsampleConv2d(8, 6, 3, groups=3),
        [(1, 5, 5, 8)],
        r"in_channels=8 is not divisible by groups=3",
    )
    _raises(
        UpsampleConv2d(8, 6, 3, groups=4),
        [(1, 5, 5, 8)],
        r"out_channels=6 is not divisible by groups=4",
    )
    _raises(
        UpsampleConv2d(8, 6, 3, scale_factor=0),
        [(1, 5, 5, 8)],
        r"scale_factor must be a positive integer, got 0",
    )
    _raises(
        UpsampleConv2d(8, 6, 5),
        [(1, 3, 8, 8)],
        r"UpsampleConv2d: input H=3 is smaller than the dilated kernel",
    )
    _raises(UpsampleConv2d(8, 6, 3), [(5, 5, 8)], r"UpsampleConv2d: expected x of rank 4")
