"""Installation layout: `import jaxenc` from anywhere, kernels shipped as jaxenc.kernels only."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_import_from_another_directory(tmp_path):
    proc = _python(
        "import importlib.util, jaxenc, jaxenc.kernels, jaxenc.nn, jaxenc.losses, jaxenc.port, jaxenc.models;"
        "print(jaxenc.__version__, importlib.util.find_spec('kernels'))",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0.1.0", "None"], (
        "a top-level package `kernels` must not be installed"
    )


def test_pyproject_pins_lower_bounds_and_maps_kernels():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = meta["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].strip() for d in deps}
    for required in (
        "jax",
        "flax",
        "optax",
        "orbax-checkpoint",
        "chex",
        "ml-collections",
        "tensorflow-datasets",
        "grain",
        "numpy",
    ):
        assert required in names
    assert not any("==" in d for d in deps), "runtime dependencies pin lower bounds only"
    assert not any(d.startswith(("tensorflow>", "tensorflow=", "clu")) for d in deps)
    assert meta["tool"]["setuptools"]["package-dir"]["jaxenc.kernels"] == "kernels"
    assert "test" in meta["project"]["optional-dependencies"]
    assert meta["project"]["requires-python"] == ">=3.11"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert "bash .ci/run" in first_block
    assert "bash .ci/run" in readme.split("\n## ")[0]


def test_export_package_and_its_dependencies_are_declared():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "jaxenc.export" in meta["tool"]["setuptools"]["packages"]
    deps = meta["project"]["dependencies"]
    assert any(d.startswith("flatbuffers>=") for d in deps), "jax.export serialisation needs it"
    onnx = meta["project"]["optional-dependencies"]["onnx"]
    assert {d.split(">")[0] for d in onnx} >= {"onnx", "onnxruntime"}
    # jax2onnx pins an orbax-checkpoint that excludes ours: installed with --no-deps by .ci/setup.
    assert not any(d.startswith("jax2onnx") for d in onnx)
    assert 'install -q --no-deps "jax2onnx==' in (REPO / ".ci/setup").read_text()
