"""Segmentation heads and models (jaxenc.models.heads / segmentation) and Deep TEN (jaxenc.models.deepten)
against torch restatements of PyTorch-Encoding's ``encoding/models/sseg`` (and DANet's head) with the
upstream attribute names (encoding/models). PyTorch-Encoding is not installable, so
the torch heads below restate upstream's modules; the torch backbone is the ``resnest`` package's
ResNet (tests/torch_ref.py), the same design as upstream's backbone (its ``radix=0`` is the plain
ResNet, jaxenc's ``radix=1``).

Parameter-count literals (``EXPECTED_PARAMS``) were computed once with :func:`torch_param_count`:
the torch restatement of each whole model (oracle backbone with upstream's options and
``fc = None`` + the torch heads below, nclass/aux/se_loss/lateral from the registered presets),
counting ``sum(p.numel() for p in model.parameters())`` (shared parameters once).
``test_param_count_literals_match_torch`` recomputes a few of them live.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from optional_torch import F, torch
from parity import assert_close, nchw, nhwc, random_input, randomise_batchnorm
from test_customize import TorchConcurrentModule, TorchPyramidPooling
from test_encoding import TorchEncoding
from test_encoding_attention import TorchACFModule, TorchCAM, TorchPAM
from torch_ref import resnest_torch

from jaxenc.models import deepten as deepten_mod
from jaxenc.models import head_blocks
from jaxenc.models import heads as H
from jaxenc.models import segmentation as S
from jaxenc.models.registry import get_model, list_models
from jaxenc.port import torch_to_flax

UP = {"mode": "bilinear", "align_corners": True}
BN = torch.nn.BatchNorm2d
RNGS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}


# --- torch restatements of the upstream heads (upstream names and structure) --------------------------


class TorchIdentity(torch.nn.Module):
    def forward(self, x):
        return x


class TorchMean(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.mean(self.dim)


class TorchGlobalPooling(torch.nn.Module):
    """fcn.py / atten.py ``GlobalPooling`` and deeplab.py ``AsppPooling``."""

    def __init__(self, in_channels, out_channels, norm_layer, up_kwargs):
        super().__init__()
        self._up_kwargs = up_kwargs
        self.gap = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Conv2d(in_channels, out_channels, 1, bias=False),
            norm_layer(out_channels),
            torch.nn.ReLU(True),
        )

    def forward(self, x):
        return F.interpolate(self.gap(x), x.shape[2:], **self._up_kwargs)


def conv_bn_relu(cin, cout, k=1, padding=0, dilation=1, norm_layer=BN):
    return torch.nn.Sequential(
        torch.nn.Conv2d(cin, cout, k, padding=padding, dilation=dilation, bias=False),
        norm_layer(cout),
        torch.nn.ReLU(True),
    )


class TorchFCNHead(torch.nn.Module):
    def __init__(self, in_channels, out_channels, norm_layer=BN, up_kwargs=UP, with_global=False):
        super().__init__()
        inter = in_channels // 4
        layers = [
            torch.nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
            norm_layer(inter),
            torch.nn.ReLU(),
        ]
        if with_global:
            layers.append(
                TorchConcurrentModule(
                    [TorchIdentity(), TorchGlobalPooling(inter, inter, norm_layer, up_kwargs)]
                )
            )
        layers += [
            torch.nn.Dropout(0.1, False),
            torch.nn.Conv2d(inter * (2 if with_global else 1), out_channels, 1),
        ]
        self.conv5 = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.conv5(x)


class TorchPSPHead(torch.nn.Module):
    def __init__(self, in_channels, out_channels, norm_layer=BN, up_kwargs=UP):
        super().__init__()
        inter = in_channels // 4
        self.conv5 = torch.nn.Sequential(
            TorchPyramidPooling(in_channels, norm_layer, up_kwargs),
            torch.nn.Conv2d(in_channels * 2, inter, 3, padding=1, bias=False),
            norm_layer(inter),
            torch.nn.ReLU(True),
            torch.nn.Dropout(0.1, False),
            torch.nn.Conv2d(inter, out_channels, 1),
        )

    def forward(self, x):
        return self.conv5(x)


class TorchEncModule(torch.nn.Module):
    """Upstream's ``norm_layer(ncodes)`` on the (B, K, D) encoding is a BatchNorm1d(K) (SyncBatchNorm
    upstream accepts 3-D input; torch's BatchNorm2d does not)."""

    def __init__(self, in_channels, nclass, ncodes=32, se_loss=True, norm_layer=BN):
        super().__init__()
        self.se_loss = se_loss
        self.encoding = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, in_channels, 1, bias=False),
            norm_layer(in_channels),
            torch.nn.ReLU(True),
            TorchEncoding(D=in_channels, K=ncodes),
            torch.nn.BatchNorm1d(ncodes),
            torch.nn.ReLU(True),
            TorchMean(1),
        )
        self.fc = torch.nn.Sequential(torch.nn.Linear(in_channels, in_channels), torch.nn.Sigmoid())
        if se_loss:
            self.selayer = torch.nn.Linear(in_channels, nclass)

    def forward(self, x):
        en = self.encoding(x)
        b, c = x.shape[:2]
        gamma = self.fc(en).view(b, c, 1, 1)
        outputs = [F.relu(x + x * gamma)]
        if self.se_loss:
            outputs.append(self.selayer(en))
        return tuple(outputs)


class TorchLateral(torch.nn.Module):
    """EncHead's / ATTENHead's ``connect`` and ``fusion``."""

    def _make_lateral(self, norm_layer):
        self.connect = torch.nn.ModuleList(
            [
                conv_bn_relu(512, 512, norm_layer=norm_layer),
                conv_bn_relu(1024, 512, norm_layer=norm_layer),
            ]
        )
        self.fusion = conv_bn_relu(3 * 512, 512, 3, 1, norm_layer=norm_layer)

    def _fuse(self, feat, inputs):
        return self.fusion(
            torch.cat([feat, self.connect[0](inputs[1]), self.connect[1](inputs[2])], 1)
        )


class TorchEncHead(TorchLateral):
    def __init__(
        self, in_channels, out_channels, se_loss=True, lateral=True, norm_layer=BN, up_kwargs=UP
    ):
        super().__init__()
        self.lateral = lateral
        self.conv5 = conv_bn_relu(in_channels, 512, 3, 1, norm_layer=norm_layer)
        if lateral:
            self._make_lateral(norm_layer)
        self.encmodule = TorchEncModule(512, out_channels, 32, se_loss, norm_layer)
        self.conv6 = torch.nn.Sequential(
            torch.nn.Dropout(0.1, False), torch.nn.Conv2d(512, out_channels, 1)
        )

    def forward(self, *inputs):
        feat = self.conv5(inputs[-1])
        if self.lateral:
            feat = self._fuse(feat, inputs)
        outs = list(self.encmodule(feat))
        outs[0] = self.conv6(outs[0])
        return tuple(outs)


class TorchASPP_Module(torch.nn.Module):  # noqa: N801
    def __init__(self, in_channels, atrous_rates, norm_layer=BN, up_kwargs=UP):
        super().__init__()
        out = in_channels // 8
        self.b0 = conv_bn_relu(in_channels, out, norm_layer=norm_layer)
        for i, r in enumerate(atrous_rates, start=1):
            setattr(self, f"b{i}", conv_bn_relu(in_channels, out, 3, r, r, norm_layer))
        self.b4 = TorchGlobalPooling(in_channels, out, norm_layer, up_kwargs)
        self.project = torch.nn.Sequential(
            torch.nn.Conv2d(5 * out, out, 1, bias=False),
            norm_layer(out),
            torch.nn.ReLU(True),
            torch.nn.Dropout2d(0.5, False),
        )

    def forward(self, x):
        return self.project(torch.cat([getattr(self, f"b{i}")(x) for i in range(5)], 1))


class TorchDeepLabV3Head(torch.nn.Module):
    def __init__(
        self, in_channels, out_channels, norm_layer=BN, up_kwargs=UP, atrous_rates=(12, 24, 36)
    ):
        super().__init__()
        inter = in_channels // 8
        self.aspp = TorchASPP_Module(in_channels, atrous_rates, norm_layer, up_kwargs)
        self.block = torch.nn.Sequential(
            torch.nn.Conv2d(inter, inter, 3, padding=1, bias=False),
            norm_layer(inter),
            torch.nn.ReLU(True),
            torch.nn.Dropout(0.1, False),
            torch.nn.Conv2d(inter, out_channels, 1),
        )

    def forward(self, x):
        return self.block(self.aspp(x))


class TorchFCFPNHead(torch.nn.Module):
    def __init__(
        self,
        out_channels,
        norm_layer=BN,
        fpn_inchannels=(256, 512, 1024, 2048),
        fpn_dim=256,
        up_kwargs=UP,
        c4_channels=None,
    ):
        super().__init__()
        self._up_kwargs = up_kwargs
        self.fpn_lateral = torch.nn.ModuleList(
            [conv_bn_relu(c, fpn_dim, norm_layer=norm_layer) for c in fpn_inchannels[:-1]]
        )
        self.fpn_out = torch.nn.ModuleList(
            [
                conv_bn_relu(fpn_dim, fpn_dim, 3, 1, norm_layer=norm_layer)
                for _ in fpn_inchannels[:-1]
            ]
        )
        self.c4conv = conv_bn_relu(
            c4_channels or fpn_inchannels[-1], fpn_dim, 3, 1, norm_layer=norm_layer
        )
        inter = len(fpn_inchannels) * fpn_dim
        self.conv5 = torch.nn.Sequential(
            torch.nn.Conv2d(inter, 512, 3, padding=1, bias=False),
            norm_layer(512),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.1, False),
            torch.nn.Conv2d(512, out_channels, 1),
        )

    def forward(self, *inputs):
        c4 = inputs[-1]
        if hasattr(self, "extramodule"):
            c4 = self.extramodule(c4)
        feat = self.c4conv(c4)
        c1_size = inputs[0].shape[2:]
        fpn_features = [F.interpolate(feat, c1_size, **self._up_kwargs)]
        for i in reversed(range(len(inputs) - 1)):
            feat_i = self.fpn_lateral[i](inputs[i])
            feat = F.interpolate(feat, feat_i.shape[2:], **self._up_kwargs) + feat_i
            fpn_features.append(F.interpolate(self.fpn_out[i](feat), c1_size, **self._up_kwargs))
        return (self.conv5(torch.cat(fpn_features, 1)),)


class TorchUperNetHead(TorchFCFPNHead):
    """Upstream's UperNetHead without its shared-default-list mutation."""

    def __init__(
        self,
        out_channels,
        norm_layer=BN,
        fpn_inchannels=(256, 512, 1024, 2048),
        fpn_dim=256,
        up_kwargs=UP,
    ):
        super().__init__(
            out_channels,
            norm_layer,
            fpn_inchannels,
            fpn_dim,
            up_kwargs,
            c4_channels=2 * fpn_inchannels[-1],
        )
        self.extramodule = TorchPyramidPooling(fpn_inchannels[-1], norm_layer, up_kwargs)


class TorchATTENHead(TorchLateral):
    def __init__(
        self,
        in_channels,
        out_channels,
        norm_layer=BN,
        up_kwargs=UP,
        nheads=8,
        nmixs=1,
        with_global=True,
        with_enc=True,
        se_loss=False,
        lateral=False,
    ):
        super().__init__()
        assert with_global  # upstream cannot build with_global=False
        self.with_enc, self.lateral = with_enc, lateral
        inter = in_channels // 4
        self.conv5 = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
            norm_layer(inter),
            torch.nn.ReLU(),
        )
        if lateral:
            self._make_lateral(norm_layer)
        self.atten = TorchACFModule(
            nheads, nmixs, inter, inter // nheads * nmixs, inter // nheads, norm_layer
        )
        self.atten_layers = TorchConcurrentModule(
            [TorchGlobalPooling(inter, inter, norm_layer, up_kwargs), self.atten]
        )
        if with_enc:
            self.encmodule = TorchEncModule(2 * inter, out_channels, 32, se_loss, norm_layer)
        self.conv6 = torch.nn.Sequential(
            torch.nn.Dropout(0.1, False), torch.nn.Conv2d(2 * inter, out_channels, 1)
        )

    def forward(self, *inputs):
        feat = self.conv5(inputs[-1])
        if self.lateral:
            feat = self._fuse(feat, inputs)
        feat = self.atten_layers(feat)
        outs = list(self.encmodule(feat)) if self.with_enc else [feat]
        outs[0] = self.conv6(outs[0])
        return tuple(outs)


class TorchDANetHead(torch.nn.Module):
    def __init__(self, in_channels, out_channels, norm_layer=BN):
        super().__init__()
        inter = in_channels // 4
        self.conv5a = conv_bn_relu(in_channels, inter, 3, 1, norm_layer=norm_layer)
        self.conv5c = conv_bn_relu(in_channels, inter, 3, 1, norm_layer=norm_layer)
        self.sa = TorchPAM(inter)
        self.sc = TorchCAM(inter)
        self.conv51 = conv_bn_relu(inter, inter, 3, 1, norm_layer=norm_layer)
        self.conv52 = conv_bn_relu(inter, inter, 3, 1, norm_layer=norm_layer)
        for name in ("conv6", "conv7", "conv8"):
            setattr(
                self,
                name,
                torch.nn.Sequential(
                    torch.nn.Dropout2d(0.1, False), torch.nn.Conv2d(inter, out_channels, 1)
                ),
            )

    def forward(self, x):
        sa_conv = self.conv51(self.sa(self.conv5a(x)))
        sc_conv = self.conv52(self.sc(self.conv5c(x)))
        return self.conv8(sa_conv + sc_conv), self.conv6(sa_conv), self.conv7(sc_conv)


# --- torch restatements of the models -------------------------------------------------------------

_RESNEST = dict(
    radix=2, groups=1, bottleneck_width=64, deep_stem=True, avg_down=True, avd=True, avd_first=False
)
TORCH_BACKBONES = {
    "resnet50s": dict(layers=[3, 4, 6, 3], radix=0, deep_stem=True, stem_width=64),
    "resnet101s": dict(layers=[3, 4, 23, 3], radix=0, deep_stem=True, stem_width=64),
    "resnest50": dict(layers=[3, 4, 6, 3], stem_width=32, **_RESNEST),
    "resnest101": dict(layers=[3, 4, 23, 3], stem_width=64, **_RESNEST),
    "resnest200": dict(layers=[3, 24, 36, 3], stem_width=64, **_RESNEST),
    "resnest269": dict(layers=[3, 30, 48, 8], stem_width=64, **_RESNEST),
}


def torch_backbone(name, dilated, keep_fc=False):
    """Upstream's backbone ``name`` from the resnest oracle; ``fc = None`` as BaseNet sets it."""
    ref = resnest_torch().resnet
    opts = dict(TORCH_BACKBONES[name])
    net = ref.ResNet(ref.Bottleneck, opts.pop("layers"), dilated=dilated, norm_layer=BN, **opts)
    if not keep_fc:
        net.fc = None
    return net


class TorchSegNet(torch.nn.Module):
    """BaseNet + the model's forward: 'single' (FCN/PSP/DeepLab: head(c4)), 'multi' (EncNet/ATTEN/
    UperNet/FCFPN: head(c1..c4) -> tuple), 'danet' (three upsampled outputs)."""

    def __init__(self, kind, backbone, head, nclass, aux):
        super().__init__()
        self.kind, self.aux = kind, aux
        self.pretrained = backbone
        self.head = head
        if aux:
            self.auxlayer = TorchFCNHead(1024, nclass)

    def base_forward(self, x):
        p = self.pretrained
        x = p.maxpool(p.relu(p.bn1(p.conv1(x))))
        c1 = p.layer1(x)
        c2 = p.layer2(c1)
        c3 = p.layer3(c2)
        return c1, c2, c3, p.layer4(c3)

    def forward(self, x):
        size = x.shape[2:]
        feats = self.base_forward(x)
        if self.kind == "single":
            outs = [self.head(feats[-1])]
        elif self.kind == "danet":
            outs = list(self.head(feats[-1]))
        else:
            outs = list(self.head(*feats))
        n_up = 3 if self.kind == "danet" else 1
        outs = [F.interpolate(o, size, **UP) if i < n_up else o for i, o in enumerate(outs)]
        if self.aux:
            outs.append(F.interpolate(self.auxlayer(feats[2]), size, **UP))
        return tuple(outs)


def torch_model_for(model: S.BaseNet) -> TorchSegNet:
    """The torch restatement of a jaxenc segmentation model, configured from its fields."""
    n = model.nclass
    if isinstance(model, S.FCN):
        kind, head = "single", TorchFCNHead(2048, n, with_global=model.with_global)
    elif isinstance(model, S.PSP):
        kind, head = "single", TorchPSPHead(2048, n)
    elif isinstance(model, S.DeepLabV3):
        kind, head = "single", TorchDeepLabV3Head(2048, n, atrous_rates=tuple(model.atrous_rates))
    elif isinstance(model, S.EncNet):
        kind, head = "multi", TorchEncHead(2048, n, se_loss=model.se_loss, lateral=model.lateral)
    elif isinstance(model, S.UperNet):
        kind, head = "multi", TorchUperNetHead(n)
    elif isinstance(model, S.FCFPN):
        kind, head = "multi", TorchFCFPNHead(n)
    elif isinstance(model, S.ATTEN):
        kind, head = (
            "multi",
            TorchATTENHead(
                2048,
                n,
                nheads=model.nheads,
                nmixs=model.nmixs,
                se_loss=model.se_loss,
                lateral=model.with_lateral,
            ),
        )
    elif isinstance(model, S.DANet):
        kind, head = "danet", TorchDANetHead(2048, n)
    else:
        raise TypeError(type(model))
    return TorchSegNet(kind, torch_backbone(model.backbone, model.dilated), head, n, model.aux)


class TorchDeepTen(torch.nn.Module):
    def __init__(self, nclass, backbone="resnet50s"):
        super().__init__()
        self.pretrained = torch_backbone(backbone, dilated=False, keep_fc=True)
        self.head = torch.nn.Sequential(
            torch.nn.Conv2d(2048, 128, 1),
            BN(128),
            torch.nn.ReLU(True),
            TorchEncoding(D=128, K=32),
            torch.nn.Flatten(1),
            _TorchL2(),
            torch.nn.Linear(128 * 32, nclass),
        )

    def forward(self, x):
        p = self.pretrained
        x = p.maxpool(p.relu(p.bn1(p.conv1(x))))
        return self.head(p.layer4(p.layer3(p.layer2(p.layer1(x)))))


class _TorchL2(torch.nn.Module):
    def forward(self, x):
        return F.normalize(x, 2, 1)


def torch_param_count(name: str) -> int:
    """Parameters of the torch restatement of the registered model ``name`` (how EXPECTED_PARAMS was made)."""
    if name.startswith("deepten"):
        net = TorchDeepTen(23)
    else:
        net = torch_model_for(get_model(name))
    return sum(p.numel() for p in net.parameters())


def flax_param_count(model, x) -> int:
    shapes = jax.eval_shape(model.init, RNGS, x)
    return sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(shapes["params"]))


# --- helpers --------------------------------------------------------------------------------------


def _randomise(module: torch.nn.Module) -> torch.nn.Module:
    """Random BN statistics/affine everywhere and a non-zero DANet gamma (0 would hide PAM/CAM)."""
    randomise_batchnorm(module)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (TorchPAM, TorchCAM)):
                m.gamma.fill_(0.7)
    return module.eval()


def _as_list(y):
    return list(y) if isinstance(y, (tuple, list)) else [y]


def compare_eval(torch_module, flax_module, inputs, rtol=1e-4, apply_kwargs=None):
    """Convert ``torch_module``'s state_dict, run both in eval mode on NHWC ``inputs``, compare every output."""
    _randomise(torch_module)
    jx = [jnp.asarray(a) for a in inputs]
    variables = torch_to_flax(flax_module, torch_module.state_dict(), *jx, **(apply_kwargs or {}))
    with torch.no_grad():
        expected = _as_list(torch_module(*[torch.tensor(nchw(a)) for a in inputs]))
    actual = _as_list(flax_module.apply(variables, *jx, **(apply_kwargs or {})))
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, nhwc(e.numpy()), rtol, what=f"{type(flax_module).__name__} output {i}")
    return variables, actual


# --- 1. heads vs torch restatements ------------------------------------------------------------------


@pytest.mark.parametrize("with_global", [False, True])
def test_fcn_head_parity(with_global):
    x = random_input((2, 6, 7, 32), seed=1)
    compare_eval(
        TorchFCNHead(32, 5, with_global=with_global), H.FCNHead(32, 5, with_global=with_global), [x]
    )


def test_psp_head_parity():
    x = random_input((2, 7, 9, 32), seed=2)  # 7x9: PSP's overlapping adaptive bins
    compare_eval(TorchPSPHead(32, 5), H.PSPHead(32, 5), [x])


@pytest.mark.parametrize("se_loss", [True, False])
def test_enc_module_parity_with_se_output(se_loss):
    x = random_input((2, 5, 6, 24), seed=3)
    _, out = compare_eval(
        TorchEncModule(24, 7, ncodes=8, se_loss=se_loss),
        H.EncModule(24, 7, ncodes=8, se_loss=se_loss),
        [x],
    )
    assert len(out) == (2 if se_loss else 1)
    if se_loss:
        assert out[1].shape == (2, 7)


@pytest.mark.parametrize("lateral", [False, True])
def test_enc_head_parity(lateral):
    feats = [
        random_input(s, seed=10 + i)
        for i, s in enumerate([(2, 4, 4, 8), (2, 4, 4, 512), (2, 4, 4, 1024), (2, 4, 4, 2048)])
    ]
    _, out = compare_eval(
        TorchEncHead(2048, 5, lateral=lateral), H.EncHead(2048, 5, lateral=lateral), feats
    )
    assert out[0].shape == (2, 4, 4, 5) and out[1].shape == (2, 5)


def test_deeplab_head_parity():
    x = random_input((2, 6, 5, 64), seed=4)
    compare_eval(
        TorchDeepLabV3Head(64, 5, atrous_rates=(1, 2, 3)),
        H.DeepLabV3Head(64, 5, atrous_rates=(1, 2, 3)),
        [x],
    )
    # upstream rates (12/24/36) exceed this map: the atrous branches see only their centre tap
    compare_eval(TorchDeepLabV3Head(64, 5), H.DeepLabV3Head(64, 5), [x])


@pytest.mark.parametrize("upernet", [False, True])
def test_fpn_heads_parity(upernet):
    chans = (8, 16, 24, 32)
    feats = [
        random_input((2, 12 // 2**i + 1, 10 // 2**i + 1, c), seed=20 + i)
        for i, c in enumerate(chans)
    ]
    if upernet:
        pair = (
            TorchUperNetHead(5, fpn_inchannels=chans, fpn_dim=8),
            H.UperNetHead(5, fpn_inchannels=chans, fpn_dim=8),
        )
    else:
        pair = (
            TorchFCFPNHead(5, fpn_inchannels=chans, fpn_dim=8),
            H.FCFPNHead(5, fpn_inchannels=chans, fpn_dim=8),
        )
    _, out = compare_eval(*pair, feats)
    assert out[0].shape == (2, 13, 11, 5)
    # a second construction is unaffected (upstream's UperNetHead mutated its default list)
    assert H.UperNetHead(5).fpn_inchannels == (256, 512, 1024, 2048)


@pytest.mark.parametrize("se_loss", [False, True])
def test_atten_head_parity_and_acf_alias(se_loss):
    x = random_input((2, 6, 8, 64), seed=5)
    torch_head = TorchATTENHead(64, 5, nheads=4, se_loss=se_loss)
    sd = torch_head.state_dict()
    assert any(k.startswith("atten.") for k in sd) and any(
        k.startswith("atten_layers.1.") for k in sd
    )
    _, out = compare_eval(torch_head, H.ATTENHead(64, 5, nheads=4, se_loss=se_loss), [x])
    assert len(out) == (2 if se_loss else 1)
    # with_global=False (upstream: NameError) runs the ACF module alone before the EncModule
    head = H.ATTENHead(64, 5, nheads=4, with_global=False, se_loss=se_loss)
    v = head.init(RNGS, jnp.asarray(x))
    assert "atten" in v["params"] and "atten_layers" not in v["params"]
    assert head.apply(v, jnp.asarray(x))[0].shape == (2, 6, 8, 5)


def test_atten_head_lateral_parity():
    feats = [
        random_input(s, seed=30 + i)
        for i, s in enumerate([(1, 4, 4, 8), (1, 4, 4, 512), (1, 4, 4, 1024), (1, 4, 4, 2048)])
    ]
    compare_eval(
        TorchATTENHead(2048, 3, nheads=8, lateral=True), H.ATTENHead(2048, 3, lateral=True), feats
    )


def test_danet_head_parity():
    x = random_input((2, 5, 6, 64), seed=6)
    _, out = compare_eval(TorchDANetHead(64, 5), H.DANetHead(64, 5), [x])
    assert [o.shape for o in out] == [(2, 5, 6, 5)] * 3


def test_aspp_module_and_global_pooling_parity():
    x = random_input((2, 5, 7, 16), seed=7)
    compare_eval(TorchASPP_Module(16, (1, 2, 3)), H.ASPP_Module(16, (1, 2, 3)), [x])
    compare_eval(TorchGlobalPooling(16, 4, BN, UP), H.GlobalPooling(16, 4), [x])


def test_head_errors():
    x = jnp.ones((1, 4, 4, 16))
    with pytest.raises(ValueError, match="FCNHead: in_channels=32 but the input has 16"):
        H.FCNHead(32, 5).init(RNGS, x)
    with pytest.raises(ValueError, match="ASPP_Module: atrous_rates"):
        H.ASPP_Module(16, (1, 2)).init(RNGS, x)
    with pytest.raises(ValueError, match="FCFPNHead: expected 4 feature maps"):
        H.FCFPNHead(5).init(RNGS, x)
    with pytest.raises(ValueError, match="EncHead: lateral=True concatenates"):
        feats = [
            jnp.ones((1, 8, 8, 8)),
            jnp.ones((1, 8, 8, 512)),
            jnp.ones((1, 4, 4, 1024)),
            jnp.ones((1, 4, 4, 2048)),
        ]
        H.EncHead(2048, 5, lateral=True).init(RNGS, *feats)
    with pytest.raises(ValueError, match="ACFModule: pooling=True"):
        H.ATTENHead(16, 3, nheads=2).init(RNGS, jnp.ones((1, 5, 4, 16)))


# --- 2. parameter counts of every registered name ---------------------------------------------------

# fmt: off
UPSTREAM_NAMES = [
    "encnet_resnet101s_coco", "fcn_resnet50s_pcontext", "encnet_resnet50s_pcontext", "encnet_resnet101s_pcontext",
    "encnet_resnet50s_ade", "encnet_resnet101s_ade", "fcn_resnet50s_ade", "psp_resnet50s_ade", "fcn_resnest50_ade",
    "deeplab_resnest50_ade", "deeplab_resnest101_ade", "deeplab_resnest200_ade", "deeplab_resnest269_ade",
    "fcn_resnest50_pcontext", "deeplab_resnest50_pcontext", "deeplab_resnest101_pcontext",
    "deeplab_resnest200_pcontext", "deeplab_resnest269_pcontext",
]
# fmt: on
GENERIC_NAMES = [
    "fcn_resnest50",
    "encnet_resnet50s",
    "deeplab_resnest50",
    "psp_resnet50s",
    "upernet_resnet50s",
    "fcfpn_resnet50s",
    "atten_resnest50",
    "danet_resnet50s",
]

# fmt: off
EXPECTED_PARAMS = {
"encnet_resnet101s_coco": 62858591,
    "fcn_resnet50s_pcontext": 33100283,
    "encnet_resnet50s_pcontext": 43915217,
    "encnet_resnet101s_pcontext": 62907345,
    "encnet_resnet50s_ade": 36164578,
    "encnet_resnet101s_ade": 55156706,
    "fcn_resnet50s_ade": 35545324,
    "psp_resnet50s_ade": 49180908,
    "fcn_resnest50_ade": 37347756,
    "deeplab_resnest50_ade": 43996588,
    "deeplab_resnest101_ade": 64788364,
    "deeplab_resnest200_ade": 86714892,
    "deeplab_resnest269_ade": 127442828,
    "fcn_resnest50_pcontext": 37277686,
    "deeplab_resnest50_pcontext": 43949814,
    "deeplab_resnest101_pcontext": 64741590,
    "deeplab_resnest200_pcontext": 86668118,
    "deeplab_resnest269_pcontext": 127396054,
    "fcn_resnest50": 37248426,
    "encnet_resnet50s": 43866463,
    "deeplab_resnest50": 43930282,
    "psp_resnet50s": 49081578,
    "upernet_resnet50s": 44229589,
    "fcfpn_resnet50s": 35312597,
    "atten_resnest50": 40443914,
    "danet_resnet50s": 47589505,
    "deepten_resnet50_minc": 26041695,
}
# fmt: on


def test_registered_names():
    names = set(list_models())
    for name in UPSTREAM_NAMES + GENERIC_NAMES + ["deepten_resnet50_minc"]:
        assert name in names, name
    assert set(S.SEGMENTATION_MODEL_NAMES) == set(UPSTREAM_NAMES + GENERIC_NAMES)


def test_presets():
    m = get_model("encnet_resnet101s_ade")
    assert (m.nclass, m.backbone, m.base_size, m.crop_size, m.aux, m.se_loss, m.lateral) == (
        150,
        "resnet101s",
        640,
        576,
        True,
        True,
        False,
    )
    m = get_model("encnet_resnet50s_pcontext")
    assert (m.nclass, m.lateral, m.base_size, m.crop_size) == (59, True, 520, 480)
    assert get_model("encnet_resnet101s_coco").lateral is True  # upstream's name rule would drop it
    assert (
        get_model("encnet_resnet101s_coco").nclass,
        get_model("fcn_resnet50s_pcontext").aux,
    ) == (21, False)
    m = get_model("deeplab_resnest269_pcontext")
    assert (type(m), m.nclass, m.backbone, m.aux, m.dilated) == (
        S.DeepLabV3,
        59,
        "resnest269",
        True,
        True,
    )
    assert (get_model("fcn_resnest50_ade").aux, get_model("psp_resnet50s_ade").nclass) == (
        True,
        150,
    )
    assert get_model("fcn_resnest50", nclass=7).nclass == 7
    assert get_model("fcn_resnest50", dataset="ade20k").nclass == 150
    assert (get_model("upernet_resnet50s").dilated, get_model("upernet_resnet50s").aux) == (
        False,
        False,
    )
    assert get_model("deepten_resnet50_minc").nclass == 23


@pytest.mark.parametrize("name", UPSTREAM_NAMES + GENERIC_NAMES + ["deepten_resnet50_minc"])
def test_param_counts(name):
    """jax.eval_shape(init): no FLOPs spent."""
    assert flax_param_count(get_model(name), jnp.zeros((1, 64, 64, 3))) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", UPSTREAM_NAMES + GENERIC_NAMES + ["deepten_resnet50_minc"])
def test_param_count_literals_match_torch(name):
    """The literals are the torch restatements' counts (random-initialised torch models, ~0.2-1 s each)."""
    assert torch_param_count(name) == EXPECTED_PARAMS[name]


# --- 3. full-model parity ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fcn_resnest50", "encnet_resnet50s", "deeplab_resnest50"])
def test_full_model_eval_parity(name):
    model = get_model(name, nclass=5)
    x = random_input((2, 64, 64, 3), seed=8)
    torch_model = torch_model_for(model)
    _, out = compare_eval(torch_model, model, [x])
    expected_len = {"fcn_resnest50": 2, "encnet_resnet50s": 3, "deeplab_resnest50": 2}[name]
    assert len(out) == expected_len


def test_deepten_eval_parity():
    model = deepten_mod.DeepTen(nclass=6)
    x = random_input((1, 64, 64, 3), seed=9)
    _, out = compare_eval(TorchDeepTen(6), model, [x])
    assert out[0].shape == (1, 6)


# --- 4./5. every model class: structure, training, bfloat16 ------------------------------------------

SMALL = {"layers": (1, 1, 1, 1)}  # a 4-block backbone keeps these checks fast
CLASSES = {
    "fcn": (S.FCN, dict(with_global=True)),
    "psp": (S.PSP, {}),
    "encnet": (S.EncNet, dict(lateral=True)),
    "deeplab": (S.DeepLabV3, {}),
    "upernet": (S.UperNet, {}),
    "fcfpn": (S.FCFPN, {}),
    "atten": (S.ATTEN, dict(se_loss=True)),
    "danet": (S.DANet, dict(aux=True)),
}
# fmt: off
EXPECTED_OUTPUTS = {"fcn": ["map", "map"], "psp": ["map", "map"], "encnet": ["map", "se", "map"],
                    "deeplab": ["map", "map"], "upernet": ["map"], "fcfpn": ["map"], "atten": ["map", "se", "map"],
                    "danet": ["map", "map", "map", "map"]}
# fmt: on


def _small_model(kind, **kw):
    cls, extra = CLASSES[kind]
    return cls(nclass=4, backbone="resnet50s", backbone_kwargs=SMALL, **{**extra, **kw})


@pytest.mark.parametrize("kind", list(CLASSES))
def test_outputs_and_training(kind):
    model = _small_model(kind)
    x = jnp.asarray(random_input((2, 32, 32, 3), seed=11))
    variables = model.init(RNGS, x)
    out = model.apply(variables, x)
    shapes = [(2, 32, 32, 4) if k == "map" else (2, 4) for k in EXPECTED_OUTPUTS[kind]]
    assert [o.shape for o in out] == shapes
    assert jnp.array_equal(model.apply(variables, x, method="evaluate"), out[0])
    out_t, updates = model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)}
    )
    assert [o.shape for o in out_t] == shapes and all(bool(jnp.all(jnp.isfinite(o))) for o in out_t)
    old, new = flatten_dict(variables["batch_stats"]), flatten_dict(updates["batch_stats"])
    assert old.keys() == new.keys()
    assert all(not np.array_equal(old[k], new[k]) for k in old if k[-1] == "mean")
    with pytest.raises(Exception, match="dropout"):
        model.apply(
            variables, x, train=True, mutable=["batch_stats"]
        )  # the dropout rng stream is required


def test_dropout_kinds():
    """Dropout2d (ASPP's 0.5, DANet's 0.1) drops whole channels of a sample; Dropout(0.1) single elements."""

    class Drop(nn.Module):
        channelwise: bool

        @nn.compact
        def __call__(self, x, train=False):
            return head_blocks.apply_dropout(x, 0.5, train, self.channelwise)

    x = jnp.ones((4, 6, 5, 32))
    for channelwise in (True, False):
        y = np.asarray(
            Drop(channelwise).apply({}, x, train=True, rngs={"dropout": jax.random.key(5)})
        )
        assert set(np.unique(y)) == {0.0, 2.0}
        per_channel = (y == 0).mean(axis=(1, 2))
        if channelwise:
            assert set(np.unique(per_channel)) == {0.0, 1.0}
        else:
            assert 0.3 < per_channel.mean() < 0.7 and len(np.unique(per_channel)) > 2
        assert np.array_equal(Drop(channelwise).apply({}, x), x)  # eval: identity


@pytest.mark.parametrize("kind", list(CLASSES) + ["deepten"])
def test_bfloat16_close_to_float32(kind):
    x = jnp.asarray(random_input((1, 32, 32, 3), seed=12))
    if kind == "deepten":
        model32 = deepten_mod.DeepTen(nclass=4)
        model16 = deepten_mod.DeepTen(nclass=4, dtype=jnp.bfloat16)
    else:
        model32, model16 = _small_model(kind), _small_model(kind, dtype=jnp.bfloat16)
    variables = model32.init(RNGS, x)
    ref = _as_list(model32.apply(variables, x))
    out = _as_list(model16.apply(variables, x))
    assert all(o.dtype == jnp.bfloat16 for o in out)
    for i, (a, e) in enumerate(zip(out, ref)):
        assert_close(a.astype(jnp.float32), e, 2e-2, what=f"{kind} output {i} bf16 vs f32")


# --- errors -------------------------------------------------------------------------------------------


def test_errors():
    x = jnp.ones((1, 32, 32, 3))
    with pytest.raises(ValueError, match="unknown model 'fcnn'"):
        S.get_segmentation_model("fcnn")
    with pytest.raises(ValueError, match="pretrained=True does not download"):
        get_model("fcn_resnest50_ade", pretrained=True)
    with pytest.raises(ValueError, match="pretrained=True does not download"):
        get_model("deepten_resnet50_minc", pretrained=True)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['lateral'\]"):
        get_model("fcn_resnest50", lateral=True)
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        get_model("fcn_resnest50", backbone="vgg16")
    with pytest.raises(ValueError, match="unknown dataset 'voc'"):
        S.get_segmentation_model("fcn", dataset="voc")
    with pytest.raises(ValueError, match="UperNet: aux=True is not supported"):
        S.UperNet(nclass=3, aux=True).init(RNGS, x)
    with pytest.raises(ValueError, match=r"FCN: expected an NHWC image batch \(B, H, W, 3\)"):
        S.FCN(nclass=3).init(RNGS, jnp.ones((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="FCN: nclass must be a positive integer"):
        S.FCN(nclass=0).init(RNGS, x)
    with pytest.raises(ValueError, match="DeepTen: unknown backbone"):
        deepten_mod.DeepTen(nclass=3, backbone="resnest50").init(RNGS, x)


def test_basic_block_backbone_and_narrow_stages():
    """jaxenc's addition: heads take their widths from the backbone (resnet18: c3 256, c4 512;
    stage_planes scale them), so small models build and run."""
    x = jnp.zeros((2, 32, 32, 3))
    model = S.EncNet(
        nclass=5,
        backbone="resnet18",
        aux=True,
        se_loss=True,
        backbone_kwargs={"layers": (1, 1, 1, 1), "stage_planes": (8, 16, 32, 64)},
    )
    variables = model.init(RNGS, x)
    assert [o.shape for o in model.apply(variables, x)] == [(2, 32, 32, 5), (2, 5), (2, 32, 32, 5)]
    params = flatten_dict(variables["params"])
    assert params[("auxlayer", "conv5", "0", "kernel")].shape == (
        3,
        3,
        32,
        8,
    )  # FCNHead(c3=32): 32 -> 32 // 4
    assert params[("head", "conv5", "0", "kernel")].shape[2] == 64  # EncHead on c4 = 64 channels
    assert params[("pretrained", "layer4", "0", "conv2", "kernel")].shape == (3, 3, 64, 64)
    for kind in ("fcn", "psp", "deeplab"):
        m = S.get_segmentation_model(kind, backbone="resnet34", nclass=3, aux=True)
        assert m.init(RNGS, x) is not None
    with pytest.raises(ValueError, match=r"stage_planes must be 4 widths"):
        S.get_backbone("resnet18", stage_planes=(8, 16))
    with pytest.raises(ValueError, match=r"stage_planes\[1\]"):
        S.get_backbone("resnet18", stage_planes=(8, 0, 16, 32))
