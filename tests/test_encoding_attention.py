"""PyTorch-Encoding's ACFModule / MixtureOfSoftMaxACF and DANet's PAM_Module / CAM_Module
(jaxenc.nn.attention) against torch references that restate the upstream maths with the upstream
attribute names (upstream encoding/nn/attention.py and
junfu1115/DANet encoding/nn/da_att.py). PyTorch-Encoding itself is not installable."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from optional_torch import torch
from parity import assert_close, check_module_parity, random_input, randomise_batchnorm

from jaxenc.nn.attention import ACFModule, CAM_Module, MixtureOfSoftMaxACF, PAM_Module
from jaxenc.port import torch_to_flax

# --- torch references -------------------------------------------------------------------------------


class TorchMixtureOfSoftMaxACF(torch.nn.Module):
    """Upstream layout: q (B, d_k, N), k (B, d_k, N2), v (B, d_v, N2) -> (B, N, d_v), attn (B, N, N2)."""

    def __init__(self, n_mix, d_k, attn_dropout=0.1):
        super().__init__()
        self.n_mix, self.d_k, self.temperature = n_mix, d_k, d_k**0.5
        self.dropout = torch.nn.Dropout(attn_dropout)
        if n_mix > 1:
            self.weight = torch.nn.Parameter(
                torch.empty(n_mix, d_k).uniform_(-(n_mix**-0.5), n_mix**-0.5)
            )

    def forward(self, qt, kt, vt):
        b, d_k, n = qt.shape
        m, n2 = self.n_mix, kt.shape[2]
        d = d_k // m
        q = qt.reshape(b * m, d, n).transpose(1, 2)
        attn = torch.softmax(torch.bmm(q, kt.reshape(b * m, d, n2)) / self.temperature, dim=2)
        attn = self.dropout(attn)
        if m > 1:
            pi = torch.softmax(
                torch.matmul(self.weight, qt.mean(2, keepdim=True)), dim=1
            )  # (B, m, 1)
            attn = (attn * pi.reshape(b * m, 1, 1)).reshape(b, m, n, n2).sum(1)
        return torch.bmm(attn, vt.transpose(1, 2)), attn


class TorchACFModule(torch.nn.Module):
    """Upstream ACFModule. Its key/query transform is registered twice (conv_qs and conv_ks)."""

    def __init__(
        self,
        n_head,
        n_mix,
        d_model,
        d_k,
        d_v,
        norm_layer=torch.nn.BatchNorm2d,
        kq_transform="conv",
        value_transform="conv",
        pooling=True,
        concat=False,
        dropout=0.1,
    ):
        super().__init__()
        assert value_transform == "conv"
        self.n_head, self.d_k, self.d_v, self.pooling, self.concat = (
            n_head,
            d_k,
            d_v,
            pooling,
            concat,
        )
        if pooling:
            self.pool = torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False)
        hk = n_head * d_k
        if kq_transform == "conv":
            self.conv_qs = torch.nn.Conv2d(d_model, hk, 1)
        else:
            dil = 1 if kq_transform == "ffn" else 4
            self.conv_qs = torch.nn.Sequential(
                torch.nn.Conv2d(d_model, hk, 3, padding=dil, dilation=dil, bias=False),
                norm_layer(hk),
                torch.nn.ReLU(True),
                torch.nn.Conv2d(hk, hk, 1),
            )
        self.conv_ks = self.conv_qs
        self.conv_vs = torch.nn.Conv2d(d_model, n_head * d_v, 1)
        self.attention = TorchMixtureOfSoftMaxACF(n_mix, d_k)
        self.conv = torch.nn.Conv2d(n_head * d_v, d_model, 1, bias=False)
        self.norm_layer = norm_layer(d_model)

    def forward(self, x):
        b, _, h, w = x.shape
        heads, d_k, d_v = self.n_head, self.d_k, self.d_v
        if self.pooling:
            qt = self.conv_ks(x).reshape(b * heads, d_k, h * w)
            kt = self.conv_ks(self.pool(x)).reshape(b * heads, d_k, h * w // 4)
            vt = self.conv_vs(self.pool(x)).reshape(b * heads, d_v, h * w // 4)
        else:
            kt = self.conv_ks(x).reshape(b * heads, d_k, h * w)
            qt = kt
            vt = self.conv_vs(x).reshape(b * heads, d_v, h * w)
        out, _ = self.attention(qt, kt, vt)
        out = self.conv(out.transpose(1, 2).reshape(b, heads * d_v, h, w))
        if self.concat:
            return torch.cat((self.norm_layer(out), x), 1)
        return self.norm_layer(out) + x


class TorchPAM(torch.nn.Module):
    def __init__(self, in_dim):
        super().__init__()
        self.query_conv = torch.nn.Conv2d(in_dim, in_dim // 8, 1)
        self.key_conv = torch.nn.Conv2d(in_dim, in_dim // 8, 1)
        self.value_conv = torch.nn.Conv2d(in_dim, in_dim, 1)
        self.gamma = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, c, h, w = x.shape
        q = self.query_conv(x).reshape(b, -1, h * w).permute(0, 2, 1)
        attn = torch.softmax(torch.bmm(q, self.key_conv(x).reshape(b, -1, h * w)), dim=-1)
        out = torch.bmm(self.value_conv(x).reshape(b, -1, h * w), attn.permute(0, 2, 1)).reshape(
            b, c, h, w
        )
        return self.gamma * out + x


class TorchCAM(torch.nn.Module):
    def __init__(self, in_dim):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, c, h, w = x.shape
        feats = x.reshape(b, c, -1)
        energy = torch.bmm(feats, feats.permute(0, 2, 1))
        attn = torch.softmax(energy.max(-1, keepdim=True)[0].expand_as(energy) - energy, dim=-1)
        return self.gamma * torch.bmm(attn, feats).reshape(b, c, h, w) + x


def randomise(module: torch.nn.Module) -> torch.nn.Module:
    """Random BN affine parameters and running statistics; a non-zero gamma (DANet starts at 0,
    which would make the output equal the input and hide the attention)."""
    randomise_batchnorm(module)
    with torch.no_grad():
        if hasattr(module, "gamma"):
            module.gamma.fill_(0.7)
    return module


# --- MixtureOfSoftMaxACF ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_mix, d_k, d_v, n, n2", [(1, 8, 5, 12, 3), (2, 8, 6, 20, 5), (4, 12, 3, 7, 7)]
)
def test_mixture_of_softmax_parity(n_mix, d_k, d_v, n, n2):
    torch_module = TorchMixtureOfSoftMaxACF(n_mix, d_k).eval()
    q, k, v = (
        random_input(s, seed=i) for i, s in enumerate([(3, n, d_k), (3, n2, d_k), (3, n2, d_v)])
    )
    ts = [torch.tensor(a.transpose(0, 2, 1).copy(), requires_grad=True) for a in (q, k, v)]
    out_t, attn_t = torch_module(*ts)
    cot_out, cot_attn = (
        random_input(tuple(out_t.shape), seed=10),
        random_input(tuple(attn_t.shape), seed=11),
    )
    ((out_t * torch.tensor(cot_out)).sum() + (attn_t * torch.tensor(cot_attn)).sum()).backward()

    module = MixtureOfSoftMaxACF(n_mix, d_k)
    params = {"weight": jnp.asarray(torch_module.weight.detach().numpy())} if n_mix > 1 else {}

    @jax.jit
    def run(p, q, k, v):
        return jax.vjp(lambda p, q, k, v: module.apply({"params": p}, q, k, v), p, q, k, v)

    (out, attn), vjp = run(params, q, k, v)
    assert_close(out, out_t.detach().numpy(), what="output")
    assert_close(attn, attn_t.detach().numpy(), what="attn")
    g_p, *g_in = vjp((jnp.asarray(cot_out), jnp.asarray(cot_attn)))
    for name, g, t in zip("qkv", g_in, ts):
        assert_close(g, t.grad.numpy().transpose(0, 2, 1), 1e-4, what=f"gradient of {name}")
    if n_mix > 1:
        assert_close(
            g_p["weight"], torch_module.weight.grad.numpy(), 1e-4, what="gradient of weight"
        )
    else:
        assert "params" not in module.init(jax.random.key(0), q, k, v)


def test_mixture_of_softmax_dropout_and_init():
    q, k, v = (
        jnp.asarray(random_input(s, seed=i))
        for i, s in enumerate([(4, 64, 8), (4, 16, 8), (4, 16, 3)])
    )
    module = MixtureOfSoftMaxACF(1, 8, attn_dropout=0.5)
    _, eval_attn = jax.jit(module.apply)({}, q, k, v)
    out, attn = jax.jit(
        lambda *a: module.apply({}, *a, train=True, rngs={"dropout": jax.random.key(3)})
    )(q, k, v)
    kept = np.asarray(attn) != 0
    assert 0.45 < kept.mean() < 0.55
    # Inverted dropout, as torch: kept entries are scaled by 1 / (1 - p).
    np.testing.assert_allclose(np.asarray(attn)[kept], 2 * np.asarray(eval_attn)[kept], rtol=1e-6)
    assert_close(out, jnp.einsum("bnk,bkv->bnv", attn, v), 1e-5)
    # Mixture weights start U(+-n_mix^-1/2), stored in torch's (n_mix, d_k) layout.
    w = jax.jit(MixtureOfSoftMaxACF(4, 64).init)(
        jax.random.key(0), jnp.ones((1, 3, 64)), jnp.ones((1, 2, 64)), jnp.ones((1, 2, 3))
    )
    w = np.asarray(w["params"]["weight"])
    assert w.shape == (4, 64) and np.abs(w).max() <= 0.5 and np.abs(w).max() > 0.45


# --- ACFModule --------------------------------------------------------------------------------------

# (n_head, n_mix, d_model, d_k, d_v, kq_transform, pooling, concat, shape). ATTEN builds
# ACFModule(nheads, nmixs, C, C // nheads * nmixs, C // nheads).
# fmt: off
_ACF_CASES = {
    "mix1-conv-pool": (2, 1, 16, 8, 8, "conv", True, False, (2, 8, 6, 16)),
    "mix2-ffn-pool-concat": (2, 2, 16, 16, 8, "ffn", True, True, (2, 6, 10, 16)),
    "mix2-dffn-nopool-odd": (2, 2, 16, 16, 8, "dffn", False, False, (2, 7, 5, 16)),
    "mix4-conv-nopool-concat-odd": (1, 4, 8, 8, 3, "conv", False, True, (3, 5, 9, 8)),
}
# fmt: on


def _acf_pair(case: str, dropout: float = 0.1):
    n_head, n_mix, d_model, d_k, d_v, kq, pooling, concat, shape = _ACF_CASES[case]
    args = (n_head, n_mix, d_model, d_k, d_v)
    kwargs = dict(kq_transform=kq, pooling=pooling, concat=concat)
    torch_module = randomise(TorchACFModule(*args, **kwargs))
    torch_module.attention.dropout.p = dropout  # upstream hard-codes 0.1
    return torch_module, ACFModule(*args, dropout=dropout, **kwargs), shape


@pytest.mark.parametrize(
    "case, train",
    [
        ("mix1-conv-pool", True),
        ("mix2-ffn-pool-concat", True),
        ("mix2-dffn-nopool-odd", False),
        ("mix2-dffn-nopool-odd", True),
        ("mix4-conv-nopool-concat-odd", False),
    ],
)
def test_acf_parity(case, train):
    # Training compares with attention dropout 0 (the two frameworks draw different masks); the BN
    # statistics of the shared 'ffn'/'dffn' transform are updated twice per step (queries, then the
    # pooled keys), as upstream.
    torch_module, flax_module, shape = _acf_pair(case, dropout=0.0 if train else 0.1)
    out = check_module_parity(
        torch_module, flax_module, random_input(shape, seed=len(case)), train=train
    )
    concat = _ACF_CASES[case][7]
    assert out["output"].shape == (*shape[:3], shape[3] * (2 if concat else 1))


def test_acf_upstream_state_dict_aliases_and_init():
    torch_module = TorchACFModule(2, 2, 16, 16, 8, kq_transform="ffn")
    full = torch_module.state_dict()
    # Upstream's checkpoints carry the shared transform twice; the tensors are identical, and
    # torch_to_flax drops the conv_ks.* aliases after checking that.
    for key in [k for k in full if k.startswith("conv_qs.")]:
        assert torch.equal(full[key], full["conv_ks." + key[len("conv_qs.") :]])
    x0 = np.zeros((1, 8, 8, 16), np.float32)
    converted = torch_to_flax(ACFModule(2, 2, 16, 16, 8, kq_transform="ffn"), full, x0)
    assert "conv_ks" not in converted["params"]
    tampered = dict(full)
    tampered["conv_ks.0.weight"] = tampered["conv_ks.0.weight"] + 1
    with pytest.raises(
        ValueError, match=r"'conv_ks\.0\.weight': alias of 'conv_qs\.0\.weight' but not equal to it"
    ):
        torch_to_flax(ACFModule(2, 2, 16, 16, 8, kq_transform="ffn"), tampered, x0)
    variables = jax.jit(ACFModule(2, 2, 16, 16, 8, kq_transform="ffn").init)(
        jax.random.key(0), jnp.ones((2, 8, 8, 16))
    )
    flat = {"/".join(k): v for k, v in flatten_dict(variables["params"]).items()}
    assert set(flat) == {
        "conv_qs/0/kernel",
        "conv_qs/1/scale",
        "conv_qs/1/bias",
        "conv_qs/3/kernel",
        "conv_qs/3/bias",
        "conv_vs/kernel",
        "conv_vs/bias",
        "attention/weight",
        "conv/kernel",
        "norm_layer/scale",
        "norm_layer/bias",
    }
    # Upstream's normal inits: 1x1 of the ffn N(0, 1/d_k), values N(0, 2/(d_model + d_v)).
    assert np.std(np.asarray(flat["conv_qs/3/kernel"])) == pytest.approx((1 / 16) ** 0.5, rel=0.15)
    assert np.std(np.asarray(flat["conv_vs/kernel"])) == pytest.approx((2 / 24) ** 0.5, rel=0.25)


def test_acf_attention_dropout_in_training():
    module = ACFModule(2, 1, 8, 4, 4, dropout=0.5)
    x = jnp.asarray(random_input((2, 8, 8, 8), seed=1))
    v = jax.jit(module.init)(jax.random.key(0), x)
    run = jax.jit(
        lambda key: module.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})[
            0
        ]
    )
    a, b = run(jax.random.key(1)), run(jax.random.key(2))
    assert float(jnp.abs(a - b).max()) > 1e-3  # the masks differ
    no_drop = jax.jit(
        lambda: ACFModule(2, 1, 8, 4, 4, dropout=0.0).apply(
            v, x, train=True, mutable=["batch_stats"]
        )[0]
    )()
    assert float(jnp.abs(a - no_drop).max()) > 1e-3


def test_acf_bf16_jit_vmap():
    module = ACFModule(2, 2, 16, 16, 8, kq_transform="ffn")
    x = random_input((2, 8, 6, 16), seed=2)
    v = jax.jit(module.init)(jax.random.key(0), x)
    ref = module.apply(v, x)
    assert_close(jax.jit(module.apply)(v, x), ref, rtol=1e-6, what="jit")
    out = jax.jit(ACFModule(2, 2, 16, 16, 8, kq_transform="ffn", dtype=jnp.bfloat16).apply)(v, x)
    assert out.dtype == jnp.bfloat16
    assert_close(out.astype(jnp.float32), ref, rtol=2e-2)
    xs = jnp.asarray(random_input((3, 2, 8, 6, 16), seed=3))
    apply = jax.jit(module.apply)
    assert_close(
        jax.jit(jax.vmap(lambda t: module.apply(v, t)))(xs),
        jnp.stack([apply(v, t) for t in xs]),
        1e-6,
        what="vmap",
    )


def test_acf_bad_input():
    x = jnp.ones((2, 8, 6, 16))
    init = lambda m, t=x: m.init(jax.random.key(0), t)  # noqa: E731
    with pytest.raises(
        ValueError,
        match=r"ACFModule: pooling=True .* needs both even, got input shape \(2, 7, 6, 16\) \(H=7, W=6\)",
    ):
        init(ACFModule(2, 1, 16, 8, 8), jnp.ones((2, 7, 6, 16)))
    with pytest.raises(ValueError, match="ACFModule: d_model=32 but the input has 16 channels"):
        init(ACFModule(2, 1, 32, 8, 8))
    with pytest.raises(ValueError, match="ACFModule: d_k=9 is not divisible by n_mix=2"):
        init(ACFModule(2, 2, 16, 9, 8))
    with pytest.raises(
        ValueError,
        match=r"ACFModule: kq_transform must be one of \('conv', 'ffn', 'dffn'\), got 'mlp'",
    ):
        init(ACFModule(2, 1, 16, 8, 8, kq_transform="mlp"))
    with pytest.raises(ValueError, match="ACFModule: value_transform must be 'conv'"):
        init(ACFModule(2, 1, 16, 8, 8, value_transform="ffn"))
    with pytest.raises(ValueError, match="ACFModule: n_head must be a positive integer, got 0"):
        init(ACFModule(0, 1, 16, 8, 8))
    with pytest.raises(ValueError, match=r"ACFModule: expected x of rank 4 \(N, H, W, C\)"):
        init(ACFModule(2, 1, 16, 8, 8), x[0])
    q = jnp.ones((2, 5, 8))
    with pytest.raises(ValueError, match="MixtureOfSoftMaxACF: d_k=8 but the input has 6 channels"):
        MixtureOfSoftMaxACF(1, 8).init(
            jax.random.key(0), q, jnp.ones((2, 3, 6)), jnp.ones((2, 3, 4))
        )
    with pytest.raises(
        ValueError,
        match=r"MixtureOfSoftMaxACF: .* must share B, and k and v N2; got q \(2, 5, 8\), k \(2, 3, 8\), v \(2, 4, 4\)",
    ):
        MixtureOfSoftMaxACF(1, 8).init(
            jax.random.key(0), q, jnp.ones((2, 3, 8)), jnp.ones((2, 4, 4))
        )
    with pytest.raises(
        ValueError,
        match=r"MixtureOfSoftMaxACF: attn_dropout must be a probability in \[0, 1\], got 1.5",
    ):
        MixtureOfSoftMaxACF(1, 8, attn_dropout=1.5).init(jax.random.key(0), q, q, q)


# --- DANet PAM / CAM --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 7, 5, 16), (1, 4, 4, 8), (3, 6, 9, 12)])
def test_pam_parity(shape):
    check_module_parity(
        randomise(TorchPAM(shape[-1])), PAM_Module(shape[-1]), random_input(shape, seed=shape[1])
    )


@pytest.mark.parametrize("shape", [(2, 7, 5, 16), (1, 4, 4, 8), (3, 6, 9, 3)])
def test_cam_parity(shape):
    check_module_parity(
        randomise(TorchCAM(shape[-1])), CAM_Module(shape[-1]), random_input(shape, seed=shape[2])
    )


@pytest.mark.parametrize("cls", [PAM_Module, CAM_Module])
def test_danet_identity_at_init_bf16_jit_vmap(cls):
    x = random_input((2, 7, 5, 16), seed=4)
    module = cls(16)
    v = jax.jit(module.init)(jax.random.key(0), x)
    assert v["params"]["gamma"].shape == (1,) and float(v["params"]["gamma"][0]) == 0.0
    np.testing.assert_array_equal(
        np.asarray(jax.jit(module.apply)(v, x)), x
    )  # gamma = 0: the identity
    v = {"params": {**v["params"], "gamma": jnp.array([0.7])}}
    # CAM's energies are unscaled sums over H*W positions: keep inputs small so that bfloat16
    # rounding of x does not swamp the softmax (the comparison is about the compute dtype).
    x = 0.2 * x
    ref = module.apply(v, x)
    assert_close(jax.jit(module.apply)(v, x), ref, rtol=1e-6, what="jit")
    out = jax.jit(cls(16, dtype=jnp.bfloat16).apply)(v, x)
    assert out.dtype == jnp.bfloat16
    assert_close(out.astype(jnp.float32), ref, rtol=2e-2)
    xs = jnp.asarray(random_input((3, 2, 7, 5, 16), seed=5))
    apply = jax.jit(module.apply)
    assert_close(
        jax.jit(jax.vmap(lambda t: module.apply(v, t)))(xs),
        jnp.stack([apply(v, t) for t in xs]),
        1e-6,
        what="vmap",
    )


def test_danet_bad_input():
    x = jnp.ones((2, 7, 5, 16))
    for cls in (PAM_Module, CAM_Module):
        name = cls.__name__
        with pytest.raises(ValueError, match=f"{name}: in_dim=32 but the input has 16 channels"):
            cls(32).init(jax.random.key(0), x)
        with pytest.raises(
            ValueError,
            match=rf"{name}: expected x of rank 4 \(N, H, W, C\), got shape \(7, 5, 16\)",
        ):
            cls(16).init(jax.random.key(0), x[0])
    with pytest.raises(ValueError, match=r"PAM_Module: in_dim must be >= 8 .* got 4"):
        PAM_Module(4).init(jax.random.key(0), jnp.ones((2, 3, 3, 4)))
