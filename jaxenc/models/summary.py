"""Parameter count and FLOPs of registered models: ``python -m jaxenc.models.summary NAME [NAME ...]``.

Parameters are counted from ``jax.eval_shape`` of ``init`` (nothing is allocated). FLOPs come from
XLA's cost analysis of the lowered inference program (``apply`` in eval mode, batch 1) and count a
multiply-add as two operations; ``gmacs`` (= FLOPs / 2) is the convention of most papers and of
PyTorch-Encoding's model tables (e.g. ResNet-50 at 224: ~4.1 GMACs).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp

from jaxenc.models.registry import get_model, list_models

__all__ = ["count_params", "summarize"]


def _abstract_variables(model, size: int):
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return x, jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))


def count_params(variables) -> int:
    """Number of scalars in the ``params`` collection (BatchNorm statistics excluded, as torch's
    ``sum(p.numel() for p in model.parameters())``)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(variables.get("params", {})))


def summarize(name: str, sizes=(224,), **overrides) -> dict:
    """{'name', 'params', 'gflops': {size: ...}, 'gmacs': {size: ...}} for ``get_model(name, **overrides)``.

    Shapes: inference on a (1, size, size, 3) NHWC image per size.
    """
    model = get_model(name, **overrides)
    x, variables = _abstract_variables(model, sizes[0])
    out = {"name": name, "params": count_params(variables), "gflops": {}, "gmacs": {}}
    for size in sizes:
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        lowered = jax.jit(lambda v, img: model.apply(v, img)).lower(variables, x)
        flops = float(lowered.cost_analysis()["flops"])
        out["gflops"][size] = flops / 1e9
        out["gmacs"][size] = flops / 2e9
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="registered model names (default: list them)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224], help="square input sizes")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)
    if not args.names:
        print("\n".join(list_models()))
        return 0
    if not args.json:
        header = f"{'model':<32} {'params':>14} " + " ".join(f"{'GMACs@' + str(s):>12}" for s in args.sizes)
        print(header)
        print("-" * len(header))
    for name in args.names:
        row = summarize(name, tuple(args.sizes))
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{name:<32} {row['params']:>14,} " + " ".join(f"{row['gmacs'][s]:>12.2f}" for s in args.sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
