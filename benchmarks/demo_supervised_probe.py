"""How fast can the demo's ViT learn the demo classes WITH labels? An upper bound for what DINO can show on a CPU.

    python benchmarks/demo_supervised_probe.py [--config=configs/demo.py] [--epochs 5] [--lr 5e-4] [--batch_size 64]

Trains the config's backbone (same architecture, grey 32-px demo images, ImageNet normalisation) plus a linear
classifier on its CLS feature with cross-entropy, AdamW and random flips, and prints a table of validation top-1
by epoch. If a ViT cannot learn the classes with labels in N epochs, DINO cannot show a k-NN gain in N epochs.
"""
from __future__ import annotations

import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dino_jax import dino  # noqa: E402
from dino_jax.data import demo  # noqa: E402
from dino_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


class Classifier(nn.Module):
    backbone: nn.Module
    num_classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(self.backbone(x))


config_flags.DEFINE_config_file("config", "configs/demo.py", "Recipe whose backbone and demo images are used.")
flags.DEFINE_integer("epochs", 5, "Training epochs.")
flags.DEFINE_float("lr", 5e-4, "AdamW learning rate.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = FLAGS.config
    size = config.global_crop_size
    train_x, train_y, _ = demo.generate(demo.SIZES["train"], size, seed=demo.SEEDS["train"],
                                        grayscale=config.grayscale_input)
    val_x, val_y, _ = demo.generate(demo.SIZES["val"], size, seed=demo.SEEDS["val"], grayscale=config.grayscale_input)
    train_x, val_x = ((x.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD for x in (train_x, val_x))

    model = Classifier(dino.build_model(config).backbone, len(demo.CLASSES))
    params = jax.jit(model.init)(jax.random.PRNGKey(config.seed), train_x[:2])
    tx = optax.adamw(FLAGS.lr, weight_decay=config.weight_decay)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(
            lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean())(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda p, x: jnp.argmax(model.apply(p, x), -1))
    rng = np.random.default_rng(config.seed)
    n, b = len(train_x), FLAGS.batch_size
    print("| epoch | steps | train loss (last 50) | val top-1 (%) | seconds |\n|---|---|---|---|---|", flush=True)
    print(f"| 0 | 0 | | {100 * float((predict(params, val_x) == val_y).mean()):.1f} | 0 |", flush=True)
    t0, losses = time.time(), []
    for epoch in range(1, FLAGS.epochs + 1):
        order = rng.permutation(n)
        for i in range(0, n - b + 1, b):
            idx = order[i:i + b]
            x = np.where((rng.random(b) < 0.5)[:, None, None, None], train_x[idx][:, :, ::-1], train_x[idx])
            params, opt_state, loss = step(params, opt_state, x, train_y[idx])
            losses.append(float(loss))
        acc = 100 * float((predict(params, val_x) == val_y).mean())
        print(f"| {epoch} | {epoch * (n // b)} | {np.mean(losses[-50:]):.3f} | {acc:.1f} | {time.time() - t0:.0f} |",
              flush=True)
    print(f"val_top1={acc:.1f}")


if __name__ == "__main__":
    app.run(main)
