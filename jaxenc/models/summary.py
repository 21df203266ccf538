"""Parameter count and FLOPs of registered models: ``python -m jaxenc.models.summary NAME [NAME ...]``.

Parameters are counted from ``jax.eval_shape`` of ``init`` (nothing is allocated). Multiply-adds
are counted on the traced inference program (``apply`` in eval mode, batch 1): every convolution
contributes output elements x kernel taps x input channels per group and every matmul its product
of dimensions, the convention of the papers and of fvcore/ptflops tables (ResNet-50 at 224: 4.1
GMACs, often quoted as "4.1 GFLOPs"). ``gflops`` is XLA's own cost analysis of the lowered
program, which also counts elementwise work and skips taps that fall on zero padding.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp

from jaxenc.models.registry import get_model, list_models
from jaxenc.nn.grouped_conv import grouped_conv_impl

__all__ = ["count_params", "summarize"]


def _abstract_variables(model, size: int):
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return x, jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))


def count_params(variables) -> int:
    """Number of scalars in the ``params`` collection (BatchNorm statistics excluded, as torch's
    ``sum(p.numel() for p in model.parameters())``)."""
    return sum(
        math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(variables.get("params", {}))
    )


def _macs(jaxpr) -> int:
    """Multiply-adds of convolutions and matmuls in ``jaxpr``, nested jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            lhs, rhs = (v.aval for v in eqn.invars)
            out = eqn.outvars[0].aval
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
            taps = math.prod(rhs.shape[d] for d in spec[2:]) * rhs.shape[spec[1]]
            total += math.prod(out.shape) * taps
        elif eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lc)
        for sub in _subjaxprs(eqn):
            total += _macs(sub)
    return total


def _subjaxprs(eqn):
    """Jaxprs nested in an equation's parameters (jit, custom_vjp, scan, cond, ...)."""
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", None)
            if inner is not None:
                yield inner if hasattr(inner, "eqns") else inner.jaxpr
            elif hasattr(item, "eqns"):
                yield item


def summarize(name: str, sizes=(224,), **overrides) -> dict:
    """{'name', 'params', 'gmacs': {size: ...}, 'gflops': {size: ...}} for ``get_model(name, **overrides)``.

    Shapes: inference on a (1, size, size, 3) NHWC image per size.
    """
    model = get_model(name, **overrides)
    x, variables = _abstract_variables(model, sizes[0])
    out = {"name": name, "params": count_params(variables), "gflops": {}, "gmacs": {}}
    for size in sizes:
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        infer = lambda v, img: model.apply(v, img)  # noqa: E731
        # Counted on the plain grouped convolution: the CPU forms (block-diagonal chunks, depthwise
        # taps) do the same function with other flop counts.
        with grouped_conv_impl("xla"):
            out["gmacs"][size] = _macs(jax.make_jaxpr(infer)(variables, x).jaxpr) / 1e9
            out["gflops"][size] = (
                float(jax.jit(infer).lower(variables, x).cost_analysis()["flops"]) / 1e9
            )
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
        header = f"{'model':<32} {'params':>14} " + " ".join(
            f"{'GMACs@' + str(s):>12}" for s in args.sizes
        )
        print(header)
        print("-" * len(header))
    for name in args.names:
        row = summarize(name, tuple(args.sizes))
        if args.json:
            print(json.dumps(row))
        else:
            print(
                f"{name:<32} {row['params']:>14,} "
                + " ".join(f"{row['gmacs'][s]:>12.2f}" for s in args.sizes)
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
