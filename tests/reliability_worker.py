"""`python -m dino_jax.main` with test-only instrumentation, for tests/test_reliability.py.

    python tests/reliability_worker.py MAIN_FLAGS...          # exactly dino_jax.main (same flags)
    python tests/reliability_worker.py restore WORKDIR OUT    # restore WORKDIR's latest checkpoint on this process's
                                                              # devices; write a JSON comparison to OUT

Instrumentation (environment variables; nothing is patched when they are unset):
  RELIABILITY_RECORD=PREFIX   at exit, write PREFIX.<process_index>.json with the (epoch, example index) pairs this
                              process's training pipeline asked for, in order, and per dataset spec the example
                              indices its sources actually loaded (so a test can check which examples each process
                              read).
  RELIABILITY_NAN_STEPS=3,11  the batches of these steps (1-based, as in the logs, metrics.jsonl and checkpoint
                              numbers) get NaN global crops: a genuinely non-finite loss and gradient through the
                              real train step.
  RELIABILITY_SLOW_PROCESS=1:40  process 1 finishes building its train state 40 s late: a host that reaches the
                              first collective long after the others (JAX's CPU collectives give their setup 30 s).
"""
import atexit
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _instrument():
    record, nan_steps = os.environ.get("RELIABILITY_RECORD"), os.environ.get("RELIABILITY_NAN_STEPS")
    slow = os.environ.get("RELIABILITY_SLOW_PROCESS")
    if not (record or nan_steps or slow):
        return
    import numpy as np
    import tensorflow as tf

    from dino_jax.data import pipeline, sources

    if record:
        requested, loaded = [], {}
        train_indices, load_source = pipeline.train_indices, sources.load_source

        def recorded_indices(*args, **kwargs):
            def note(epoch, index):
                requested.append((int(epoch), int(index)))
                return np.int64(0)

            def rec(epoch, index):
                zero = tf.py_function(note, [epoch, index], tf.int64)
                return epoch, index + tf.reshape(zero, [])

            return train_indices(*args, **kwargs).map(rec)  # sequential: records the stream in order

        def recorded_source(spec, *args, **kwargs):
            source = load_source(spec, *args, **kwargs)
            indices = loaded.setdefault(spec, [])

            def load(index):
                zero = tf.py_function(lambda i: indices.append(int(i)) or np.int64(0), [index], tf.int64)
                return source.load(index + tf.reshape(zero, []))

            return dataclasses.replace(source, load=load)

        pipeline.train_indices, sources.load_source = recorded_indices, recorded_source

        def dump():
            import jax

            with open(f"{record}.{jax.process_index()}.json", "w") as f:
                json.dump({"requested": requested, "loaded": loaded, "process_index": jax.process_index(),
                           "process_count": jax.process_count()}, f)

        atexit.register(dump)

    if nan_steps:
        bad = {int(s) for s in nan_steps.split(",")}
        train_iterator = pipeline.train_iterator

        class NaNBatches:
            def __init__(self, it):
                self.it = it

            def __iter__(self):
                return self

            def __next__(self):
                number = self.it.step + 1  # the 1-based number of the step this batch feeds
                batch = next(self.it)
                if number in bad:
                    batch = {**batch, "global": batch["global"] * np.float32("nan")}
                return batch

            def close(self):
                self.it.close()

        pipeline.train_iterator = lambda *a, **k: NaNBatches(train_iterator(*a, **k))


    if slow:
        import time

        import jax

        from dino_jax import dino

        process, seconds = (int(x) for x in slow.split(":"))
        create_train_state = dino.create_train_state

        def late_state(*args, **kwargs):
            state = create_train_state(*args, **kwargs)
            if jax.process_index() == process:
                time.sleep(seconds)
            return state

        dino.create_train_state = late_state


def _restore(workdir, out):
    """Restore the latest checkpoint onto this process's devices (replicated) and compare it with the raw arrays."""
    import jax
    import numpy as np

    from dino_jax import checkpoint, dino, sharding
    from reliability_config import get_config

    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    meta = ckpt.restore_meta()
    config = get_config()
    model = dino.build_model(config)
    template = jax.eval_shape(
        lambda: dino.create_train_state(config, model, meta["steps_per_epoch"], jax.random.PRNGKey(0)))
    mesh = sharding.make_mesh()
    state, _ = ckpt.restore(template, sharding.replicated(mesh))
    raw, _ = ckpt.restore_raw()
    restored = checkpoint.array_fields(state)
    leaves, raw_leaves = jax.tree.leaves(restored), jax.tree.leaves(raw)
    result = {
        "devices": len(jax.devices()), "num_arrays": len(leaves), "step": int(state.step),
        "devices_per_array": sorted({len(x.sharding.device_set) for x in leaves}),
        "identical": bool(len(leaves) == len(raw_leaves) and all(
            np.asarray(a).shape == np.asarray(b).shape and np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(leaves, raw_leaves))),
        "finite": bool(all(np.isfinite(np.asarray(x)).all() for x in leaves if np.asarray(x).dtype.kind == "f")),
    }
    ckpt.close()
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if sys.argv[1:2] == ["restore"]:
        _restore(*sys.argv[2:4])
    else:
        _instrument()
        from absl import app

        from dino_jax import main

        app.run(main.main)
