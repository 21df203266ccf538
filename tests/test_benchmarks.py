"""The kernel benchmark script (benchmarks/kernels.py) runs end to end and reports what it claims.

The benchmark's numbers are only checked for shape and sign (timings depend on the machine), but
the script itself must not rot: ``--quick`` is run as the README documents it, in a subprocess,
and its JSON must hold one measured entry per op x implementation x pass available on CPU. The
GPU-only code path (copy bandwidth, achieved bandwidth per result, the "pallas" implementation)
cannot run here, so it is driven in-process with the backend reported as "gpu" and the Pallas
kernels swapped for the interpreter.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from optional_torch import HAVE_TORCH

REPO_ROOT = Path(__file__).resolve().parent.parent
OPS = ("encoding", "involution")
PASSES = ("fwd", "fwd+bwd")
# torch is the CPU reference where it is installed (stack A); stack B has none.
CPU_IMPLS = ("xla", "pallas-interpret", "torch") if HAVE_TORCH else ("xla", "pallas-interpret")


@pytest.fixture
def bench(monkeypatch):
    """benchmarks.kernels, importable from the repository root whatever pytest's working directory."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    return importlib.import_module("benchmarks.kernels")


def _entries(report, **match):
    return [r for r in report["results"] if all(r[k] == v for k, v in match.items())]


@pytest.mark.slow
def test_quick_run_writes_every_cpu_measurement(tmp_path):
    out = tmp_path / "k.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels", "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("op "))
    torch_columns = ("torch ms", "torch rssΔ MiB") if HAVE_TORCH else ()
    for column in (
        "shape",
        "pass",
        "xla ms",
        "xla peak MiB",
        "pallas-interpret ms",
        *torch_columns,
        "avoided MiB",
    ):
        assert column in header

    report = json.loads(out.read_text())
    assert report["machine"]["backend"] == "cpu"
    assert report["implementations"] == list(CPU_IMPLS)
    assert "copy_bandwidth_gbps" not in report  # GPU only
    for op in OPS:
        for impl in CPU_IMPLS:
            for pass_ in PASSES:
                (row,) = _entries(report, op=op, impl=impl, **{"pass": pass_})
                assert "skipped" not in row, row
                assert row["dtype"] == "float32"
                assert row["time_ms"] > 0 and row["repeats"] >= 1
                assert row["avoided_tensor_bytes"] > 0
                if impl == "torch":
                    assert row["largest_intermediate_bytes"] == row["avoided_tensor_bytes"]
                    assert (
                        row["rss_peak_delta_bytes"] is not None and row["rss_peak_delta_bytes"] >= 0
                    )
                else:
                    assert row["peak_bytes"] >= row["argument_bytes"] + row["output_bytes"] > 0
                    assert row["temp_bytes"] >= 0
                    # XLA also counts the output tuple's pointer table (8 bytes per element).
                    planned_io = row["argument_bytes"] + row["output_bytes"]
                    assert 0 <= planned_io - row["min_io_bytes"] <= 8 * 3
                    assert "bandwidth_gbps" not in row


def test_avoided_tensor_sizes(bench):
    """The sizes quoted next to the kernels: B·N·K·D residuals and B·C·K²·H'·W' unfolded taps."""
    assert bench.EncodingOp.avoided_elements(dict(B=8, N=1024, K=32, D=128)) == 8 * 1024 * 32 * 128
    # 'same' padding: stride 1 keeps 56x56, stride 2 gives 28x28.
    inv = dict(B=8, H=56, W=56, C=64, G=4, K=7, stride=1)
    assert bench.InvolutionOp.avoided_elements(inv) == 8 * 64 * 49 * 56 * 56
    assert bench.InvolutionOp.geometry(dict(inv, K=3, stride=2)) == (1, 28, 28)


def test_implementations_per_backend(bench):
    assert [i.name for i in bench.implementations("cpu", torch_available=True)] == [
        "xla",
        "pallas-interpret",
        "torch",
    ]
    assert [i.name for i in bench.implementations("cpu", torch_available=False)] == [
        "xla",
        "pallas-interpret",
    ]
    gpu = bench.implementations("gpu", torch_available=True)
    assert [i.name for i in gpu] == ["xla", "pallas"]
    assert dict(gpu[1].kwargs) == {"impl": "pallas"} and not gpu[1].interpreted


def test_skips_are_reported_with_a_reason(bench, monkeypatch):
    interp = bench.Impl("pallas-interpret", "jax", (("impl", "pallas"), ("interpret", True)))
    huge = dict(B=64, N=128 * 128, K=64, D=1024)
    assert "Pallas interpreter estimated" in bench.skip_reason(
        interp, bench.EncodingOp, huge, "fwd", 4
    )
    monkeypatch.setattr(bench, "available_memory_bytes", lambda: 2**30)
    torch_impl = bench.Impl("torch", "torch")
    assert "of the available RAM" in bench.skip_reason(torch_impl, bench.EncodingOp, huge, "fwd", 4)
    tiny = dict(B=1, N=4, K=2, D=4)
    assert bench.skip_reason(torch_impl, bench.EncodingOp, tiny, "fwd+bwd", 4) is None

    skipped = dict(
        op="encoding",
        impl="torch",
        shape=huge,
        dtype="float32",
        avoided_tensor_bytes=4,
        skipped="too big",
        **{"pass": "fwd"},
    )
    measured = dict(skipped, impl="xla", time_ms=1.5, peak_bytes=2**20)
    del measured["skipped"]
    text = bench.table([measured, skipped], bench.implementations("cpu", torch_available=True))
    row = text.splitlines()[2].split()
    assert row[-7:] == ["1.5", "1", "-", "-", "-", "-", "3.81e-06"]


def test_command_line_errors(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--ops", "encoding,conv"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])
    args = bench.parse_args(["--ops", "involution", "--dtype", "bfloat16"])
    assert args.ops == ["involution"] and args.dtype == "bfloat16"


def test_bandwidth_arithmetic(bench):
    row = dict(min_io_bytes=2 * 10**9, time_ms=1000.0)
    bench.add_bandwidth(row, copy_gbps=4.0)
    assert row["bandwidth_gbps"] == pytest.approx(2.0)
    assert row["bandwidth_fraction"] == pytest.approx(0.5)
    assert bench.copy_bandwidth_gbps(1 << 20, repeats=2) > 0


@pytest.mark.slow
def test_gpu_code_path_with_the_interpreter(bench, monkeypatch, tmp_path, capsys):
    """backend 'gpu': copy bandwidth, per-result bandwidth, no torch; kernels interpreted on CPU."""
    monkeypatch.setattr(bench, "detect_backend", lambda: "gpu")
    monkeypatch.setattr(bench, "PALLAS_GPU_KWARGS", {"impl": "pallas", "interpret": True})
    monkeypatch.setattr(bench, "COPY_BANDWIDTH_BYTES", 1 << 20)
    out = tmp_path / "gpu.json"
    assert bench.main(["--quick", "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "copy bandwidth:" in printed and "of copy" in printed

    report = json.loads(out.read_text())
    assert report["implementations"] == ["xla", "pallas"]
    assert report["copy_bandwidth_gbps"] > 0
    assert len(report["results"]) == len(OPS) * 2 * len(PASSES)
    for row in report["results"]:
        assert row["bandwidth_gbps"] > 0
        assert row["bandwidth_fraction"] == pytest.approx(
            row["bandwidth_gbps"] / report["copy_bandwidth_gbps"]
        )
        assert row["bandwidth_gbps"] == pytest.approx(row["min_io_bytes"] / row["time_ms"] / 1e6)


# --- benchmarks/memory.py (train-step memory with and without remat): its arithmetic, no compiles ----


@pytest.fixture
def memory_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    return importlib.import_module("benchmarks.memory")


def test_memory_plan_total_ratio_and_fits(memory_bench):
    class Stats:
        argument_size_in_bytes, output_size_in_bytes, temp_size_in_bytes, alias_size_in_bytes = (
            30,
            20,
            100,
            15,
        )

    class Compiled:
        def memory_analysis(self):
            return Stats()

    plan = memory_bench.memory_plan(Compiled())
    assert plan == dict(
        argument_bytes=30, output_bytes=20, temp_bytes=100, alias_bytes=15, total_bytes=135
    )
    assert memory_bench.fits(15 * 10**9) == [16, 40, 80]
    assert memory_bench.fits(16 * 10**9) == [40, 80]  # total < capacity, decimal GB
    assert memory_bench.fits(90 * 10**9) == [] and memory_bench.fits(None) == []

    case = dict(
        model="deeplab_resnest50", dtype="float32", batch=2, size=480, compiler_options=None
    )
    rows = [
        dict(
            case,
            remat="none",
            temp_bytes=10 * 2**30,
            total_bytes=12 * 2**30,
            argument_bytes=2**30,
            output_bytes=2**30,
            fits_gb=[16, 40, 80],
            compile_s=3.0,
        ),
        dict(
            case,
            remat="block",
            temp_bytes=4 * 2**30,
            total_bytes=6 * 2**30,
            argument_bytes=2**30,
            output_bytes=2**30,
            fits_gb=[16, 40, 80],
            compile_s=4.0,
        ),
        dict(case, dtype="bfloat16", remat="block", temp_bytes=2**30, total_bytes=3 * 2**30),
    ]
    memory_bench.add_ratios(rows)
    assert rows[1]["temp_ratio"] == pytest.approx(0.4) and rows[1]["total_ratio"] == pytest.approx(
        0.5
    )
    assert (
        "temp_ratio" not in rows[0] and "temp_ratio" not in rows[2]
    )  # no float32/none twin for bfloat16
    line = memory_bench.table(rows[:2]).splitlines()[3].split()
    assert line == [
        "deeplab_resnest50",
        "float32",
        "block",
        "2x480x480",
        "1.00",
        "1.00",
        "4.00",
        "6.00",
        "0.400",
        "16,40,80",
        "4",
    ]


def test_memory_command_line(memory_bench):
    args = memory_bench.parse_args(
        ["--models", "psp_resnet50s", "--dtypes", "bfloat16", "--size", "256"]
    )
    assert (args.models, args.dtypes, args.remat, args.size, args.batch) == (
        ["psp_resnet50s"],
        ["bfloat16"],
        ["none", "block"],
        256,
        2,
    )
    assert memory_bench.split_name("deeplab_resnest269") == ("deeplab", "resnest269")
    for bad in (
        ["--models", "deeplab"],
        ["--dtypes", "float16"],
        ["--remat", "dots"],
        ["--batch", "0"],
    ):
        with pytest.raises(SystemExit):
            memory_bench.parse_args(bad)
    # On CPU the plan is made keeping jax.checkpoint's optimization barriers (see the script's docstring).
    on_cpu = memory_bench.jax.default_backend() == "cpu"
    keep = {"xla_disable_hlo_passes": "cse_barrier_expander"} if on_cpu else {}
    assert memory_bench.step_compiler_options("block", "keep") == keep
    assert memory_bench.step_compiler_options("block", "expand") == (
        {"xla_disable_hlo_passes": ""} if on_cpu else {}
    )
    assert "xla_disable_hlo_passes" not in memory_bench.step_compiler_options("none", "keep")


@pytest.fixture
def deploy_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    return importlib.import_module("benchmarks.deploy_latency")


@pytest.mark.slow
def test_deploy_latency_measures_every_runtime(deploy_bench, tmp_path, capsys):
    out = tmp_path / "d.json"
    assert (
        deploy_bench.main(
            ["--cases", "resnet18:32:10", "--repeats", "1", "--warmup", "0", "--out", str(out)]
        )
        == 0
    )
    rows = json.loads(out.read_text())["results"]
    assert [r["runtime"] for r in rows] == list(deploy_bench.RUNTIMES)
    have_onnx = importlib.util.find_spec("jax2onnx") is not None
    for r in rows:
        if r["runtime"] == "onnxruntime" and not have_onnx:
            assert "jax2onnx" in r["error"]
            continue
        assert r["time_ms"] > 0 and r["repeats"] == 1
        if r["runtime"] != "jit":
            assert r["max_abs_diff"] < 1e-4 and r["artifact_mib"] > 0
    table = capsys.readouterr().out
    assert "stablehlo" in table and "ratio" in table


def test_deploy_latency_case_errors(deploy_bench):
    assert deploy_bench.Case.parse("fcn_resnest50:512:150") == deploy_bench.Case(
        "fcn_resnest50", 512, 150
    )
    with pytest.raises(ValueError, match="name:size"):
        deploy_bench.Case.parse("resnest50")
