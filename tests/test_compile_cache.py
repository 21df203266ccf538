"""train.compile_cache: where the persistent XLA cache goes, the off switch, and that a second
process reads what the first wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from train.compile_cache import cache_dir

REPO = Path(__file__).resolve().parent.parent


def test_cache_dir_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXENC_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir("user", None) == tmp_path / "env"
    monkeypatch.delenv("JAXENC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("user", None) == tmp_path / "xdg" / "jaxenc" / "xla"
    assert cache_dir("workdir", tmp_path / "run") == tmp_path / "run" / "xla_cache"
    assert cache_dir(str(tmp_path / "mine"), None) == tmp_path / "mine"
    for off in ("off", "", None):
        assert cache_dir(off, tmp_path) is None
    with pytest.raises(ValueError, match="compile_cache='workdir' needs a workdir"):
        cache_dir("workdir", None)


_PROBE = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from train.compile_cache import enable_compile_cache
    hits = []
    jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if "cache_hits" in name else None)
    enable_compile_cache(sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache even this small program
    f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)
    print(float(f(jnp.ones((8, 8))).sum()), "hits", len(hits))
""")


def _probe(setting: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, setting],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_second_process_uses_the_entries_the_first_wrote(tmp_path):
    cache = tmp_path / "cache"
    first = _probe(str(cache)).split()
    assert first[1:] == ["hits", "0"]
    assert any(cache.iterdir()), "the first process wrote no cache entry"
    second = _probe(str(cache)).split()
    assert second[0] == first[0] and second[1] == "hits" and int(second[2]) >= 1


def test_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXENC_CACHE_DIR", str(tmp_path / "user"))
    assert _probe("off").endswith("hits 0")
    assert not (tmp_path / "user").exists()
