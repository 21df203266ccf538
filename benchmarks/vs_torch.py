"""jaxenc models against their upstream PyTorch definitions on CPU, one process, same shapes.

Run from the repository root (stack A: needs torch and the oracles ``bash .ci/setup`` installs)::

    .venv/bin/python -m benchmarks.vs_torch [--models resnest50,deeplab_resnest50] [--repeats 5]
                                            [--warmup 2] [--out benchmarks/results/vs_torch_cpu.json]

Per model, float32, random weights: ``train`` (one SGD-momentum step; jaxenc: one jitted function,
state donated) and ``eval`` (forward); ``time_s`` is the median of ``--repeats`` calls after
``--warmup``; torch runs NCHW and channels_last and ``ratio`` = jaxenc / the faster. Also jaxenc's
``init_s`` and ``compile_s``. Upstream: the ``resnest`` package's torch ResNet / ResNeXt / ResNeSt and
the tests' torch DeepLabV3 (``tests/test_models_segmentation.py``: ``torch_model_for``), output stride 8.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.report import machine_info, time_calls, timing_s, write_report
from jaxenc import models
from jaxenc.compiler_options import compiler_options

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "vs_torch_cpu.json"
NUM_CLASSES = 1000
SEG_CLASSES = 150  # ADE20K, the deeplab_resnest50 recipe's dataset


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked model: its jaxenc name, task, batch and image size."""

    name: str
    task: str  # "classification" | "segmentation"
    batch: int
    size: int


CASES = {
    c.name: c
    for c in (
        Case("resnet50", "classification", 4, 224),
        Case("resnest50", "classification", 4, 224),
        Case("resnext50_32x4d", "classification", 4, 224),
        Case("resnest101", "classification", 4, 224),
        Case("deeplab_resnest50", "segmentation", 2, 256),
    )
}


# --------------------------------------------------------------------------------------------------
# jaxenc


def jaxenc_model(case: Case):
    if case.task == "segmentation":
        return models.get_segmentation_model(
            case.name.split("_", 1)[0],
            dataset="ade20k",
            backbone=case.name.split("_", 1)[1],
            nclass=SEG_CLASSES,
        )
    return models.get_model(case.name, num_classes=NUM_CLASSES)


def cross_entropy(outputs, labels) -> jax.Array:
    """Mean cross-entropy of every output (class axis last) against integer ``labels``."""
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return sum(
        optax.softmax_cross_entropy_with_integer_labels(o.astype(jnp.float32), labels).mean()
        for o in outputs
    )


def measure_jaxenc(
    case: Case, images: np.ndarray, labels: np.ndarray, repeats: int, warmup: int
) -> dict:
    model = jaxenc_model(case)
    start = time.perf_counter()
    variables = jax.block_until_ready(models.init_variables(model, jax.random.key(0), images[:1]))
    init_s = time.perf_counter() - start
    tx = optax.sgd(0.01, momentum=0.9)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    x, y = jnp.asarray(images), jnp.asarray(labels)

    def train_step(state, x, y):
        params, stats, opt = state

        def loss_fn(p):
            out, upd = model.apply(
                {"params": p, "batch_stats": stats},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(1)},
            )
            return cross_entropy(out, y), upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), stats, opt), loss

    def eval_forward(variables, x):
        return model.apply(variables, x, train=False)

    start = time.perf_counter()
    options = compiler_options()
    train = (
        jax.jit(train_step, donate_argnums=0, compiler_options=options).lower(state, x, y).compile()
    )
    train_compile_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate = jax.jit(eval_forward, compiler_options=options).lower(variables, x).compile()
    eval_compile_s = time.perf_counter() - start
    holder = {"state": state}

    def train_call():
        holder["state"], loss = train(holder["state"], x, y)
        jax.block_until_ready(loss)

    row = {
        "compiler_options": options,
        "init_s": init_s,
        "train_compile_s": train_compile_s,
        "eval_compile_s": eval_compile_s,
    }
    row["train"] = timing_s(time_calls(train_call, repeats, warmup))
    trained = {
        "params": holder["state"][0],
        "batch_stats": holder["state"][1],
    }  # `variables` was donated
    row["eval"] = timing_s(
        time_calls(lambda: jax.block_until_ready(evaluate(trained, x)), repeats, warmup)
    )
    return row


# --------------------------------------------------------------------------------------------------
# torch


def torch_model(case: Case):
    """The upstream torch definition of ``case`` (see the module docstring)."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    if case.task == "segmentation":
        import test_models_segmentation as seg

        return seg.torch_model_for(jaxenc_model(case))
    from torch_ref import resnest_torch

    ref = resnest_torch()
    if case.name == "resnest50":
        return ref.resnest.resnest50(num_classes=NUM_CLASSES)
    if case.name == "resnest101":
        return ref.resnest.resnest101(num_classes=NUM_CLASSES)
    plain = dict(radix=0, num_classes=NUM_CLASSES)
    if case.name == "resnet50":
        return ref.resnet.ResNet(ref.resnet.Bottleneck, [3, 4, 6, 3], **plain)
    if case.name == "resnext50_32x4d":
        return ref.resnet.ResNet(
            ref.resnet.Bottleneck, [3, 4, 6, 3], groups=32, bottleneck_width=4, **plain
        )
    raise ValueError(f"no torch definition for {case.name!r}")


def measure_torch(
    case: Case, images: np.ndarray, labels: np.ndarray, repeats: int, warmup: int
) -> dict:
    import torch

    torch.manual_seed(0)
    rows = {}
    for layout in ("nchw", "channels_last"):
        model = torch_model(case)
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        y = torch.from_numpy(labels.astype(np.int64))
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def loss_of(out):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            return sum(torch.nn.functional.cross_entropy(o, y) for o in outs)

        def train_call():
            model.train()
            opt.zero_grad(set_to_none=True)
            loss_of(model(x)).backward()
            opt.step()

        def eval_call():
            model.eval()
            with torch.no_grad():
                model(x)

        rows[layout] = {
            "train": timing_s(time_calls(train_call, repeats, warmup)),
            "eval": timing_s(time_calls(eval_call, repeats, warmup)),
        }
    return rows


# --------------------------------------------------------------------------------------------------


def inputs(case: Case) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((case.batch, case.size, case.size, 3)).astype(np.float32)
    if case.task == "segmentation":
        labels = rng.integers(0, SEG_CLASSES, (case.batch, case.size, case.size))
    else:
        labels = rng.integers(0, NUM_CLASSES, (case.batch,))
    return images, labels.astype(np.int32)


def compare(case: Case, repeats: int, warmup: int) -> dict:
    images, labels = inputs(case)
    torch_rows = measure_torch(case, images, labels, repeats, warmup)
    jax_row = measure_jaxenc(case, images, labels, repeats, warmup)
    row = {
        "model": case.name,
        "task": case.task,
        "batch": case.batch,
        "image_size": case.size,
        "dtype": "float32",
        "torch": torch_rows,
        "jaxenc": jax_row,
    }
    for mode in ("train", "eval"):
        best = min(torch_rows, key=lambda layout: torch_rows[layout][mode]["time_s"])
        row[f"{mode}_reference"] = best
        row[f"{mode}_ratio"] = jax_row[mode]["time_s"] / torch_rows[best][mode]["time_s"]
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| model | mode | torch NCHW s | torch channels_last s | jaxenc s | jaxenc / best torch |"
        "\n|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        for mode in ("train", "eval"):
            t = r["torch"]
            lines.append(
                f"| {r['model']} (b{r['batch']}, {r['image_size']}) | {mode} | {t['nchw'][mode]['time_s']:.3f} | "
                f"{t['channels_last'][mode]['time_s']:.3f} | {r['jaxenc'][mode]['time_s']:.3f} | "
                f"{r[mode + '_ratio']:.2f}x |"
            )
    lines.append(
        "\n| model | jaxenc init s | train-step compile s | eval compile s |\n|---|---|---|---|"
    )
    for r in rows:
        j = r["jaxenc"]
        lines.append(
            f"| {r['model']} | {j['init_s']:.1f} | {j['train_compile_s']:.1f} | {j['eval_compile_s']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"vs_torch: unknown model(s) {unknown}; choose from {list(CASES)}")
    rows = []
    for name in names:
        print(f"[vs_torch] {name} ...", file=sys.stderr, flush=True)
        rows.append(compare(CASES[name], args.repeats, args.warmup))
    print(table(rows))
    info = machine_info(torch=torch.__version__, torch_threads=torch.get_num_threads())
    write_report(
        {
            "date": datetime.date.today().isoformat(),
            "machine": info,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "results": rows,
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
