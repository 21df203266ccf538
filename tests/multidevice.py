"""Run a test body with N forced CPU devices in a fresh Python process.

``XLA_FLAGS=--xla_force_host_platform_device_count=N`` only takes effect before jax initialises
its backend, so a multi-device body cannot run in the pytest process itself.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_with_cpu_devices(
    n_devices: int, body, *, args: tuple = (), timeout: float = 300.0, env: dict | None = None
) -> str:
    """Run ``body`` with ``n_devices`` CPU devices in a subprocess; return its stdout.

    ``body`` is either source code or a module-level function (it is loaded from its file in the
    subprocess, so it may use that module's imports and helpers), called with ``args`` (Python
    literals, passed through their repr). A non-zero exit or a timeout fails the calling test with
    the subprocess's output.
    """
    if callable(body):
        path = inspect.getsourcefile(body)
        code = textwrap.dedent(
            f"""
            import importlib.util, sys
            sys.path.insert(0, {str(Path(path).parent)!r})
            spec = importlib.util.spec_from_file_location("_multidevice_body", {path!r})
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.{body.__name__}(*{tuple(args)!r})
            """
        )
    else:
        code = textwrap.dedent(body)
    full_env = dict(os.environ)
    full_env["XLA_FLAGS"] = (
        full_env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_devices}"
    ).strip()
    full_env["JAX_PLATFORMS"] = "cpu"
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "tests"), full_env.get("PYTHONPATH", "")]
    )
    full_env.update(env or {})
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(REPO),
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"multi-device body timed out after {timeout}s:\n{exc.stdout}\n{exc.stderr}"
        ) from None
    if proc.returncode != 0:
        raise AssertionError(
            f"multi-device body exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout
