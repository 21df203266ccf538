"""Time and memory of the ``jaxenc.kernels`` ops (encoding, involution), per implementation.

Run from the repository root::

    .venv/bin/python -m benchmarks.kernels [--quick] [--out PATH] [--ops encoding,involution]
                                           [--repeats N] [--dtype float32|bfloat16]

Prints a row per (op, shape, pass: "fwd" or "fwd+bwd", the gradients of <output, cotangent> w.r.t.
every input) and writes ``benchmarks/results/kernels-<backend>.json`` (README, Benchmarks).
Implementations: "xla", "pallas" (GPU only), "pallas-interpret" (CPU; a correctness path whose times
say nothing about the GPU) and "torch" (CPU only; upstream's formulation, which forms the big tensor).
``time_ms`` is a median after one warm-up call, compilation excluded. JAX memory is the compiled
plan (``memory_analysis()``), not a measurement; torch memory is the peak-RSS rise (VmHWM) of a
second call in a fresh subprocess. On a GPU it adds the copy bandwidth and each result's
``min_io_bytes`` / time. Skipped combinations appear in the JSON with ``skipped`` saying why.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report as reporting
from jaxenc.kernels import encoding, involution

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSES = ("fwd", "fwd+bwd")
DTYPES = ("float32", "bfloat16")

MEASURE_BUDGET_S = (
    20.0  # repeats are cut so one (impl, shape, pass) measurement takes about this long
)
INTERPRET_BUDGET_S = 30.0  # skip pallas-interpret where one call is estimated to take longer
TORCH_MEMORY_FRACTION = (
    0.6  # skip torch where its estimated peak exceeds this share of available RAM
)
COPY_BANDWIDTH_BYTES = 1 << 30  # the array copied to measure the device's copy bandwidth
# JAX keyword arguments of the GPU Pallas implementation (a module global so a CPU test can swap
# in the interpreter and still exercise the GPU code path).
PALLAS_GPU_KWARGS: dict[str, Any] = {"impl": "pallas"}

# Shapes per op. "full" follows typical uses: Encoding heads on 32x32 / 64x64 feature maps with 32
# codewords; involution layers of RedNet stages (7x7 kernels, and a 3x3 stride-2 one).
SWEEPS: dict[str, dict[str, list[dict[str, int]]]] = {
    "encoding": {
        "quick": [dict(B=2, N=64, K=8, D=32)],
        "full": [
            dict(B=8, N=32 * 32, K=32, D=128),
            dict(B=8, N=64 * 64, K=32, D=512),
            dict(B=16, N=64 * 64, K=32, D=512),
        ],
    },
    "involution": {
        "quick": [dict(B=1, H=8, W=8, C=8, G=2, K=3, stride=1)],
        "full": [
            dict(B=8, H=56, W=56, C=64, G=4, K=7, stride=1),
            dict(B=8, H=28, W=28, C=128, G=8, K=7, stride=1),
            dict(B=8, H=56, W=56, C=64, G=4, K=3, stride=2),
        ],
    },
}


# --------------------------------------------------------------------------------------------------
# The two ops: inputs, the JAX and torch formulations, and their sizes


def _normal(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    # float32 straight from the generator: no float64 temporary the size of the input.
    out = rng.standard_normal(shape, dtype=np.float32)
    if scale != 1.0:
        out *= scale
    return out


class EncodingOp:
    """encoding(x (B, N, D), codewords (K, D), scale (K)) -> (B, K, D)."""

    name = "encoding"
    # Seconds per element of the avoided tensor for one interpreted fwd+bwd call, a few times what
    # a 2-core CPU takes (fwd: half); only used to skip shapes.
    interpret_s_per_element = 1e-8

    @staticmethod
    def describe(s: dict) -> str:
        return f"B={s['B']} N={s['N']} K={s['K']} D={s['D']}"

    @staticmethod
    def arrays(s: dict, rng: np.random.Generator):
        """float32 numpy primals (x, codewords, scale) and the output cotangent."""
        x = _normal(rng, (s["B"], s["N"], s["D"]))
        codewords = _normal(rng, (s["K"], s["D"]), 0.5)
        scale = -rng.uniform(0.5, 1.5, s["K"]).astype(np.float32)
        return (x, codewords, scale), _normal(rng, (s["B"], s["K"], s["D"]))

    @staticmethod
    def jax_primals(primals, dtype):
        x, codewords, scale = primals
        # scale stays float32: the op computes the logits in float32 whatever the activations' dtype.
        return jnp.asarray(x, dtype), jnp.asarray(codewords, dtype), jnp.asarray(scale)

    @staticmethod
    def jax_fn(s: dict, kwargs: dict) -> Callable:
        return lambda x, codewords, scale: encoding(x, codewords, scale, **kwargs)

    @staticmethod
    def torch_primals(primals, dtype):
        import torch

        return tuple(torch.from_numpy(a).to(dtype) for a in primals)

    @staticmethod
    def torch_cotangent(ct, dtype):
        import torch

        return torch.from_numpy(ct).to(dtype)

    @staticmethod
    def torch_fn(s: dict) -> Callable:
        """PyTorch-Encoding's formulation (its CPU path): the (B, N, K, D) residuals, twice."""

        def encode(x, codewords, scale):
            scaled_l2 = scale * ((x[:, :, None] - codewords) ** 2).sum(-1)
            assignments = scaled_l2.softmax(dim=2)
            return (assignments[..., None] * (x[:, :, None] - codewords)).sum(1)

        return encode

    @staticmethod
    def avoided_elements(s: dict) -> int:
        return s["B"] * s["N"] * s["K"] * s["D"]


class InvolutionOp:
    """involution(x (B, H, W, C), weights (B, H', W', G, K, K)) -> (B, H', W', C), 'same' padding."""

    name = "involution"
    interpret_s_per_element = 5e-7

    @staticmethod
    def geometry(s: dict) -> tuple[int, int, int]:
        """(padding, H', W') with padding (K - 1) // 2, as RedNet's involution layers."""
        pad = (s["K"] - 1) // 2
        ho = (s["H"] + 2 * pad - s["K"]) // s["stride"] + 1
        wo = (s["W"] + 2 * pad - s["K"]) // s["stride"] + 1
        return pad, ho, wo

    @staticmethod
    def describe(s: dict) -> str:
        return f"B={s['B']} {s['H']}x{s['W']} C={s['C']} G={s['G']} K={s['K']} s={s['stride']}"

    @classmethod
    def arrays(cls, s: dict, rng: np.random.Generator):
        _, ho, wo = cls.geometry(s)
        x = _normal(rng, (s["B"], s["H"], s["W"], s["C"]))
        weights = _normal(rng, (s["B"], ho, wo, s["G"], s["K"], s["K"]), 1.0 / s["K"])
        return (x, weights), _normal(rng, (s["B"], ho, wo, s["C"]))

    @staticmethod
    def jax_primals(primals, dtype):
        return tuple(jnp.asarray(a, dtype) for a in primals)

    @classmethod
    def jax_fn(cls, s: dict, kwargs: dict) -> Callable:
        pad, _, _ = cls.geometry(s)
        return lambda x, weights: involution(
            x, weights, kernel_size=s["K"], stride=s["stride"], padding=pad, **kwargs
        )

    @staticmethod
    def torch_primals(primals, dtype):
        """NCHW x and holocron's (B, G, K², H', W') kernel layout."""
        import torch

        x, weights = primals
        b, ho, wo, g, k, _ = weights.shape
        x_t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(dtype)
        w_t = (
            torch.from_numpy(weights)
            .reshape(b, ho, wo, g, k * k)
            .permute(0, 3, 4, 1, 2)
            .contiguous()
        )
        return x_t, w_t.to(dtype)

    @staticmethod
    def torch_cotangent(ct, dtype):
        import torch

        return torch.from_numpy(ct).permute(0, 3, 1, 2).contiguous().to(dtype)

    @classmethod
    def torch_fn(cls, s: dict) -> Callable:
        """holocron.nn.Involution2d's multiply-add: unfold -> (B, G, C/G, K², H', W') · kernel -> sum."""
        import torch.nn.functional as F

        pad, ho, wo = cls.geometry(s)
        k, g = s["K"], s["G"]

        def involve(x, weights):
            b, c = x.shape[:2]
            unfolded = F.unfold(x, k, dilation=1, padding=pad, stride=s["stride"])
            unfolded = unfolded.reshape(b, g, c // g, k * k, ho, wo)
            return (weights[:, :, None] * unfolded).sum(dim=3).reshape(b, c, ho, wo)

        return involve

    @classmethod
    def avoided_elements(cls, s: dict) -> int:
        _, ho, wo = cls.geometry(s)
        return s["B"] * s["C"] * s["K"] ** 2 * ho * wo


OPS = {op.name: op for op in (EncodingOp, InvolutionOp)}


# --------------------------------------------------------------------------------------------------
# Implementations available on a backend


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str  # label in the table and the JSON
    framework: str  # "jax" or "torch"
    kwargs: tuple[tuple[str, Any], ...] = ()  # keyword arguments of the jaxenc.kernels op

    @property
    def interpreted(self) -> bool:
        return dict(self.kwargs).get("interpret", False)


def implementations(backend: str, torch_available: bool) -> list[Impl]:
    """The implementations measured on ``backend``, in table order."""
    xla = Impl("xla", "jax", (("impl", "xla"),))
    if backend == "gpu":
        return [xla, Impl("pallas", "jax", tuple(PALLAS_GPU_KWARGS.items()))]
    impls = [xla, Impl("pallas-interpret", "jax", (("impl", "pallas"), ("interpret", True)))]
    if backend == "cpu" and torch_available:
        impls.append(Impl("torch", "torch"))
    return impls


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Measurements


def time_calls(call: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds per call of ``call`` after one warm-up call, at most ``repeats`` of them and about
    MEASURE_BUDGET_S in all (at least one)."""
    return reporting.time_calls(call, repeats, warmup=1, budget_s=MEASURE_BUDGET_S)


def timing(times: list[float]) -> dict:
    """{'time_ms', 'min_ms', 'repeats'} of per-call seconds."""
    return reporting.timing(times, "ms")


def with_gradients(fn: Callable) -> Callable:
    """fn(*primals) -> fn'(*primals, cotangent) returning the gradient of <fn(*primals), cotangent>."""

    def forward_backward(*args):
        *primals, cotangent = args
        _, vjp = jax.vjp(fn, *primals)
        return vjp(cotangent)

    return forward_backward


def nbytes(tree) -> int:
    return sum(
        int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(tree)
    )


def measure_jax(fn: Callable, args: tuple, repeats: int) -> dict:
    """Compile ``fn`` for ``args``, time it and read the compiled program's memory plan."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    row = timing(time_calls(lambda: jax.block_until_ready(compiled(*args)), repeats))
    row.update(compile_s=compile_s, min_io_bytes=nbytes(args) + nbytes(jax.eval_shape(fn, *args)))
    row.update(memory_plan(compiled))
    return row


def memory_plan(compiled) -> dict:
    """Bytes XLA's buffer assignment plans for a compiled program (None where it cannot say)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return dict(temp_bytes=None, argument_bytes=None, output_bytes=None, peak_bytes=None)
    return dict(
        temp_bytes=stats.temp_size_in_bytes,
        argument_bytes=stats.argument_size_in_bytes,
        output_bytes=stats.output_size_in_bytes,
        peak_bytes=stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes,
    )


def torch_call(op, shape: dict, dtype: str, pass_: str, primals_np, ct_np) -> Callable[[], Any]:
    """A no-argument callable running ``pass_`` of the torch formulation on fixed inputs."""
    import torch

    tdtype = getattr(torch, dtype)
    fn = op.torch_fn(shape)
    primals = op.torch_primals(primals_np, tdtype)
    if pass_ == "fwd":

        def call():
            with torch.no_grad():
                return fn(*primals)

        return call
    leaves = [p.requires_grad_() for p in primals]
    cotangent = op.torch_cotangent(ct_np, tdtype)
    return lambda: torch.autograd.grad(fn(*leaves), leaves, cotangent)


def measure_torch(op, shape: dict, dtype: str, pass_: str, primals_np, ct_np, repeats: int) -> dict:
    row = timing(time_calls(torch_call(op, shape, dtype, pass_, primals_np, ct_np), repeats))
    row.update(torch_rss_in_subprocess(op, shape, dtype, pass_))
    return row


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, ru_maxrss) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def torch_rss_probe(op_name: str, shape: dict, dtype: str, pass_: str) -> dict:
    """Peak-RSS rise over one torch call in this (fresh) process.

    A first call at the same shape pages in the code its kernels run and starts the thread pools;
    then the peak mark is reset to the current RSS and a second call is measured. Run with glibc's
    mmap threshold pinned low (see :func:`torch_rss_in_subprocess`) so the second call's large
    buffers are fresh pages rather than memory the first call left in malloc's free lists.
    """
    op = OPS[op_name]
    call = torch_call(op, shape, dtype, pass_, *op.arrays(shape, np.random.default_rng(0)))
    call()
    gc.collect()
    reset = _reset_peak_rss()
    before = _proc_status_bytes("VmRSS")
    call()
    peak = _proc_status_bytes("VmHWM")
    method = (
        "VmHWM after reset (clear_refs) minus VmRSS before, second call"
        if reset
        else "VmHWM minus VmRSS before, second call; the peak mark could not be reset, so this "
        "is at least the earlier peak of the process"
    )
    return dict(rss_peak_delta_bytes=max(0, peak - before), rss_method=method)


def torch_rss_in_subprocess(op, shape: dict, dtype: str, pass_: str) -> dict:
    spec = json.dumps(dict(op=op.name, shape=shape, dtype=dtype, pass_=pass_))
    # Allocations above 64 KiB are mmapped and returned to the OS when freed (glibc otherwise
    # raises the threshold to 32 MiB after the first large free and keeps such blocks around).
    env = dict(os.environ, JAX_PLATFORMS="cpu", MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels", "--torch-rss-probe", spec],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        print(
            f"warning: torch RSS probe failed for {spec}:\n{proc.stderr[-2000:]}", file=sys.stderr
        )
        return dict(rss_peak_delta_bytes=None, rss_method=f"probe failed (rc {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def skip_reason(impl: Impl, op, shape: dict, pass_: str, itemsize: int) -> str | None:
    """Why (impl, shape, pass) is not measured, or None."""
    elements = op.avoided_elements(shape)
    if impl.interpreted:
        estimate = elements * op.interpret_s_per_element * (1.0 if pass_ == "fwd+bwd" else 0.5)
        if estimate > INTERPRET_BUDGET_S:
            return f"Pallas interpreter estimated at {estimate:.0f} s per call (> {INTERPRET_BUDGET_S:.0f} s)"
    if impl.framework == "torch":
        # Several tensors of the avoided size are alive at once (residuals and their squares / the
        # product; in the backward their gradients): measured 2x (fwd) and 4x (fwd+bwd), plus a margin.
        estimate = elements * itemsize * (2.5 if pass_ == "fwd" else 5)
        budget = TORCH_MEMORY_FRACTION * available_memory_bytes()
        if estimate > budget:
            return (
                f"torch estimated at {estimate / 2**30:.1f} GiB (> {budget / 2**30:.1f} GiB, "
                f"{TORCH_MEMORY_FRACTION:.0%} of the available RAM)"
            )
    return None


def copy_bandwidth_gbps(nbytes_: int | None = None, repeats: int = 10) -> float:
    """Device copy bandwidth: (bytes read + written) / median time of ``x + 1`` on float32 x of
    ``nbytes_`` (default COPY_BANDWIDTH_BYTES) bytes.

    ``x + 1`` rather than ``x + 0`` or ``jnp.copy``: XLA simplifies those to no work at all.
    """
    nbytes_ = COPY_BANDWIDTH_BYTES if nbytes_ is None else nbytes_
    x = jnp.zeros((nbytes_ // 4,), jnp.float32)
    compiled = jax.jit(lambda a: a + 1.0).lower(x).compile()
    seconds = statistics.median(time_calls(lambda: jax.block_until_ready(compiled(x)), repeats))
    return 2 * nbytes_ / seconds / 1e9


def add_bandwidth(row: dict, copy_gbps: float) -> None:
    """Achieved bandwidth of a JAX result (its minimum I/O over its time) and its share of copy."""
    row["bandwidth_gbps"] = row["min_io_bytes"] / (row["time_ms"] * 1e-3) / 1e9
    row["bandwidth_fraction"] = row["bandwidth_gbps"] / copy_gbps


# --------------------------------------------------------------------------------------------------
# The sweep


def measure_case(
    op, shape: dict, dtype: str, impls: list[Impl], repeats: int, copy_gbps: float | None
) -> list[dict]:
    """Every (impl, pass) of one op and shape."""
    itemsize = jnp.dtype(dtype).itemsize
    primals_np, ct_np = op.arrays(shape, np.random.default_rng(0))
    primals = op.jax_primals(primals_np, dtype)
    cotangent = jnp.asarray(ct_np, dtype)
    common = dict(
        op=op.name,
        shape=dict(shape),
        dtype=dtype,
        avoided_tensor_bytes=op.avoided_elements(shape) * itemsize,
    )
    rows = []
    for pass_ in PASSES:
        for impl in impls:
            row = dict(common, impl=impl.name, **{"pass": pass_})
            reason = skip_reason(impl, op, shape, pass_, itemsize)
            if reason is not None:
                row["skipped"] = reason
            elif impl.framework == "jax":
                fn = op.jax_fn(shape, dict(impl.kwargs))
                args = primals if pass_ == "fwd" else (*primals, cotangent)
                row.update(measure_jax(fn if pass_ == "fwd" else with_gradients(fn), args, repeats))
                if copy_gbps is not None:
                    add_bandwidth(row, copy_gbps)
            else:
                row.update(measure_torch(op, shape, dtype, pass_, primals_np, ct_np, repeats))
                row["largest_intermediate_bytes"] = row["avoided_tensor_bytes"]
            rows.append(row)
            print(
                f"  {op.name} {op.describe(shape)} {pass_:7s} {impl.name:16s} "
                f"{_fmt_ms(row.get('time_ms'))} ms",
                file=sys.stderr,
                flush=True,
            )
    return rows


def machine_info(backend: str, impls: list[Impl]) -> dict:
    info = reporting.machine_info()
    if any(i.framework == "torch" for i in impls):
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return info


# --------------------------------------------------------------------------------------------------
# Output


def _fmt_ms(ms) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _fmt_mib(n) -> str:
    if n is None:
        return "-"
    mib = n / 2**20
    return f"{mib:.3g}" if mib < 100 else f"{mib:.0f}"


def memory_of(row: dict):
    """The memory number shown in the table: the compiled peak (JAX) or the measured RSS rise (torch)."""
    return row.get("peak_bytes", row.get("rss_peak_delta_bytes"))


def table(results: list[dict], impls: list[Impl]) -> str:
    """One row per (op, shape, pass); per implementation its time (ms) and memory (MiB)."""
    header = ["op", "shape", "pass"]
    for impl in impls:
        mem = "rssΔ MiB" if impl.framework == "torch" else "peak MiB"
        header += [f"{impl.name} ms", f"{impl.name} {mem}"]
    header.append("avoided MiB")
    lines = [header]
    keys = list(dict.fromkeys((r["op"], json.dumps(r["shape"]), r["pass"]) for r in results))
    for op_name, shape_json, pass_ in keys:
        rows = {
            r["impl"]: r
            for r in results
            if (r["op"], json.dumps(r["shape"]), r["pass"]) == (op_name, shape_json, pass_)
        }
        shape = json.loads(shape_json)
        line = [op_name, OPS[op_name].describe(shape), pass_]
        for impl in impls:
            row = rows.get(impl.name, {})
            line += [
                _fmt_ms(row.get("time_ms")),
                _fmt_mib(memory_of(row)) if "time_ms" in row else "-",
            ]
        line.append(_fmt_mib(next(iter(rows.values()))["avoided_tensor_bytes"]))
        lines.append(line)
    return reporting.aligned_table(lines, left=3)


LEGEND = """\
ms: median wall time per call after warm-up. peak MiB: XLA's compiled plan (arguments + outputs +
temporaries). rssΔ MiB: torch's measured peak-RSS rise over one call (fresh subprocess). avoided MiB:
the tensor the kernels never form (encoding residuals B·N·K·D / involution unfold B·C·K²·H'·W').
pallas-interpret is the Pallas interpreter on CPU (a correctness path, not a performance one).
'-': not measured (see "skipped" in the JSON)."""


def bandwidth_table(results: list[dict]) -> str:
    lines = ["op      shape                              pass     impl     GB/s   of copy"]
    for r in results:
        if "bandwidth_gbps" in r:
            lines.append(
                f"{r['op']:<8}{OPS[r['op']].describe(r['shape']):<35}{r['pass']:<9}{r['impl']:<8}"
                f"{r['bandwidth_gbps']:6.0f}   {r['bandwidth_fraction']:6.1%}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = reporting.argument_parser("benchmarks.kernels", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test, seconds)")
    parser.add_argument(
        "--out", type=Path, help="JSON path (default benchmarks/results/kernels-<backend>.json)"
    )
    parser.add_argument(
        "--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls per measurement (median reported)"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--torch-rss-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown or not ops:
        parser.error(f"--ops must name some of {', '.join(OPS)}; got {args.ops!r}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    args.ops = ops
    return args


def detect_backend() -> str:
    return jax.default_backend()


def run(args: argparse.Namespace) -> tuple[dict, list[Impl]]:
    """The JSON report of the sweep ``args`` asks for, and the implementations it measured."""
    backend = detect_backend()
    impls = implementations(backend, torch_available())
    copy_gbps = copy_bandwidth_gbps() if backend == "gpu" else None
    results = []
    for op_name in args.ops:
        for shape in SWEEPS[op_name]["quick" if args.quick else "full"]:
            results += measure_case(OPS[op_name], shape, args.dtype, impls, args.repeats, copy_gbps)
    report = reporting.new_report(
        args,
        ("quick", "repeats", "dtype", "ops"),
        machine=machine_info(backend, impls),
        notes=__doc__,
        measure_budget_s=MEASURE_BUDGET_S,
        interpret_budget_s=INTERPRET_BUDGET_S,
    )
    report.update(implementations=[i.name for i in impls], results=results)
    if copy_gbps is not None:
        report["copy_bandwidth_gbps"] = copy_gbps
    return report, impls


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.torch_rss_probe:
        spec = json.loads(args.torch_rss_probe)
        print(json.dumps(torch_rss_probe(spec["op"], spec["shape"], spec["dtype"], spec["pass_"])))
        return 0
    report, impls = run(args)
    print(
        f"jaxenc.kernels on {report['machine']['backend']} ({report['machine']['device_kind']}), "
        f"{args.dtype}, jax {report['machine']['jax']}"
    )
    print(table(report["results"], impls))
    print(LEGEND)
    if "copy_bandwidth_gbps" in report:
        print(f"\ncopy bandwidth: {report['copy_bandwidth_gbps']:.0f} GB/s")
        print(bandwidth_table(report["results"]))
    suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
    out = (
        args.out
        or REPO_ROOT
        / "benchmarks"
        / "results"
        / f"kernels-{report['machine']['backend']}{suffix}.json"
    )
    reporting.write_report(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
