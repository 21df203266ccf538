"""JAX's persistent compilation cache for the trainer and the evaluator.

``setting`` (``config.train.compile_cache``): ``"user"`` (default: ``$JAXENC_CACHE_DIR``, else
``$XDG_CACHE_HOME/jaxenc/xla``, default ``~/.cache/jaxenc/xla``), ``"workdir"``
(``<workdir>/xla_cache``), ``"off"`` or empty (no cache), or a directory. Programs compiling in
under ``MIN_COMPILE_S`` are not written. JAX keys entries by program, options, backend and
jax/jaxlib version, so a stale entry is never used.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["MIN_COMPILE_S", "cache_dir", "enable_compile_cache"]

MIN_COMPILE_S = 1.0


def cache_dir(setting: str | None, workdir: str | os.PathLike | None) -> Path | None:
    """The directory ``setting`` names (see the module docstring), or None when the cache is off."""
    if setting is None or setting in ("", "off"):
        return None
    if setting == "user":
        if os.environ.get("JAXENC_CACHE_DIR"):
            return Path(os.environ["JAXENC_CACHE_DIR"]).expanduser()
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
        return base / "jaxenc" / "xla"
    if setting == "workdir":
        if workdir is None:
            raise ValueError("compile_cache='workdir' needs a workdir")
        return Path(workdir) / "xla_cache"
    return Path(setting).expanduser()


def enable_compile_cache(
    setting: str | None, workdir: str | os.PathLike | None = None
) -> Path | None:
    """Point JAX's persistent compilation cache at ``cache_dir(setting, workdir)`` (or turn it off).

    Call before the first compilation. Returns the directory in use (None: off).
    """
    path = cache_dir(setting, workdir)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    return path
