"""jaxenc.models.multi_eval against a numpy restatement of upstream ``MultiEvalModule.forward``.

The reference below follows ``encoding/models/base.py`` line by line (NCHW, one image, float32):
``resize_image`` (its own align_corners bilinear, checked against torch), ``pad_image`` with
``-mean/std``, the pad-and-crop branch, the sliding window (``h0 = idh * stride``,
``h1 = min(h0 + crop, ph)``, window padded to the crop), ``module_inference``
(``exp(out + flip(out(flip(x))))``), division by ``count_norm`` and the sum over scales. Both sides
call the same small fixed Flax net (stride 2, bilinear upsampling back to the input) as a black box.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice import run_with_cpu_devices
from optional_torch import torch

from jaxenc.models import multi_eval
from jaxenc.models.multi_eval import (
    MultiScaleEvaluator,
    make_sharded_predict,
    multi_scale_predict,
    multi_scale_scores,
    scale_geometry,
    single_scale_scores,
)
from jaxenc.nn.resample import interpolate_bilinear

NUM_CLASSES = 5
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class TinySegNet(nn.Module):
    """Output stride 2, then align-corners upsampling to the input: position-dependent logits."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False):
        h, w = x.shape[1:3]
        y = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), padding=1)(x))
        y = nn.Conv(8, (3, 3), padding=1)(y)
        y = nn.Conv(self.num_classes, (1, 1))(nn.relu(y))
        return (interpolate_bilinear(y, (h, w), align_corners=True), jnp.mean(y, axis=(1, 2)))


@pytest.fixture(scope="module")
def net():
    model = TinySegNet()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 24, 24, 3)))
    apply = jax.jit(lambda x: model.apply(variables, x)[0])
    return model, variables, apply


# ----------------------------------------------------------------------------------------------------
# numpy restatement of upstream (NCHW, batch 1)


def np_resize_ac(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """F.interpolate(x, (oh, ow), mode='bilinear', align_corners=True) for (C, H, W), float32."""
    _, ih, iw = x.shape

    def taps(n_in, n_out):
        scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0)
        src = scale * np.arange(n_out, dtype=np.float32)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = (src - i0).astype(np.float32)
        return i0, i1, lam

    h0, h1, lh = taps(ih, oh)
    w0, w1, lw = taps(iw, ow)
    top = x[:, h0][:, :, w0] * (1 - lw) + x[:, h0][:, :, w1] * lw
    bot = x[:, h1][:, :, w0] * (1 - lw) + x[:, h1][:, :, w1] * lw
    return (top * (1 - lh)[:, None] + bot * lh[:, None]).astype(np.float32)


def np_pad_image(img, mean, std, crop):
    c, h, w = img.shape
    padh = crop - h if h < crop else 0
    padw = crop - w if w < crop else 0
    values = -np.asarray(mean) / np.asarray(std)
    out = np.empty((c, h + padh, w + padw), np.float32)
    for i in range(c):
        out[i] = np.pad(img[i], ((0, padh), (0, padw)), constant_values=values[i])
    return out


def np_module_inference(apply, img_chw, flip):
    def evaluate(x):
        return np.asarray(apply(x.transpose(1, 2, 0)[None]))[0].transpose(2, 0, 1)

    out = evaluate(img_chw)
    if flip:
        out = out + evaluate(img_chw[:, :, ::-1].copy())[:, :, ::-1]
    return np.exp(out)


def np_multi_eval(
    apply, image_hwc, *, nclass, base_size, crop_size, scales, flip, mean=MEAN, std=STD
):
    image = image_hwc.transpose(2, 0, 1).astype(np.float32)
    _, h, w = image.shape
    stride = int(crop_size * (2.0 / 3.0))
    scores = np.zeros((nclass, h, w), np.float32)
    for scale in scales:
        long_size = int(math.ceil(base_size * scale))
        if h > w:
            height, width = long_size, int(1.0 * w * long_size / h + 0.5)
            short_size = width
        else:
            width, height = long_size, int(1.0 * h * long_size / w + 0.5)
            short_size = height
        cur = np_resize_ac(image, height, width)
        if long_size <= crop_size:
            pad = np_pad_image(cur, mean, std, crop_size)
            outputs = np_module_inference(apply, pad, flip)[:, :height, :width]
        else:
            pad = np_pad_image(cur, mean, std, crop_size) if short_size < crop_size else cur
            _, ph, pw = pad.shape
            h_grids = int(math.ceil(1.0 * (ph - crop_size) / stride)) + 1
            w_grids = int(math.ceil(1.0 * (pw - crop_size) / stride)) + 1
            outputs = np.zeros((nclass, ph, pw), np.float32)
            count = np.zeros((1, ph, pw), np.float32)
            for idh in range(h_grids):
                for idw in range(w_grids):
                    h0, w0 = idh * stride, idw * stride
                    h1, w1 = min(h0 + crop_size, ph), min(w0 + crop_size, pw)
                    crop_img = np_pad_image(pad[:, h0:h1, w0:w1], mean, std, crop_size)
                    out = np_module_inference(apply, crop_img, flip)
                    outputs[:, h0:h1, w0:w1] += out[:, : h1 - h0, : w1 - w0]
                    count[:, h0:h1, w0:w1] += 1
            assert (count == 0).sum() == 0
            outputs = (outputs / count)[:, :height, :width]
        scores += np_resize_ac(outputs, h, w)
    return scores.transpose(1, 2, 0)


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (h, w, 3)).astype(np.float32)
    return ((raw / 255 - np.asarray(MEAN)) / np.asarray(STD)).astype(np.float32)


def _max_rel(a, b):
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


# ----------------------------------------------------------------------------------------------------
# the resize used by both sides


@pytest.mark.parametrize(
    "src,dst", [((37, 53), (21, 30)), ((13, 9), (40, 27)), ((5, 7), (1, 7)), ((8, 8), (8, 8))]
)
def test_resizes_match_torch_align_corners(src, dst):
    x = np.random.default_rng(1).standard_normal((4,) + src).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x)[None], dst, mode="bilinear", align_corners=True
    )[0].numpy()
    np.testing.assert_allclose(np_resize_ac(x, *dst), ref, rtol=1e-6, atol=1e-6)
    ours = multi_eval._resize_image(x.transpose(1, 2, 0), *dst).transpose(2, 0, 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# the protocol against the restatement

CASES = {
    # non-square (w > h): 0.5 -> long 20 <= crop (pad branch); 0.75 -> long 30, short 21 < crop (sliding +
    # padded short side); 1.75 -> long 70 (3 x 2 windows, the last overhanging); batch 3 leaves a partial batch
    "wide_all_scales_flip": dict(
        hw=(37, 53), base=40, crop=24, scales=multi_eval.DEFAULT_SCALES, flip=True, bs=3
    ),
    "wide_all_scales_noflip": dict(
        hw=(37, 53), base=40, crop=24, scales=multi_eval.DEFAULT_SCALES, flip=False, bs=5
    ),
    # tall (h > w): the height is the long side
    "tall_flip": dict(hw=(61, 29), base=36, crop=20, scales=(0.5, 1.0, 1.75), flip=True, bs=4),
    # square, everything fits in one padded window
    "square_pad_only": dict(
        hw=(16, 16), base=16, crop=24, scales=(0.75, 1.0, 1.25), flip=True, bs=2
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy_restatement(net, name):
    c = CASES[name]
    image = _image(*c["hw"], seed=len(name))
    kw = dict(
        num_classes=NUM_CLASSES,
        base_size=c["base"],
        crop_size=c["crop"],
        scales=c["scales"],
        flip=c["flip"],
    )
    _, _, apply = net
    ref = np_multi_eval(
        apply,
        image,
        nclass=NUM_CLASSES,
        base_size=c["base"],
        crop_size=c["crop"],
        scales=c["scales"],
        flip=c["flip"],
    )
    got = multi_scale_scores(apply, image, mean=MEAN, std=STD, batch_size=c["bs"], **kw)
    assert got.shape == image.shape[:2] + (NUM_CLASSES,) and got.dtype == np.float32
    assert _max_rel(got, ref) < 1e-5, _max_rel(got, ref)
    pred = multi_scale_predict(apply, image, mean=MEAN, std=STD, batch_size=c["bs"], **kw)
    assert pred.dtype == np.int32
    np.testing.assert_array_equal(pred, np.argmax(ref, axis=-1))


def test_branches_exercised():
    """The cases above hit both upstream branches, padded short sides and overhanging windows."""
    g = scale_geometry(37, 53, base_size=40, crop_size=24, scale=0.5)
    assert (g.height, g.width, g.sliding, g.grids) == (14, 20, False, (1, 1))
    g = scale_geometry(37, 53, base_size=40, crop_size=24, scale=0.75)
    assert (g.height, g.width, g.padded, g.sliding, g.grids) == (21, 30, (24, 30), True, (1, 2))
    g = scale_geometry(37, 53, base_size=40, crop_size=24, scale=1.75)
    assert (g.height, g.width, g.grids, g.stride) == (49, 70, (3, 4), 16)
    assert (
        g.windows[-1] == (32, 48) and g.windows[-1][1] + 24 > g.padded[1]
    )  # overhangs: padded window
    # ADE-sized example with upstream's defaults: 512 x 683 at scale 1.0 -> 390 x 520, 1 x 2 windows
    g = scale_geometry(512, 683, base_size=520, crop_size=480, scale=1.0)
    assert (g.height, g.width, g.padded, g.grids, g.stride) == (390, 520, (480, 520), (1, 2), 320)
    assert g.count()[:390, :520].min() == 1 and g.count()[:, 320:480].max() == 2


def test_single_scale_is_scale_one_at_own_size(net):
    _, _, apply = net
    for hw in ((20, 23), (45, 31)):  # fits the crop (pad) / needs the sliding window
        image = _image(*hw, seed=3)
        got = single_scale_scores(
            apply, image, num_classes=NUM_CLASSES, crop_size=24, mean=MEAN, std=STD, batch_size=2
        )
        ref = np_multi_eval(
            apply,
            image,
            nclass=NUM_CLASSES,
            base_size=max(hw),
            crop_size=24,
            scales=(1.0,),
            flip=False,
        )
        assert _max_rel(got, ref) < 1e-5


def test_sharded_predict_and_evaluator(net):
    model, variables, apply = net
    predict = make_sharded_predict(model, variables)
    x = jnp.asarray(np.stack([_image(24, 24, seed=s) for s in range(3)]))
    np.testing.assert_allclose(np.asarray(predict(x)), np.asarray(apply(x)), rtol=1e-6, atol=1e-6)
    image = _image(30, 41, seed=7)
    kw = dict(
        num_classes=NUM_CLASSES,
        base_size=40,
        crop_size=24,
        scales=(0.5, 1.0, 1.5),
        flip=True,
        mean=MEAN,
        std=STD,
        batch_size=3,
    )
    ev = MultiScaleEvaluator(predict, **kw)
    ref = np_multi_eval(
        apply,
        image,
        nclass=NUM_CLASSES,
        base_size=40,
        crop_size=24,
        scales=(0.5, 1.0, 1.5),
        flip=True,
    )
    assert _max_rel(ev.scores(image), ref) < 1e-5
    padded, size = ev.padded_scores(image)
    assert size == (30, 41) and padded.shape == (64, 64, NUM_CLASSES)
    assert float(jnp.abs(padded[30:]).max()) == 0.0 and float(jnp.abs(padded[:, 41:]).max()) == 0.0


_SHARDED_BODY = """
if True:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxenc.models.multi_eval import make_sharded_predict, multi_scale_scores
    from test_multi_eval import NUM_CLASSES, TinySegNet, _image

    assert jax.local_device_count() == 2
    model = TinySegNet()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 24, 24, 3)))
    predict = make_sharded_predict(model, variables)
    x = np.stack([_image(24, 24, seed=s) for s in range(3)])  # 3 rows: padded to 4 for 2 devices
    out = predict(x)
    assert out.shape == (3, 24, 24, NUM_CLASSES)
    ref = model.apply(variables, jnp.asarray(x))[0]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
    full = predict(np.concatenate([x, x[:1]]))
    assert len(full.sharding.device_set) == 2
    image = _image(30, 41, seed=7)
    kw = dict(num_classes=NUM_CLASSES, base_size=40, crop_size=24, scales=(0.5, 1.5), flip=True, batch_size=3)
    a = multi_scale_scores(predict, image, **kw)
    b = multi_scale_scores(jax.jit(lambda v: model.apply(variables, v)[0]), image, **kw)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    print("ok")
"""


@pytest.mark.multidevice
def test_sharded_predict_two_devices():
    assert "ok" in run_with_cpu_devices(2, _SHARDED_BODY, timeout=180)


# ----------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "image,kwargs,match",
    [
        (np.zeros((1, 8, 8, 3), np.float32), {}, "image"),
        (np.zeros((8, 8), np.float32), {}, "image"),
        (np.zeros((8, 8, 3), np.uint8), {}, "image"),
        (np.zeros((8, 0, 3), np.float32), {}, "image"),
        (np.zeros((8, 8, 3), np.float32), {"base_size": 0}, "base_size"),
        (np.zeros((8, 8, 3), np.float32), {"crop_size": -4}, "crop_size"),
        (np.zeros((8, 8, 3), np.float32), {"crop_size": 1}, "crop_size"),
        (np.zeros((8, 8, 3), np.float32), {"scales": ()}, "scales"),
        (np.zeros((8, 8, 3), np.float32), {"scales": (1.0, -0.5)}, "scales"),
        (np.zeros((8, 8, 3), np.float32), {"num_classes": 0}, "num_classes"),
        (np.zeros((8, 8, 3), np.float32), {"batch_size": 0}, "batch_size"),
        (np.zeros((8, 8, 3), np.float32), {"std": (0.2, 0.0, 0.2)}, "std"),
        (np.zeros((8, 800, 3), np.float32), {"scales": (0.01,)}, "scale"),
    ],
)
def test_bad_input_raises_value_error(net, image, kwargs, match):
    _, _, apply = net
    kw = dict(
        num_classes=NUM_CLASSES, base_size=16, crop_size=8, scales=(1.0,), flip=False, batch_size=2
    )
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        multi_scale_scores(apply, image, **kw)


def test_wrong_logits_shape_is_named(net):
    _, _, apply = net
    with pytest.raises(ValueError, match="predict returned logits of shape"):
        multi_scale_scores(
            lambda x: apply(x)[..., :3],
            _image(8, 8),
            num_classes=NUM_CLASSES,
            base_size=8,
            crop_size=8,
            scales=(1.0,),
        )
