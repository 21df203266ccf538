"""Input validation shared by every jaxenc layer and loss.

Errors name the layer, the argument, what was expected and what was given (DESIGN.md: the error
message is part of the API). All checks run on static shapes at trace time, so they cost nothing
inside a compiled program.
"""
from __future__ import annotations

from typing import Sequence

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


def check_positive_int(value, name: str, where: str) -> int:
    """Raise ValueError unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def check_divisible(value: int, divisor: int, what: str, by: str, where: str) -> None:
    """Raise ValueError unless ``divisor`` divides ``value``; ``what``/``by`` name the two quantities."""
    if divisor == 0 or value % divisor != 0:
        raise ValueError(f"{where}: {what}={value} is not divisible by {by}={divisor}")


def check_reduction(reduction: str, where: str) -> str:
    """Raise ValueError unless ``reduction`` is 'none', 'mean' or 'sum'."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def to_pair(value, name: str, where: str) -> tuple[int, int]:
    """Torch-style ``int | (int, int)`` argument -> ``(int, int)``, checked."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError(f"{where}: {name} must be an int or a pair of ints, got {value!r}")
        pair = tuple(value)
    else:
        pair = (value, value)
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{where}: {name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def check_probability(p, name: str, where: str) -> float:
    """Raise ValueError unless ``p`` is a real number in [0, 1]; return it as a float."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{where}: {name} must be a probability in [0, 1], got {p!r}")
    return float(p)
