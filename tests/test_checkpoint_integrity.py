"""A damaged latest checkpoint: each kind of damage storage can do is reported by directory and the
previous complete checkpoint restored instead; with none usable, one error names them all.

The damage is done to real orbax checkpoints of a small TrainState-shaped pytree (random arrays, so the data files
hold raw, incompressible bytes), written and restored by dino_jax.checkpoint exactly as training does.
"""
import logging
import os
import re

import numpy as np
import pytest


def _state(value):
    import flax
    import jax
    import jax.numpy as jnp

    class State(flax.struct.PyTreeNode):
        step: jax.Array
        params: dict
        rng: jax.Array

    rng = np.random.default_rng(value)
    return State(step=jnp.int32(value), rng=jax.random.PRNGKey(value),
                 params={"w": jnp.asarray(rng.standard_normal((256, 256)), jnp.float32),
                         "b": jnp.asarray(rng.standard_normal(7), jnp.float32)})


def _write(workdir, steps=(1, 2)):
    from dino_jax import checkpoint

    ckpt = checkpoint.Checkpointer(str(workdir), every_steps=1, max_to_keep=5)
    for step in steps:
        ckpt.save(step, _state(step), {"config": {"lr": 0.1}, "epoch": step})
    ckpt.close()
    return os.path.join(str(workdir), "checkpoints")


def _restore(workdir):
    import jax

    from dino_jax import checkpoint

    ckpt = checkpoint.Checkpointer(str(workdir), every_steps=1, max_to_keep=5)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    try:
        return ckpt.restore(_state(0), device)
    finally:
        ckpt.close()


def _largest_array_file(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
             if os.path.basename(d) == "d"]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_array_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _delete_array_file(step_dir):
    os.remove(_largest_array_file(step_dir))


def _delete_manifest(step_dir):
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def _garble_meta(step_dir):
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
        f.write('{"config": {"lr": 0.1}, "epo')


def _garble_array_metadata(step_dir):
    with open(os.path.join(step_dir, "state", "_METADATA"), "wb") as f:
        f.write(os.urandom(300))


def _flip_bytes(step_dir):
    """64 bytes in the middle of the largest array's data: the file still reads, the values are wrong."""
    path = _largest_array_file(step_dir)
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
        f.seek(0)
        f.write(data)


DAMAGE = [_truncate, _delete_array_file, _delete_manifest, _garble_meta, _garble_array_metadata, _flip_bytes]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__.strip("_") for d in DAMAGE])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    directory = _write(tmp_path)
    damage(os.path.join(directory, "2"))
    with caplog.at_level(logging.WARNING):
        state, meta = _restore(tmp_path)
    assert int(state.step) == 1 and meta["epoch"] == 1 and "checksums" not in meta
    assert all(np.array_equal(a, b) for a, b in zip(
        [np.asarray(x) for x in [state.params["w"], state.params["b"], state.rng]],
        [np.asarray(x) for x in [_state(1).params["w"], _state(1).params["b"], _state(1).rng]]))
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert (f"checkpoint {os.path.join(directory, '2')} is damaged" in warnings[0] and
            f"restored the previous complete one, {os.path.join(directory, '1')}, instead" in warnings[0]), warnings
    # The cause is the reader's first sentence, without the spec dump TensorStore appends to its errors.
    assert "TensorStore details" not in warnings[0] and "tensorstore_spec" not in warnings[0], warnings
    # The damaged one is kept for inspection, out of the way of the saves that will reuse its step number.
    assert sorted(os.listdir(directory)) == ["1"]
    assert os.listdir(os.path.join(str(tmp_path), "checkpoints_damaged")) == ["2"]
    _write(tmp_path, steps=(2,))
    assert int(_restore(tmp_path)[0].step) == 2


def test_flipped_bytes_are_caught_by_the_checksum_not_by_the_reader(tmp_path):
    """Without the checksum the flipped bytes restore silently: the reader alone must not notice."""
    import jax

    from dino_jax import checkpoint

    directory = _write(tmp_path)
    _flip_bytes(os.path.join(directory, "2"))
    ckpt = checkpoint.Checkpointer(str(tmp_path), read_only=True)
    raw, meta = ckpt.restore_raw(2, verify=False)
    ckpt.close()
    assert not np.array_equal(raw["params"]["w"], np.asarray(_state(2).params["w"]))
    bad = [k for k, v in checkpoint.checksums(jax.tree.map(np.asarray, raw)).items() if meta["checksums"][k] != v]
    assert bad == ["['params']['w']"]


def test_no_usable_checkpoint_is_one_error_naming_each(tmp_path):
    from dino_jax import checkpoint

    directory = _write(tmp_path)
    _flip_bytes(os.path.join(directory, "2"))
    _delete_manifest(os.path.join(directory, "1"))
    with pytest.raises(checkpoint.CheckpointError) as e:
        _restore(tmp_path)
    message = str(e.value)
    assert message.startswith(f"no checkpoint in {directory} can be restored: ")
    assert re.search(re.escape(os.path.join(directory, "2")) + r": 1 array\(s\) differ from their checksums", message)
    assert re.search(re.escape(os.path.join(directory, "1")) + ": its arrays do not read", message)
    assert "\n" not in message and "another --workdir" in message
    assert sorted(os.listdir(directory)) == ["1", "2"]  # nothing moved when nothing restores
