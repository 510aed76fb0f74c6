"""TFDS datasets as users store them: a tiny dataset prepared here in each file format (tfrecord, TFDS's default,
read as a per-process stream; array_record, read by index), read, fed through the pipeline and trained on."""
import numpy as np
import pytest
import tensorflow as tf

import tiny_tfds
from dino_jax import sharding
from dino_jax.data import demo, pipeline, sources

FORMATS = ("tfrecord", "array_record")
SPEC = f"tfds:{tiny_tfds.NAME}"
CROPS = dict(global_crop_size=16, local_crop_size=8, local_crops_number=1)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    return {fmt: tiny_tfds.build(tmp_path_factory.mktemp(fmt), fmt) for fmt in FORMATS}


@pytest.fixture(scope="module")
def stream(data_dirs):
    return sources.load_source(f"{SPEC}:train", data_dir=data_dirs["tfrecord"])


@pytest.fixture(scope="module")
def batch_sharding():
    return sharding.batch_sharding(sharding.make_mesh())


def labels(ds):
    return [int(e["label"]) for e in ds.as_numpy_iterator()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_both_file_formats_give_every_example_with_its_image_and_label(data_dirs, fmt):
    source = sources.load_source(f"{SPEC}:train", data_dir=data_dirs[fmt])
    assert source.random_access == (fmt == "array_record")
    assert (source.num_examples, source.num_classes) == (16, 10)
    got = list(source.dataset().as_numpy_iterator())
    assert [int(e["index"]) for e in got] == list(range(16))
    images, truth, _ = demo.generate(16, 32, seed=0)  # the builder's train split (PNG: lossless)
    by_image = {im.tobytes(): int(label) for im, label in zip(images, truth)}
    assert {e["image"].tobytes(): int(e["label"]) for e in got} == by_image


def test_a_stream_is_split_between_processes_shuffled_by_seed_and_skips_by_position(stream):
    parts = [list(stream.read(p, 3, drop_remainder=True).as_numpy_iterator()) for p in range(3)]
    assert [[int(e["index"]) for e in part] for part in parts] == [list(range(0, 5)), list(range(5, 10)),
                                                                    list(range(10, 15))]  # 16 // 3 each
    in_order = labels(stream.read(0, 1))
    shuffled = labels(stream.read(0, 1, seed=7))
    assert sorted(shuffled) == sorted(in_order) and shuffled == labels(stream.read(0, 1, seed=7))
    assert shuffled != in_order or shuffled != labels(stream.read(0, 1, seed=8))
    assert labels(stream.read(0, 1, seed=7, skip=5)) == shuffled[5:]


def test_stream_training_batches_resume_by_position_and_cover_each_process_part(stream, batch_sharding):
    def batches(start_step, n, process_index=0, process_count=1):
        it = pipeline.train_iterator(stream, global_batch=4, sharding=batch_sharding, seed=3, start_step=start_step,
                                     process_index=process_index, process_count=process_count, device_prefetch=0,
                                     **CROPS)
        try:
            return [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(n)]
        finally:
            it.close()

    straight = batches(0, 10)  # 4 steps per epoch: epochs 0, 1 and half of 2
    resumed = batches(5, 5)
    for a, b in zip(straight[5:], resumed):
        for key in ("global", "local", "label"):
            np.testing.assert_array_equal(a[key], b[key])
    epoch0 = np.concatenate([b["label"] for b in straight[:4]])
    epoch1 = np.concatenate([b["label"] for b in straight[4:8]])
    assert sorted(epoch0) == sorted(epoch1) == sorted(labels(stream.read(0, 1)))  # every example once per epoch
    assert not np.array_equal(straight[0]["global"], straight[4]["global"])
    two = [np.concatenate([b["label"] for b in batches(0, 4, p, 2)]) for p in range(2)]
    assert [sorted(t) for t in two] == [sorted(labels(stream.read(p, 2, drop_remainder=True))) for p in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_train_two_steps_with_knn_evaluation(data_dirs, fmt, tmp_path, tiny):
    from dino_jax import train

    config = tiny(dataset=f"{SPEC}:train", data_dir=data_dirs[fmt], stop_after_epochs=1,
                  eval_train_dataset=f"{SPEC}:train", eval_dataset=f"{SPEC}:test", eval_resize_size=32,
                  eval_crop_size=32, eval_batch_size=8, nb_knn=(5,), eval_every_epochs=1, attention_images=2)
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert (summary["steps"], summary["epochs"]) == (2, 1), summary
    assert 0.0 <= summary["knn_top1"] <= 100.0 and "knn_top1_random_init" in summary
    assert (tmp_path / "run" / "attention" / "epoch0001.png").is_file()
    tf.io.gfile.rmtree(str(tmp_path / "run"))
