"""No DeprecationWarning or FutureWarning from anywhere while jaxenc imports, builds, initialises
and applies a model with the default implementation (the acceptance command of the jax 0.12
stack, in a fresh interpreter so no earlier import hides a warning)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = """
import jax, jax.numpy as jnp
from jaxenc.models import get_model
model = get_model("encnet_resnet50s", nclass=21)
x = jnp.ones((1, 32, 32, 3))
variables = model.init(jax.random.key(0), x)
out = model.apply(variables, x)
assert out[0].shape == (1, 32, 32, 21), out[0].shape
"""


@pytest.mark.slow
def test_encnet_init_and_apply_raise_no_deprecation_warning():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::DeprecationWarning",
            "-W",
            "error::FutureWarning",
            "-c",
            SCRIPT,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
