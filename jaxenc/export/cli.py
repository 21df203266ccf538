"""``python -m jaxenc.export NAME_OR_CONFIG --format {stablehlo,onnx} --output PATH ...``.

Exports a registered model (or the model of a ``configs/*.py`` recipe) with its weights to a
StableHLO (``jax.export``) artifact or an ONNX file. Exit status 0 on success, 2 for a usage error
or bad input (the message says which), as argparse does.
"""

from __future__ import annotations

import argparse
import sys
import time

from jaxenc.export.artifacts import FORMATS, check_output_path, write_artifact
from jaxenc.export.forward import DTYPES, OUTPUTS, cast_params

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m jaxenc.export",
        description=(
            "Export a jaxenc model (eval mode) to StableHLO or ONNX. Input: NHWC float32 images, "
            "already normalised (mean/std); outputs: what model.apply returns (--outputs main: "
            "a segmentation model's main logits only)."
        ),
    )
    p.add_argument(
        "model", metavar="NAME_OR_CONFIG", help="a jaxenc.models name or a configs/*.py file"
    )
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="artifact format")
    p.add_argument("--output", required=True, help="artifact path (e.g. model.onnx)")
    p.add_argument(
        "--weights",
        help="a native .msgpack, an upstream .pth/.zip, a trainer workdir or a model-store name",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="export the random initialisation (refused by default without --weights)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --random-weights (default 0)")
    p.add_argument("--use-ema", action="store_true", help="trainer checkpoints: the EMA weights")
    p.add_argument(
        "--nclass", type=int, help="number of classes (default: the model's or recipe's)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="input size (default: the recipe's image size, a segmentation model's crop size, or 224)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="static batch size (default 1)")
    p.add_argument(
        "--dynamic",
        choices=("batch", "size", "batch,size"),
        help="symbolic axes: any batch; H and W any multiple of --size-multiple (stablehlo only)",
    )
    p.add_argument(
        "--size-multiple", type=int, default=32, help="with --dynamic size: H, W multiples of this"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default float32)")
    p.add_argument(
        "--outputs", choices=OUTPUTS, default="all", help="all outputs or the main logits"
    )
    p.add_argument(
        "--platforms", help="stablehlo: comma-separated platforms, e.g. cpu,cuda (default: current)"
    )
    return p


def _export(args) -> str:
    from jaxenc.export.resolve import build_target, target_variables

    out = check_output_path(args.output)  # before any conversion work
    target = build_target(args.model, nclass=args.nclass, dtype=args.dtype)
    if args.weights is None and not args.random_weights:
        raise ValueError(
            "no --weights given: pass a .msgpack, an upstream .pth/.zip, a trainer workdir or a "
            "model-store name, or --random-weights to export an untrained model on purpose"
        )
    if args.format == "onnx" and args.platforms:
        raise ValueError("--platforms applies to --format stablehlo only")
    size = tuple(args.image_size) if args.image_size else target.image_size
    variables = target_variables(
        target,
        weights=args.weights,
        random_weights=args.random_weights,
        seed=args.seed,
        use_ema=args.use_ema,
        image_size=size,
    )
    variables = cast_params(variables, args.dtype or "float32")
    common = dict(
        image_size=size, batch_size=args.batch_size, dynamic=args.dynamic, outputs=args.outputs
    )
    if args.format == "stablehlo":
        from jaxenc.export.stablehlo import export_stablehlo

        platforms = tuple(args.platforms.split(",")) if args.platforms else None
        data = export_stablehlo(
            target.model,
            variables,
            size_multiple=args.size_multiple,
            platforms=platforms,
            **common,
        )
    else:
        from jaxenc.export.onnx_export import export_onnx

        data = export_onnx(target.model, variables, **common)
    write_artifact(out, data)
    return f"{out} ({len(data) / 2**20:.1f} MiB)"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (errors print ``error: ...`` to stderr, status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        written = _export(args)
    except (ValueError, TypeError, KeyError, FileNotFoundError, ImportError) as err:
        text = str(err).removeprefix("jaxenc.export: ")
        parser.exit(2, f"{parser.prog}: error: {text}\n")
    print(f"wrote {written} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
