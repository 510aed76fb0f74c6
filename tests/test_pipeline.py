"""Input pipeline: per-process sharding, epochs, resume, determinism, global arrays, eval padding."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dino_jax import sharding
from dino_jax.data import pipeline, sources

CROPS = dict(global_crop_size=16, local_crop_size=8, local_crops_number=2)


@pytest.fixture(scope="module")
def demo():
    return sources.load_source("demo:train:50", image_size=16)


@pytest.fixture(scope="module")
def batch_sharding():
    return sharding.batch_sharding(sharding.make_mesh())


def take(ds, n):
    return [tuple(int(v) for v in x) for x in ds.take(n).as_numpy_iterator()]


def test_steps_per_epoch():
    assert pipeline.steps_per_epoch(50, 8) == 6
    with pytest.raises(ValueError, match="larger than the dataset"):
        pipeline.steps_per_epoch(5, 8)


def test_processes_read_disjoint_shares_that_cover_each_epoch():
    n, batch, spe = 50, 8, 6
    streams = [take(pipeline.train_indices(n, global_batch=batch, seed=1, process_index=p, process_count=2),
                    2 * spe * 4) for p in range(2)]
    for epoch in range(2):
        shares = [[i for e, i in s if e == epoch] for s in streams]
        assert all(len(share) == spe * batch // 2 for share in shares)
        assert not set(shares[0]) & set(shares[1])
        assert len(set(shares[0]) | set(shares[1])) == spe * batch  # every example once (the tail is dropped)
    e0 = [i for e, i in streams[0] if e == 0]
    e1 = [i for e, i in streams[0] if e == 1]
    assert e0 != e1  # reshuffled each epoch
    again = take(pipeline.train_indices(n, global_batch=batch, seed=1, process_index=0, process_count=2), 2 * spe * 4)
    assert again == streams[0]
    other_seed = take(pipeline.train_indices(n, global_batch=batch, seed=2, process_index=0, process_count=2), 24)
    assert other_seed != streams[0][:24]


def test_global_step_order_is_the_same_for_any_process_count():
    """Global batch s is the same set of examples whether 1 or 2 processes read it."""
    n, batch = 50, 8
    one = take(pipeline.train_indices(n, global_batch=batch, seed=0, process_index=0, process_count=1), 24)
    two = [take(pipeline.train_indices(n, global_batch=batch, seed=0, process_index=p, process_count=2), 12)
           for p in range(2)]
    for step in range(3):
        joined = two[0][step * 4:(step + 1) * 4] + two[1][step * 4:(step + 1) * 4]
        assert joined == one[step * 8:(step + 1) * 8]


@pytest.mark.parametrize("start_step", [0, 4, 6, 9])
def test_resume_skips_exactly_to_the_step(start_step):
    n, batch = 50, 8
    full = take(pipeline.train_indices(n, global_batch=batch, seed=3, process_index=1, process_count=2), 60)
    resumed = take(pipeline.train_indices(n, global_batch=batch, seed=3, process_index=1, process_count=2,
                                          start_step=start_step), 60 - start_step * 4)
    assert resumed == full[start_step * 4:]


def test_train_batches_are_global_arrays_with_bookkeeping(demo, batch_sharding):
    it = pipeline.train_iterator(demo, global_batch=8, sharding=batch_sharding, seed=0, start_step=5, **CROPS)
    assert (it.step, it.epoch) == (5, 0)
    batch = next(it)
    assert batch["global"].shape == (8, 2, 16, 16, 3) and batch["local"].shape == (8, 2, 8, 8, 3)
    assert batch["global"].dtype == np.float32 and batch["label"].shape == (8,)
    assert batch["global"].sharding == batch_sharding
    next(it)
    assert (it.step, it.epoch) == (7, 1)


def test_crops_do_not_depend_on_thread_count_or_resume(demo, batch_sharding):
    def batches(threads, start_step=0, n=3):
        it = pipeline.train_iterator(demo, global_batch=8, sharding=batch_sharding, seed=0, start_step=start_step,
                                     num_parallel_calls=threads, **CROPS)
        return [np.asarray(next(it)["local"]) for _ in range(n)]

    serial, parallel = batches(1), batches(4)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(batches(2, start_step=2, n=1)[0], serial[2])
    assert not np.array_equal(serial[0], serial[1])


def test_device_prefetch_yields_the_same_batches_and_bookkeeping(demo, batch_sharding):
    def batches(device_prefetch):
        it = pipeline.train_iterator(demo, global_batch=8, sharding=batch_sharding, seed=0, start_step=4,
                                     device_prefetch=device_prefetch, **CROPS)
        out = [(it.step, next(it)) for _ in range(4)]
        steps = (it.step, it.epoch)
        it.close()
        return out, steps

    (direct, direct_steps), (ahead, ahead_steps) = batches(0), batches(3)
    assert direct_steps == ahead_steps == (8, 1)
    for (s0, a), (s1, b) in zip(direct, ahead):
        assert s0 == s1 and b["local"].sharding == batch_sharding
        for key in ("global", "local", "label"):
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_same_example_gets_new_crops_each_epoch(demo):
    """Crop seeds fold in the epoch: example i in epoch 0 and epoch 1 is cropped differently."""
    from dino_jax.data import augment

    ex = demo.load(tf.constant(3, tf.int64))
    base = tf.constant([0, 0], tf.int64)
    crops = [augment.multicrop(ex["image"], augment.fold_in(augment.fold_in(base, e), 3), global_size=16,
                               local_size=8, n_local=1)[0].numpy() for e in (0, 1, 0)]
    assert not np.array_equal(crops[0], crops[1]) and np.array_equal(crops[0], crops[2])


def test_tfds_mock_images_smaller_than_the_crop(batch_sharding):
    with tfds.testing.mock_data(num_examples=8):
        source = sources.load_source("tfds:imagenet2012:train")
        batch = next(pipeline.train_iterator(source, global_batch=4, sharding=batch_sharding, seed=0,
                                             global_crop_size=64, local_crop_size=32, local_crops_number=1))
    assert batch["global"].shape == (4, 2, 64, 64, 3) and np.isfinite(np.asarray(batch["global"])).all()


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """A TFDS dataset stored as tfrecord: each process reads TFDS's per-process split, in order for evaluation."""
    import tiny_tfds

    data_dir = tiny_tfds.build(tmp_path_factory.mktemp("tfrecord"), "tfrecord")
    return sources.load_source(f"tfds:{tiny_tfds.NAME}:test", data_dir=data_dir)


@pytest.mark.parametrize("kind", ["random_access", "stream"])
@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_reads_every_example_once_padding_every_process_to_the_same_batches(batch_sharding, process_count, kind,
                                                                                 stream):
    source = stream if kind == "stream" else sources.load_source("demo:val:21", image_size=16)
    seen, counts = [], []
    for p in range(process_count):
        batches = list(pipeline.eval_iterator(source, global_batch=6, sharding=batch_sharding, resize_size=16,
                                              crop_size=12, process_index=p, process_count=process_count))
        counts.append(len(batches))
        for b in batches:
            valid = np.asarray(b["valid"])
            assert b["image"].shape[1:] == (12, 12, 3)
            assert "mask" not in b if kind == "stream" else b["mask"].shape[1:] == (12, 12)
            seen += list(np.asarray(b["index"])[valid])
    assert len(set(counts)) == 1
    assert sorted(seen) == list(range(source.num_examples))


def test_eval_mask_is_cropped_like_the_image(batch_sharding):
    source = sources.load_source("demo:val:8", image_size=24)
    batch = next(pipeline.eval_iterator(source, global_batch=8, sharding=batch_sharding, resize_size=24,
                                        crop_size=16))
    raw = list(source.dataset().as_numpy_iterator())
    for i, ex in enumerate(raw):
        np.testing.assert_array_equal(np.asarray(batch["mask"])[i], ex["mask"][4:20, 4:20])
        assert set(np.unique(np.asarray(batch["mask"])[i])) <= {0, 1}


def test_configure_tensorflow_gives_it_one_intra_op_thread_or_says_why_not_and_importing_changes_nothing():
    """oneDNN kernels inside tf.data use TF's process-wide intra-op pool; one thread there made the pipeline ~1.6x
    faster on 2 cores (benchmarks/README.md). Entry points ask for it; importing the package does not."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, TF_CPP_MIN_LOG_LEVEL="2")
    check = ("import tensorflow as tf\nimport dino_jax.data.pipeline, dino_jax.data.sources\n{before}"
             "print('threads', tf.config.threading.get_intra_op_parallelism_threads())\n")

    def run(before):
        out = subprocess.run([sys.executable, "-c", check.format(before=before)], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out

    assert "threads 0" in run("").stdout  # imports alone: TF's default pool (0: a thread per core)
    fresh = run("dino_jax.data.configure_tensorflow()\n")
    assert "threads 1" in fresh.stdout and "before dino_jax.data.configure_tensorflow" not in fresh.stderr
    late = run("tf.constant(1.0) + 1\ndino_jax.data.configure_tensorflow()\n")
    assert "threads 0" in late.stdout and "ran an op before dino_jax.data.configure_tensorflow()" in late.stderr
