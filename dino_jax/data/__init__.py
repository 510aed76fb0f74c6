"""The input pipeline: tf.data on the host CPU. Importing the package sets TensorFlow up for that role before TF
starts: no GPUs (the accelerators belong to JAX), and one thread in TF's process-wide intra-op pool.

Why one thread: the oneDNN kernels among the augmentation ops (the resize's transposes, the blur's convolutions,
the colour matmuls) split their work over that pool whatever tf.data's `max_intra_op_parallelism` says, so on a
small host the map's workers keep waiting on each other. Parallelism comes from map() alone: on the 2-core
development VM `python benchmarks/input_pipeline.py` went from 37-41 to 60-69 images/s per core (benchmarks/README.md).
"""
import logging

import tensorflow as tf


def _configure_tensorflow():
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF was initialised by someone else; its GPUs stay visible to it
        pass
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:
        threads = tf.config.threading.get_intra_op_parallelism_threads()
        if threads != 1:
            logging.warning("TensorFlow was initialised before dino_jax.data was imported, so its intra-op pool keeps "
                            "%s and the input pipeline runs slower (benchmarks/README.md); import dino_jax.data "
                            "before running any TensorFlow op", f"{threads} threads" if threads else "a thread per core")


_configure_tensorflow()
