"""Reliability of the trainer: multi-process training, crashes, bad input, non-finite steps, determinism.

Every end-to-end run is a real `python -m dino_jax.main` (through tests/reliability_worker.py, which adds only
opt-in instrumentation) on the config of tests/reliability_config.py: a 2-block 32-px ViT on 64 demo images, global
batch 8 on 8 simulated CPU devices, 8 steps per epoch, 2 epochs = 16 steps. The runs share one persistent XLA
compilation cache (a temporary folder for the session), so only the first run of each device layout compiles.

Set RELIABILITY_SEED to replay the random kill moments of a failed run (the seed is printed).
"""
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import max_relative_error

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
WORKER = os.path.join(TESTS, "reliability_worker.py")
CONFIG = os.path.join(TESTS, "reliability_config.py")
TOTAL_STEPS = 16  # reliability_config: 64 examples / batch 8 = 8 steps per epoch, 2 epochs
SEED = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 100000))


# ------------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


def _env(cache, devices=8, **extra):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _start(workdir, cache, *flags, devices=8, log=None, env=None):
    """Start one training process (a real dino_jax.main); its stdout+stderr go to LOG (default WORKDIR.log)."""
    log = log or f"{workdir}.log"
    cmd = [sys.executable, WORKER, f"--config={CONFIG}", f"--workdir={workdir}", *flags]
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(cache, devices, **(env or {})), stdout=f,
                                stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def _text(proc_or_log) -> str:
    with open(getattr(proc_or_log, "log", proc_or_log), errors="replace") as f:
        return f.read()


def _finish(proc, timeout=400) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"run did not finish in {timeout}s; log:\n{_text(proc)[-5000:]}")


def _ok(proc, timeout=400):
    rc = _finish(proc, timeout)
    assert rc == 0, f"exit code {rc}; log:\n{_text(proc)[-5000:]}"


def _steps(workdir, offset=0) -> dict:
    """metrics.jsonl (from byte OFFSET on) as {step: the last line with a loss for that step}.

    A resumed run appends, so the steps between its checkpoint and the crash appear twice: the last one counts.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        f.seek(offset)
        for line in f:
            if line.endswith("\n"):
                m = json.loads(line)
                if "loss" in m:
                    out[m["step"]] = m
    return out


def _state(workdir):
    """The latest checkpoint of WORKDIR as numpy arrays, and its meta (read in this process, 1 device)."""
    from dino_jax import checkpoint

    return checkpoint.load_params(workdir)


def _identical(a, b) -> bool:
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.asarray(x).shape == np.asarray(y).shape and
                                      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _ckpt_dirs(workdir):
    """(complete step numbers, names of partial orbax temporary folders) under WORKDIR/checkpoints."""
    d = os.path.join(workdir, "checkpoints")
    names = os.listdir(d) if os.path.isdir(d) else []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if "tmp" in n)


def _wait_for(cond, proc, timeout=300, what="condition"):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {what}; log:\n{_text(proc)[-5000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}; log:\n{_text(proc)[-5000:]}")
        time.sleep(0.005)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# The k-NN evaluation and attention Jaccard at the end (epoch 2), on 32-px demo images: 48 in the bank,
# 200 queries, 40 per eval batch (5 per device).
EVAL_AT_END = ("--config.eval_every_epochs=2", "--config.eval_train_dataset=demo:train:48",
               "--config.eval_dataset=demo:val:200", "--config.eval_resize_size=32", "--config.eval_crop_size=32",
               "--config.eval_batch_size=40")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, jax_cache):
    """Two uninterrupted runs of the same command, one process with 8 devices, recording what they read and
    evaluating at the end."""
    base = tmp_path_factory.mktemp("reference")
    runs = [str(base / name) for name in ("run1", "run2")]
    for w in runs:  # one after the other: the second reuses the first's compiled programs
        _ok(_start(w, jax_cache, *EVAL_AT_END, env={"RELIABILITY_RECORD": f"{w}.record"}))
    return runs


def _summary(workdir) -> dict:
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ 5. determinism


@pytest.mark.slow
def test_same_seed_and_config_give_bit_identical_runs(reference):
    a, b = (_steps(w) for w in reference)
    assert sorted(a) == list(range(1, TOTAL_STEPS + 1))
    assert a == b, "metrics.jsonl differs between two runs of the same command"  # every logged value, exactly
    (sa, ma), (sb, _) = _state(reference[0]), _state(reference[1])
    assert int(sa["step"]) == TOTAL_STEPS and ma["epoch"] == 2
    assert _identical(sa, sb), "final checkpoints (params, teacher, optimiser, center, rng) differ"


# ---------------------------------------------------------------------------------------------- 1. multi-process


@pytest.mark.slow
def test_two_processes_match_one_and_read_disjoint_shares(reference, tmp_path, jax_cache):
    """2 processes x 4 devices (jax.distributed on localhost, CPU collectives) == 1 process x 8 devices, training
    and the evaluation at the end (each process extracts the features of its rows; `sharding.to_host` gathers them).

    Process 1 finishes building its state 40 s after process 0: hosts of a pod reach the first collective far apart.
    """
    workdir, record = str(tmp_path / "run"), str(tmp_path / "record")
    port = _free_port()
    procs = [_start(workdir, jax_cache, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                    f"--process_id={i}", *EVAL_AT_END, devices=4, log=str(tmp_path / f"p{i}.log"),
                    env={"RELIABILITY_RECORD": record, "RELIABILITY_SLOW_PROCESS": "1:40"}) for i in range(2)]
    for p in procs:
        _ok(p)
    assert "process 1 of 2" in _text(procs[1]) and "mesh {'data': 8}" in _text(procs[0])
    assert "waited" in _text(procs[0]) and "for every process to build its state" in _text(procs[0])

    # Same loss curve and the same parameters as one process on the same data.
    one, two = _steps(reference[0]), _steps(workdir)
    assert sorted(two) == list(range(1, TOTAL_STEPS + 1))
    np.testing.assert_allclose([two[s]["loss"] for s in sorted(two)], [one[s]["loss"] for s in sorted(one)],
                               rtol=1e-5, atol=0)
    (s1, _), (s2, _) = _state(reference[0]), _state(workdir)
    assert int(s2["step"]) == TOTAL_STEPS
    for key in ("params", "teacher_params", "center"):
        err = max_relative_error(s1[key], s2[key])
        print(f"{key}: max relative difference, 2 processes vs 1: {err:.2e}")
        assert err <= 1e-5, key

    # The evaluation saw every bank image and query once: the same k-NN and Jaccard as one process.
    evaluated, expected = _summary(workdir), _summary(reference[0])
    print("evaluation, 2 processes:", {k: evaluated[k] for k in ("knn_top1", "knn_top5", "attention_jaccard")},
          "1 process:", {k: expected[k] for k in ("knn_top1", "knn_top5", "attention_jaccard")})
    ks = sorted(k for k in expected if k.startswith("knn_top1_k"))  # k 10 and 20 (larger k than the bank: none)
    assert ks and ks == sorted(k for k in evaluated if k.startswith("knn_top1_k")), (expected, evaluated)
    for k in ks:
        assert abs(evaluated[k] - expected[k]) <= 0.5, k  # 0.5: one query of 200
    assert abs(evaluated["attention_jaccard"] - expected["attention_jaccard"]) <= 1e-3

    # Each process read only its own half of every global batch; together exactly what one process read.
    with open(f"{reference[0]}.record.0.json") as f:
        single = json.load(f)
    shares = []
    for i in range(2):
        with open(f"{record}.{i}.json") as f:
            shares.append(json.load(f))
        assert shares[i]["process_index"] == i and shares[i]["process_count"] == 2
    glob, local = 8, 4
    for step in range(TOTAL_STEPS):
        batch = [tuple(x) for x in single["requested"][step * glob:(step + 1) * glob]]
        halves = [[tuple(x) for x in s["requested"][step * local:(step + 1) * local]] for s in shares]
        assert halves[0] + halves[1] == batch, f"step {step + 1}: processes did not split the global batch"
        assert not set(halves[0]) & set(halves[1])
    for i, s in enumerate(shares):
        requested = [idx for _, idx in s["requested"]]
        loaded = s["loaded"]["demo:train:64"]  # by the training source (the evaluation's bank is another spec)
        assert len(loaded) >= TOTAL_STEPS * local
        left = list(requested)
        for idx in loaded:  # multiset inclusion: nothing loaded that this process did not ask for
            assert idx in left, f"process {i} loaded example {idx}, which is not in its share"
            left.remove(idx)


# ------------------------------------------------------------------------------------------------- 2. crashes


@pytest.mark.slow
def test_sigkill_during_saves_and_sigterm_resume_to_the_same_result(reference, tmp_path, jax_cache):
    rng = random.Random(SEED)
    print(f"RELIABILITY_SEED={SEED}")
    workdir = str(tmp_path / "run")
    every_step = "--config.checkpoint_every_steps=1"  # a save is in flight almost all the time

    # Run 1: SIGKILL at a random step, at a moment when orbax is writing a checkpoint (temporary folder present).
    kill_after = rng.randint(3, 9)
    p = _start(workdir, jax_cache, every_step)
    _wait_for(lambda: len(_steps(workdir)) >= kill_after and _ckpt_dirs(workdir)[1], p, what="a save in flight")
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    complete, partial = _ckpt_dirs(workdir)
    print(f"SIGKILL after step {max(_steps(workdir))}: complete checkpoints {complete}, partial {partial}")
    assert complete, "no complete checkpoint to resume from"

    # Run 2: resumes from the last COMPLETE checkpoint, then SIGTERM at a random later step: checkpoint, exit 0.
    offset = os.path.getsize(os.path.join(workdir, "metrics.jsonl"))
    p = _start(workdir, jax_cache, every_step)
    _wait_for(lambda: "resumed from" in _text(p), p, what="the resume")
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", _text(p)).group(1))
    assert resumed == complete[-1], (resumed, complete, partial)
    term_after = resumed + rng.randint(1, 4)
    _wait_for(lambda: max(_steps(workdir, offset), default=0) >= term_after, p, what=f"step {term_after}")
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    at_signal = max(_steps(workdir, offset))
    rc = _finish(p, timeout=60)
    took = time.time() - t0
    print(f"SIGTERM at step >= {term_after}: exit {rc} after {took:.1f}s")
    assert rc == 0, _text(p)[-3000:]
    assert took < 20, f"SIGTERM took {took:.1f}s to save and exit"
    saved = int(re.search(r"saved a checkpoint at step (\d+); exiting", _text(p)).group(1))
    complete, partial = _ckpt_dirs(workdir)
    assert complete[-1] == saved and not partial and saved >= term_after
    assert saved <= at_signal + 2, f"signal after step {at_signal}, stopped at step {saved}"  # checked every step

    # Run 3: resumes at that step and finishes: the same numbers as the uninterrupted run, bit for bit.
    p = _start(workdir, jax_cache, every_step)
    _ok(p)
    assert f"at step {saved} " in _text(p)
    (final, _), (ref, _) = _state(workdir), _state(reference[0])
    assert int(final["step"]) == TOTAL_STEPS
    assert _identical(final, ref), f"resumed run differs from the uninterrupted one: {max_relative_error(final, ref)}"
    ours, theirs = _steps(workdir), _steps(reference[0])
    assert sorted(ours) == sorted(theirs)
    assert [ours[s]["loss"] for s in sorted(ours)] == [theirs[s]["loss"] for s in sorted(theirs)]


@pytest.mark.slow
def test_checkpoint_restores_onto_fewer_devices(reference, tmp_path, jax_cache):
    out = str(tmp_path / "restore.json")
    subprocess.run([sys.executable, WORKER, "restore", reference[0], out], cwd=ROOT, env=_env(jax_cache, 2),
                   check=True, timeout=300)
    with open(out) as f:
        r = json.load(f)
    assert r["devices"] == 2 and r["devices_per_array"] == [2], r  # written by 8 devices, restored onto 2
    assert r["identical"] and r["finite"] and r["step"] == TOTAL_STEPS, r


# --------------------------------------------------------------------------------------------- 3. bad input


def test_mistyped_config_key_names_it():
    r = subprocess.run([sys.executable, "-m", "dino_jax.main", f"--config={CONFIG}", "--workdir=/nonexistent/x",
                        "--config.lrr=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "--config.lrr" in r.stderr and 'Did you mean "lr"' in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 3, r.stderr
    assert not os.path.exists("/nonexistent/x")


def test_stop_after_epochs_then_finish_and_no_rewind(tmp_path, tiny):
    """stop_after_epochs trains the first N epochs of the schedule; the same workdir without it finishes the run; a
    stop before the latest checkpoint is refused (resuming would save that state under an earlier step), as is N < 0."""
    from dino_jax import checkpoint, train

    workdir = str(tmp_path / "run")
    settings = dict(dataset="demo:train:64", batch_size=8, epochs=2, warmup_epochs=1, eval_every_epochs=0)
    first = train.train_and_evaluate(tiny(stop_after_epochs=1, **settings), workdir)
    assert (first["steps"], first["epochs"]) == (8, 1), first
    assert int(checkpoint.load_params(workdir)[0]["step"]) == 8
    rest = train.train_and_evaluate(tiny(**settings), workdir)
    assert (rest["steps"], rest["epochs"]) == (16, 2), rest
    assert int(checkpoint.load_params(workdir)[0]["step"]) == 16
    with pytest.raises(ValueError, match="checkpoint at step 16, past where this run stops \\(step 8"):
        train.train_and_evaluate(tiny(stop_after_epochs=1, **settings), workdir)
    with pytest.raises(ValueError, match="stop_after_epochs=-1"):
        train.train_and_evaluate(tiny(stop_after_epochs=-1, **settings), str(tmp_path / "other"))


def test_unwritable_workdir_fails_before_any_work(tmp_path, tiny):
    from dino_jax import train
    from dino_jax.config import UserError

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = [str(blocker / "run")]  # a folder under a file: unwritable even for root
    if os.geteuid() != 0:
        ro = tmp_path / "read_only"
        ro.mkdir()
        ro.chmod(0o500)
        bad.append(str(ro / "run"))
    for workdir in bad:
        with pytest.raises(UserError, match=re.escape(f"cannot write to --workdir={workdir}") + ".*choose a folder"):
            train.train_and_evaluate(tiny(dataset="demo:train:64"), workdir)


def test_missing_tfds_dataset_fails_fast_without_download(tmp_path, tiny):
    from dino_jax import train

    t0 = time.time()
    with pytest.raises(ValueError, match="no dataset called 'no_such_dataset'.*check the spelling"):
        train.train_and_evaluate(tiny(dataset="tfds:no_such_dataset", data_dir=str(tmp_path / "data")),
                                 str(tmp_path / "run"))
    assert time.time() - t0 < 60
    assert not os.path.exists(tmp_path / "data" / "no_such_dataset")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # failed before anything was written


def test_folder_without_images_names_the_folder(tmp_path, tiny):
    from dino_jax import train

    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=re.escape(f"folder:{tmp_path / 'data'}: no image files")):
        train.train_and_evaluate(tiny(dataset=f"folder:{tmp_path / 'data'}"), str(tmp_path / "run"))


def _image_folder(root, n=62):
    """n demo images as PNGs in two class folders, plus a garbage .jpg, a 5x5 and a 1x1 image.

    n=62 makes 64 readable images: 8 steps per epoch like the reference runs, so the same compiled step.
    """
    from PIL import Image

    from dino_jax.data import demo

    images, _, _ = demo.generate(n, 32)
    for i, im in enumerate(images):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / f"c{i % 2}" / f"{i}.png")
    (root / "c0" / "garbage.jpg").write_bytes(os.urandom(700))
    Image.fromarray(images[0][:5, :5]).save(root / "c1" / "tiny5x5.png")
    Image.fromarray(images[1][:1, :1]).save(root / "c1" / "one_pixel.png")
    return images


@pytest.mark.slow
def test_corrupt_and_tiny_images_are_handled_and_training_finishes(tmp_path, jax_cache):
    _image_folder(tmp_path / "data")
    workdir = str(tmp_path / "run")
    p = _start(workdir, jax_cache, f"--config.dataset=folder:{tmp_path / 'data'}")
    _ok(p)
    log = _text(p)
    assert re.search(r"skipping 1 unreadable file\(s\): \S*garbage\.jpg", log), log[-3000:]
    assert "64 examples, 8 steps per epoch" in log  # every readable image is used, the tiny ones included
    steps = _steps(workdir)
    assert sorted(steps) == list(range(1, TOTAL_STEPS + 1)) and all(np.isfinite(m["loss"]) for m in steps.values())
    state, _ = _state(workdir)
    assert int(state["step"]) == TOTAL_STEPS


def test_jpeg_with_corrupt_data_is_skipped(tmp_path, caplog):
    """A JPEG whose header reads but whose data is corrupt passes the folder scan and fails only when decoded
    (TF's "jpeg::Uncompress failed", naming no file): it must be replaced, with one warning naming it, and the
    batches must stay the same for the same seed."""
    import io
    import logging

    import jax
    from PIL import Image

    from dino_jax import sharding
    from dino_jax.data import pipeline, sources

    images = _image_folder(tmp_path / "data", n=6)
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sos = data.index(b"\xff\xda")  # start of scan: keep every header segment, scramble the entropy-coded data
    for k in range(sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big"), len(data) - 2):
        data[k] = (data[k] * 7 + 13) % 256
    (tmp_path / "data" / "c0" / "scrambled.jpg").write_bytes(bytes(data))
    mesh = sharding.make_mesh(jax.devices()[:1])

    def epoch():
        source = sources.load_source(f"folder:{tmp_path / 'data'}")
        batches = pipeline.train_iterator(source, global_batch=1, sharding=sharding.batch_sharding(mesh), seed=0,
                                          global_crop_size=32, local_crop_size=16, local_crops_number=1,
                                          num_parallel_calls=1)
        return source, [np.asarray(next(batches)["global"]) for _ in range(source.num_examples)]  # every file once

    with caplog.at_level(logging.WARNING):
        source, first = epoch()
    assert [os.path.basename(f) for f in source.skipped] == ["garbage.jpg"]  # the scrambled file passes the scan
    warnings = [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]
    assert len(warnings) == 1 and "scrambled.jpg" in warnings[0], warnings
    assert [os.path.basename(f) for f in source.decode_failures] == ["scrambled.jpg"]
    assert all(np.isfinite(b).all() for b in first)
    _, again = epoch()
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_jpeg_cut_short_is_named_once_and_used(tmp_path, caplog):
    """A JPEG cut in half still decodes (libjpeg fills the rest with grey, and names no file): one warning names it
    at the folder scan, and the example stays in the dataset."""
    import io
    import logging

    import tensorflow as tf
    from PIL import Image

    from dino_jax.data import sources

    images = _image_folder(tmp_path / "data", n=6)
    buf = io.BytesIO()
    Image.fromarray(np.repeat(np.repeat(images[0], 8, 0), 8, 1)).save(buf, "JPEG")
    (tmp_path / "data" / "c0" / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    (tmp_path / "data" / "c0" / "whole.jpg").write_bytes(buf.getvalue())
    with caplog.at_level(logging.WARNING):
        source = sources.load_source(f"folder:{tmp_path / 'data'}")
    warnings = [r.getMessage() for r in caplog.records if "end-of-image" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].endswith(f"decodes as grey: {tmp_path / 'data' / 'c0' / 'cut.jpg'}")
    assert source.num_examples == 10  # 6 PNGs, the 2 tiny ones and the 2 JPEGs (garbage.jpg is skipped)
    cut = [i for i in range(source.num_examples) if tf.reduce_all(source.load(i)["image"][-1] == 128)]
    assert len(cut) == 1 and source.load(cut[0])["image"].shape == (256, 256, 3)


@pytest.mark.slow
def test_checkpoint_of_another_architecture_is_refused_and_kept(reference, tmp_path, jax_cache):
    workdir = str(tmp_path / "run")
    shutil.copytree(os.path.join(reference[0], "checkpoints"), os.path.join(workdir, "checkpoints"))

    def listing():
        return sorted((os.path.relpath(os.path.join(d, f), workdir), os.path.getsize(os.path.join(d, f)))
                      for d, _, files in os.walk(os.path.join(workdir, "checkpoints")) for f in files)

    before = listing()
    p = _start(workdir, jax_cache, "--config.head_bottleneck_dim=8")
    assert _finish(p) != 0
    log = _text(p)
    assert ("holds a checkpoint of a run with another head_bottleneck_dim (16 there, 8 now): it cannot resume with "
            "these changed. Use another --workdir, or resume with the checkpoint's value: "
            "--config.head_bottleneck_dim=16") in log, log[-3000:]
    assert "Traceback" not in log
    assert "is not compatible with the stored shape" not in log
    assert listing() == before  # nothing lost or touched


@pytest.mark.slow
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(reference, tmp_path, jax_cache):
    """64 flipped bytes in the final checkpoint's largest array file: the rerun falls back to step 12, says so,
    and ends bit-identical to the uninterrupted run."""
    from test_checkpoint_integrity import _flip_bytes

    workdir = str(tmp_path / "run")
    shutil.copytree(os.path.join(reference[0], "checkpoints"), os.path.join(workdir, "checkpoints"))
    shutil.copy(os.path.join(reference[0], "metrics.jsonl"), workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    assert _ckpt_dirs(workdir)[0] == [12, 16]
    _flip_bytes(os.path.join(ckpts, "16"))
    p = _start(workdir, jax_cache)
    _ok(p)
    log = _text(p)
    assert re.search(f"checkpoint {re.escape(os.path.join(ckpts, '16'))} is damaged: .*; restored the previous "
                     f"complete one, {re.escape(os.path.join(ckpts, '12'))}, instead", log), log[-3000:]
    assert f"resumed from {ckpts} at step 12 " in log
    assert os.listdir(os.path.join(workdir, "checkpoints_damaged")) == ["16"]
    (final, _), (ref, _) = _state(workdir), _state(reference[0])
    assert int(final["step"]) == TOTAL_STEPS and _identical(final, ref)


# ------------------------------------------------------------------------------------------ 4. non-finite steps


@pytest.mark.slow
def test_nonfinite_step_stops_or_is_skipped(reference, tmp_path, jax_cache):
    """NaN global crops at chosen steps make the loss and gradient NaN through the real train step."""
    stop_dir, skip_dir = str(tmp_path / "stop"), str(tmp_path / "skip")
    stop = _start(stop_dir, jax_cache, "--config.checkpoint_every_steps=1", env={"RELIABILITY_NAN_STEPS": "6"})
    skip = _start(skip_dir, jax_cache, "--config.skip_nonfinite_steps=True", env={"RELIABILITY_NAN_STEPS": "3,11"})

    # Default: training stops at the bad step, names it, and points to the intact last checkpoint.
    assert _finish(stop) != 0
    log = _text(stop)
    ckpts = os.path.join(stop_dir, "checkpoints")
    assert ("non-finite loss or gradient at step 6 (loss=nan" in log and
            f"the last complete checkpoint (step 5) in {ckpts} is intact" in log), log[-3000:]
    state, _ = _state(stop_dir)
    assert int(state["step"]) == 5 and _ckpt_dirs(stop_dir)[1] == []
    import jax

    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if x.dtype.kind == "f")
    ref = _steps(reference[0])
    assert [_steps(stop_dir)[s]["loss"] for s in range(1, 6)] == [ref[s]["loss"] for s in range(1, 6)]

    # skip_nonfinite_steps=True: the bad steps are skipped and logged, training goes on to the end.
    _ok(skip)
    steps, log = _steps(skip_dir), _text(skip)
    assert sorted(steps) == list(range(1, TOTAL_STEPS + 1))
    assert sorted(s for s, m in steps.items() if m.get("skipped_nonfinite")) == [3, 11]
    assert "step 3: non-finite loss or gradient, update skipped" in log
    assert all(np.isfinite(m["loss"]) for s, m in steps.items() if s not in (3, 11))
    assert [steps[s]["loss"] for s in (1, 2)] == [ref[s]["loss"] for s in (1, 2)]
    state, _ = _state(skip_dir)
    assert int(state["step"]) == TOTAL_STEPS
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if x.dtype.kind == "f")
    assert not _identical(state["params"], _state(reference[0])[0]["params"])  # the skips changed the course


# --------------------------------------------------------------------------- 6. preemption of a multi-process run


def _two_processes(workdir, tmp_path, cache, *flags, tag):
    port = _free_port()
    return [_start(workdir, cache, f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
                   *flags, devices=4, log=str(tmp_path / f"{tag}.p{i}.log")) for i in range(2)]


def _stopped_at(procs) -> int:
    """The step every process logged as its stop step (they must agree)."""
    found = [re.findall(r"every process stops at step (\d+): saved a checkpoint at step (\d+); exiting", _text(p))
             for p in procs]
    assert all(len(f) == 1 and f[0][0] == f[0][1] for f in found), [_text(p)[-3000:] for p in procs]
    assert found[0] == found[1], found
    return int(found[0][0][0])


def _sigterm(workdir, procs, signal_to, after_step, offset=0) -> int:
    """SIGTERM the processes in SIGNAL_TO (1.5 s apart) once step AFTER_STEP is logged; both must exit 0 within
    120 s at one agreed step, later than AFTER_STEP, with a complete checkpoint of it. Returns that step."""
    _wait_for(lambda: max(_steps(workdir, offset), default=0) >= after_step, procs[0], what=f"step {after_step}")
    at_signal = max(_steps(workdir, offset))
    t0 = time.time()
    for k, i in enumerate(signal_to):
        if k:
            time.sleep(1.5)
        procs[i].send_signal(signal.SIGTERM)
    codes = [_finish(p, timeout=120) for p in procs]
    took = time.time() - t0
    print(f"SIGTERM to {signal_to} after step {at_signal}: exit codes {codes} after {took:.1f}s")
    assert codes == [0, 0], [_text(p)[-3000:] for p in procs]
    stop = _stopped_at(procs)
    assert took < 120 and stop > after_step, (took, stop)
    complete, partial = _ckpt_dirs(workdir)
    assert complete[-1] == stop and not partial, (complete, partial)
    return stop


def _resumed(procs, workdir, step):
    for p in procs:
        _wait_for(lambda: "resumed from" in _text(p), p, what="the resume")
        assert f"resumed from {os.path.join(workdir, 'checkpoints')} at step {step} " in _text(p), _text(p)[-3000:]


LONG = ("--config.dataset=demo:train:512", "--config.epochs=1")  # 64 steps
EVERY_40, EVERY_STEP = "--config.checkpoint_every_steps=40", "--config.checkpoint_every_steps=1"


@pytest.mark.slow
def test_sigterm_to_one_process_then_to_both_on_a_checkpoint_step_and_resume(tmp_path, jax_cache):
    """Preemption of a two-process run, twice, then the end of the run equals the uninterrupted run's.

    1. SIGTERM to process 1 only after step 50, checkpoints every 40: the stop step is off the save schedule.
    2. The resumed run saves every step; SIGTERM to both processes, 1.5 s apart: the stop step coincides with a
       scheduled save.
    3. The second resume finishes: the same parameters and losses as one uninterrupted process.
    """
    reference_dir, workdir = str(tmp_path / "uninterrupted"), str(tmp_path / "run")
    _ok(_start(reference_dir, jax_cache, *LONG, EVERY_40))

    procs = _two_processes(workdir, tmp_path, jax_cache, *LONG, EVERY_40, tag="first")
    first = _sigterm(workdir, procs, (1,), after_step=50)
    assert first % 40

    offset = os.path.getsize(os.path.join(workdir, "metrics.jsonl"))
    procs = _two_processes(workdir, tmp_path, jax_cache, *LONG, EVERY_STEP, tag="second")
    _resumed(procs, workdir, first)
    second = _sigterm(workdir, procs, (0, 1), after_step=first + 2, offset=offset)

    procs = _two_processes(workdir, tmp_path, jax_cache, *LONG, EVERY_40, tag="last")
    for p in procs:
        _ok(p)
    _resumed(procs, workdir, second)
    (final, _), (ref, _) = _state(workdir), _state(reference_dir)
    assert int(final["step"]) == 64
    for key in ("params", "teacher_params", "center"):
        assert max_relative_error(ref[key], final[key]) <= 1e-5, key
    ours, theirs = _steps(workdir), _steps(reference_dir)
    assert sorted(ours) == sorted(theirs) == list(range(1, 65))
    np.testing.assert_allclose([ours[s]["loss"] for s in sorted(ours)], [theirs[s]["loss"] for s in sorted(theirs)],
                               rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------ 7. config on resume


def _meta(**changes):
    from reliability_config import get_config

    saved = get_config()
    return {"config": saved.to_dict(), "steps_per_epoch": 8}, _config(**changes)


def _config(**changes):
    from reliability_config import get_config

    c = get_config()
    for k, v in changes.items():
        c[k] = v
    return c


def test_resume_refuses_changes_of_meaning_in_one_message():
    from dino_jax import train
    from dino_jax.config import UserError

    meta, config = _meta(optimizer="sgd", epochs=3, out_dim=32, lr=0.1)
    with pytest.raises(UserError) as e:
        train._check_resumable(meta, config, 8, "/w/checkpoints")
    message = str(e.value)
    assert message == ("/w/checkpoints holds a checkpoint of a run with another epochs (2 there, 3 now); optimizer "
                       "('adamw' there, 'sgd' now); out_dim (64 there, 32 now): it cannot resume with these changed. "
                       "Use another --workdir, or resume with the checkpoint's values: --config.epochs=2 "
                       "--config.optimizer=adamw --config.out_dim=64"), message
    meta, config = _meta(batch_size=16, allow_resume_changes="batch_size")  # never allowed
    with pytest.raises(UserError, match=r"another batch_size \(8 there, 16 now\)"):
        train._check_resumable(meta, config, 4, "/w/checkpoints")
    meta, config = _meta()
    with pytest.raises(UserError, match="with 8 steps per epoch, and dataset=demo:train:64 at batch_size=8 now gives 9 "
                                        r"\(the dataset's size changed\)"):
        train._check_resumable(meta, config, 9, "/w/checkpoints")


def test_resume_with_safe_changes_proceeds_and_others_need_naming(caplog):
    import logging

    from dino_jax import train
    from dino_jax.config import UserError

    meta, config = _meta(log_every_steps=7, checkpoint_every_steps=3, eval_every_epochs=1, stop_after_epochs=1,
                         max_checkpoints=9)
    with caplog.at_level(logging.INFO, logger="absl"):
        train._check_resumable(meta, config, 8, "/w/checkpoints")  # safe: no error
    assert "resuming with log_every_steps=7 (the checkpoint's run had 1)" in caplog.text

    meta, config = _meta(lr=0.1, seed=3)
    with pytest.raises(UserError) as e:
        train._check_resumable(meta, config, 8, "/w/checkpoints")
    assert str(e.value) == ("/w/checkpoints holds a checkpoint of a run with another lr (0.0005 there, 0.1 now); seed "
                            "(0 there, 3 now). To resume with these changes say so: "
                            "--config.allow_resume_changes=lr,seed; or resume with the checkpoint's values "
                            "(--config.lr=0.0005 --config.seed=0), or use another --workdir."), str(e.value)
    with pytest.raises(UserError, match=r"another seed \(0 there, 3 now\)\. To resume.*allow_resume_changes=seed;"):
        train._check_resumable(meta, _config(lr=0.1, seed=3, allow_resume_changes="lr"), 8, "/w/checkpoints")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train._check_resumable(meta, _config(lr=0.1, seed=3, allow_resume_changes="lr, seed"), 8, "/w/checkpoints")
    assert [r.getMessage() for r in caplog.records] == ["resuming with lr=0.1 (the checkpoint's run had 0.0005)",
                                                        "resuming with seed=3 (the checkpoint's run had 0)"]


@pytest.mark.slow
def test_resume_records_the_config_in_force_and_refuses_in_one_line(reference, tmp_path, jax_cache):
    """The run resumes from step 12 with an allowed lr change: its later checkpoint records the new lr (not the first
    run's), so an unchanged rerun needs no allow and a change back does. A refused change is one line, no traceback,
    and touches nothing."""
    workdir = str(tmp_path / "run")
    shutil.copytree(os.path.join(reference[0], "checkpoints"), os.path.join(workdir, "checkpoints"))
    shutil.rmtree(os.path.join(workdir, "checkpoints", "16"))
    assert _ckpt_dirs(workdir)[0] == [12]
    p = _start(workdir, jax_cache, "--config.lr=0.001", "--config.allow_resume_changes=lr")
    _ok(p)
    assert "resuming with lr=0.001 (the checkpoint's run had 0.0005)" in _text(p)
    _, meta = _state(workdir)
    assert int(meta["epoch"]) == 2 and meta["config"]["lr"] == 0.001 and meta["config"]["allow_resume_changes"] == "lr"

    r = subprocess.run([sys.executable, WORKER, f"--config={CONFIG}", f"--workdir={workdir}", "--config.epochs=3",
                        "--config.optimizer=sgd"], cwd=ROOT, env=_env(jax_cache), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("FATAL ") and "another epochs (2 there, 3 now); optimizer ('adamw' there, 'sgd' now)" in last


# ------------------------------------------------------------------------------- 8. config checked before any work


@pytest.mark.parametrize("key,value,message", [
    ("optimizer", "adam", "--config.optimizer='adam': unknown value; use one of adamw, sgd, lars"),
    ("dataset", "tfds", "--config.dataset='tfds': expected tfds:NAME[:SPLIT]"),
    ("dataset", "imagenet", "--config.dataset='imagenet': unknown kind 'imagenet'"),
    ("dataset", "demo:test", "--config.dataset='demo:test': expected demo[:SPLIT][:N]"),
    ("local_crop_size", 20, "--config.local_crop_size=20: must be a multiple of patch_size=8"),
    ("global_crops_scale", (0.5, 0.2), "--config.global_crops_scale=(0.5, 0.2): must be (min, max) with 0 < min"),
    ("allow_resume_changes", "lr,sed", "--config.allow_resume_changes='lr,sed': no config key called 'sed'"),
    ("batch_size", 0, "--config.batch_size=0: must be a whole number >= 1"),
    ("attention_images", -1, "--config.attention_images=-1: must be a whole number >= 0"),
])
def test_invalid_config_fails_before_the_workdir_exists(tmp_path, key, value, message):
    from dino_jax import train
    from dino_jax.config import UserError

    workdir = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train.train_and_evaluate(_config(**{key: value}), str(workdir))
    assert str(e.value).startswith(message), str(e.value)
    assert not workdir.exists()


def test_user_errors_are_one_line_without_traceback(tmp_path):
    """Through the real entry point: an invalid value, an unwritable workdir, a folder with no image."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    (tmp_path / "data" / "cat").mkdir(parents=True)
    cases = [(["--config.optimizer=adam"], str(tmp_path / "run"), "--config.optimizer='adam': unknown value"),
             ([], str(blocker / "run"), f"cannot write to --workdir={blocker / 'run'}"),
             ([f"--config.dataset=folder:{tmp_path / 'data'}"], str(tmp_path / "run2"),
              f"folder:{tmp_path / 'data'}: no image files")]
    for flags, workdir, message in cases:
        r = subprocess.run([sys.executable, "-m", "dino_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
                            *flags], cwd=ROOT, env=_env(str(tmp_path / "cache"), 1), capture_output=True, text=True,
                           timeout=300)
        lines = [line for line in r.stderr.splitlines() if line.startswith("FATAL")]
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith(f"FATAL {message}"), r.stderr[-3000:]
    assert not (tmp_path / "run").exists()
