"""PyTorch-Encoding's segmentation evaluation protocol: multi-scale + flip + sliding window.

Upstream ``MultiEvalModule.forward`` (``encoding/models/base.py``)
for one image ``(H, W)``, restated here for any ``predict(images NHWC) -> logits NHWC`` callable:

for every ``scale`` in ``scales``:

1. ``long = int(math.ceil(base_size * scale))``; resize the image so that its long side is
   ``long`` and the other side is ``int(1.0 * short * long / longside + 0.5)`` (``h > w``: the height
   is the long side; a square image or ``w >= h``: the width), bilinear with align_corners=True.
2. Pad bottom/right to at least ``crop_size`` per side with the normalised black pixel
   ``-mean / std`` (upstream pads only what is shorter than the crop).
3. Sliding window over the padded ``(ph, pw)`` image: ``stride = int(crop_size * 2 / 3)``,
   ``grids = ceil((P - crop) / stride) + 1`` per axis, window ``h0 = i * stride``,
   ``h1 = min(h0 + crop, ph)`` (and the same for w); a window shorter than the crop is padded with
   ``-mean / std`` again; its scores, cropped back to ``(h1 - h0, w1 - w0)``, are added to
   ``[h0:h1, w0:w1]`` and a per-pixel count is incremented. (When ``long <= crop`` this is upstream's
   "pad, infer, crop back" branch: one window.) Upstream does **not** shift the last window back
   inside the image (no ``h0 = max(h1 - crop, 0)``, which is mmsegmentation's rule): the last window
   overhangs and sees padding.
4. Per window the score is ``exp(logits + flip_w(logits(flip_w(window))))`` with ``flip``, else
   ``exp(logits)`` (upstream ``module_inference``: raw logits summed, then exponentiated; no softmax).
5. Divide by the count, crop to the resized ``(height, width)``, resize to ``(H, W)`` (bilinear,
   align_corners=True) and **sum** over scales. The prediction is the argmax over classes.

Single-scale mode is ``scales=(1.0,), flip=False`` with ``base_size = max(H, W)`` (the image keeps
its size; only the pad / sliding rule applies): :func:`single_scale_scores`.

How it runs. The geometry is computed on the host, the windows of all scales of an image (all
``crop x crop``) are cut on the host from the resized image (3 channels: cheap) and sent to
``predict`` in batches of exactly ``batch_size`` (the last batch padded), so a jitted ``predict``
compiles once. Everything with the class axis stays on one device: the window scores are added into
a per-scale canvas of ``((gh - 1) * stride + crop, (gw - 1) * stride + crop)`` pixels at dynamic
offsets (it depends on the window counts only, so it compiles for a handful of shapes), and each
finished scale is resized into a score map padded up to a multiple of :data:`SIZE_BUCKET` per side,
with the crop to ``(height, width)`` folded into the resize matrices. So a dataset of images of many
sizes compiles a few small programs per size bucket, not per image. :func:`make_sharded_predict`
wraps a Flax model into a ``predict`` whose batch is split over a ``data`` mesh axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxenc.compiler_options import compiler_options
from jaxenc.constants import IMAGENET_MEAN, IMAGENET_STD
from jaxenc.nn.resample import bilinear_weights
from jaxenc.validation import check_int, check_positive_int

__all__ = [
    "DEFAULT_SCALES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SIZE_BUCKET",
    "MultiScaleEvaluator",
    "ScaleGeometry",
    "check_scales",
    "make_sharded_predict",
    "multi_scale_predict",
    "multi_scale_scores",
    "scale_geometry",
    "single_scale_scores",
]

DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
#: Score maps are computed padded to a multiple of this many pixels per side (compile-cache buckets).
SIZE_BUCKET = 64
STRIDE_RATE = 2.0 / 3.0
_HI = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------------
# argument checks


def check_scales(scales, where: str) -> tuple[float, ...]:
    """A scale or a non-empty sequence of positive finite numbers -> a tuple of floats."""
    if isinstance(scales, (int, float, np.number)) and not isinstance(scales, bool):
        scales = (scales,)
    try:
        out = tuple(scales)
    except TypeError:
        raise ValueError(
            f"{where}: scales must be a non-empty sequence of positive numbers, got {scales!r}"
        ) from None
    if not out or any(
        isinstance(s, bool)
        or not isinstance(s, (int, float, np.number))
        or not math.isfinite(s)
        or s <= 0
        for s in out
    ):
        raise ValueError(
            f"{where}: scales must be a non-empty sequence of positive numbers, got {scales!r}"
        )
    return tuple(float(s) for s in out)


def _check_mean_std(mean, std, where: str) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(mean, np.float64)
    s = np.asarray(std, np.float64)
    if m.shape != (3,) or not np.all(np.isfinite(m)):
        raise ValueError(f"{where}: mean must be 3 finite per-channel values (RGB), got {mean!r}")
    if s.shape != (3,) or not np.all(s > 0):
        raise ValueError(f"{where}: std must be 3 positive per-channel values (RGB), got {std!r}")
    return m, s


def _check_image(image, where: str) -> np.ndarray:
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(
            f"{where}: image must be one normalised (H, W, 3) float image (NHWC without the batch axis), "
            f"got shape {x.shape}"
        )
    if x.dtype.kind != "f":
        raise ValueError(
            f"{where}: image must be a normalised float image ((x / 255 - mean) / std), got dtype {x.dtype}"
        )
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{where}: image has an empty spatial size, shape {x.shape}")
    return x.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------------
# geometry (host)


@dataclasses.dataclass(frozen=True)
class ScaleGeometry:
    """Where upstream's evaluator puts one scale of an ``(H, W)`` image (all sizes in pixels).

    ``height, width``: the resized image; ``padded``: ``(ph, pw)`` after padding to the crop;
    ``grids``: windows per axis; ``stride``; ``windows``: ``(h0, w0)`` of each window, row-major;
    ``canvas``: ``((gh - 1) * stride + crop, (gw - 1) * stride + crop)``, which holds every window
    whole (the part beyond ``padded`` is never read back).
    """

    scale: float
    long_size: int
    height: int
    width: int
    crop_size: int
    stride: int
    padded: tuple[int, int]
    grids: tuple[int, int]
    windows: tuple[tuple[int, int], ...]
    canvas: tuple[int, int]

    @property
    def sliding(self) -> bool:
        """Upstream's branch: True when ``long > crop`` (sliding window), False for pad-and-crop."""
        return self.long_size > self.crop_size

    def count(self) -> np.ndarray:
        """float32 ``canvas``-shaped map: how many windows cover each pixel of the resized image
        (upstream's ``count_norm``), 0 outside ``(height, width)``."""
        c = np.zeros(self.canvas, np.float32)
        ph, pw = self.padded
        for h0, w0 in self.windows:
            c[h0 : min(h0 + self.crop_size, ph), w0 : min(w0 + self.crop_size, pw)] += 1
        c[self.height :, :] = 0
        c[:, self.width :] = 0
        return c


def scale_geometry(
    height: int, width: int, *, base_size: int, crop_size: int, scale: float
) -> ScaleGeometry:
    """Upstream's resize / pad / sliding-window geometry of one scale for an ``(height, width)`` image."""
    where = "scale_geometry"
    h = check_positive_int(height, "height", where)
    w = check_positive_int(width, "width", where)
    base_size = check_positive_int(base_size, "base_size", where)
    crop = check_int(crop_size, "crop_size", where, minimum=2)
    (scale,) = check_scales((scale,), where)
    long_size = int(math.ceil(base_size * scale))
    if h > w:
        rh, rw = long_size, int(1.0 * w * long_size / h + 0.5)
    else:
        rh, rw = int(1.0 * h * long_size / w + 0.5), long_size
    if rh < 1 or rw < 1:
        raise ValueError(
            f"{where}: scale={scale} with base_size={base_size} resizes the ({h}, {w}) image to ({rh}, {rw}), "
            "an empty size; use a larger scale or base_size"
        )
    stride = int(crop * STRIDE_RATE)
    ph, pw = max(rh, crop), max(rw, crop)
    gh = -(-(ph - crop) // stride) + 1
    gw = -(-(pw - crop) // stride) + 1
    windows = tuple((i * stride, j * stride) for i in range(gh) for j in range(gw))
    canvas = ((gh - 1) * stride + crop, (gw - 1) * stride + crop)
    return ScaleGeometry(
        scale, long_size, rh, rw, crop, stride, (ph, pw), (gh, gw), windows, canvas
    )


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's align_corners=True source taps along one axis: (i0, i1, lambda1), float32 as torch."""
    f32 = np.float32
    scale = f32(n_in - 1) / f32(n_out - 1) if n_out > 1 else f32(0)
    src = (f32(scale) * np.arange(n_out, dtype=f32)).astype(f32)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
    return i0, i1, lam


def _resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) float32 -> (height, width, C), bilinear with align_corners=True (torch's taps and
    weights, the same as :func:`jaxenc.nn.resample.bilinear_weights`); two-tap gathers on the host."""
    h, w, _ = image.shape
    if (h, w) == (height, width):
        return image
    x = image.astype(np.float32, copy=False)
    h0, h1, lh = _taps(h, height)
    w0, w1, lw = _taps(w, width)
    lw = lw[None, :, None]
    rows0, rows1 = x[h0], x[h1]
    top = rows0[:, w0] * (1 - lw) + rows0[:, w1] * lw
    bottom = rows1[:, w0] * (1 - lw) + rows1[:, w1] * lw
    lh = lh[:, None, None]
    return (top * (1 - lh) + bottom * lh).astype(np.float32)


def _bucket(n: int) -> int:
    return -(-n // SIZE_BUCKET) * SIZE_BUCKET


def _padded_resize_matrix(
    src_valid: int, src_total: int, dst_valid: int, dst_total: int
) -> np.ndarray:
    """(dst_total, src_total) float32: align-corners bilinear from the first ``src_valid`` source
    pixels to the first ``dst_valid`` outputs; zero elsewhere (crop and pad folded in)."""
    m = np.zeros((dst_total, src_total), np.float32)
    m[:dst_valid, :src_valid] = bilinear_weights(src_valid, dst_valid, True)
    return m


# ---------------------------------------------------------------------------------------------------
# device programs (module level: compiled once per shape for all evaluators)


@jax.jit
def _exp_scores(logits):
    return jnp.exp(logits.astype(jnp.float32))


@jax.jit
def _exp_flip_scores(logits, flipped_logits):
    # upstream module_inference: exp(logits + flip(logits of the flipped image)), W is axis 2 (NHWC)
    return jnp.exp(logits.astype(jnp.float32) + flipped_logits.astype(jnp.float32)[:, :, ::-1, :])


@functools.partial(jax.jit, donate_argnums=0)
def _add_window(canvas, scores, index, h0, w0):
    win = jax.lax.dynamic_index_in_dim(scores, index, axis=0, keepdims=False)
    start = (h0, w0, jnp.zeros((), h0.dtype))
    cur = jax.lax.dynamic_slice(canvas, start, win.shape)
    return jax.lax.dynamic_update_slice(canvas, cur + win, start)


@functools.partial(jax.jit, donate_argnums=0)
def _add_resized(acc, canvas, count, wh, ww):
    cnt = count[..., None]
    x = jnp.where(
        cnt > 0, canvas / jnp.maximum(cnt, 1.0), 0.0
    )  # crop: outside (height, width) is 0
    y = jnp.einsum("ih,hwc->iwc", wh, x, precision=_HI)
    return acc + jnp.einsum("jw,iwc->ijc", ww, y, precision=_HI)


@jax.jit
def _argmax(scores):
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------
# the evaluator


class MultiScaleEvaluator:
    """Upstream's ``MultiEvalModule`` for a ``predict`` callable (see the module docstring).

    Args:
      predict: ``predict(images) -> logits``: images float32 ``(batch_size, crop, crop, 3)``
        (normalised), logits ``(batch_size, crop, crop, num_classes)`` (a tuple/list: its first
        entry), numpy or jax. Called with exactly ``batch_size`` images every time.
      num_classes: the logits' last axis.
      base_size: the long side at scale 1.0 (upstream default 520).
      crop_size: window size (upstream default 480); >= 2.
      scales: positive numbers (upstream default 0.5 ... 1.75).
      flip: add the logits of the horizontally flipped window before ``exp``.
      mean, std: the normalisation of the images; padding uses ``-mean / std`` (black).
      batch_size: windows per ``predict`` call (the last batch of an image is padded).
      device: where the score maps are accumulated (default: this process's first device).
    """

    def __init__(
        self,
        predict: Callable,
        *,
        num_classes: int,
        base_size: int,
        crop_size: int,
        scales: Sequence[float] = DEFAULT_SCALES,
        flip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        batch_size: int = 8,
        device: Any = None,
    ):
        where = type(self).__name__
        if not callable(predict):
            raise TypeError(
                f"{where}: predict must be callable (images NHWC -> logits NHWC), got {type(predict).__name__}"
            )
        self.predict_fn = predict
        self.num_classes = check_positive_int(num_classes, "num_classes", where)
        self.base_size = check_positive_int(base_size, "base_size", where)
        self.crop_size = check_int(crop_size, "crop_size", where, minimum=2)
        self.scales = check_scales(scales, where)
        if not isinstance(flip, (bool, np.bool_)):
            raise ValueError(f"{where}: flip must be a bool, got {flip!r}")
        self.flip = bool(flip)
        m, s = _check_mean_std(mean, std, where)
        self.mean, self.std = tuple(float(v) for v in m), tuple(float(v) for v in s)
        self.pad_value = (-m / s).astype(np.float32)
        self.batch_size = check_positive_int(batch_size, "batch_size", where)
        self.device = jax.local_devices()[0] if device is None else device

    # -- predict wrapper

    def _window_scores(self, batch: np.ndarray) -> jax.Array:
        """exp(logits [+ flipped logits]) for one full batch, float32 on ``self.device``."""
        logits = self._logits(batch)
        if not self.flip:
            return _exp_scores(logits)
        flipped = self._logits(np.ascontiguousarray(batch[:, :, ::-1, :]))
        return _exp_flip_scores(logits, flipped)

    def _logits(self, batch: np.ndarray) -> jax.Array:
        out = self.predict_fn(batch)
        if isinstance(out, (tuple, list)):
            out = out[0]
        expected = (self.batch_size, self.crop_size, self.crop_size, self.num_classes)
        if tuple(np.shape(out)) != expected:
            raise ValueError(
                f"{type(self).__name__}: predict returned logits of shape {tuple(np.shape(out))} for images of shape "
                f"{batch.shape}; expected {expected} (batch, crop, crop, num_classes), i.e. logits at the input size"
            )
        return jax.device_put(out, self.device)

    # -- main entry points

    def padded_scores(self, image) -> tuple[jax.Array, tuple[int, int]]:
        """The summed scores as a device array padded to :data:`SIZE_BUCKET` multiples, and ``(H, W)``:
        ``scores[:H, :W]`` is :meth:`scores`. Zero outside ``(H, W)``."""
        x = _check_image(image, type(self).__name__)
        h, w, _ = x.shape
        crop = self.crop_size
        geoms = [
            scale_geometry(h, w, base_size=self.base_size, crop_size=crop, scale=s)
            for s in self.scales
        ]
        hb, wb = _bucket(h), _bucket(w)
        acc = jnp.zeros((hb, wb, self.num_classes), jnp.float32, device=self.device)

        # Every window of every scale, in scale order (row-major within a scale).
        windows: list[tuple[int, int, int]] = []  # (scale index, h0, w0)
        sources: list[np.ndarray] = []
        for k, g in enumerate(geoms):
            ext = np.empty(g.canvas + (3,), np.float32)
            ext[...] = self.pad_value
            ext[: g.height, : g.width] = _resize_image(x, g.height, g.width)
            sources.append(ext)
            windows += [(k, h0, w0) for h0, w0 in g.windows]
        last_window = {
            k: max(i for i, win in enumerate(windows) if win[0] == k) for k in range(len(geoms))
        }

        canvases: dict[int, jax.Array] = {}
        bs = self.batch_size
        for start in range(0, len(windows), bs):
            chunk = windows[start : start + bs]
            batch = np.zeros((bs, crop, crop, 3), np.float32)
            for j, (k, h0, w0) in enumerate(chunk):
                batch[j] = sources[k][h0 : h0 + crop, w0 : w0 + crop]
            scores = self._window_scores(batch)
            for j, (k, h0, w0) in enumerate(chunk):
                if k not in canvases:
                    canvases[k] = jnp.zeros(
                        geoms[k].canvas + (self.num_classes,), jnp.float32, device=self.device
                    )
                canvases[k] = _add_window(
                    canvases[k], scores, np.int32(j), np.int32(h0), np.int32(w0)
                )
                if start + j == last_window[k]:
                    acc = self._finish_scale(acc, canvases.pop(k), geoms[k], (h, w), (hb, wb))
        return acc, (h, w)

    def _finish_scale(self, acc, canvas, g: ScaleGeometry, size, bucket):
        wh = _padded_resize_matrix(g.height, g.canvas[0], size[0], bucket[0])
        ww = _padded_resize_matrix(g.width, g.canvas[1], size[1], bucket[1])
        put = functools.partial(jax.device_put, device=self.device)
        return _add_resized(acc, canvas, put(g.count()), put(wh), put(ww))

    def scores(self, image) -> np.ndarray:
        """float32 ``(H, W, num_classes)``: Σ over scales of the resized exp-score maps."""
        acc, (h, w) = self.padded_scores(image)
        return np.asarray(acc)[:h, :w]

    def predict(self, image) -> np.ndarray:
        """int32 ``(H, W)``: argmax over classes of :meth:`scores`."""
        acc, (h, w) = self.padded_scores(image)
        return np.asarray(_argmax(acc))[:h, :w]

    __call__ = scores


# ---------------------------------------------------------------------------------------------------
# functional API


def multi_scale_scores(
    predict: Callable,
    image,
    *,
    num_classes: int,
    base_size: int,
    crop_size: int,
    scales: Sequence[float] = DEFAULT_SCALES,
    flip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    batch_size: int = 8,
) -> np.ndarray:
    """Upstream ``MultiEvalModule(...)(image)`` for one normalised float32 ``(H, W, 3)`` image:
    float32 ``(H, W, num_classes)`` scores summed over ``scales`` (see :class:`MultiScaleEvaluator`)."""
    return MultiScaleEvaluator(
        predict,
        num_classes=num_classes,
        base_size=base_size,
        crop_size=crop_size,
        scales=scales,
        flip=flip,
        mean=mean,
        std=std,
        batch_size=batch_size,
    ).scores(image)


def multi_scale_predict(predict: Callable, image, **options: Any) -> np.ndarray:
    """int32 ``(H, W)`` argmax of :func:`multi_scale_scores` (same keyword-only ``options``)."""
    return MultiScaleEvaluator(predict, **options).predict(image)


def single_scale_scores(
    predict: Callable,
    image,
    *,
    num_classes: int,
    crop_size: int,
    flip: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    batch_size: int = 8,
) -> np.ndarray:
    """Single scale at the image's own size: :func:`multi_scale_scores` with ``scales=(1.0,)`` and
    ``base_size = max(H, W)`` (no resize). Images no larger than the crop are padded and inferred once;
    larger ones go through the sliding window. ``flip`` defaults to False."""
    x = _check_image(image, "single_scale_scores")
    return multi_scale_scores(
        predict,
        x,
        num_classes=num_classes,
        base_size=max(x.shape[:2]),
        crop_size=crop_size,
        scales=(1.0,),
        flip=flip,
        mean=mean,
        std=std,
        batch_size=batch_size,
    )


# ---------------------------------------------------------------------------------------------------
# Flax model -> sharded predict


def make_sharded_predict(
    model,
    variables,
    *,
    mesh: jax.sharding.Mesh | None = None,
    axis: str = "data",
    apply_kwargs: dict | None = None,
) -> Callable[[Any], jax.Array]:
    """A jitted ``predict(images NHWC) -> logits NHWC`` for a Flax model, batch split over ``axis``.

    Args:
      model: a Flax module; called as ``model.apply(variables, images, **apply_kwargs)``
        (default ``train=False``). A tuple/list output (segmentation models: main logits first)
        gives its first entry.
      variables: the model's variables (``{"params": ..., "batch_stats": ...}``); replicated.
      mesh: a mesh with an ``axis`` axis; default a 1-D ``data`` mesh over this process's local
        devices (so each process of a multi-process job evaluates its own images on its own devices).
      apply_kwargs: keyword arguments of ``apply``.
    Returns:
      ``predict(images)``: images (B, H, W, 3) numpy or jax; B is padded with zeros to a multiple of
      the number of devices along ``axis`` and the padding rows are dropped from the result. The
      logits are a ``jax.Array`` sharded over ``axis`` (``NamedSharding(mesh, P(axis))``).
    """
    if mesh is None:
        devices = np.asarray(jax.local_devices())
        try:
            mesh = jax.sharding.Mesh(devices, (axis,), axis_types=(jax.sharding.AxisType.Auto,))
        except (AttributeError, TypeError):  # older jax without axis types
            mesh = jax.sharding.Mesh(devices, (axis,))
    if axis not in mesh.axis_names:
        raise ValueError(
            f"make_sharded_predict: axis {axis!r} is not an axis of the mesh {mesh.axis_names}"
        )
    n = int(mesh.shape[axis])
    kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
    replicated = NamedSharding(mesh, P())
    split = NamedSharding(mesh, P(axis))
    variables = jax.device_put(variables, replicated)

    def apply(v, x):
        out = model.apply(v, x, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    jitted = jax.jit(
        apply,
        in_shardings=(replicated, split),
        out_shardings=split,
        compiler_options=compiler_options(mesh.devices.flat[0].platform),
    )

    def predict(images):
        b = int(np.shape(images)[0])
        pad = (-b) % n
        if pad:
            if isinstance(images, jax.Array):
                images = jnp.concatenate(
                    [images, jnp.zeros((pad,) + images.shape[1:], images.dtype)]
                )
            else:
                images = np.concatenate(
                    [np.asarray(images), np.zeros((pad,) + np.shape(images)[1:], np.float32)]
                )
        logits = jitted(variables, jax.device_put(images, split))
        return logits[:b] if pad else logits

    predict.mesh = mesh
    predict.num_devices = n
    return predict
