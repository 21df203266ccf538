"""One prepared GPU check: kernels verified and timed, a ResNeSt-50 train step against PyTorch.

Run from the repository root on a machine with a GPU::

    python -m benchmarks.gpu_check --out benchmarks/results/ [--record kernels/verified.json]

It checks both Pallas kernels against their XLA twins (values and gradients, float32, the shapes of
``benchmarks.kernels.SWEEPS["full"]``) and times them against XLA (fwd, fwd+bwd); times a ResNeSt-50
bfloat16 train step with its MFU (XLA's FLOP count over the dense bf16 peak) and, when torch and timm
are installed, timm's ``resnest50d``; writes ``gpu_check-<device>.json`` under ``--out`` and to
``--record`` the records ``impl="auto"`` reads (``verified`` when every shape matched, with the
geometric-mean speed-ups). Without a GPU it exits at once (status 2); a stage that would run past
the time budget is skipped and says so in the JSON. README, Pallas kernels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import OPS, SWEEPS, with_gradients

BUDGET_S = 450.0  # stop starting new stages after this (the whole check must end within 8 minutes)
TIMED_CALLS = 20
# Dense bf16 tensor-core peak per device kind, FLOP/s (vendor datasheets, no sparsity).
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
KERNEL_RTOL = {"float32": 1e-4}
# Keyword arguments of the Pallas implementation (a module global so a CPU test can run this code
# with the kernels interpreted).
PALLAS_KWARGS: dict[str, Any] = {"impl": "pallas"}
START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - START


def device_kind() -> str:
    return jax.devices()[0].device_kind


def time_compiled(call: Callable[[], Any], n: int = TIMED_CALLS) -> dict:
    """Median and min milliseconds of ``n`` calls after two warm-up calls (each synchronised)."""
    for _ in range(2):
        jax.block_until_ready(call())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return {"time_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "calls": n}


def max_rel_err(actual, expected) -> float:
    """max |a - e| / max |e| over every leaf (the kernels' tests use the same scale-relative form)."""
    worst = 0.0
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        worst = max(worst, float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30)))
    return worst


# --------------------------------------------------------------------------------------------------
# 1. Kernels


def check_kernel(op_name: str, shape: dict, dtype: str = "float32") -> dict:
    op = OPS[op_name]
    rng = np.random.default_rng(0)
    primals_np, ct_np = op.arrays(shape, rng)
    primals = op.jax_primals(primals_np, jnp.dtype(dtype))
    ct = jnp.asarray(ct_np, jnp.dtype(dtype))
    row: dict[str, Any] = {"op": op_name, "shape": shape, "dtype": dtype}
    outputs = {}
    for impl, kwargs in (("xla", {"impl": "xla"}), ("pallas", PALLAS_KWARGS)):
        fn = op.jax_fn(shape, kwargs)
        fwd = jax.jit(fn)
        bwd = jax.jit(with_gradients(fn))
        t0 = time.perf_counter()
        out = jax.block_until_ready(fwd(*primals))
        grads = jax.block_until_ready(bwd(*primals, ct))
        row[f"{impl}_compile_and_first_call_s"] = time.perf_counter() - t0
        outputs[impl] = (out, grads)
        row[f"{impl}_fwd"] = time_compiled(lambda: fwd(*primals))
        row[f"{impl}_fwd_bwd"] = time_compiled(lambda: bwd(*primals, ct))
    row["max_rel_err_out"] = max_rel_err(outputs["pallas"][0], outputs["xla"][0])
    row["max_rel_err_grads"] = max_rel_err(outputs["pallas"][1], outputs["xla"][1])
    row["matches"] = max(row["max_rel_err_out"], row["max_rel_err_grads"]) <= KERNEL_RTOL[dtype]
    for p in ("fwd", "fwd_bwd"):
        row[f"speedup_{p}"] = row[f"xla_{p}"]["time_ms"] / row[f"pallas_{p}"]["time_ms"]
    return row


def kernel_records(rows: list[dict]) -> list[dict]:
    """One verification record per op that ran on every shape of its sweep."""
    records = []
    for op_name in OPS:
        op_rows = [r for r in rows if r["op"] == op_name and "error" not in r]
        if not op_rows or len(op_rows) != len(SWEEPS[op_name]["full"]):
            continue
        geo = lambda key: math.exp(statistics.fmean(math.log(r[key]) for r in op_rows))  # noqa: E731
        records.append(
            {
                "op": op_name,
                "backend": "triton",
                "device_kind": device_kind(),
                "jax": jax.__version__,
                "verified": all(r["matches"] for r in op_rows),
                "max_rel_err": max(
                    max(r["max_rel_err_out"], r["max_rel_err_grads"]) for r in op_rows
                ),
                "speedup_fwd": geo("speedup_fwd"),
                "speedup_fwd_bwd": geo("speedup_fwd_bwd"),
                "shapes": [r["shape"] for r in op_rows],
                "dtype": "float32",
                "date": datetime.date.today().isoformat(),
            }
        )
    return records


# --------------------------------------------------------------------------------------------------
# 2. jaxenc ResNeSt-50 train step


def jaxenc_train_step(
    batch: int = 64, size: int = 224, name: str = "resnest50", num_calls: int = TIMED_CALLS
) -> dict:
    import optax

    from jaxenc.models import get_model

    model = get_model(name, dtype=jnp.bfloat16)
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
    labels = jax.random.randint(jax.random.key(1), (batch,), 0, 1000)
    t0 = time.perf_counter()
    variables = jax.jit(lambda x: model.init(jax.random.key(2), x))(images[:1])
    init_s = time.perf_counter() - t0
    tx = optax.sgd(0.1, momentum=0.9)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    def step(state, images, labels):
        params, stats, opt = state

        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), labels
            ).mean()
            return loss, upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), stats, opt), loss

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, images, labels).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan")))
    holder = {"state": state}

    def call():
        holder["state"], loss = compiled(holder["state"], images, labels)
        return loss

    timing = time_compiled(call, num_calls)
    kind = device_kind()
    peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
    step_s = timing["time_ms"] / 1e3
    return {
        "model": name,
        "batch": batch,
        "image_size": size,
        "dtype": "bfloat16 compute, float32 params",
        "init_s": init_s,
        "compile_s": compile_s,
        **timing,
        "images_per_s": batch / step_s,
        "step_flops_xla": flops,
        "peak_bf16_flops": peak,
        "mfu": flops / step_s / peak if peak else None,
    }


# --------------------------------------------------------------------------------------------------
# 3. PyTorch reference step


def torch_train_step(batch: int = 64, size: int = 224) -> dict:
    try:
        import timm
        import torch
    except ImportError as err:
        return {"skipped": f"torch/timm not installed: {err}"}
    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    model = (
        timm.create_model("resnest50d", num_classes=1000)
        .to(dev)
        .to(memory_format=torch.channels_last)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images = torch.randn(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(images), labels)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(TIMED_CALLS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    return {
        "model": "timm resnest50d",
        "batch": batch,
        "image_size": size,
        "dtype": "bf16 autocast, channels_last",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "time_ms": ms,
        "min_ms": min(times),
        "calls": TIMED_CALLS,
        "images_per_s": batch / (ms / 1e3),
    }


# --------------------------------------------------------------------------------------------------


def stage(results: dict, name: str, fn: Callable[[], Any]) -> Any:
    if elapsed() > BUDGET_S:
        results["skipped_stages"].append(f"{name}: time budget ({BUDGET_S:.0f} s) spent")
        return None
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as err:  # a failing stage is reported, the others still run
        out = {"error": f"{type(err).__name__}: {err}"[:2000]}
    print(f"[{elapsed():6.1f} s] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def merge_records(path: Path, new: list[dict]) -> None:
    """Replace the records of the same (op, device kind, jax version), keep the others."""
    data = json.loads(path.read_text()) if path.exists() else {"records": []}
    keys = {(r["op"], r["device_kind"], r["jax"]) for r in new}
    data["records"] = [
        r for r in data["records"] if (r["op"], r["device_kind"], r["jax"]) not in keys
    ] + new
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="benchmarks/results/", help="folder for gpu_check-<device>.json"
    )
    parser.add_argument(
        "--record", default="kernels/verified.json", help="kernel verification records to update"
    )
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(
            f"benchmarks.gpu_check: no GPU here (jax backend {jax.default_backend()!r}); it needs a CUDA "
            "GPU and jax with CUDA support. Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    kind = device_kind()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device_kind": kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "skipped_stages": [],
        "kernels": [],
    }
    print(f"gpu_check on {kind}, jax {jax.__version__}", flush=True)
    for op_name in OPS:
        for shape in SWEEPS[op_name]["full"]:
            row = stage(results, f"{op_name} {shape}", lambda: check_kernel(op_name, shape))
            if row is not None:
                results["kernels"].append(
                    row if "op" in row else {"op": op_name, "shape": shape, **row}
                )
    results["jaxenc_resnest50"] = stage(results, "jaxenc resnest50 train step", jaxenc_train_step)
    results["torch_resnest50d"] = stage(results, "torch resnest50d train step", torch_train_step)
    jx, tc = results["jaxenc_resnest50"] or {}, results["torch_resnest50d"] or {}
    if "time_ms" in jx and "time_ms" in tc:
        results["jaxenc_over_torch_time"] = jx["time_ms"] / tc["time_ms"]
    records = kernel_records(results["kernels"])
    results["records"] = records
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_check-{kind.replace(' ', '_')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    if records:
        merge_records(Path(args.record), records)
    print_table(results)
    print(
        f"wrote {path}; {len(records)} kernel record(s) to {args.record}; {elapsed():.0f} s in all"
    )
    return 0


def print_table(results: dict) -> None:
    print(
        "\n| op | shape | err (out, grads) | fwd xla / pallas ms | fwd+bwd xla / pallas ms | speed-up fwd, fwd+bwd |"
    )
    print("|---|---|---|---|---|---|")
    for r in results["kernels"]:
        if "error" in r:
            print(f"| {r['op']} | {r['shape']} | error: {r['error'][:80]} | | | |")
            continue
        print(
            f"| {r['op']} | {r['shape']} | {r['max_rel_err_out']:.1e}, {r['max_rel_err_grads']:.1e} | "
            f"{r['xla_fwd']['time_ms']:.3f} / {r['pallas_fwd']['time_ms']:.3f} | "
            f"{r['xla_fwd_bwd']['time_ms']:.3f} / {r['pallas_fwd_bwd']['time_ms']:.3f} | "
            f"{r['speedup_fwd']:.2f}, {r['speedup_fwd_bwd']:.2f} |"
        )
    for key in ("jaxenc_resnest50", "torch_resnest50d"):
        print(f"{key}: {json.dumps(results.get(key))[:400]}")
    if "jaxenc_over_torch_time" in results:
        print(f"jaxenc / torch step time: {results['jaxenc_over_torch_time']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
