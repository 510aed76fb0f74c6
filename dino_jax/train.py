"""The training loop: mesh, data, state, steps, periodic evaluation, checkpoints and logging.

Everything numerical happens in `dino.make_train_step`; this file only moves data and writes things down.
Metrics stay on device until a log step prints them, and the loop dispatches at most `MAX_STEPS_AHEAD` steps
ahead of the device: enough to keep it busy, and a stop request (SIGTERM) is then a stop within that many steps.
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
from jax.experimental import multihost_utils

from dino_jax import checkpoint, dino, paths, sharding
from dino_jax import config as config_lib


# JAX dispatches steps asynchronously: unbounded, the loop could run up to log_every_steps ahead of a busy device
# (it otherwise waits only to print metrics), and a stop request would wait for all of those steps before its save.
MAX_STEPS_AHEAD = 2


class TrainingStopped(RuntimeError):
    """Training cannot go on (non-finite step): the message says where and which checkpoint is intact."""


class Writer:
    """metrics.jsonl + TensorBoard events, written by process 0 only, through `paths` (so also to a bucket).

    TensorBoard events are written in tensorboard's record format rather than with tf.summary, so that they go
    through the path layer like every other file. One events file per process start, as tf.summary does. On a URL
    both files are uploaded every 2 minutes and at flush(): flush before each checkpoint so that a resumed run loses
    no line.
    """

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            import socket

            from tensorboard.summary.writer.record_writer import RecordWriter

            self.jsonl = paths.GrowingFile(paths.join(workdir, "metrics.jsonl"))
            name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.dino_jax.v2"
            self.tb = RecordWriter(paths.GrowingFile(paths.join(workdir, "tb", name)))
            self.tb.write(self._event(0, file_version="brain.Event:2"))

    @staticmethod
    def _event(step, **fields) -> bytes:
        from tensorboard.compat.proto import event_pb2

        return event_pb2.Event(wall_time=time.time(), step=step, **fields).SerializeToString()

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        from tensorboard.compat.proto import summary_pb2

        self.jsonl.write((json.dumps({"step": step, **scalars}) + "\n").encode())
        values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()
                  if isinstance(v, (int, float))]
        self.tb.write(self._event(step, summary=summary_pb2.Summary(value=values)))

    def flush(self):
        if self.enabled:
            self.jsonl.flush()
            self.tb.flush()

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


class StopRequest:
    """SIGTERM (or the platform's preemption notice) as a stop at one step that every process agrees on.

    Asked after each step is dispatched; True means: save this step and exit. One process: a SIGTERM handler sets a
    flag. Several: JAX's preemption sync manager, because a process cannot stop alone (the others would wait in the
    next step's collectives) and each process's Python loop runs ahead of its device by a different amount.
    jax.distributed catches SIGTERM on every process; on a notice from any of them the coordination service takes
    the largest step number any process has reached, plus one, as the stop step. A check costs ~15 us and no device
    work. The service must see the step numbers from the first one on (a notice before the first check would pick
    step 1), hence `first_step` as early as possible; orbax asks it the same question at each save.
    """

    def __init__(self, first_step: int):
        self.reason = None
        self._signum = None
        self._previous = None
        self._multi = jax.process_count() > 1
        if self._multi:
            try:
                multihost_utils.reached_preemption_sync_point(first_step)
            except RuntimeError as e:  # jax_enable_preemption_service is off
                logging.warning("a SIGTERM will stop this run without a checkpoint: %s", e)
                self._multi = None

    def install(self):
        if self._multi is False:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self._signum = signum

    def __call__(self, step: int) -> bool:
        if self._multi:
            if multihost_utils.reached_preemption_sync_point(step):
                self.reason = (f"preemption notice (SIGTERM to at least one of the {jax.process_count()} processes): "
                               f"every process stops at step {step}")
                return True
        elif self._signum is not None:
            self.reason = f"signal {self._signum} received"
            return True
        return False

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _prepare_workdir(workdir: str):
    try:
        paths.check_writable(workdir, f"--workdir={workdir}")
    except OSError as e:
        raise config_lib.UserError(str(e)) from e


def _open_source(spec, **kwargs):
    """data.sources.load_source, its complaints about the spec or the files as UserErrors (one line, no traceback)."""
    from dino_jax.data import sources

    try:
        return sources.load_source(spec, **kwargs)
    except (ValueError, OSError) as e:
        raise config_lib.UserError(str(e)) from e


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
        from dino_jax.evaluation import knn

        self.config, self.model, self.mesh, self.workdir = config, model, mesh, workdir
        self.enabled = bool(config.eval_dataset and config.eval_train_dataset)
        if self.enabled:
            self.knn = knn.KnnProtocol.from_config(config, open_source=_open_source)

    def __call__(self, teacher_params, tag: str) -> dict:
        from dino_jax.evaluation import attention

        if not self.enabled:
            return {}
        c, backbone = self.config, self.model.backbone
        params = teacher_params["backbone"]
        t0 = time.time()
        results = self.knn(backbone, params, self.mesh)
        out = {f"knn_top1_k{k}": r["top1"] for k, r in results.items()}
        k20 = 20 if 20 in results else sorted(results)[0]
        out["knn_top1"], out["knn_top5"] = results[k20]["top1"], results[k20]["top5"]
        images, masks = self._attention_images()
        if masks is not None:
            out["attention_jaccard"] = attention.attention_jaccard(backbone, params, images, masks,
                                                                   c.patch_size, c.attention_threshold)
        if jax.process_index() == 0 and c.attention_images:
            attention.save_attention_grid(paths.join(self.workdir, "attention", f"{tag}.png"), backbone, params,
                                          images[: c.attention_images], c.patch_size, c.attention_threshold)
        out["eval_seconds"] = time.time() - t0
        return out

    def _attention_images(self):
        """Up to 256 validation images (with their ground-truth masks when the dataset has them)."""
        images, masks = [], []
        for batch in self.knn.batches(self.knn.queries, self.mesh):
            valid = sharding.to_host(batch["valid"])
            images.append(sharding.to_host(batch["image"])[valid])
            if "mask" in batch:
                masks.append(sharding.to_host(batch["mask"])[valid])
            if sum(len(x) for x in images) >= 256:
                break
        return np.concatenate(images)[:256], (np.concatenate(masks)[:256] if masks else None)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train (resuming from WORKDIR if it holds a checkpoint), evaluate periodically, write summary.json."""
    from dino_jax.data import pipeline

    config_lib.validate(config)
    _prepare_workdir(workdir)
    stop_request = StopRequest(checkpoint.latest_step(workdir) or 0)
    mesh = sharding.make_mesh()
    sharding.check_batch_divisible(config.batch_size, mesh)
    source = _open_source(config.dataset, data_dir=config.data_dir, image_size=config.global_crop_size,
                          grayscale=config.grayscale_input)
    spe = pipeline.steps_per_epoch(source.num_examples, config.batch_size)
    total_steps = spe * config.epochs  # the schedules' length
    end_step = min(total_steps, spe * config.stop_after_epochs) if config.stop_after_epochs > 0 else total_steps
    if end_step < total_steps:
        logging.info("stop_after_epochs=%d: training stops after step %d of the %d-step schedule",
                     config.stop_after_epochs, end_step, total_steps)
    _log_setup(config, mesh, spe, source.num_examples)

    model = dino.build_model(config)
    state = dino.create_train_state(config, model, spe, jax.random.PRNGKey(config.seed))
    waited = sharding.wait_for_every_process("state built")
    if waited > 5:
        logging.info("waited %.0f s for every process to build its state", waited)
    state = sharding.shard_state(state, mesh)
    ckpt = checkpoint.Checkpointer(workdir, every_steps=config.checkpoint_every_steps,
                                   max_to_keep=config.max_checkpoints, keep_period=config.keep_every_epochs * spe)
    summary = {}
    if ckpt.latest_step() is not None:
        def check(step, saved):  # before the arrays are read: another architecture fails there opaquely
            _check_resumable(saved, config, spe, ckpt.directory)
            if step > end_step:  # resuming would save that state again under the earlier step number
                raise config_lib.UserError(
                    f"{ckpt.directory} holds a checkpoint at step {step}, past where this run stops (step {end_step}: "
                    f"epochs={config.epochs}, stop_after_epochs={config.stop_after_epochs}). Raise them, or use "
                    "another --workdir.")

        state, saved = ckpt.restore(state, sharding.replicated(mesh), check_meta=check)
        summary = dict(saved.get("summary", {}))
        logging.info("resumed from %s at step %d (epoch %d)", ckpt.directory, int(state.step), int(state.step) // spe)
    meta = {"config": config.to_dict(), "steps_per_epoch": spe}  # what later checkpoints record: the config in force
    if jax.process_index() == 0:
        paths.write_json(paths.join(workdir, "config.json"), config.to_dict(), indent=2, default=str)

    evaluator = Evaluator(config, model, mesh, workdir)
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

    writer = Writer(workdir)
    stop_request.install()
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
            if len(pending) > MAX_STEPS_AHEAD:
                pending[-MAX_STEPS_AHEAD - 1][1]["loss"].block_until_ready()
            done = step + 1
            epoch_end = done % spe == 0
            stop = stop_request(done) and done < end_step  # at the end: finish normally (evaluation, summary)
            if done % config.log_every_steps == 0 or epoch_end or done == end_step or stop:
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
            if (eval_due or done == end_step) and not stop:  # log steps, so the metrics are already drained
                results = evaluator(state.teacher_params, f"epoch{done // spe:04d}")
                if results:
                    logging.info("evaluation at epoch %d: %s", done // spe, _fmt(results))
                    writer.write(done, results)
                    summary.update(results)
                t_window = time.time()  # evaluation time is not training time
            if done % config.checkpoint_every_steps == 0 or epoch_end or stop:
                _drain(pending, config, writer, ckpt, last_saved)
                writer.flush()  # on a bucket the lines so far are uploaded now, so a resume from here loses none
                meta = {**meta, "summary": {**summary, "train_seconds": train_seconds}, "epoch": done // spe}
                if ckpt.save(done, state, meta, force=stop or epoch_end):
                    last_saved = done
            if stop:
                ckpt.close()
                logging.warning("%s: saved a checkpoint at step %d; exiting", stop_request.reason, done)
                writer.close()
                raise SystemExit(0)
        if ckpt.latest_step() != end_step:
            ckpt.save(end_step, state, {**meta, "summary": summary, "epoch": end_step // spe}, force=True)
        ckpt.wait()
    finally:
        stop_request.close()
        batches.close()
        writer.close()
    summary.update({"epochs": end_step // spe, "steps": end_step, "wall_seconds": time.time() - t_start,
                    "train_seconds": train_seconds,
                    "images_per_second": (end_step - start_step) * config.batch_size / max(session_seconds, 1e-9)})
    if jax.process_index() == 0:
        paths.write_json(paths.join(workdir, "summary.json"), summary, indent=2)
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
    """Compare the checkpoint's config with this one key by key (config.RESUME_REFUSED / RESUME_SAFE say which
    changes are refused, fine, or need --config.allow_resume_changes); log what proceeds."""
    saved, now = _plain(meta.get("config", {})), _plain(config.to_dict())
    changed = {k: (saved[k], now[k]) for k in sorted(set(saved) & set(now)) if saved[k] != now[k]}
    refused = {k: v for k, v in changed.items() if k in config_lib.RESUME_REFUSED}
    if refused:
        raise config_lib.UserError(
            f"{directory} holds a checkpoint of a run with another "
            + "; ".join(f"{k} ({old!r} there, {new!r} now)" for k, (old, new) in refused.items())
            + ": it cannot resume with these changed. Use another --workdir, or resume with the checkpoint's value"
            + ("s" if len(refused) > 1 else "") + ": " + " ".join(f"--config.{k}={old}" for k, (old, _) in refused.items()))
    saved_spe = meta.get("steps_per_epoch", spe)
    if saved_spe != spe:
        raise config_lib.UserError(
            f"{directory} holds a checkpoint of a run with {saved_spe} steps per epoch, and dataset={config.dataset} "
            f"at batch_size={config.batch_size} now gives {spe} (the dataset's size changed): the schedules would "
            "jump. Use another --workdir, or restore the dataset the run started with.")
    allowed = set(config_lib.allowed_resume_changes(config))
    unlisted = {k: v for k, v in changed.items() if k not in config_lib.RESUME_SAFE and k not in allowed}
    if unlisted:
        raise config_lib.UserError(
            f"{directory} holds a checkpoint of a run with another "
            + "; ".join(f"{k} ({old!r} there, {new!r} now)" for k, (old, new) in unlisted.items())
            + ". To resume with these changes say so: --config.allow_resume_changes=" + ",".join(unlisted)
            + "; or resume with the checkpoint's values (" + " ".join(f"--config.{k}={old}" for k, (old, _) in
                                                                   unlisted.items()) + "), or use another --workdir.")
    for k, (old, new) in changed.items():
        log = logging.info if k in config_lib.RESUME_SAFE else logging.warning
        log("resuming with %s=%r (the checkpoint's run had %r)", k, new, old)


def _plain(tree):
    """A config dict as its JSON form (tuples as lists), so a saved config and a live one compare."""
    return json.loads(json.dumps(tree, default=str))


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())

