"""Shared fixtures. Helpers live in importable modules beside this file:
``optional_torch`` (torch when installed, else a stand-in that skips the test touching it),
``torch_ref`` (upstream oracles), ``parity`` (value/gradient comparisons), ``multidevice``
(N CPU devices in a subprocess)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The trainer's persistent compilation cache (train/compile_cache.py, "user" setting) goes to a
# directory of this run, never to ~/.cache: set before xdist starts its workers, so they and the
# trainer subprocesses share it, and removed at exit by the process that made it.
if "JAXENC_CACHE_DIR" not in os.environ:
    os.environ["JAXENC_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxenc-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAXENC_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from optional_torch import HAVE_TORCH, torch  # noqa: E402
from torch_ref import holocron_functional, holocron_nn  # noqa: E402

if HAVE_TORCH:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same torch seed, so results do not depend on test order."""
    if HAVE_TORCH:
        torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="session")
def hnn():
    """``holocron.nn`` from pylocron 0.3.0 (upstream oracle)."""
    return holocron_nn()


@pytest.fixture(scope="session")
def hF():
    """``holocron.nn.functional`` from pylocron 0.3.0 (upstream oracle)."""
    return holocron_functional()


@pytest.fixture
def rng():
    """A fixed jax PRNG key."""
    return jax.random.key(0)
