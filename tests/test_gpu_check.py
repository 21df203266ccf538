"""benchmarks.gpu_check on a CPU-only machine: it refuses at once, and its pieces run (kernels
interpreted, a small model's train step) so the GPU run does not fail on a typo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parent.parent


def test_exits_at_once_without_a_gpu(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--out",
            str(tmp_path),
            "--record",
            str(tmp_path / "r.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "no GPU here" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_kernel_check_and_records_with_interpreted_kernels(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "PALLAS_KWARGS", {"impl": "pallas", "interpret": True})
    monkeypatch.setattr(gpu_check, "TIMED_CALLS", 1)
    monkeypatch.setattr(
        gpu_check, "time_compiled", lambda call, n=1: {"time_ms": 1.0, "min_ms": 1.0, "calls": 1}
    )
    small = {
        "encoding": [dict(B=1, N=40, K=5, D=24)],
        "involution": [dict(B=1, H=6, W=6, C=8, G=2, K=3, stride=1)],
    }
    monkeypatch.setitem(gpu_check.SWEEPS["encoding"], "full", small["encoding"])
    monkeypatch.setitem(gpu_check.SWEEPS["involution"], "full", small["involution"])
    rows = [gpu_check.check_kernel(op, shape) for op, shapes in small.items() for shape in shapes]
    for row in rows:
        assert row["matches"], row
        assert row["max_rel_err_grads"] < 1e-5
    records = gpu_check.kernel_records(rows)
    assert [r["op"] for r in records] == ["encoding", "involution"]
    assert all(r["verified"] and r["device_kind"] == jax.devices()[0].device_kind for r in records)

    path = tmp_path / "verified.json"
    path.write_text(json.dumps({"records": [{**records[0], "jax": "0.0.1"}, records[1]]}))
    gpu_check.merge_records(path, [{**records[1], "speedup_fwd": 9.0}])
    merged = json.loads(path.read_text())["records"]
    assert len(merged) == 2
    assert {r["jax"] for r in merged if r["op"] == "encoding"} == {"0.0.1"}
    assert [r["speedup_fwd"] for r in merged if r["op"] == "involution"] == [9.0]


@pytest.mark.slow
def test_train_step_stage_runs_on_a_small_model():
    row = gpu_check.jaxenc_train_step(batch=2, size=32, name="resnet18", num_calls=1)
    assert (
        row["step_flops_xla"] > 0 and row["time_ms"] > 0 and row["mfu"] is None
    )  # no peak known for a CPU
