"""Weighted k-NN: parity with the reference's torch knn_classifier, edge cases, and feature extraction."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import torch_reference as ref
from dino_jax.evaluation import knn
from dino_jax.models.vit import build_vit

torch.set_num_threads(1)  # torch and XLA thread pools fight over 2 cores otherwise (5x slower)


def random_params(model, image_size=32, seed=0):
    """Random backbone params without compiling model.init (seconds on a loaded 2-core CPU): normal(0.02)
    weights, unit LayerNorm scales."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (np.ones(s.shape, np.float32) if "scale" in jax.tree_util.keystr(path)
                         else rng.normal(0, 0.1, s.shape).astype(np.float32)), shapes)


def _clustered(rng, n, num_classes, dim=32, noise=2.5, centers=None):
    """L2-normalised features around class centres, so the vote is neither trivial nor random."""
    if centers is None:
        centers = rng.normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, n)
    f = centers[labels] + noise * rng.normal(size=(n, dim))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    return f.astype(np.float32), labels, centers


def _torch_knn(train_f, train_l, test_f, test_l, k, T, num_classes):
    tt = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    return ref.knn_classifier(tt(train_f), tt(train_l).long(), tt(test_f), tt(test_l).long(), k, T, num_classes)


@pytest.mark.parametrize("n_test,num_classes", [(7, 3), (99, 10), (250, 10)])
def test_matches_torch_reference(n_test, num_classes):
    rng = np.random.default_rng(n_test * 100 + num_classes)
    train_f, train_l, c = _clustered(rng, 400, num_classes)
    test_f, test_l, _ = _clustered(rng, n_test, num_classes, centers=c)
    ks = (1, 3, 5, 20, 200)
    for T in (0.07, 0.5):
        got = knn.knn_classifier_multi_k(train_f, train_l, test_f, test_l, ks, T, num_classes)
        for k in ks:
            want = _torch_knn(train_f, train_l, test_f, test_l, k, T, num_classes)
            np.testing.assert_allclose((got[k]["top1"], got[k]["top5"]), want, atol=1e-9, err_msg=f"k={k} T={T}")
    np.testing.assert_allclose(knn.knn_classifier(train_f, train_l, test_f, test_l, 3, 0.1, num_classes),
                               _torch_knn(train_f, train_l, test_f, test_l, 3, 0.1, num_classes), atol=1e-9)
    # jnp inputs and any chunking give the same numbers
    multi = knn.knn_classifier_multi_k(jax.numpy.asarray(train_f), train_l, jax.numpy.asarray(test_f), test_l,
                                       [1, 20], 0.07, num_classes, chunk_size=3)
    assert multi[20]["top1"] == knn.knn_classifier(train_f, train_l, test_f, test_l, 20, 0.07, num_classes)[0]
    assert n_test < 99 or 0 < multi[20]["top1"] < 100  # a case where the vote actually decides something


def test_perfect_features_and_k_below_5():
    rng = np.random.default_rng(0)
    num_classes = 7
    eye = np.eye(16, dtype=np.float32)[:num_classes]
    train_l = np.repeat(np.arange(num_classes), 5)
    test_l = rng.integers(0, num_classes, 13)
    for k in (1, 2, 5, 30):
        top1, top5 = knn.knn_classifier(eye[train_l], train_l, eye[test_l], test_l, k, 0.07, num_classes)
        assert (top1, top5) == (100.0, 100.0), k
    # wrong labels in the bank: 0% top-1. With k=2 neighbours of one class, top-5 looks at 2 ranked classes: the
    # voted one and the lowest-index class without votes (the reference's stable sort on small rows).
    shifted = (train_l + 1) % num_classes
    got = knn.knn_classifier(eye[train_l], shifted, eye[test_l], test_l, 2, 0.07, num_classes)
    assert got[0] == 0.0
    assert got == _torch_knn(eye[train_l], shifted, eye[test_l], test_l, 2, 0.07, num_classes)
    assert got[1] == 100.0 * np.mean(test_l == np.where(test_l == num_classes - 1, 1, 0))


def test_errors_are_clear():
    f = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="train bank holds only 4"):
        knn.knn_classifier(f, np.arange(4), f, np.arange(4), 10, 0.07, 4)
    assert list(knn.knn_classifier_multi_k(f, np.arange(4), f, np.arange(4), [1, 10], 0.07, 4)) == [1]
    with pytest.raises(ValueError, match="num_classes"):
        knn.knn_classifier(f, np.arange(4), f, np.arange(4), 1, 0.07, 3)


def test_cli_on_dumped_features(tmp_path):
    """eval_knn --load_features reads the reference's file names and writes the JSON table."""
    from dino_jax import eval_knn

    rng = np.random.default_rng(3)
    train_f, train_l, c = _clustered(rng, 60, 4)
    test_f, test_l, _ = _clustered(rng, 9, 4, centers=c)
    eval_knn.dump_features(str(tmp_path / "feats"), (train_f, test_f, train_l, test_l))
    assert sorted(os.listdir(tmp_path / "feats")) == ["testfeat.pth", "testlabels.pth", "trainfeat.pth",
                                                      "trainlabels.pth"]
    eval_knn.main(["--load_features", str(tmp_path / "feats"), "--nb_knn", "1", "5", "--temperature", "0.1",
                   "--output", str(tmp_path / "knn.json")])
    import json

    got = json.loads((tmp_path / "knn.json").read_text())
    assert got["num_classes"] == 4 and got["num_test"] == 9
    want = _torch_knn(train_f, train_l, test_f, test_l, 5, 0.1, 4)
    assert (got["results"]["5"]["top1"], got["results"]["5"]["top5"]) == pytest.approx(want)


def _batches(images, labels, order, batch):
    """Pipeline-like global batches: shuffled visit order, last batch padded with valid=False."""
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        pad = batch - len(idx)
        full = np.concatenate([idx, np.zeros(pad, int)])
        yield {"image": images[full], "label": labels[full], "index": full,
               "valid": np.arange(batch) < len(idx)}


def test_extract_features_orders_by_index_and_drops_padding():
    model = build_vit("vit_custom", 8, embed_dim=64, depth=2, num_heads=2, img_size=32)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(11, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 11)
    params = random_params(model)
    feats, labs = knn.extract_features(model, params, _batches(images, labels, rng.permutation(11), 4))
    want = np.array(jax.jit(model.apply)({"params": params}, images))
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert feats.shape == (11, 64) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, want, atol=1e-5)
    np.testing.assert_array_equal(labs, labels)


def test_protocol_from_a_training_config():
    """The trainer's protocol from its config (a ConfigDict, as the trainer has it): bank and queries (here the same
    demo images, so with k=1 every query finds itself), the eval transform, and the vote for every k."""
    import ml_collections

    config = ml_collections.ConfigDict({
        "eval_train_dataset": "demo:val:12", "eval_dataset": "demo:val:12", "eval_max_train_examples": 0,
        "data_dir": None, "global_crop_size": 32, "grayscale_input": False, "eval_batch_size": 8,
        "eval_resize_size": 32, "eval_crop_size": 32, "nb_knn": (1, 3), "knn_temperature": 0.07})
    protocol = knn.KnnProtocol.from_config(config)
    assert protocol.bank.num_examples == protocol.queries.num_examples == 12
    model = build_vit("vit_custom", 8, embed_dim=64, depth=2, num_heads=2, img_size=32)
    bank_f, bank_l, query_f, query_l = protocol.features(model, random_params(model))
    assert bank_f.shape == query_f.shape == (12, 64)
    np.testing.assert_array_equal(bank_l, query_l)
    results = protocol.classify(bank_f, bank_l, query_f, query_l)
    assert sorted(results) == [1, 3] and results[1]["top1"] == 100.0


SCRIPT = r"""
import numpy as np, jax
from dino_jax import sharding
from dino_jax.evaluation import knn
from dino_jax.models.vit import build_vit
assert jax.device_count() == 4
model = build_vit("vit_custom", 8, embed_dim=64, depth=2, num_heads=2, img_size=32)
rng = np.random.default_rng(0)
images = rng.normal(size=(10, 32, 32, 3)).astype(np.float32)
params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), jax.eval_shape(
    model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))["params"])
mesh = sharding.make_mesh()
def batches():
    for s in (0, 8):
        idx = np.arange(s, s + 8) % 10
        b = {"image": images[idx], "label": idx % 3, "index": idx, "valid": np.arange(s, s + 8) < 10}
        yield jax.device_put(b, sharding.batch_sharding(mesh))
f, l = knn.extract_features(model, params, batches())
want = np.array(jax.jit(model.apply)({"params": params}, images))
want /= np.linalg.norm(want, axis=1, keepdims=True)
np.testing.assert_allclose(f, want, atol=1e-5)
assert (l == np.arange(10) % 3).all()
print("OK")
"""


def test_extract_features_on_a_4_device_mesh():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
