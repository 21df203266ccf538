"""Library demo (the main job until the trainer lands): train a small holocron-layer CNN on a
procedurally generated shape-classification set and report held-out accuracy.

    python -m train.demo [--steps 300] [--batch 64] [--seed 0]

Everything is generated in memory from the seed: nothing is downloaded. The network uses jaxenc
layers end to end (Conv2d, BatchNorm, FReLU, BlurPool2d, TripletAttention, HardMish, SAM,
DropBlock2d, GlobalAvgPool2d) and trains with ``jaxenc.losses.focal_loss`` under optax AdamW.
"""
from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxenc import losses
from jaxenc import nn as jnn

CLASSES = ("disk", "square", "triangle", "ring")
SIZE = 32


def make_shapes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` RGB images (n, 32, 32, 3) in [0, 1] with one shape each, and labels (n,) in [0, 4)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    images = np.empty((n, SIZE, SIZE, 3), np.float32)
    labels = rng.integers(0, len(CLASSES), n)
    for i, label in enumerate(labels):
        r = rng.uniform(5, 10)
        cy, cx = rng.uniform(r + 1, SIZE - r - 1, 2)
        dy, dx = yy - cy, xx - cx
        if label == 0:
            mask = dy**2 + dx**2 <= r**2
        elif label == 1:
            mask = (np.abs(dy) <= r * 0.8) & (np.abs(dx) <= r * 0.8)
        elif label == 2:
            mask = (dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
        else:
            dist = np.sqrt(dy**2 + dx**2)
            mask = (dist <= r) & (dist >= r * 0.55)
        background = rng.uniform(0.0, 0.5, 3) + 0.15 * np.sin(xx[..., None] * rng.uniform(0.2, 0.8) + rng.uniform(0, 6))
        colour = rng.uniform(0.5, 1.0, 3)
        img = np.where(mask[..., None], colour, background)
        images[i] = np.clip(img + rng.normal(0, 0.08, img.shape), 0, 1)
    return images, labels.astype(np.int32)


class ShapeNet(nn.Module):
    """A 3-stage CNN built from jaxenc layers. (N, 32, 32, 3) -> logits (N, num_classes)."""

    num_classes: int = len(CLASSES)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnn.Conv2d(16, 3, padding=1, bias=False)(x)
        x = jnn.FReLU(16)(jnn.BatchNorm()(x, train=train), train=train)
        x = jnn.BlurPool2d(16)(x)  # 16x16
        x = jnn.Conv2d(32, 3, padding=1, bias=False)(x)
        x = jnn.hard_mish(jnn.BatchNorm()(x, train=train))
        x = jnn.TripletAttention()(x, train=train)
        x = jnn.BlurPool2d(32)(x)  # 8x8
        x = jnn.DropBlock2d(p=0.1, block_size=3)(x, train=train)
        x = jnn.Conv2d(64, 3, padding=1, bias=False)(x)
        x = jnn.hard_mish(jnn.BatchNorm()(x, train=train))
        x = jnn.SAM(64)(x)
        x = jnn.GlobalAvgPool2d(flatten=True)(x)
        return nn.Dense(self.num_classes)(x)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="optional JSON file for the final numbers")
    args = parser.parse_args(argv)

    x_train, y_train = make_shapes(4096, seed=args.seed)
    x_test, y_test = make_shapes(1024, seed=args.seed + 10_000)  # held out: a different seed
    model = ShapeNet()
    variables = model.init(jax.random.key(args.seed), x_train[:2])
    params, batch_stats = variables["params"], variables["batch_stats"]
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 30, args.steps)
    tx = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, y, key):
        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
            )
            return losses.focal_loss(logits, y, gamma=2.0), (logits, upd["batch_stats"])

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss, acc

    @jax.jit
    def predict(params, batch_stats, x):
        return jnp.argmax(model.apply({"params": params, "batch_stats": batch_stats}, x), -1)

    print(f"jaxenc demo | jax {jax.__version__} on {jax.devices()[0].platform} | ShapeNet {n_params:,} params")
    print(f"{'step':>6} {'loss':>8} {'train acc':>10} {'img/s':>8}")
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed + 1)
    t_start = time.perf_counter()
    t_last, seen = t_start, 0
    for step in range(1, args.steps + 1):
        idx = rng.integers(0, len(x_train), args.batch)
        key, sub = jax.random.split(key)
        params, batch_stats, opt_state, loss, acc = train_step(
            params, batch_stats, opt_state, x_train[idx], y_train[idx], sub
        )
        seen += args.batch
        if step % 50 == 0 or step == args.steps:
            loss = float(loss)
            now = time.perf_counter()
            print(f"{step:>6} {loss:>8.4f} {float(acc):>10.3f} {seen / (now - t_last):>8.0f}")
            t_last, seen = now, 0
    train_seconds = time.perf_counter() - t_start
    preds = np.concatenate([np.asarray(predict(params, batch_stats, x_test[i : i + 256])) for i in range(0, len(x_test), 256)])
    accuracy = float(np.mean(preds == y_test))
    per_class = {c: float(np.mean(preds[y_test == k] == k)) for k, c in enumerate(CLASSES)}
    print(f"held-out accuracy: {accuracy:.3f} on {len(y_test)} images | per class: "
          + ", ".join(f"{c} {a:.3f}" for c, a in per_class.items()))
    print(f"training time: {train_seconds:.1f} s for {args.steps} steps of {args.batch} (compilation included)")
    result = {"held_out_accuracy": accuracy, "per_class": per_class, "steps": args.steps, "batch": args.batch,
              "train_seconds": train_seconds, "params": int(n_params), "jax": jax.__version__}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
