"""Inference latency of one model three ways: jaxenc under jit, its StableHLO artifact, onnxruntime.

Run from the repository root (the ONNX column needs the converter ``bash .ci/setup`` installs)::

    .venv/bin/python -m benchmarks.deploy_latency [--cases resnest50:224,fcn_resnest50:512:150]
        [--repeats 10] [--warmup 2] [--budget-s 60] [--out benchmarks/results/deploy_latency_cpu.json]

Per case ``name:size[:nclass]`` (a registry name, a square image, the class count: the model's
default unless given, 1000 for a recognition model, 21 for ``fcn_resnest50``), batch 1, float32,
random weights, the main output only (``outputs="main"``: the segmentation logits at the input size):

* ``jit``: ``jax.jit(model.apply)`` with jaxenc's compiler options, the variables an argument;
* ``stablehlo``: the :func:`jaxenc.export.export_stablehlo` bytes loaded back by
  :func:`jaxenc.export.load_stablehlo` (deserialised ``jax.export`` program, compiled here);
* ``onnxruntime``: :func:`jaxenc.export.export_onnx` (jax2onnx) in an onnxruntime CPU session with
  its default threads.

``time_ms`` is the median of the timed calls (at most ``--repeats``, fewer when the first warm-up
call says they would exceed ``--budget-s``); ``ratio`` = time / jit time; ``max_abs_diff`` is the
largest absolute difference of the output from jit's. Also the export time and artifact size.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.report import (
    aligned_table,
    argument_parser,
    new_report,
    time_calls,
    timing,
    write_report,
)
from jaxenc import export
from jaxenc.compiler_options import compiler_options

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "deploy_latency_cpu.json"
DEFAULT_CASES = "resnest50:224,fcn_resnest50:512"
RUNTIMES = ("jit", "stablehlo", "onnxruntime")


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured model: registry ``name``, square image ``size``, class count ``nclass``."""

    name: str
    size: int
    nclass: int | None

    @classmethod
    def parse(cls, text: str) -> Case:
        parts = text.split(":")
        if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
            raise ValueError(f"a case is name:size[:nclass], got {text!r}")
        return cls(parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None)


def _first_output(out) -> np.ndarray:
    return np.asarray(out[0] if isinstance(out, (tuple, list)) else out)


def _measure(call, repeats: int, warmup: int, budget_s: float) -> tuple[dict, np.ndarray]:
    holder = {}

    def run():
        holder["out"] = jax.block_until_ready(call())

    times = time_calls(run, repeats, warmup=max(warmup, 1), budget_s=budget_s)
    return timing(times, "ms"), _first_output(holder["out"])


def measure_case(case: Case, repeats: int, warmup: int, budget_s: float) -> list[dict]:
    """One row per runtime of ``case``: timing, export time and size, difference from jit."""
    target = export.build_target(case.name, nclass=case.nclass)
    model = target.model
    variables = export.target_variables(
        target, random_weights=True, image_size=(case.size, case.size)
    )
    x = np.random.default_rng(0).standard_normal((1, case.size, case.size, 3), np.float32)
    nclass = getattr(model, "nclass", getattr(model, "num_classes", None))
    common = dict(model=case.name, task=target.task, size=case.size, batch=1, nclass=nclass)
    rows = []

    fn = jax.jit(export.apply_function(model, "main"), compiler_options=compiler_options())
    start = time.perf_counter()
    jax.block_until_ready(fn(variables, x))
    compile_s = time.perf_counter() - start
    stats, reference = _measure(lambda: fn(variables, x), repeats, warmup, budget_s)
    rows.append(dict(common, runtime="jit", first_call_s=compile_s, **stats))

    def artifact_row(runtime: str, make, load) -> dict:
        """Export with ``make``, load with ``load``, time the loaded callable against jit's output."""
        start = time.perf_counter()
        data = make(model, variables, image_size=case.size, outputs="main")
        export_s = time.perf_counter() - start
        call = load(data)
        start = time.perf_counter()
        jax.block_until_ready(call(x))
        first_s = time.perf_counter() - start
        stats, out = _measure(lambda: call(x), repeats, warmup, budget_s)
        return dict(
            common,
            runtime=runtime,
            export_s=export_s,
            artifact_mib=len(data) / 2**20,
            first_call_s=first_s,
            max_abs_diff=float(np.abs(out - reference).max()),
            **stats,
        )

    rows.append(artifact_row("stablehlo", export.export_stablehlo, export.load_stablehlo))
    try:
        rows.append(artifact_row("onnxruntime", export.export_onnx, export.load_onnx))
    except ImportError as err:  # the optional converter or onnxruntime is not installed
        rows.append(dict(common, runtime="onnxruntime", error=str(err)))
    return rows


def table(rows: list[dict]) -> str:
    """The rows as an aligned text table with each runtime's ratio to jit."""
    jit_ms = {(r["model"], r["size"]): r["time_ms"] for r in rows if r["runtime"] == "jit"}
    lines = [["model", "size", "runtime", "ms", "ratio", "max|diff|", "export s", "MiB"]]
    for r in rows:
        if "error" in r:
            lines.append([r["model"], r["size"], r["runtime"], "n/a", "", r["error"][:40], "", ""])
            continue
        ratio = r["time_ms"] / jit_ms[(r["model"], r["size"])]
        lines.append(
            [
                r["model"],
                r["size"],
                r["runtime"],
                f"{r['time_ms']:.1f}",
                f"{ratio:.2f}",
                f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-",
                f"{r['export_s']:.1f}" if "export_s" in r else "-",
                f"{r['artifact_mib']:.1f}" if "artifact_mib" in r else "-",
            ]
        )
    return aligned_table(lines, left=3)


def main(argv=None) -> int:
    p = argument_parser("benchmarks.deploy_latency", __doc__)
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated name:size[:nclass]")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", dest="budget_s", type=float, default=60.0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    cases = [Case.parse(c) for c in args.cases.split(",")]
    report = new_report(args, ("cases", "repeats", "warmup", "budget_s"), batch=1, dtype="float32")
    rows = []
    for case in cases:
        rows += measure_case(case, args.repeats, args.warmup, args.budget_s)
        print(f"measured {case.name} at {case.size}", file=sys.stderr, flush=True)
    report["results"] = rows
    print(table(rows))
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
