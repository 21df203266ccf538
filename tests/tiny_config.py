"""``configs/tiny.py`` with dotted overrides, the starting point of the trainer's tests."""

from __future__ import annotations

from configs import tiny


def tiny_config(**overrides):
    """``tiny_config(**{"train.num_steps": 4, "optim.lr": 0.0})``: the tiny recipe with those fields set."""
    c = tiny.get_config()
    for dotted, value in overrides.items():
        node = c
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c
