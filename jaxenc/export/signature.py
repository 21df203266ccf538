"""The input an exported model takes: NHWC float32 images, static or symbolic batch and size.

``dynamic`` names the symbolic axes: None (all static), ``"batch"``, ``"size"`` or ``"batch,size"``.
A symbolic batch is ``b`` (any batch >= 1). Symbolic height and width are ``m*h`` and ``m*w`` with
``m = size_multiple`` (default 32, the output stride of the non-dilated backbones): the artifact
then accepts any H and W that are positive multiples of ``m``, and every size-dependent shape inside
the network (strided convolutions, pooling windows, the resizes back to the input size) stays
decidable from the symbolic shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["DYNAMIC_AXES", "image_size_pair", "input_spec", "parse_dynamic"]

#: The axes that ``dynamic`` may name.
DYNAMIC_AXES = ("batch", "size")


def parse_dynamic(dynamic: str | Sequence[str] | None) -> frozenset[str]:
    """``dynamic`` ("batch", "size", "batch,size", a sequence of them, or None) as a set of axes."""
    if dynamic is None or dynamic == "":
        return frozenset()
    parts = dynamic.split(",") if isinstance(dynamic, str) else list(dynamic)
    axes = [p.strip() for p in parts]
    unknown = sorted({a for a in axes if a not in DYNAMIC_AXES})
    if unknown or not axes:
        raise ValueError(
            f"jaxenc.export: dynamic must name axes among {DYNAMIC_AXES} (e.g. 'batch' or "
            f"'batch,size'), got {dynamic!r}"
        )
    return frozenset(axes)


def image_size_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``image_size`` (an int or (H, W)) as a pair of positive ints."""
    pair = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(
            f"jaxenc.export: image_size must be a positive int or a pair (H, W) of them, got {image_size!r}"
        )
    return pair


def input_spec(
    image_size: int | Sequence[int],
    *,
    batch_size: int = 1,
    dynamic: str | Sequence[str] | None = None,
    size_multiple: int = 32,
    dtype=jnp.float32,
) -> jax.ShapeDtypeStruct:
    """The (B, H, W, 3) input of an export: static dims from ``batch_size`` and ``image_size``,
    symbolic ones (``b``, ``m*h``, ``m*w``) where ``dynamic`` asks (see the module docstring).

    With a symbolic size, ``image_size`` must itself be a multiple of ``size_multiple`` (it is the
    size the caller expects to use; the check catches a multiple that does not fit it).
    """
    axes = parse_dynamic(dynamic)
    h, w = image_size_pair(image_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"jaxenc.export: batch_size must be a positive int, got {batch_size!r}")
    m = size_multiple
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"jaxenc.export: size_multiple must be a positive int, got {m!r}")
    if "size" in axes and (h % m or w % m):
        raise ValueError(
            f"jaxenc.export: with a symbolic size the artifact takes multiples of size_multiple={m}; "
            f"image_size ({h}, {w}) is not one"
        )
    dims = [
        "b" if "batch" in axes else str(batch_size),
        f"{m}*h" if "size" in axes else str(h),
        f"{m}*w" if "size" in axes else str(w),
    ]
    shape = jax.export.symbolic_shape(", ".join(dims)) + (3,)
    return jax.ShapeDtypeStruct(shape, dtype)
