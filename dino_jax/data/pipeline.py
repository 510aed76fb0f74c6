"""Per-process input pipelines that yield global `jax.Array` batches.

Training on a random-access source: every epoch is a permutation of the example indices drawn from (seed, epoch);
global step s of an epoch uses permutation entries [s*B, (s+1)*B), of which process p takes its contiguous
1/process_count slice. So the processes together see every example once per epoch (minus the drop_remainder tail),
no process reads another's examples, and a crop depends only on (seed, epoch, example index): the same whatever the
thread or process count. Resuming at any step skips index tensors, not decoded images.

Training on a stream (a TFDS tfrecord dataset): process p reads its own part of the split (TFDS's per-process
split, N // process_count examples), one pass per epoch, with files shuffled and examples passed through a shuffle
buffer, both seeded by (seed, epoch); each pass gives exactly steps_per_epoch local batches. The order, and so the
batches, depend on the process count. Resuming at step s of an epoch re-reads, without decoding, the first
s * local_batch examples of that epoch's pass and continues with the same batches an uninterrupted run would have
used. The pipeline restarts at each epoch, so the first batches of an epoch wait for the shuffle buffer to fill.
"""
from __future__ import annotations

import functools
from typing import Iterable, Iterator, Optional

import jax
import numpy as np
import tensorflow as tf

from dino_jax import sharding as sharding_lib
from dino_jax.data import augment
from dino_jax.data.sources import Source


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch (the tail is dropped, as the reference's drop_last)."""
    steps = num_examples // global_batch
    if steps == 0:
        raise ValueError(f"global batch {global_batch} is larger than the dataset ({num_examples} examples); "
                         "lower config.batch_size or use a bigger dataset")
    return steps


def _process(process_index, process_count, global_batch):
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} must be divisible by the process count {process_count}")
    return process_index, process_count, global_batch // process_count


def _options(num_parallel_calls):
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.inject_prefetch = False  # prefetch is explicit below
    options.threading.max_intra_op_parallelism = 1  # parallelism comes from map(); per-op threads only add overhead
    if num_parallel_calls != tf.data.AUTOTUNE:
        options.threading.private_threadpool_size = max(int(num_parallel_calls), 1)
    return options


def train_indices(num_examples: int, *, global_batch: int, seed: int, process_index: int, process_count: int,
                  start_step: int = 0) -> tf.data.Dataset:
    """(epoch, index) pairs this process reads, from global step `start_step` on, forever."""
    spe = steps_per_epoch(num_examples, global_batch)
    local = global_batch // process_count
    start_epoch, skip = divmod(start_step, spe)

    def epoch_indices(epoch):
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(num_examples, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        mine = tf.reshape(perm[:spe * global_batch], [spe, process_count, local])[:, process_index]
        first = tf.where(epoch == start_epoch, skip * local, 0)
        return tf.data.Dataset.from_tensor_slices(tf.reshape(mine, [-1])[first:]).map(lambda i: (epoch, i))

    return tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_indices)


class TrainIterator:
    """Yields {"global": (B, 2, G, G, 3), "local": (B, L, l, l, 3), "label": (B,)} global arrays, built
    `device_prefetch` batches ahead (sharding.GlobalBatches); close() stops that thread.

    `step` and `epoch` say where the next batch sits in the schedule (bookkeeping lives here, not in the batch,
    because every leaf of the batch is sharded along the batch axis). Batches prefetched but not consumed are lost
    on close(), which loses nothing: a resumed run rebuilds the iterator at the checkpoint's step.
    """

    def __init__(self, host_batches: Iterable[dict], sharding, start_step: int, spe: int, device_prefetch: int = 2):
        self._batches = sharding_lib.GlobalBatches(iter(host_batches), sharding, device_prefetch)
        self.step, self.steps_per_epoch = start_step, spe

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._batches)
        self.step += 1
        return batch

    def close(self):
        self._batches.close()


def train_iterator(source: Source, *, global_batch: int, sharding, seed: int, start_step: int = 0,
                   global_crop_size: int = 224, local_crop_size: int = 96, global_crops_scale=(0.4, 1.0),
                   local_crops_scale=(0.05, 0.4), local_crops_number: int = 8, blur_sigma=augment.BLUR_SIGMA,
                   process_index: Optional[int] = None, process_count: Optional[int] = None,
                   num_parallel_calls=tf.data.AUTOTUNE, prefetch: int = 2,
                   device_prefetch: int = 2) -> TrainIterator:
    """Endless multi-crop batches for DINO training, starting at global step `start_step` (epoch start_step // spe).

    sharding: a NamedSharding with P('data') on the batch axis; process_index / process_count default to JAX's.
    prefetch: host batches tf.data keeps ready; device_prefetch: global-array batches built ahead (0: in next()).
    """
    process_index, process_count, local_batch = _process(process_index, process_count, global_batch)
    spe = steps_per_epoch(source.num_examples, global_batch)
    base_seed = tf.constant([seed, 0], tf.int64)

    def augment_example(epoch, ex):
        crop_seed = augment.fold_in(augment.fold_in(base_seed, epoch), ex["index"])
        globals_, locals_ = augment.multicrop(
            ex["image"], crop_seed, global_size=global_crop_size, local_size=local_crop_size,
            global_scale=global_crops_scale, local_scale=local_crops_scale, n_local=local_crops_number,
            blur_sigma=blur_sigma)
        return {"global": globals_, "local": locals_, "label": ex["label"]}

    def finish(ds):
        ds = ds.batch(local_batch, drop_remainder=True).prefetch(prefetch)
        return ds.with_options(_options(num_parallel_calls))

    if source.random_access:
        ds = train_indices(source.num_examples, global_batch=global_batch, seed=seed, process_index=process_index,
                           process_count=process_count, start_step=start_step)
        ds = ds.map(lambda epoch, index: augment_example(epoch, source.load(index)),
                    num_parallel_calls=num_parallel_calls, deterministic=True)
        return TrainIterator(finish(ds).as_numpy_iterator(), sharding, start_step, spe, device_prefetch)

    def passes():
        epoch, skip = divmod(start_step, spe)
        while True:
            pass_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)
            ds = source.read(process_index, process_count, seed=pass_seed, skip=skip * local_batch,
                             drop_remainder=True)
            ds = ds.map(functools.partial(augment_example, tf.constant(epoch, tf.int64)),
                        num_parallel_calls=num_parallel_calls, deterministic=True)
            yield from finish(ds).as_numpy_iterator()
            epoch, skip = epoch + 1, 0

    return TrainIterator(passes(), sharding, start_step, spe, device_prefetch)


def eval_iterator(source: Source, *, global_batch: int, sharding, resize_size: int = 256, crop_size: int = 224,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  num_parallel_calls=tf.data.AUTOTUNE) -> Iterator[dict]:
    """Every example once, in index order, as {"image", "label", "index", "valid"} (+ "mask") global arrays.

    Each process reads a contiguous share (a stream: TFDS's per-process split), padded so all processes run the
    same number of batches; padding rows repeat the share's first example and have valid=False. Masks are resized
    and cropped like the image (nearest).
    """
    process_index, process_count, local_batch = _process(process_index, process_count, global_batch)
    n = source.num_examples
    if n < process_count:
        raise ValueError(f"{source.name}: {n} examples cannot be shared by {process_count} processes")
    share = -(-n // process_count)
    num_batches = -(-share // local_batch)

    def transform(ex, valid):
        out = {"image": augment.eval_transform(ex["image"], resize_size=resize_size, crop_size=crop_size),
               "label": ex["label"], "index": tf.cast(ex["index"], tf.int32), "valid": valid}
        if "mask" in ex:
            out["mask"] = augment.resize_shorter_and_center_crop(ex["mask"][..., None], resize_size, crop_size,
                                                                 method="nearest")[..., 0]
        return out

    if source.random_access:
        positions = np.arange(process_index * share, min((process_index + 1) * share, n), dtype=np.int64)
        padded = np.full(num_batches * local_batch, -1, np.int64)
        padded[:len(positions)] = positions
        fill = positions[0] if len(positions) else 0

        def load(position):
            valid = position >= 0
            return transform(source.load(tf.where(valid, position, fill)), valid)

        ds = tf.data.Dataset.from_tensor_slices(padded).map(load, num_parallel_calls=num_parallel_calls,
                                                             deterministic=True)
    else:
        ds = source.read(process_index, process_count)
        padding = ds.take(1).map(lambda ex: transform(ex, False)).repeat()
        ds = ds.map(lambda ex: transform(ex, True), num_parallel_calls=num_parallel_calls, deterministic=True)
        ds = ds.concatenate(padding).take(num_batches * local_batch)
    ds = ds.batch(local_batch).prefetch(2).with_options(_options(num_parallel_calls))
    for local in ds.as_numpy_iterator():
        yield sharding_lib.global_batch(sharding, local)


def linear_train_iterator(source: Source, *, global_batch: int, sharding, seed: int, epoch: int,
                          crop_size: int = 224, process_index: Optional[int] = None,
                          process_count: Optional[int] = None,
                          num_parallel_calls=tf.data.AUTOTUNE) -> Iterator[dict]:
    """One epoch of the linear probe's augmented training images as global batches {"image", "label", "valid"}.

    The reference's probe transform: RandomResizedCrop(crop_size) (scale 0.08-1, torchvision's sampling, the same
    `augment.sample_crop_windows` as DINO's crops) with antialiased bilinear resizing (PIL's default there), a
    horizontal flip with p 0.5, then ImageNet normalisation. The epoch order is a permutation drawn from
    (seed, epoch); every example is seen once (the reference's loader keeps the last partial batch, so the tail is
    padded with valid=False rows instead of dropped). Randomness depends on (seed, epoch, example index) only.
    """
    process_index, process_count, local_batch = _process(process_index, process_count, global_batch)
    n = source.num_examples
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    steps = -(-n // global_batch)
    padded = np.full(steps * global_batch, -1, np.int64)
    padded[:n] = perm
    mine = padded.reshape(steps, process_count, local_batch)[:, process_index].reshape(-1)
    fill = int(perm[0])

    def load(position):
        valid = position >= 0
        index = tf.where(valid, position, fill)
        ex = source.load(index)
        seeds = augment.split(tf.stack([tf.constant(seed * 1000003 + epoch, tf.int64), tf.cast(index, tf.int64)]), 2)
        image = augment.to_float(ex["image"])
        shape = tf.shape(image)
        top, left, h, w = (t[0] for t in augment.sample_crop_windows(seeds[0], shape[0], shape[1], 1, (0.08, 1.0)))
        image = tf.image.resize(image[top:top + h, left:left + w], (crop_size, crop_size), method="bilinear",
                                antialias=True)
        image = augment.flip(image, augment.uniform(seeds[1]) < 0.5)
        image = tf.ensure_shape(augment.normalize(tf.clip_by_value(image, 0.0, 1.0)), [crop_size, crop_size, 3])
        return {"image": image, "label": ex["label"], "valid": valid}

    ds = tf.data.Dataset.from_tensor_slices(mine).map(load, num_parallel_calls=num_parallel_calls,
                                                       deterministic=True)
    for local in ds.batch(local_batch).prefetch(2).with_options(_options(num_parallel_calls)).as_numpy_iterator():
        yield sharding_lib.global_batch(sharding, local)
