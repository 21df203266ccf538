"""What every benchmark script shares: the machine description, timed calls, an aligned text table
and the JSON report under ``benchmarks/results/``."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

__all__ = [
    "aligned_table",
    "argument_parser",
    "machine_info",
    "new_report",
    "time_calls",
    "timing_s",
    "write_report",
]


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def machine_info(**extra: Any) -> dict:
    """Backend, device kind and count, jax/jaxlib/Python versions, CPU count, platform (+ ``extra``)."""
    device = jax.devices()[0]
    return dict(
        backend=jax.default_backend(),
        device_kind=device.device_kind,
        device_count=jax.device_count(),
        jax=jax.__version__,
        jaxlib=_jaxlib_version(),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        platform=platform.platform(),
        **extra,
    )


def argument_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The parser of ``python -m <module>``, described by the first paragraph of its docstring."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])


def new_report(
    args: Any, fields: tuple[str, ...], *, machine: dict | None = None, notes=None, **settings
) -> dict:
    """The head of every JSON report: ``machine`` (default :func:`machine_info`), the UTC time, the
    settings (the named command-line ``fields`` of ``args``, then ``settings``) and ``notes``."""
    return dict(
        machine=machine_info() if machine is None else machine,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        settings={**{name: getattr(args, name) for name in fields}, **settings},
        notes=notes,
    )


def time_calls(
    call: Callable[[], Any], repeats: int, warmup: int = 1, budget_s: float | None = None
) -> list[float]:
    """Seconds of each timed call of ``call`` after ``warmup`` untimed ones: ``repeats`` calls, or
    fewer (at least one) when ``budget_s`` is given and the last warm-up call says they would take longer."""
    warm = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        call()
        warm = time.perf_counter() - start
    if budget_s is not None:
        repeats = max(1, min(repeats, int(budget_s / max(warm, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


_UNIT_SCALE = {"s": 1.0, "ms": 1e3}


def timing(times: list[float], unit: str = "s") -> dict:
    """{'time_<unit>': median, 'min_<unit>', 'repeats'} of per-call seconds, in ``unit`` (s or ms)."""
    scale = _UNIT_SCALE[unit]
    return {
        f"time_{unit}": statistics.median(times) * scale,
        f"min_{unit}": min(times) * scale,
        "repeats": len(times),
    }


def timing_s(times: list[float]) -> dict:
    """{'time_s': median, 'min_s', 'repeats'} of per-call seconds."""
    return timing(times, "s")


def aligned_table(lines: list[list], left: int) -> str:
    """Rows of cells (the first is the header) as aligned text: the first ``left`` columns
    left-aligned, the others right-aligned, a dashed rule under the header."""
    cells = [[str(c) for c in line] for line in lines]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    out = [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))
        )
        for line in cells
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_report(report: dict, out: Path) -> None:
    """``report`` as indented JSON at ``out`` (parents created); says where on stderr."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
