"""Per-iteration schedules with exactly the reference's values (`utils.cosine_scheduler` and the teacher temperature).

They are precomputed numpy arrays (as in the reference) and looked up by `state.step` inside the jitted step,
so lr, weight decay, teacher momentum and teacher temperature are bit-for-bit the reference's numbers.
"""
from __future__ import annotations

import numpy as np


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """Linear warm-up (linspace incl. both ends) then cosine from base to final over the remaining iterations."""
    warmup_iters = int(warmup_epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs):
    """Per-epoch teacher temperature: linspace warm-up (both ends included), then constant."""
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(epochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))


def training_schedules(config, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """Every schedule a DINO run needs, per iteration (the teacher temperature expanded from per-epoch)."""
    epochs = config.epochs
    lr = config.lr * config.batch_size / 256.0  # linear scaling rule on the global batch
    return {
        "lr": cosine_scheduler(lr, config.min_lr, epochs, steps_per_epoch, warmup_epochs=config.warmup_epochs),
        "wd": cosine_scheduler(config.weight_decay, config.weight_decay_end, epochs, steps_per_epoch),
        "momentum": cosine_scheduler(config.momentum_teacher, 1.0, epochs, steps_per_epoch),
        "teacher_temp": np.repeat(teacher_temp_schedule(
            config.warmup_teacher_temp, config.teacher_temp, config.warmup_teacher_temp_epochs, epochs),
            steps_per_epoch),
    }
