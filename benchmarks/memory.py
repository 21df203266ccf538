"""Per-device memory of the segmentation train step, with and without rematerialisation.

Run from the repository root::

    .venv/bin/python -m benchmarks.memory [--models deeplab_resnest50,psp_resnet50s]
                                          [--dtypes float32,bfloat16] [--remat none,block]
                                          [--size 480] [--batch 2] [--out PATH]

Nothing is executed: the trainer's own step (:func:`train.step.make_train_step`, one-device mesh,
upstream's segmentation loss, SGD momentum, donated state) is compiled and its ``memory_analysis()``
written to ``benchmarks/results/memory.json`` (rewritten after every case). Defaults follow
upstream's recipes (2 images per device, 480 crops, 150 classes, aux head); ``dtype`` is the compute
dtype, parameters and optimizer state stay float32. ``total_bytes`` = argument + output + temp -
alias; ``fits`` compares it with 16 / 40 / 80 GB (1e9 bytes); ``temp_ratio`` = temp with
``remat="block"`` / temp without. On CPU the step keeps ``jax.checkpoint``'s barriers
(``xla_disable_hlo_passes=cse_barrier_expander``, as GPU and TPU do; ``--cpu-barriers expand``
measures XLA:CPU's default pipeline). A GPU fuses differently: run it there for its own plan.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.report import aligned_table, argument_parser, new_report, write_report
from jaxenc.compiler_options import compiler_options
from jaxenc.models import get_segmentation_model
from train.step import StepConfig, TrainState, make_mesh, make_train_step

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "memory.json"

#: The recipes measured by default: (segmentation model, backbone) as ``<model>_<backbone>``.
MODELS = (
    *(f"deeplab_resnest{depth}" for depth in (50, 101, 200, 269)),
    "encnet_resnet101s",
    "psp_resnet50s",
)
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
REMATS = ("none", "block")
NUM_CLASSES = 150  # ADE20K
AUX_WEIGHT = SE_WEIGHT = 0.2
CAPACITIES_GB = (16, 40, 80)


def split_name(name: str) -> tuple[str, str]:
    """'deeplab_resnest50' -> ('deeplab', 'resnest50')."""
    model, sep, backbone = name.partition("_")
    if not sep or not backbone:
        raise ValueError(
            f"model names are <model>_<backbone> (e.g. deeplab_resnest50), got {name!r}"
        )
    return model, backbone


def build(name: str, dtype: str, remat: str, backbone_kwargs: dict | None = None):
    """The recipe's network: ADE20K classes, aux head (and SE loss for EncNet), as upstream trains it."""
    model, backbone = split_name(name)
    kwargs = dict(aux=True, dtype=DTYPES[dtype], remat=remat)
    if model in ("encnet", "atten"):
        kwargs["se_loss"] = True
    if backbone_kwargs:
        kwargs["backbone_kwargs"] = backbone_kwargs
    return get_segmentation_model(
        model, dataset="ade20k", backbone=backbone, nclass=NUM_CLASSES, **kwargs
    )


def abstract_step_inputs(model, batch: int, size: int, tx):
    """ShapeDtypeStructs of (state, batch) for the train step (nothing is initialised for real)."""
    image = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)

    def init_state():
        variables = model.init(jax.random.key(0), jnp.zeros(image.shape, image.dtype), train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            ema_params={},
            rng=jax.random.key_data(jax.random.key(0)),
        )

    state = jax.eval_shape(init_state)
    data = {"image": image, "mask": jax.ShapeDtypeStruct((batch, size, size), jnp.int32)}
    return state, data


def nbytes(tree) -> int:
    return sum(
        int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(tree)
    )


def fits(total_bytes: int | None) -> list[int]:
    """The capacities (GB) in :data:`CAPACITIES_GB` that hold ``total_bytes``."""
    if total_bytes is None:
        return []
    return [gb for gb in CAPACITIES_GB if total_bytes < gb * 10**9]


def memory_plan(compiled) -> dict:
    """argument / output / temp / alias bytes of a compiled program and total = arg + out + temp - alias."""
    stats = compiled.memory_analysis()
    if stats is None:
        return dict(
            argument_bytes=None,
            output_bytes=None,
            temp_bytes=None,
            alias_bytes=None,
            total_bytes=None,
        )
    row = dict(
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
    )
    row["total_bytes"] = (
        row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
    )
    return row


def step_compiler_options(remat: str, cpu_barriers: str = "keep") -> dict:
    """The XLA options a measurement compiles with: the trainer's (:func:`jaxenc.compiler_options`,
    which on CPU keep the remat barriers), or with ``cpu_barriers="expand"`` XLA:CPU's default
    barrier pipeline."""
    options = compiler_options(remat=remat != "none")
    if jax.default_backend() == "cpu" and cpu_barriers == "expand":
        options["xla_disable_hlo_passes"] = ""
    return options


def measure(
    name: str,
    dtype: str,
    remat: str,
    batch: int,
    size: int,
    backbone_kwargs: dict | None = None,
    cpu_barriers: str = "keep",
) -> dict:
    """Lower and compile the train step of one case (never run it); its memory plan and timings."""
    model = build(name, dtype, remat, backbone_kwargs)
    tx = optax.sgd(0.01, momentum=0.9)
    cfg = StepConfig(
        task="segmentation",
        num_classes=NUM_CLASSES,
        aux=model.aux,
        se_loss=model.se_loss,
        aux_weight=AUX_WEIGHT,
        se_weight=SE_WEIGHT,
        sync_bn=True,
    )
    step = make_train_step(model, tx, cfg, make_mesh(jax.devices()[:1]))
    state, data = abstract_step_inputs(model, batch, size, tx)
    start = time.perf_counter()
    lowered = step.lower(state, data)
    lower_s = time.perf_counter() - start
    options = step_compiler_options(remat, cpu_barriers)
    compiled = lowered.compile(options)  # overrides the options make_train_step's jit carries
    compile_s = time.perf_counter() - start - lower_s
    row = dict(
        model=name,
        dtype=dtype,
        remat=remat,
        batch=batch,
        size=size,
        cpu_barriers=cpu_barriers,
        param_bytes=nbytes(state.params),
        batch_stats_bytes=nbytes(state.batch_stats),
        opt_state_bytes=nbytes(state.opt_state),
        lower_s=round(lower_s, 2),
        compile_s=round(compile_s, 2),
        compiler_options=options,
    )
    if backbone_kwargs:
        row["backbone_kwargs"] = backbone_kwargs
    row.update(memory_plan(compiled))
    row["fits_gb"] = fits(row["total_bytes"])
    return row


def add_ratios(results: list[dict]) -> None:
    """``temp_ratio`` / ``total_ratio`` of every non-"none" row against its "none" twin (same case)."""

    def key(r):
        # Rows of one case differ in compiler options by remat (jaxenc.compiler_options), so the
        # barrier setting, not the options, tells a "keep" run from an "expand" one.
        return (
            r["model"],
            r["dtype"],
            r["batch"],
            r["size"],
            json.dumps(r.get("backbone_kwargs")),
            r.get("cpu_barriers", "keep"),
        )

    base = {key(r): r for r in results if r["remat"] == "none" and r.get("temp_bytes") is not None}
    for r in results:
        b = base.get(key(r))
        if r["remat"] != "none" and b is not None and r.get("temp_bytes") is not None:
            r["temp_ratio"] = r["temp_bytes"] / b["temp_bytes"] if b["temp_bytes"] else None
            r["total_ratio"] = r["total_bytes"] / b["total_bytes"] if b["total_bytes"] else None


# --------------------------------------------------------------------------------------------------
# Output


def _fmt_gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _fmt_fits(gbs) -> str:
    return ",".join(str(g) for g in gbs) if gbs else "none"


def table(results: list[dict]) -> str:
    header = [
        "model",
        "dtype",
        "remat",
        "input",
        "arg GiB",
        "out GiB",
        "temp GiB",
        "total GiB",
        "temp ratio",
        "fits (GB)",
        "compile s",
    ]
    lines = [header]
    for r in results:
        ratio = r.get("temp_ratio")
        lines.append(
            [
                r["model"],
                r["dtype"],
                r["remat"],
                f"{r['batch']}x{r['size']}x{r['size']}",
                _fmt_gib(r.get("argument_bytes")),
                _fmt_gib(r.get("output_bytes")),
                _fmt_gib(r.get("temp_bytes")),
                _fmt_gib(r.get("total_bytes")),
                "-" if ratio is None else f"{ratio:.3f}",
                _fmt_fits(r.get("fits_gb")),
                f"{r.get('compile_s', 0):.0f}",
            ]
        )
    return aligned_table(lines, left=4)


LEGEND = """\
Per device, from the compiled train step's memory_analysis() (nothing executed). total = argument +
output + temp - alias (donated state). temp ratio: temp with this remat / temp with remat=none.
fits: device sizes (decimal GB) with total < capacity. On CPU: compiled keeping jax.checkpoint's
optimization barriers unless --cpu-barriers expand (see the module docstring)."""


# --------------------------------------------------------------------------------------------------
# Command line


def _csv(value: str, allowed, what: str, parser) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad or not items:
        parser.error(f"--{what} must name some of {', '.join(allowed)}; got {value!r}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser("benchmarks.memory", __doc__)
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated <model>_<backbone> names (default: the six upstream recipes)",
    )
    parser.add_argument(
        "--dtypes", default=",".join(DTYPES), help="comma-separated subset of float32,bfloat16"
    )
    parser.add_argument(
        "--remat", default=",".join(REMATS), help="comma-separated subset of none,block"
    )
    parser.add_argument("--size", type=int, default=480, help="square crop size (upstream: 480)")
    parser.add_argument("--batch", type=int, default=2, help="images per device (upstream: 2)")
    parser.add_argument(
        "--backbone-kwargs",
        type=json.loads,
        default=None,
        help="JSON ResNet overrides, e.g. '{\"layers\": [1, 1, 1, 1]}' (shrunk smoke runs)",
    )
    parser.add_argument(
        "--cpu-barriers",
        choices=("keep", "expand"),
        default="keep",
        help="CPU only: keep jax.checkpoint's optimization barriers (default, an accelerator's "
        "behaviour) or let XLA:CPU expand them (its default pipeline)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON path (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    args.models = _csv(args.models, None, "models", parser)
    for name in args.models:
        try:
            split_name(name)
        except ValueError as err:
            parser.error(str(err))
    args.dtypes = _csv(args.dtypes, tuple(DTYPES), "dtypes", parser)
    args.remat = _csv(args.remat, REMATS, "remat", parser)
    if args.size < 32 or args.batch < 1:
        parser.error(f"--size must be >= 32 and --batch >= 1; got {args.size}, {args.batch}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    fields = ("models", "dtypes", "remat", "size", "batch", "backbone_kwargs", "cpu_barriers")
    report = new_report(
        args,
        fields,
        notes=__doc__,
        num_classes=NUM_CLASSES,
        capacities_gb=CAPACITIES_GB,
        compiler_options=step_compiler_options("block", args.cpu_barriers),
    )
    report["results"] = []
    for name in args.models:
        for dtype in args.dtypes:
            for remat in args.remat:
                start = time.perf_counter()
                shape = (args.batch, args.size, args.backbone_kwargs, args.cpu_barriers)
                row = measure(name, dtype, remat, *shape)
                report["results"].append(row)
                add_ratios(report["results"])
                # After every case: an interrupted run keeps what it measured.
                write_report(report, args.out)
                print(
                    f"  {name} {dtype} remat={remat}: temp {_fmt_gib(row['temp_bytes'])} GiB, total "
                    f"{_fmt_gib(row['total_bytes'])} GiB ({time.perf_counter() - start:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"segmentation train step memory on {report['machine']['backend']} ({report['machine']['device_kind']}), "
        f"batch {args.batch} per device, {args.size}x{args.size}, jax {report['machine']['jax']}"
    )
    print(table(report["results"]))
    print(LEGEND)
    return 0


if __name__ == "__main__":
    sys.exit(main())
