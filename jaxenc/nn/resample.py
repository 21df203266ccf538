"""Torch-compatible spatial resampling on NHWC tensors: bilinear interpolation, adaptive and fixed
average pooling, max pooling.

This is the one place in jaxenc that reproduces ``torch.nn.functional.interpolate(mode='bilinear')``,
``adaptive_avg_pool2d`` and ``avg_pool2d``. ``jax.image.resize`` uses half-pixel centres only and has
no align_corners mode, and torch's adaptive pooling bins overlap for sizes that do not divide
(upstream models resize with align_corners=True), so neither has a drop-in JAX equivalent.

Every operation is separable over H and W. The per-axis weights are built in numpy from the static
shapes (torch's index and weight formulas, float32 where torch computes in float32) and applied as
two small matrix products, so there are no gathers and the backward pass is another pair of matrix
products. Fixed-window average pooling is a windowed sum (``lax.reduce_window``) times a static
divisor map: its windows are local, so a dense (H_out x H) matrix would waste work.

Symbolic sizes (``jax.export`` shape polymorphism, e.g. ``jax.export.symbolic_shape("b, 32*h, 32*w")``):
the same formulas are evaluated with ``jnp`` from ``lax.iota`` inside the traced program, in float32
(without align_corners the source coordinate then takes two roundings where the numpy path takes
one, a difference of at most one float32 ulp in the coordinate). Output sizes that depend on the
input (pooling windows, ``scale_factor``) must be decidable from the symbolic shape, e.g. sizes that
are multiples of the strides; otherwise a ValueError says so.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxenc.kernels.involution_op import strided_taps
from jaxenc.validation import check_rank, split_pair, to_pair

__all__ = [
    "interpolate_bilinear",
    "adaptive_avg_pool2d",
    "avg_pool2d",
    "max_pool2d",
    "bilinear_weights",
    "adaptive_pool_weights",
]

_NHWC = "N, H, W, C"


# --- per-axis weight matrices ---------------------------------------------------------------------


def bilinear_weights(
    in_size: int, out_size: int, align_corners: bool, scale_factor: float | None = None
) -> np.ndarray:
    """(out_size, in_size) float32 matrix of torch's 1-D linear interpolation along one axis.

    Row ``i`` holds the two taps of output ``i``. The source coordinate follows torch's
    ``area_pixel_compute_source_index`` in float32: ``i * (in - 1) / (out - 1)`` with align_corners,
    else ``(i + 0.5) * scale - 0.5`` clamped at 0, with ``scale = in / out`` or, when the caller gave a
    ``scale_factor``, ``1 / scale_factor`` (torch's rule when recompute_scale_factor is not set).
    """
    f32 = np.float32
    dst = np.arange(out_size, dtype=np.int64)
    if align_corners:
        scale = f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0)
        src = f32(scale) * dst.astype(f32)
    else:
        scale = f32(1.0 / scale_factor) if scale_factor else f32(in_size) / f32(out_size)
        # torch's compiled kernel fuses this multiply-add (one rounding); float64 is exact for it.
        src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(f32)
        src = np.maximum(src, f32(0))
    src = src.astype(f32)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam1 = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
    lam0 = (f32(1) - lam1).astype(f32)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w = np.zeros((out_size, in_size), np.float32)
    np.add.at(w, (dst, i0), lam0)
    np.add.at(w, (dst, i1), lam1)
    return w


def adaptive_pool_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 averaging matrix with torch's adaptive-pooling bins.

    Bin ``i`` covers ``[floor(i * in / out), ceil((i + 1) * in / out))``; neighbouring bins overlap
    when ``out`` does not divide ``in``.
    """
    w = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        w[i, start:end] = 1.0 / (end - start)
    return w.astype(np.float32)


def _is_static(*dims) -> bool:
    """True when no dimension is a ``jax.export`` symbolic expression."""
    return not any(jax.export.is_symbolic_dim(d) for d in dims)


def _dim_value(d) -> jax.Array:
    """A (possibly symbolic) dimension as an int32 scalar of the traced program."""
    return jnp.asarray(d, jnp.int32)


def _rows_cols(out_size, in_size) -> tuple[jax.Array, jax.Array]:
    """int32 (out, 1) row and (1, in) column indices; the sizes may be symbolic."""
    rows = lax.broadcasted_iota(jnp.int32, (out_size, 1), 0)
    cols = lax.broadcasted_iota(jnp.int32, (1, in_size), 1)
    return rows, cols


def _bilinear_weights_traced(in_size, out_size, align_corners: bool, scale_factor) -> jax.Array:
    """:func:`bilinear_weights` built in the traced program, for symbolic sizes (float32 throughout)."""
    f32 = jnp.float32
    rows, cols = _rows_cols(out_size, in_size)
    n_in = _dim_value(in_size)
    dst = rows.astype(f32)
    if align_corners:
        n_out = _dim_value(out_size)
        ratio = (n_in - 1).astype(f32) / jnp.maximum(n_out - 1, 1).astype(f32)
        src = jnp.where(n_out > 1, ratio, f32(0)) * dst
    else:
        scale = (
            f32(1.0 / scale_factor)
            if scale_factor
            else n_in.astype(f32) / _dim_value(out_size).astype(f32)
        )
        src = jnp.maximum(scale * (dst + f32(0.5)) - f32(0.5), f32(0))
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), n_in - 1)
    lam1 = jnp.clip(src - i0.astype(f32), f32(0), f32(1))
    i1 = jnp.minimum(i0 + 1, n_in - 1)
    zero = jnp.zeros((), f32)
    return jnp.where(cols == i0, f32(1) - lam1, zero) + jnp.where(cols == i1, lam1, zero)


def _adaptive_pool_weights_traced(in_size, out_size) -> jax.Array:
    """:func:`adaptive_pool_weights` built in the traced program, for symbolic sizes."""
    rows, cols = _rows_cols(out_size, in_size)
    n_in, n_out = _dim_value(in_size), _dim_value(out_size)
    # Non-negative operands: lax.div (truncating) is floor division here, and stays one primitive
    # (jnp's // is a nested jit, which jax2onnx 0.17.1 cannot lower on jax 0.12).
    start = lax.div(rows * n_in, n_out)
    end = lax.div((rows + 1) * n_in + n_out - 1, n_out)
    inside = (cols >= start) & (cols < end)
    return jnp.where(inside, 1.0 / (end - start).astype(jnp.float32), jnp.zeros((), jnp.float32))


def _axis_weights(in_size, out_size, static_fn, traced_fn, *args):
    """The per-axis matrix, None for the identity: numpy from static sizes, jnp from symbolic ones
    (where only provably equal sizes are skipped as the identity)."""
    if _is_static(in_size, out_size):
        return _identity_or(static_fn(in_size, out_size, *args))
    if in_size == out_size:
        return None
    return traced_fn(in_size, out_size, *args)


def _apply_separable(x: jax.Array, wh: np.ndarray | None, ww: np.ndarray | None) -> jax.Array:
    """y[n, i, j, c] = sum_{h, w} wh[i, h] ww[j, w] x[n, h, w, c]; ``None`` skips an axis (identity).

    Computed in float32 (bfloat16 inputs are promoted; the result has the input dtype) at HIGHEST
    precision so that GPUs do not round the operands to TF32. The axis whose contraction shrinks the
    tensor more goes first.
    """
    dtype = x.dtype
    acc = jnp.promote_types(dtype, jnp.float32)
    y = x.astype(acc)
    hi = jax.lax.Precision.HIGHEST

    def along_h(v):
        return (
            v if wh is None else jnp.einsum("ih,nhwc->niwc", jnp.asarray(wh, acc), v, precision=hi)
        )

    def along_w(v):
        return (
            v if ww is None else jnp.einsum("jw,nhwc->nhjc", jnp.asarray(ww, acc), v, precision=hi)
        )

    _, h, w, _ = x.shape
    ho = h if wh is None else wh.shape[0]
    wo = w if ww is None else ww.shape[0]
    # Multiply-adds per (n, c): H first costs ho*h*w + ho*w*wo, W first h*w*wo + ho*h*wo. With
    # symbolic sizes the costs cannot be compared: H first (equal costs for square inputs).
    if not _is_static(h, w, ho, wo) or ho * h * w + ho * w * wo <= h * w * wo + ho * h * wo:
        y = along_w(along_h(y))
    else:
        y = along_h(along_w(y))
    return y.astype(dtype)


def _identity_or(w: np.ndarray) -> np.ndarray | None:
    """None when ``w`` is the identity (resampling to the same size leaves that axis unchanged)."""
    if w.shape[0] == w.shape[1] and np.array_equal(w, np.eye(w.shape[0], dtype=w.dtype)):
        return None
    return w


def _check_size_pair(value, name: str, where: str, allow_none: bool = False) -> tuple:
    pair = split_pair(value, name, where, "a pair (H, W)")
    for v in pair:
        if (v is None and allow_none) or jax.export.is_symbolic_dim(v):
            continue  # a symbolic dimension is >= 1 by construction
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            what = (
                "positive ints (or None to keep that input size)" if allow_none else "positive ints"
            )
            raise ValueError(f"{where}: {name} must be an int or a pair of {what}, got {value!r}")
    return pair


# --- public functions -----------------------------------------------------------------------------


def _scaled_size(size, scale: float, where: str):
    """torch's output size ``floor(size * scale)``; a symbolic ``size`` needs an integer ``scale``."""
    if _is_static(size):
        return math.floor(size * float(scale))
    if float(scale).is_integer():
        return size * int(scale)
    raise ValueError(
        f"{where}: scale_factor={scale!r} with a symbolic input size {size} has no symbolic output "
        "size (floor of a fraction); give size= or an integer scale_factor"
    )


def interpolate_bilinear(
    x: jax.Array,
    size: int | Sequence[int] | None = None,
    align_corners: bool = True,
    scale_factor: float | Sequence[float] | None = None,
) -> jax.Array:
    """``F.interpolate(x, size, mode='bilinear', align_corners=...)`` on an NHWC tensor.

    Bilinear resizing as in PyTorch; PyTorch-Encoding's models use ``align_corners=True``
    (PyTorch-Encoding's models resize this way), which maps the corner pixels of input and output onto each other.
    ``align_corners=False`` uses half-pixel centres and matches torch's (not jax.image's) border
    handling.

    Args:
      x: (N, H, W, C).
      size: output (H_out, W_out), or an int for both. Exactly one of ``size`` and ``scale_factor``.
      align_corners: torch's flag (default True here: the PyTorch-Encoding convention; torch's own
        default is False).
      scale_factor: float or (float, float); output size ``floor(H * s)`` and, without
        align_corners, source coordinates scaled by ``1 / s`` as torch does.
    Returns:
      (N, H_out, W_out, C) in the dtype of ``x`` (computed in float32).
    """
    where = "interpolate_bilinear"
    x = jnp.asarray(x)
    check_rank(x, 4, _NHWC, where)
    if not isinstance(align_corners, (bool, np.bool_)):
        raise TypeError(f"{where}: align_corners must be a bool, got {align_corners!r}")
    _, h, w, _ = x.shape
    if (size is None) == (scale_factor is None):
        raise ValueError(
            f"{where}: give exactly one of size and scale_factor, got size={size!r}, scale_factor={scale_factor!r}"
        )
    if size is not None:
        ho, wo = _check_size_pair(size, "size", where)
        scales = (None, None)
    else:
        scales = (
            tuple(scale_factor)
            if isinstance(scale_factor, Sequence)
            else (scale_factor, scale_factor)
        )
        if len(scales) != 2 or any(
            isinstance(s, bool) or not isinstance(s, (int, float)) or s <= 0 for s in scales
        ):
            raise ValueError(
                f"{where}: scale_factor must be a positive number or a pair of them, got {scale_factor!r}"
            )
        ho, wo = _scaled_size(h, scales[0], where), _scaled_size(w, scales[1], where)
        if _is_static(ho, wo) and (ho < 1 or wo < 1):
            raise ValueError(
                f"{where}: scale_factor={scale_factor!r} gives an empty output ({ho}, {wo}) for input size ({h}, {w})"
            )
    if _is_static(h, w) and (h < 1 or w < 1):
        raise ValueError(f"{where}: the input has an empty spatial size, shape {tuple(x.shape)}")
    align = bool(align_corners)
    wh = _axis_weights(h, ho, bilinear_weights, _bilinear_weights_traced, align, scales[0])
    ww = _axis_weights(w, wo, bilinear_weights, _bilinear_weights_traced, align, scales[1])
    return _apply_separable(x, wh, ww)


def adaptive_avg_pool2d(x: jax.Array, output_size: int | Sequence[int | None]) -> jax.Array:
    """``F.adaptive_avg_pool2d(x, output_size)`` on an NHWC tensor.

    Output cell (i, j) averages rows ``[floor(i H / H_out), ceil((i + 1) H / H_out))`` and the
    matching columns: torch's bins, which overlap when H_out does not divide H (PSPNet's 1/2/3/6
    pyramid, Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017).

    Args:
      x: (N, H, W, C).
      output_size: int or (H_out, W_out); a None entry keeps that input size.
    Returns:
      (N, H_out, W_out, C) in the dtype of ``x`` (averaged in float32).
    """
    where = "adaptive_avg_pool2d"
    x = jnp.asarray(x)
    check_rank(x, 4, _NHWC, where)
    _, h, w, _ = x.shape
    if _is_static(h, w) and (h < 1 or w < 1):
        raise ValueError(f"{where}: the input has an empty spatial size, shape {tuple(x.shape)}")
    ho, wo = _check_size_pair(output_size, "output_size", where, allow_none=True)
    ho = h if ho is None else ho
    wo = w if wo is None else wo
    traced = _adaptive_pool_weights_traced
    return _apply_separable(
        x,
        _axis_weights(h, ho, adaptive_pool_weights, traced),
        _axis_weights(w, wo, adaptive_pool_weights, traced),
    )


def _pool_axis(
    size,
    k: int,
    s: int,
    p: int,
    ceil_mode: bool,
    count_include_pad: bool,
    where: str,
    axis: str,
):
    """Output length, high-side padding and per-output divisor of torch's avg_pool along one axis.

    ``size`` may be symbolic: the output length is then symbolic too, the padding must still come out
    as an int (it does when the stride divides the size) and the divisor is built in the program.
    """
    try:
        out = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
        # torch: the last window must start inside the input or its left padding.
        if ceil_mode and (out - 1) * s >= size + p:
            out -= 1
        too_small = out < 1
        pad_hi = max(0, (out - 1) * s + k - size - p)
    except jax.errors.InconclusiveDimensionOperation:
        too_small, pad_hi = False, None
    if pad_hi is None or not _is_static(pad_hi):
        raise ValueError(
            f"{where}: the output {axis} for the symbolic input {axis} {size} (kernel_size={k}, "
            f"stride={s}, padding={p}, ceil_mode={ceil_mode}) is not decidable; export with a symbolic "
            f"{axis} that is a multiple of the stride (e.g. 32*h)"
        )
    if too_small:
        raise ValueError(
            f"{where}: output {axis} would be {out} (input {axis}={size}, kernel_size={k}, stride={s}, padding={p}); "
            "the input is too small"
        )
    if _is_static(size, out):
        starts = np.arange(out) * s - p
        ends_padded = np.minimum(starts + k, size + p)
        lo, hi = np.maximum(starts, 0), np.minimum(ends_padded, size)
        divisor = ends_padded - starts if count_include_pad else hi - lo
        return out, pad_hi, divisor.astype(np.float64)
    starts = lax.iota(jnp.int32, out) * s - p
    ends_padded = jnp.minimum(starts + k, _dim_value(size) + p)
    lo, hi = jnp.maximum(starts, 0), jnp.minimum(ends_padded, _dim_value(size))
    divisor = ends_padded - starts if count_include_pad else hi - lo
    return out, pad_hi, divisor.astype(jnp.float32)


def avg_pool2d(
    x: jax.Array,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> jax.Array:
    """``F.avg_pool2d`` on an NHWC tensor, with torch's arguments, defaults and divisors.

    Zero padding on both sides; ``count_include_pad=False`` divides by the number of real input
    pixels under each window (ResNet-D's avg_down shortcut, PyTorch-Encoding's ACF pooling);
    ``ceil_mode=True`` adds a last, partial window when the stride does not tile the input (that
    window never counts the part that lies beyond the right padding, as in torch).

    Args:
      x: (N, H, W, C).
      kernel_size, stride (default: kernel_size), padding: int or pair; padding <= kernel_size // 2.
      divisor_override: if given, every window sum is divided by it instead.
    Returns:
      (N, H_out, W_out, C), H_out = floor_or_ceil((H + 2 p - k) / s) + 1, in the dtype of ``x``
      (summed in float32).
    """
    where = "avg_pool2d"
    x = jnp.asarray(x)
    check_rank(x, 4, _NHWC, where)
    kh, kw = to_pair(kernel_size, "kernel_size", where)
    sh, sw = to_pair(kernel_size if stride is None else stride, "stride", where)
    ph, pw = to_pair(padding, "padding", where)
    if min(kh, kw) < 1 or min(sh, sw) < 1:
        raise ValueError(
            f"{where}: kernel_size and stride must be positive, got kernel_size={kernel_size!r}, stride={stride!r}"
        )
    if min(ph, pw) < 0 or ph > kh // 2 or pw > kw // 2:
        raise ValueError(
            f"{where}: padding must be between 0 and half the kernel size (torch's limit), got padding={padding!r} "
            f"for kernel_size={kernel_size!r}"
        )
    bad_divisor = (
        isinstance(divisor_override, bool)
        or not isinstance(divisor_override, int)
        or divisor_override == 0
    )
    if divisor_override is not None and bad_divisor:
        raise ValueError(
            f"{where}: divisor_override must be a non-zero int or None, got {divisor_override!r}"
        )
    _, h, w, _ = x.shape
    ho, hi_h, div_h = _pool_axis(h, kh, sh, ph, ceil_mode, count_include_pad, where, "height")
    wo, hi_w, div_w = _pool_axis(w, kw, sw, pw, ceil_mode, count_include_pad, where, "width")

    dtype = x.dtype
    acc = jnp.promote_types(dtype, jnp.float32)
    sums = jax.lax.reduce_window(
        x.astype(acc),
        np.zeros((), acc),  # a concrete zero: lax then uses its differentiable window-sum primitive
        jax.lax.add,
        (1, kh, kw, 1),
        (1, sh, sw, 1),
        ((0, 0), (ph, hi_h), (pw, hi_w), (0, 0)),
    )[:, :ho, :wo, :]
    if divisor_override is not None:
        divisor = jnp.asarray(float(divisor_override), acc)
    else:
        outer = np.outer if _is_static(ho, wo) else jnp.outer
        divisor = jnp.asarray(outer(div_h, div_w)[None, :, :, None], acc)
    return (sums / divisor).astype(dtype)


def _max_pool_taps(x, kernel, stride, padding):
    """The strided slices of the -inf padded input, one per window tap in row-major order."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=-jnp.inf)
    out_hw = ((xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1)
    return strided_taps(xp, kernel, stride, (1, 1), out_hw)


def _max_pool_forward(x, kernel, stride, padding):
    taps = _max_pool_taps(x, kernel, stride, padding)
    best, index = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
    for t, tap in enumerate(taps[1:], start=1):
        take = (tap > best) | jnp.isnan(
            tap
        )  # torch's rule: the first maximum in window order; NaN wins
        best = jnp.where(take, tap, best)
        index = jnp.where(take, jnp.int8(t), index)
    return best, index


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, kernel, stride, padding):
    return _max_pool_forward(x, kernel, stride, padding)[0]


def _max_pool_fwd(x, kernel, stride, padding):
    y, index = _max_pool_forward(x, kernel, stride, padding)
    return y, (index, x.shape)


def _max_pool_bwd(kernel, stride, padding, residual, g):
    index, shape = residual
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, h, w, c = shape
    hp, wp = h + 2 * ph, w + 2 * pw
    ho, wo = g.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    dx = None
    for t in range(kh * kw):
        i, j = divmod(t, kw)
        # Place tap t's share back on the input grid: stride-1 zeros between outputs, offset (i, j).
        part = jax.lax.pad(
            jnp.where(index == t, g, zero),
            zero,
            (
                (0, 0, 0),
                (i, hp - i - (ho - 1) * sh - 1, sh - 1),
                (j, wp - j - (wo - 1) * sw - 1, sw - 1),
                (0, 0, 0),
            ),
        )
        dx = part if dx is None else dx + part
    return (dx[:, ph : ph + h, pw : pw + w, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool2d(
    x: jax.Array,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
) -> jax.Array:
    """``F.max_pool2d`` (floor mode, no dilation) on an NHWC tensor, with torch's gradient.

    -inf padding on both sides. The gradient goes to the first maximum of each window in row-major
    order (torch's and XLA's tie rule); it is computed from the stored argmax with strided pads
    instead of XLA's select-and-scatter, which XLA:CPU runs slowly (measured: ResNet's 3x3/2 stem
    pool on (4, 112, 112, 64), forward + backward, <see benchmarks/vs_torch.py>).

    Args:
      x: (N, H, W, C).
      kernel_size, stride (default: kernel_size), padding: int or pair; padding <= kernel_size // 2.
    Returns:
      (N, H_out, W_out, C), H_out = floor((H + 2 p - k) / s) + 1.
    """
    where = "max_pool2d"
    x = jnp.asarray(x)
    check_rank(x, 4, _NHWC, where)
    kernel = to_pair(kernel_size, "kernel_size", where)
    stride = to_pair(kernel_size if stride is None else stride, "stride", where)
    padding = to_pair(padding, "padding", where)
    if min(kernel) < 1 or min(stride) < 1:
        raise ValueError(
            f"{where}: kernel_size and stride must be positive, got kernel_size={kernel_size!r}, stride={stride!r}"
        )
    if min(padding) < 0 or padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(
            f"{where}: padding must be between 0 and half the kernel size (torch's limit), got padding={padding!r} "
            f"for kernel_size={kernel_size!r}"
        )
    if x.shape[1] + 2 * padding[0] < kernel[0] or x.shape[2] + 2 * padding[1] < kernel[1]:
        raise ValueError(
            f"{where}: input {tuple(x.shape)} is smaller than the kernel {kernel} (padding {padding})"
        )
    return _max_pool(x, kernel, stride, padding)
