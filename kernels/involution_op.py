"""Involution as Pallas kernels, with its XLA reference twin.

Li et al., "Involution: Inverting the Inherence of Convolution for Visual Recognition", CVPR 2021
(holocron.nn.Involution2d's ``unfold`` -> multiply -> sum, without the unfold).

    out[b, h, w, c] = Σ_ij weights[b, h, w, g(c), i, j] · x[b, h·s + i·d - p, w·s + j·d - p, c]

with zero padding outside x and g(c) = c // (C / G). Neither implementation forms the unfolded
(B, C, K², H', W') tensor. Kernels (one program per output row, column tile, group and channel
block): the forward accumulates the K² strided tap reads in float32; the input gradient is the same
gather on the cotangent with the weights dilated by the stride and the taps mirrored (for stride s,
s² - 1 of every s² taps read zeros); the weight gradient writes each tap's channel sum directly.

Shapes: x (B, H, W, C), weights (B, H', W', G, K, K) with G | C -> (B, H', W', C), H' and W' as
torch's unfold. float32 or bfloat16 (promoted to a common dtype), float32 accumulation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxenc.kernels._common import (
    compiler_params,
    pow2_block,
    promote_floating,
    resolve_impl,
    round_up,
)
from jaxenc.validation import (
    check_divisible,
    check_positive_int,
    check_rank,
    conv_args,
    conv_output_hw,
)

__all__ = ["involution", "involution_reference", "strided_taps"]

_F32 = jnp.float32


def strided_taps(x: jax.Array, kernel_size, stride, dilation, out_hw) -> list[jax.Array]:
    """The kh*kw strided views of an already padded (B, Hp, Wp, C) tensor, row-major over (i, j).

    Tap (i, j) holds, at output position (h, w), the input value x[h*s + i*d, w*s + j*d]: stacking
    them gives torch's unfold without a gather, and a loop over them never needs the stack.
    """
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel_size, stride, dilation, out_hw
    b, _, _, c = x.shape
    return [
        jax.lax.slice(
            x,
            (0, i * dh, j * dw, 0),
            (b, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]


def _pad_hw(x: jax.Array, padding) -> jax.Array:
    ph, pw = padding
    return jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))


# --------------------------------------------------------------------------------------------------
# Public entry point


def involution(
    x: jax.Array,
    weights: jax.Array,
    *,
    kernel_size: int,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    impl: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Involution with given per-position kernels (Li et al., CVPR 2021; formula in the module docstring).

    Args:
      x: (B, H, W, C).
      weights: (B, H', W', G, K, K), G dividing C; H', W' as torch's unfold (zero padding).
      kernel_size, stride, padding, dilation: torch conventions (int or pair; kernel square).
      impl: "pallas", "xla" (:func:`involution_reference`) or "auto" (Pallas on a GPU verified in
        ``kernels/verified.json`` or when ``interpret`` is set, XLA otherwise).
      interpret: run the Pallas kernels in the Pallas interpreter (any backend; for tests).
    Returns:
      (B, H', W', C) in the promoted dtype of x and weights; float32 accumulation. Differentiable
      in x and weights (reverse mode; both implementations use a hand-written VJP).
    """
    where = "involution"
    check_rank(x, 4, "B, H, W, C", where)
    check_rank(weights, 6, "B, H_out, W_out, G, K, K", where, name="weights")
    k = check_positive_int(kernel_size, "kernel_size", where)
    (_, _), stride, padding, dilation = conv_args(k, stride, padding, dilation, where)
    b, _, _, c = x.shape
    g = weights.shape[3]
    check_divisible(c, g, "channels", "weight groups (weights.shape[3])", where)
    ho, wo = conv_output_hw(x.shape, (k, k), stride, padding, dilation, where)
    if tuple(weights.shape) != (b, ho, wo, g, k, k):
        raise ValueError(
            f"{where}: weights must have shape (B, H_out, W_out, G, K, K) = {(b, ho, wo, g, k, k)} for x of shape "
            f"{tuple(x.shape)}, kernel_size={k}, stride={stride}, padding={padding}, dilation={dilation}; "
            f"got {tuple(weights.shape)}"
        )
    x, weights, dtype = promote_floating(x, weights, "x and weights", where)
    if resolve_impl(impl, interpret, where, "involution") == "xla":
        return _reference_jit(x, weights, k, stride, padding, dilation)
    if 0 in x.shape or 0 in weights.shape:
        return jnp.zeros((b, ho, wo, c), dtype)
    geo = _geometry(x.shape, g, k, stride, padding, dilation)
    return _involution_pallas(x, weights, geo, interpret)


# --------------------------------------------------------------------------------------------------
# XLA reference twin (also the implementation behind impl="xla")


# Reverse mode is written out (custom VJP) rather than derived: the derived backward reuses the K*K
# forward slices of x for the kernel gradient, and XLA keeps them all alive at once, which is the
# unfolded tensor again. Here the kernel gradient walks the offsets in a scan (one slice live at a
# time) and the input gradient is a fused sum of padded products.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def involution_reference(x, weights, kernel_size: int, stride, padding, dilation):
    """Pure-jnp involution (no validation; stride/padding/dilation as pairs).

    The K*K offsets are accumulated one strided slice of the padded input at a time (XLA fuses the
    loop), so the unfolded tensor is never built. Shapes as :func:`involution`; x and weights share
    a dtype.
    """
    k = kernel_size
    b, _, _, c = x.shape
    _, ho, wo, g = weights.shape[:4]
    taps = strided_taps(_pad_hw(x, padding), (k, k), stride, dilation, (ho, wo))
    acc = jnp.zeros((b, ho, wo, g, c // g), _F32)
    for idx, tap in enumerate(taps):
        kernel = weights[..., idx // k, idx % k].astype(_F32)[..., None]
        acc = acc + tap.reshape(b, ho, wo, g, c // g).astype(_F32) * kernel
    return acc.reshape(b, ho, wo, c).astype(jnp.result_type(x, weights))


def _reference_fwd(x, weights, kernel_size, stride, padding, dilation):
    return involution_reference(x, weights, kernel_size, stride, padding, dilation), (x, weights)


def _reference_bwd(kernel_size, stride, padding, dilation, residuals, ct):
    x, weights = residuals
    k, (sh, sw), (dh, dw), (ph, pw) = kernel_size, stride, dilation, padding
    b, h, w, c = x.shape
    _, ho, wo, g = weights.shape[:4]
    ct = ct.astype(_F32).reshape(b, ho, wo, g, c // g)
    xp = _pad_hw(x, padding)
    hp, wp = xp.shape[1:3]
    span_h, span_w = (ho - 1) * sh + 1, (wo - 1) * sw + 1

    def kernel_grad(_, offset):
        i, j = offset // k, offset % k
        window = jax.lax.dynamic_slice(xp, (0, i * dh, j * dw, 0), (b, span_h, span_w, c))
        tap = window[:, ::sh, ::sw].reshape(b, ho, wo, g, c // g).astype(_F32)
        return None, jnp.sum(tap * ct, axis=-1)

    _, g_weights = jax.lax.scan(kernel_grad, None, jnp.arange(k * k))
    g_weights = jnp.moveaxis(g_weights, 0, -1).reshape(weights.shape)

    g_xp = jnp.zeros(xp.shape, _F32)
    for idx in range(k * k):
        i, j = divmod(idx, k)
        contrib = (ct * weights[..., i, j].astype(_F32)[..., None]).reshape(b, ho, wo, c)
        # The transpose of the strided tap slice: dilate by the stride, shift to the tap's offset.
        g_xp = g_xp + jax.lax.pad(
            contrib,
            jnp.float32(0),
            [
                (0, 0, 0),
                (i * dh, hp - i * dh - span_h, sh - 1),
                (j * dw, wp - j * dw - span_w, sw - 1),
                (0, 0, 0),
            ],
        )
    g_x = g_xp[:, ph : ph + h, pw : pw + w]
    return g_x.astype(x.dtype), g_weights.astype(weights.dtype)


involution_reference.defvjp(_reference_fwd, _reference_bwd)
# Compiled as one program even when called eagerly (arguments already validated).
_reference_jit = jax.jit(involution_reference, static_argnums=(2, 3, 4, 5))


# --------------------------------------------------------------------------------------------------
# Geometry of one call (static)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Sizes, padded sizes and block sizes of one involution call (all Python ints)."""

    h: int
    w: int
    groups: int
    cg: int  # channels per group
    k: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ho: int
    wo: int
    bc: int  # channels per block (power of two)
    tw: int  # output columns per tile (power of two)

    @property
    def cgp(self) -> int:
        return round_up(self.cg, self.bc)

    @property
    def wop(self) -> int:
        """Output width padded to whole column tiles."""
        return round_up(self.wo, self.tw)

    @property
    def wip(self) -> int:
        """Input width padded to whole column tiles (the input-gradient kernel's output)."""
        return round_up(self.w, self.tw)

    @property
    def padded_x_hw(self) -> tuple[int, int]:
        """Rows and columns of the padded input that the forward tiles read."""
        (sh, sw), (dh, dw) = self.stride, self.dilation
        return (self.ho - 1) * sh + (self.k - 1) * dh + 1, (self.wop - 1) * sw + (
            self.k - 1
        ) * dw + 1


def _geometry(x_shape, groups: int, k: int, stride, padding, dilation) -> _Geometry:
    _, h, w, c = x_shape
    cg = c // groups
    ho, wo = conv_output_hw(x_shape, (k, k), stride, padding, dilation, "involution")
    bc = pow2_block(cg, lo=1, hi=64)
    tw = pow2_block(max(wo, w), lo=1, hi=max(1, min(32, 1024 // bc)))
    return _Geometry(
        h=h,
        w=w,
        groups=groups,
        cg=cg,
        k=k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        ho=ho,
        wo=wo,
        bc=bc,
        tw=tw,
    )


def _pad_to(x, low, total, interior=(0, 0)):
    """Pad (or crop, when negative) axes 1 and 2 of a (B, H, W, G, C') array to ``total`` rows/cols
    after ``low`` leading ones and ``interior`` zeros between elements."""
    dims = [(0, 0, 0)]
    for axis, (lo, size, inner) in enumerate(zip(low, total, interior), start=1):
        dilated = (x.shape[axis] - 1) * (inner + 1) + 1
        dims.append((lo, size - lo - dilated, inner))
    dims += [(0, 0, 0), (0, 0, 0)]
    return jax.lax.pad(x, jnp.zeros((), x.dtype), dims)


def _grouped(x, geo: _Geometry):
    """(B, H, W, C) -> (B, H, W, G, cgp) with zero channels padding each group to whole blocks."""
    b, h, w, _ = x.shape
    x = x.reshape(b, h, w, geo.groups, geo.cg)
    return jnp.pad(x, ((0, 0),) * 4 + ((0, geo.cgp - geo.cg),))


# --------------------------------------------------------------------------------------------------
# Kernels


def _gather_taps(src_ref, w_ref, row_of, col_of, geo: _Geometry):
    """Σ over the K² taps of src[row_of(i), col_of(j) : +tw (strided), channels] · w[.., tap].

    ``w_ref`` is either a (tw, K²) block (the forward's weights of this row tile) or, with
    ``row_of`` given, indexed like ``src_ref`` (the dilated weights of the input-gradient kernel).
    """
    k = geo.k
    acc = jnp.zeros((geo.tw, src_ref.shape[-1]), _F32)
    for i in range(k):
        row = row_of(i)
        for j in range(k):
            cols = col_of(j)
            tap = i * k + j
            src = src_ref[row, cols, :].astype(_F32)
            wv = w_ref[:, tap] if len(w_ref.shape) == 2 else w_ref[row, cols, tap]
            acc = acc + src * wv.astype(_F32)[:, None]
    return acc


def _forward_kernel(x_ref, w_ref, o_ref, *, geo: _Geometry):
    """Grid (B, H', column tiles, G, channel blocks): one (tw, bc) output tile."""
    h, t = pl.program_id(1), pl.program_id(2)
    (sh, sw), (dh, dw) = geo.stride, geo.dilation
    acc = _gather_taps(
        x_ref,
        w_ref,
        row_of=lambda i: h * sh + i * dh,
        col_of=lambda j: pl.ds(t * geo.tw * sw + j * dw, geo.tw, sw),
        geo=geo,
    )
    o_ref[...] = acc.astype(o_ref.dtype)


def _input_grad_kernel(ct_ref, w_ref, dx_ref, *, geo: _Geometry):
    """Grid (B, H, column tiles, G, channel blocks) over the input: mirrored taps on dilated operands."""
    r, t = pl.program_id(1), pl.program_id(2)
    k, (dh, dw) = geo.k, geo.dilation
    acc = _gather_taps(
        ct_ref,
        w_ref,
        row_of=lambda i: r + (k - 1 - i) * dh,
        col_of=lambda j: pl.ds(t * geo.tw + (k - 1 - j) * dw, geo.tw),
        geo=geo,
    )
    dx_ref[...] = acc.astype(dx_ref.dtype)


def _weight_grad_kernel(x_ref, ct_ref, dw_ref, *, geo: _Geometry):
    """Grid (B, H', column tiles, G): the K² channel-sums of one tile, one column of dW each."""
    h, t = pl.program_id(1), pl.program_id(2)
    k, (sh, sw), (dh, dw) = geo.k, geo.stride, geo.dilation
    sums = [jnp.zeros((geo.tw,), _F32) for _ in range(k * k)]
    for cb in range(geo.cgp // geo.bc):
        chans = pl.ds(cb * geo.bc, geo.bc)
        ct = ct_ref[:, chans].astype(_F32)
        for i in range(k):
            for j in range(k):
                cols = pl.ds(t * geo.tw * sw + j * dw, geo.tw, sw)
                x = x_ref[h * sh + i * dh, cols, chans].astype(_F32)
                sums[i * k + j] = sums[i * k + j] + jnp.sum(x * ct, axis=1)
    for tap, total in enumerate(sums):
        dw_ref[:, tap] = total.astype(dw_ref.dtype)


# --------------------------------------------------------------------------------------------------
# pallas_call wrappers


def _gather_call(
    kernel, src, w, w_spec, rows: int, cols: int, geo: _Geometry, dtype, interpret: bool, name: str
):
    """Launch a tap-gather kernel over the (B, rows, column tiles, G, channel blocks) grid.

    ``src`` (B, rows', cols', G, cgp) is seen whole per (batch, group, channel block); each program
    writes a (tw, bc) tile of the (B, rows, cols, G, cgp) output.
    """
    b, hn, wn = src.shape[:3]
    return pl.pallas_call(
        functools.partial(kernel, geo=geo),
        grid=(b, rows, cols // geo.tw, geo.groups, geo.cgp // geo.bc),
        in_specs=[
            pl.BlockSpec((None, hn, wn, None, geo.bc), lambda b, r, t, g, cb: (b, 0, 0, g, cb)),
            w_spec,
        ],
        out_specs=pl.BlockSpec(
            (None, None, geo.tw, None, geo.bc), lambda b, r, t, g, cb: (b, r, t, g, cb)
        ),
        out_shape=jax.ShapeDtypeStruct((b, rows, cols, geo.groups, geo.cgp), dtype),
        interpret=interpret,
        compiler_params=compiler_params(),
        name=name,
    )(src, w)


def _forward_call(xg, w, geo: _Geometry, dtype, interpret: bool):
    # This output row's (tw, K²) weights.
    w_spec = pl.BlockSpec(
        (None, None, geo.tw, None, geo.k * geo.k), lambda b, h, t, g, cb: (b, h, t, g, 0)
    )
    return _gather_call(
        _forward_kernel, xg, w, w_spec, geo.ho, geo.wop, geo, dtype, interpret, "involution_forward"
    )


def _input_grad_call(ct, w, geo: _Geometry, dtype, interpret: bool):
    (sh, sw), (dh, dw), (ph, pw) = geo.stride, geo.dilation, geo.padding
    low = ((geo.k - 1) * dh - ph, (geo.k - 1) * dw - pw)
    total = (geo.h + (geo.k - 1) * dh, geo.wip + (geo.k - 1) * dw)
    interior = (sh - 1, sw - 1)
    ctd, wd = _pad_to(ct, low, total, interior), _pad_to(w, low, total, interior)
    # The dilated weights are read at the same (shifted) positions as the cotangent.
    w_spec = pl.BlockSpec(
        (None, *total, None, geo.k * geo.k), lambda b, r, t, g, cb: (b, 0, 0, g, 0)
    )
    return _gather_call(
        _input_grad_kernel,
        ctd,
        wd,
        w_spec,
        geo.h,
        geo.wip,
        geo,
        dtype,
        interpret,
        "involution_input_grad",
    )


def _weight_grad_call(xg, ct, geo: _Geometry, dtype, interpret: bool):
    b = xg.shape[0]
    hn, wn = geo.padded_x_hw
    kk = geo.k * geo.k
    return pl.pallas_call(
        functools.partial(_weight_grad_kernel, geo=geo),
        grid=(b, geo.ho, geo.wop // geo.tw, geo.groups),
        in_specs=[
            pl.BlockSpec((None, hn, wn, None, geo.cgp), lambda b, h, t, g: (b, 0, 0, g, 0)),
            pl.BlockSpec((None, None, geo.tw, None, geo.cgp), lambda b, h, t, g: (b, h, t, g, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, geo.tw, None, kk), lambda b, h, t, g: (b, h, t, g, 0)),
        out_shape=jax.ShapeDtypeStruct((b, geo.ho, geo.wop, geo.groups, kk), dtype),
        interpret=interpret,
        compiler_params=compiler_params(),
        name="involution_weight_grad",
    )(xg, ct)


def _padded_operands(x, weights, geo: _Geometry):
    """Grouped, spatially padded input (B, hn, wn, G, cgp) and weights (B, H', wop, G, K²)."""
    b = x.shape[0]
    xg = _pad_to(_grouped(x, geo), geo.padding, geo.padded_x_hw)
    w = weights.reshape(b, geo.ho, geo.wo, geo.groups, geo.k * geo.k)
    w = jnp.pad(w, ((0, 0), (0, 0), (0, geo.wop - geo.wo), (0, 0), (0, 0)))
    return xg, w


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _involution_pallas(x, weights, geo: _Geometry, interpret: bool):
    return _involution_pallas_fwd(x, weights, geo, interpret)[0]


def _involution_pallas_fwd(x, weights, geo: _Geometry, interpret: bool):
    xg, w = _padded_operands(x, weights, geo)
    out = _forward_call(xg, w, geo, x.dtype, interpret)
    b, c = x.shape[0], x.shape[-1]
    out = out[:, :, : geo.wo, :, : geo.cg].reshape(b, geo.ho, geo.wo, c)
    return out, (xg, w)


def _involution_pallas_bwd(geo: _Geometry, interpret: bool, residuals, ct):
    xg, w = residuals
    b, c = xg.shape[0], geo.groups * geo.cg
    ct = _grouped(ct.astype(_F32), geo)
    dx = _input_grad_call(ct, w[:, :, : geo.wo], geo, xg.dtype, interpret)
    dx = dx[:, :, : geo.w, :, : geo.cg].reshape(b, geo.h, geo.w, c)
    ct = jnp.pad(ct, ((0, 0), (0, 0), (0, geo.wop - geo.wo), (0, 0), (0, 0)))
    dw = _weight_grad_call(xg, ct, geo, w.dtype, interpret)
    dw = dw[:, :, : geo.wo].reshape(b, geo.ho, geo.wo, geo.groups, geo.k, geo.k)
    return dx, dw


_involution_pallas.defvjp(_involution_pallas_fwd, _involution_pallas_bwd)
