"""Overhead of the trainer's loop: steps/s of ``train.trainer.train_and_evaluate`` against the same
compiled train step timed alone.

Run from the repository root::

    .venv/bin/python -m benchmarks.train_loop [--configs default,resnest50] [--steps N] [--log-every L]
                                              [--image-size S] [--worker-count W] [--out PATH]

Writes ``benchmarks/results/train_loop.json``. ``default`` is configs/default.py as it is;
``resnest50`` is configs/imagenet_resnest50.py at global batch 8 on the built-in ``shapes_cls`` set
at ``--image-size`` px; both with ``input.worker_count = --worker-count`` (default 0). Per config:

* ``trainer_steps_per_s``: the observer's ``steps_per_sec`` over N steps after an L-step window
  holding the compilation (eval and checkpoint at the last step only, ``optim.warmup_steps = 1``);
* ``step_alone_steps_per_s``: the trainer's own jitted step (captured by wrapping
  ``train.trainer.make_train_step``) called N times on its last batch, blocking at the end only;
* ``step_with_input_steps_per_s``: the same, also reading and sharding a fresh batch per step;
* ``overhead`` = 1 - trainer / step alone (negative values are noise); ``host_batch_ms``: median
  host time of ``next`` + ``shard_batch``.

``--configs default --steps 4 --log-every 2`` is a smoke run of about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAXENC_NO_PROGRESS", "1")  # one plain line per log, no progress bar

import jax

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.report import aligned_table, argument_parser, new_report, write_report  # noqa: E402
from configs import default as default_recipe  # noqa: E402
from configs import imagenet_resnest50  # noqa: E402
from train import observe, trainer  # noqa: E402
from train.data import pipeline  # noqa: E402
from train.step import shard_batch  # noqa: E402

CONFIGS = ("default", "resnest50")
WARMUP_CALLS = 2  # untimed calls of the step alone before its loop


def make_config(name: str, *, image_size: int, worker_count: int):
    """The recipe ``name`` as this benchmark runs it (module docstring)."""
    if name == "default":
        c = default_recipe.get_config()
    elif name == "resnest50":
        c = imagenet_resnest50.get_config()
        c.dataset.name = "shapes_cls"
        c.dataset.num_classes = 5
        c.dataset.image_size = image_size
        c.dataset.num_train = 4096
        c.dataset.num_val = 8
        c.input.global_batch_size = 8
        c.input.eval_batch_size = 8
    else:
        raise ValueError(f"unknown config {name!r}; known: {CONFIGS}")
    c.input.worker_count = worker_count
    return c


def _time_trainer(config, steps: int, log_every: int, workdir: Path) -> tuple[dict, dict]:
    """Runs the trainer; returns its rates and what the step-alone measurement needs."""
    config.train.num_steps = log_every + steps
    config.train.log_every = log_every
    config.train.eval_every = config.train.num_steps
    config.train.checkpoint_every = config.train.num_steps
    config.train.sample_predictions = 0
    config.optim.warmup_steps = (
        1  # the recipes' warmup is longer than a short run; the lr does not change the time
    )
    captured = {}
    real = trainer.make_train_step

    def capture(model, tx, cfg, mesh, lr_schedule=None):
        step_fn = real(model, tx, cfg, mesh, lr_schedule)
        captured.update(step=step_fn, mesh=mesh)

        def step(state, batch):  # keeps the latest state and batch (one Python call per step)
            captured["state"], out = step_fn(state, batch)
            captured["batch"] = batch
            return captured["state"], out

        return step

    trainer.make_train_step = capture
    try:
        t0 = time.perf_counter()
        trainer.train_and_evaluate(config, workdir)
        total_s = time.perf_counter() - t0
    finally:
        trainer.make_train_step = real
    rows = observe.read_metrics(workdir, split="train")
    windows = [
        (r["step"] - prev["step"], r["steps_per_sec"])
        for prev, r in zip(rows, rows[1:])
        if r["step"] > log_every
    ]
    n = sum(k for k, _ in windows)
    assert n == steps and rows[0]["step"] == log_every, (n, steps, [r["step"] for r in rows])
    rates = dict(
        trainer_steps_per_s=n / sum(k / rate for k, rate in windows),
        trainer_window_steps_per_s=[rate for _, rate in windows],
        first_window_s=log_every / rows[0]["steps_per_sec"],
        trainer_total_s=total_s,
    )
    return rates, captured


def _time_step_alone(config, captured: dict, steps: int) -> dict:
    """The captured step from the trainer's final state: alone on one batch, then with fresh input."""
    step_fn, mesh, state, batch = (
        captured["step"],
        captured["mesh"],
        captured["state"],
        captured["batch"],
    )
    batches = pipeline.train_iterator(
        pipeline.get_source(config.dataset, "train"),
        global_batch_size=config.input.global_batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        transform=pipeline.transform_from_config(
            config.input, task=config.task, image_size=config.dataset.image_size, train=True
        ),
        worker_count=config.input.worker_count,
    )
    host_ms = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(shard_batch(mesh, next(batches)))
        host_ms.append((time.perf_counter() - t) * 1e3)
    for _ in range(WARMUP_CALLS):
        state, out = step_fn(state, batch)
    jax.block_until_ready((state, out))
    t0 = time.perf_counter()
    for _ in range(steps):
        state, out = step_fn(state, batch)
    jax.block_until_ready((state, out))
    alone_s = time.perf_counter() - t0
    # The trainer's overlap without its bookkeeping: dispatch, read and shard the next batch, wait for
    # the previous step (as the trainer bounds its run-ahead); no metric fetch until the end.
    t0 = time.perf_counter()
    prev = None
    for _ in range(steps):
        state, out = step_fn(state, batch)
        batch = shard_batch(mesh, next(batches))
        if prev is not None:
            jax.block_until_ready(prev)
        prev = out
    jax.block_until_ready((state, out))
    with_input_s = time.perf_counter() - t0
    return dict(
        step_alone_steps_per_s=steps / alone_s,
        step_with_input_steps_per_s=steps / with_input_s,
        host_batch_ms=statistics.median(host_ms),
    )


def measure(name: str, args: argparse.Namespace) -> dict:
    config = make_config(name, image_size=args.image_size, worker_count=args.worker_count)
    row = dict(
        config=name,
        recipe=f"configs/{'default' if name == 'default' else 'imagenet_resnest50'}.py",
        task=config.task,
        model=config.model.name,
        dataset=config.dataset.name,
        image_size=config.dataset.image_size,
        global_batch_size=config.input.global_batch_size,
        worker_count=config.input.worker_count,
        steps=args.steps,
        log_every=args.log_every,
    )
    with tempfile.TemporaryDirectory(prefix=f"train_loop_{name}_") as workdir:
        rates, captured = _time_trainer(config, args.steps, args.log_every, Path(workdir))
    row.update(rates)
    row.update(_time_step_alone(config, captured, args.steps))
    row["overhead"] = 1.0 - row["trainer_steps_per_s"] / row["step_alone_steps_per_s"]
    row["input_overhead"] = 1.0 - row["step_with_input_steps_per_s"] / row["step_alone_steps_per_s"]
    row["trainer_ms_per_step"] = 1e3 / row["trainer_steps_per_s"]
    row["step_alone_ms_per_step"] = 1e3 / row["step_alone_steps_per_s"]
    print(
        f"{name}: trainer {row['trainer_steps_per_s']:.3g} steps/s, alone {row['step_alone_steps_per_s']:.3g} "
        f"steps/s, overhead {row['overhead']:+.1%}",
        file=sys.stderr,
        flush=True,
    )
    return row


def table(results: list[dict]) -> str:
    header = [
        "config",
        "model",
        "image",
        "batch",
        "steps",
        "trainer steps/s",
        "alone steps/s",
        "trainer ms",
        "alone ms",
        "overhead",
        "+input steps/s",
        "input overhead",
        "host batch ms",
    ]
    lines = [header]
    for r in results:
        lines.append(
            [
                r["config"],
                r["model"],
                str(r["image_size"]),
                str(r["global_batch_size"]),
                f"{r['steps']} (log {r['log_every']})",
                f"{r['trainer_steps_per_s']:.3g}",
                f"{r['step_alone_steps_per_s']:.3g}",
                f"{r['trainer_ms_per_step']:.4g}",
                f"{r['step_alone_ms_per_step']:.4g}",
                f"{r['overhead']:+.1%}",
                f"{r['step_with_input_steps_per_s']:.3g}",
                f"{r['input_overhead']:+.1%}",
                f"{r['host_batch_ms']:.3g}",
            ]
        )
    return aligned_table(lines, left=2)


LEGEND = """\
trainer: train_and_evaluate's own logged rate over the steps after the first (compiling) log window.
alone: the same compiled step, batch on the device, block_until_ready at the end only.
overhead = 1 - trainer / alone. +input: the step with a fresh batch read and sharded after each
dispatch (the trainer's overlap, none of its bookkeeping); input overhead = 1 - +input / alone.
host batch ms: next(train_iter) + shard_batch, median (the work the loop overlaps with the step; on
a CPU backend it shares the cores with the step, so it cannot be fully hidden there)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser("benchmarks.train_loop", __doc__)
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated subset of {','.join(CONFIGS)}",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=50,
        help="measured steps per configuration (after the first window)",
    )
    parser.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="trainer log (metric fetch) interval; the first window is compilation, not measured",
    )
    parser.add_argument(
        "--image-size", type=int, default=64, help="resnest50's image size (default 64 px)"
    )
    parser.add_argument(
        "--worker-count",
        type=int,
        default=0,
        help="grain worker processes (config.input.worker_count)",
    )
    parser.add_argument(
        "--out", type=Path, help="JSON path (default benchmarks/results/train_loop.json)"
    )
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        parser.error(f"--configs must name some of {', '.join(CONFIGS)}; got {args.configs!r}")
    if args.log_every < 1 or args.steps < args.log_every or args.steps % args.log_every:
        parser.error(
            f"--steps must be a positive multiple of --log-every; got {args.steps} and {args.log_every}"
        )
    if args.image_size < 16 or args.worker_count < 0:
        parser.error("--image-size must be >= 16 and --worker-count >= 0")
    args.configs = configs
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = [measure(name, args) for name in args.configs]
    fields = ("configs", "steps", "log_every", "image_size", "worker_count")
    report = new_report(args, fields, notes=__doc__, warmup_calls=WARMUP_CALLS)
    report["results"] = results
    print(
        f"train loop overhead on {report['machine']['backend']} ({report['machine']['device_kind']}), "
        f"jax {report['machine']['jax']}, {report['date']}"
    )
    print(table(results))
    print(LEGEND)
    write_report(report, args.out or REPO_ROOT / "benchmarks" / "results" / "train_loop.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
