"""Argument checks shared by jaxenc, jaxenc.kernels and the trainer (one argument order, one message style).

Every check takes ``(value, name, where)`` and raises ``"{where}: {name} must be ..., got {value!r}"``
(docs/DESIGN.md, Public conventions: the error message is part of the API). Checks on arrays read static
shapes at trace time, so they cost nothing inside a compiled program.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_REDUCTIONS = ("none", "mean", "sum")


def check_rank(x, rank: int, layout: str, where: str, name: str = "x") -> None:
    """Raise ValueError unless ``x.ndim == rank``; ``layout`` spells the expected axes, e.g. 'N, H, W, C'."""
    if x.ndim != rank:
        raise ValueError(
            f"{where}: expected {name} of rank {rank} ({layout}), got shape {tuple(x.shape)} (rank {x.ndim})"
        )


def check_channels(x, expected: int | None, where: str, name: str = "in_channels") -> int:
    """Return the channel count (last axis) after checking it against ``expected`` when given."""
    channels = int(x.shape[-1])
    if expected is not None and channels != expected:
        raise ValueError(
            f"{where}: {name}={expected} but the input has {channels} channels on its last axis "
            f"(shape {tuple(x.shape)}; jaxenc images are NHWC)"
        )
    return channels


def is_int(value) -> bool:
    """Whether ``value`` is a Python or numpy integer (``bool`` is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(value, name: str, where: str, minimum: int | None = None) -> int:
    """Return ``value`` as an int; ValueError unless it is an integer (not a bool) >= ``minimum``."""
    if not is_int(value) or (minimum is not None and value < minimum):
        if minimum is None:
            wanted = "an integer"
        elif minimum == 1:
            wanted = "a positive integer"
        elif minimum == 0:
            wanted = "a non-negative integer"
        else:
            wanted = f"an integer >= {minimum}"
        raise ValueError(f"{where}: {name} must be {wanted}, got {value!r}")
    return int(value)


def check_positive_int(value, name: str, where: str) -> int:
    """Return ``value`` as an int; ValueError unless it is an integer >= 1."""
    return check_int(value, name, where, minimum=1)


def check_step(value, name: str = "step", where: str = "step") -> int:
    """Return a training step as an int; ValueError unless it is an integer >= 0."""
    return check_int(value, name, where, minimum=0)


def check_divisible(value: int, divisor: int, what: str, by: str, where: str) -> None:
    """Raise ValueError unless ``divisor`` divides ``value``; ``what``/``by`` name the two quantities."""
    if divisor == 0 or value % divisor != 0:
        raise ValueError(f"{where}: {what}={value} is not divisible by {by}={divisor}")


def check_reduction(reduction: str, where: str) -> str:
    """Raise ValueError unless ``reduction`` is 'none', 'mean' or 'sum'."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def split_pair(value, name: str, where: str, pair: str = "a pair of ints") -> tuple:
    """``v | (a, b)`` -> ``(v, v)`` or ``(a, b)``; ValueError for a sequence of another length."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError(f"{where}: {name} must be an int or {pair}, got {value!r}")
        return tuple(value)
    return (value, value)


def to_pair(value, name: str, where: str) -> tuple[int, int]:
    """Torch-style ``int | (int, int)`` argument -> ``(int, int)``, checked."""
    pair = split_pair(value, name, where)
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{where}: {name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def check_probability(p, name: str, where: str) -> float:
    """Raise ValueError unless ``p`` is a real number in [0, 1]; return it as a float."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{where}: {name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Torch's convolution output length along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_args(kernel_size, stride, padding, dilation, where: str):
    """Torch conv arguments (int or pair each) -> checked pairs (kernel, stride, padding, dilation)."""
    kernel_size = to_pair(kernel_size, "kernel_size", where)
    stride = to_pair(stride, "stride", where)
    padding = to_pair(padding, "padding", where)
    dilation = to_pair(dilation, "dilation", where)
    for name, pair in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
        if min(pair) < 1:
            raise ValueError(f"{where}: {name} must be positive, got {pair}")
    if min(padding) < 0:
        raise ValueError(f"{where}: padding must be >= 0, got {padding}")
    return kernel_size, stride, padding, dilation


def conv_output_hw(shape, kernel_size, stride, padding, dilation, where: str) -> tuple[int, int]:
    """Torch's (H_out, W_out) for an NHWC ``shape`` and pair arguments; ValueError if either is < 1."""
    ho = conv_output_size(shape[1], kernel_size[0], stride[0], padding[0], dilation[0])
    wo = conv_output_size(shape[2], kernel_size[1], stride[1], padding[1], dilation[1])
    if ho < 1 or wo < 1:
        raise ValueError(
            f"{where}: the input (H, W)={tuple(shape[1:3])} is smaller than the dilated kernel "
            f"(kernel_size={kernel_size}, dilation={dilation}, padding={padding}); the output would be {ho}x{wo}"
        )
    return ho, wo
