"""The training loop: mesh, data, state, steps, periodic evaluation, checkpoints and logging.

Everything numerical happens in `dino.make_train_step`; this file only moves data and writes things down.
The loop never waits on the device between log steps: metrics stay on device until they are printed.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import numpy as np
from absl import logging

from dino_jax import checkpoint, dino, sharding


class TrainingStopped(RuntimeError):
    """Training cannot go on (non-finite step): the message says where and which checkpoint is intact."""


class Writer:
    """metrics.jsonl + TensorBoard events, written by process 0 only."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            import tensorflow as tf  # tf.summary; the data pipeline imports TF anyway

            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tb = tf.summary.create_file_writer(os.path.join(workdir, "tb"))
            self.tf = tf

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        with self.tb.as_default(step=step):
            for k, v in scalars.items():
                if isinstance(v, (int, float)):
                    self.tf.summary.scalar(k, v)
        self.tb.flush()

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _prepare_workdir(workdir: str):
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(f"cannot write to --workdir={workdir} ({e.strerror}); choose a folder you can write to") from e


def _log_setup(config, mesh, spe, num_examples):
    logging.info("process %d of %d; %d local / %d global devices (%s); mesh %s",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform, dict(mesh.shape))
    logging.info("global batch %d (%d per device), %d examples, %d steps per epoch, %d epochs, %d steps in all",
                 config.batch_size, config.batch_size // mesh.size, num_examples, spe, config.epochs, spe * config.epochs)
    logging.info("config:\n%s", config)


class Evaluator:
    """k-NN on the labelled eval split and attention maps of a few fixed validation images (teacher backbone)."""

    def __init__(self, config, model, mesh, workdir):
        from dino_jax.data import pipeline, sources

        self.config, self.model, self.mesh, self.workdir = config, model, mesh, workdir
        self.enabled = bool(config.eval_dataset and config.eval_train_dataset)
        if not self.enabled:
            return
        self.bank = sources.load_source(config.eval_train_dataset, data_dir=config.data_dir,
                                        image_size=config.global_crop_size, grayscale=config.grayscale_input,
                                        max_examples=config.eval_max_train_examples or None)
        self.queries = sources.load_source(config.eval_dataset, data_dir=config.data_dir,
                                           image_size=config.global_crop_size, grayscale=config.grayscale_input)
        self.pipeline = pipeline
        self.num_classes = self.queries.num_classes

    def _batches(self, source):
        return self.pipeline.eval_iterator(source, global_batch=self.config.eval_batch_size,
                                           sharding=sharding.batch_sharding(self.mesh),
                                           resize_size=self.config.eval_resize_size,
                                           crop_size=self.config.eval_crop_size)

    def __call__(self, teacher_params, tag: str) -> dict:
        from dino_jax.evaluation import attention, knn

        if not self.enabled:
            return {}
        c, backbone = self.config, self.model.backbone
        params = teacher_params["backbone"]
        t0 = time.time()
        bank_f, bank_l = knn.extract_features(backbone, params, self._batches(self.bank))
        query_f, query_l = knn.extract_features(backbone, params, self._batches(self.queries))
        results = knn.knn_classifier_multi_k(bank_f, bank_l, query_f, query_l, list(c.nb_knn), c.knn_temperature,
                                             self.num_classes)
        out = {f"knn_top1_k{k}": r["top1"] for k, r in results.items()}
        k20 = 20 if 20 in results else sorted(results)[0]
        out["knn_top1"], out["knn_top5"] = results[k20]["top1"], results[k20]["top5"]
        images, masks = self._attention_images()
        if masks is not None:
            out["attention_jaccard"] = attention.attention_jaccard(backbone, params, images, masks,
                                                                   c.patch_size, c.attention_threshold)
        if jax.process_index() == 0:
            attention.save_attention_grid(os.path.join(self.workdir, "attention", f"{tag}.png"), backbone, params,
                                          images[: c.attention_images], c.patch_size, c.attention_threshold)
        out["eval_seconds"] = time.time() - t0
        return out

    def _attention_images(self):
        """Up to 256 validation images (with their ground-truth masks when the dataset has them)."""
        images, masks = [], []
        for batch in self._batches(self.queries):
            valid = np.asarray(jax.device_get(batch["valid"]))
            images.append(np.asarray(jax.device_get(batch["image"]))[valid])
            if "mask" in batch:
                masks.append(np.asarray(jax.device_get(batch["mask"]))[valid])
            if sum(len(x) for x in images) >= 256:
                break
        return np.concatenate(images)[:256], (np.concatenate(masks)[:256] if masks else None)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train (resuming from WORKDIR if it holds a checkpoint), evaluate periodically, write summary.json."""
    from dino_jax.data import pipeline, sources

    _prepare_workdir(workdir)
    mesh = sharding.make_mesh()
    sharding.check_batch_divisible(config.batch_size, mesh)
    source = sources.load_source(config.dataset, data_dir=config.data_dir, image_size=config.global_crop_size,
                                 grayscale=config.grayscale_input)
    spe = pipeline.steps_per_epoch(source.num_examples, config.batch_size)
    total_steps = spe * config.epochs  # the schedules' length
    if config.stop_after_epochs < 0:
        raise ValueError(f"--config.stop_after_epochs={config.stop_after_epochs}: use 0 (train the whole schedule) or "
                         f"a number of epochs N >= 1 (train the first N of the {config.epochs})")
    end_step = min(total_steps, spe * config.stop_after_epochs) if config.stop_after_epochs > 0 else total_steps
    if end_step < total_steps:
        logging.info("stop_after_epochs=%d: training stops after step %d of the %d-step schedule",
                     config.stop_after_epochs, end_step, total_steps)
    _log_setup(config, mesh, spe, source.num_examples)

    model = dino.build_model(config)
    state = dino.create_train_state(config, model, spe, jax.random.PRNGKey(config.seed))
    state = sharding.shard_state(state, mesh)
    ckpt = checkpoint.Checkpointer(workdir, every_steps=config.checkpoint_every_steps,
                                   max_to_keep=config.max_checkpoints, keep_period=config.keep_every_epochs * spe)
    meta = {"config": config.to_dict(), "steps_per_epoch": spe, "summary": {}}
    if ckpt.latest_step() is not None:
        # Check the architecture first: restoring another architecture's arrays fails with an opaque shape error.
        _check_resumable(ckpt.restore_meta(), config, spe, ckpt.directory)
        if ckpt.latest_step() > end_step:  # resuming would save that state again under the earlier step number
            raise ValueError(f"{ckpt.directory} holds a checkpoint at step {ckpt.latest_step()}, past where this run "
                             f"stops (step {end_step}: epochs={config.epochs}, stop_after_epochs="
                             f"{config.stop_after_epochs}). Raise them, or use another --workdir.")
        state, meta = ckpt.restore(state, sharding.replicated(mesh))
        logging.info("resumed from %s at step %d (epoch %d)", ckpt.directory, int(state.step), int(state.step) // spe)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)

    evaluator = Evaluator(config, model, mesh, workdir)
    summary = dict(meta.get("summary", {}))
    if int(state.step) == 0 and evaluator.enabled:  # the same architecture at its initialisation, same protocol
        init = evaluator(state.teacher_params, "init")
        summary.update({f"{k}_random_init": v for k, v in init.items() if k in ("knn_top1", "attention_jaccard")})
        logging.info("random-init evaluation: %s", _fmt(init))

    step_fn = sharding.jit_train_step(dino.make_train_step(config, spe), mesh)
    start_step = int(state.step)
    batches = pipeline.train_iterator(
        source, global_batch=config.batch_size, sharding=sharding.batch_sharding(mesh), seed=config.seed,
        start_step=start_step, global_crop_size=config.global_crop_size, local_crop_size=config.local_crop_size,
        global_crops_scale=tuple(config.global_crops_scale), local_crops_scale=tuple(config.local_crops_scale),
        local_crops_number=config.local_crops_number, blur_sigma=tuple(config.blur_sigma))

    stop_signal = {"received": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop_signal.update(received=signum))
    writer = Writer(workdir)
    pending, last_saved = [], (ckpt.latest_step() or 0)
    t_start = t_window = time.time()
    session_seconds = 0.0  # training time of this process (excludes evaluation), for images/s and the ETA
    train_seconds = float(summary.get("train_seconds", 0.0))
    step = start_step
    try:
        for step in range(start_step, end_step):
            batch = next(batches)
            state, metrics = step_fn(state, batch)
            pending.append((step, metrics))
            done = step + 1
            epoch_end = done % spe == 0
            if done % config.log_every_steps == 0 or epoch_end or done == end_step or stop_signal["received"]:
                last = _drain(pending, config, writer, ckpt, last_saved)  # waits for the device: timing is true
                now = time.time()
                train_seconds += now - t_window
                session_seconds += now - t_window
                t_window = now
                rate = (done - start_step) * config.batch_size / max(session_seconds, 1e-9)
                eta = (end_step - done) * config.batch_size / max(rate, 1e-9)
                logging.info("epoch %d step %d/%d loss %.4f lr %.3g wd %.3g m %.5f T %.3f H %.3f KL %.3f "
                             "| %.1f img/s | ETA %s", done // spe, done, total_steps, last["loss"], last["lr"],
                             last["wd"], last["momentum"], last["teacher_temp"], last["teacher_entropy"],
                             last["kl"], rate, _hms(eta))
                writer.write(done, {"images_per_second": rate, "epoch": done / spe})
                warning = dino.collapse_warning(last, config.out_dim)
                if warning:
                    logging.warning("step %d: %s", done, warning)
            eval_due = epoch_end and config.eval_every_epochs and (done // spe) % config.eval_every_epochs == 0
            if eval_due or done == end_step:  # both are log steps, so the metrics are already drained
                results = evaluator(state.teacher_params, f"epoch{done // spe:04d}")
                if results:
                    logging.info("evaluation at epoch %d: %s", done // spe, _fmt(results))
                    writer.write(done, results)
                    summary.update(results)
                t_window = time.time()  # evaluation time is not training time
            if done % config.checkpoint_every_steps == 0 or epoch_end or stop_signal["received"]:
                _drain(pending, config, writer, ckpt, last_saved)
                meta = {**meta, "summary": {**summary, "train_seconds": train_seconds}, "epoch": done // spe}
                if ckpt.save(done, state, meta, force=bool(stop_signal["received"]) or epoch_end):
                    last_saved = done
            if stop_signal["received"]:
                logging.warning("signal %d received: saved a checkpoint at step %d; exiting", stop_signal["received"],
                                done)
                ckpt.close()
                writer.close()
                raise SystemExit(0)
        if ckpt.latest_step() != end_step:
            ckpt.save(end_step, state, {**meta, "summary": summary, "epoch": end_step // spe}, force=True)
        ckpt.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        batches.close()
    summary.update({"epochs": end_step // spe, "steps": end_step, "wall_seconds": time.time() - t_start,
                    "train_seconds": train_seconds,
                    "images_per_second": (end_step - start_step) * config.batch_size / max(session_seconds, 1e-9)})
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    logging.info("done: %s", _fmt(summary))
    ckpt.close()
    writer.close()
    return summary


def _drain(pending, config, writer, ckpt, last_saved) -> dict:
    """Pull the pending step metrics to the host, log them, and stop on a non-finite step. Returns the last."""
    if not pending:
        return {}
    host = jax.device_get([m for _, m in pending])
    last = {}
    for (step, _), m in zip(pending, host):
        m = {k: float(v) for k, v in m.items()}
        if not m.pop("finite"):
            where = (f"the last complete checkpoint (step {last_saved}) in {ckpt.directory} is intact"
                     if last_saved else "no checkpoint was written yet")
            if not config.skip_nonfinite_steps:
                ckpt.wait()
                raise TrainingStopped(
                    f"non-finite loss or gradient at step {step + 1} (loss={m['loss']}, "
                    f"grad_norm={m['grad_norm']}); "
                    f"the update was not applied and training stopped; {where}. Lower the lr, raise "
                    "warmup_epochs or set --config.skip_nonfinite_steps=True to skip isolated bad steps.")
            logging.warning("step %d: non-finite loss or gradient, update skipped (skip_nonfinite_steps)", step + 1)
            m["skipped_nonfinite"] = 1.0
        writer.write(step + 1, m)
        last = m
    pending.clear()
    return last


def _check_resumable(meta, config, spe, directory):
    saved = meta.get("config", {})
    for key in ("arch", "patch_size", "out_dim", "embed_dim", "depth", "num_heads", "norm_last_layer",
                "use_bn_in_head", "head_nlayers", "head_hidden_dim", "head_bottleneck_dim"):
        if key in saved and saved[key] != config[key]:
            raise ValueError(f"{directory} holds a checkpoint with {key}={saved[key]!r}, but the config says "
                             f"{config[key]!r}. Use another --workdir, or --config.{key}={saved[key]!r} to resume.")
    if meta.get("steps_per_epoch", spe) != spe:
        logging.warning("steps per epoch changed from %s to %d (batch size or dataset changed): schedules follow the "
                        "new value", meta.get("steps_per_epoch"), spe)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())

