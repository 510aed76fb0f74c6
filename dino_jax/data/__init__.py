"""The input pipeline: tf.data on the host CPU.

Entry points call `configure_tensorflow()` before TensorFlow runs its first op; importing the package changes
nothing in the process.
"""
import logging


def configure_tensorflow():
    """Set TensorFlow up as the input pipeline's engine: no GPUs (the accelerators belong to JAX), and one thread
    in TF's process-wide intra-op pool.

    Why one thread: the oneDNN kernels among the augmentation ops (the resize's transposes, the blur's
    convolutions, the colour matmuls) split their work over that pool whatever tf.data's
    `max_intra_op_parallelism` says, so on a small host the map's workers keep waiting on each other. Parallelism
    comes from map() alone: on 2 cores `python benchmarks/input_pipeline.py` ran ~1.6x faster this way
    (benchmarks/README.md). Only takes effect before TensorFlow's first op; after it, a warning says so.
    """
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF is initialised already; its GPUs stay visible to it
        pass
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:
        threads = tf.config.threading.get_intra_op_parallelism_threads()
        if threads != 1:
            logging.warning("TensorFlow ran an op before dino_jax.data.configure_tensorflow(), so its intra-op pool "
                            "keeps %s and the input pipeline runs slower (benchmarks/README.md); call it first "
                            "thing", f"{threads} threads" if threads else "a thread per core")
