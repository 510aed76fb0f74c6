"""Linear probe: the reference's feature layout, torch-equivalent SGD + cosine lr, learning, weight round trips, and
the augmented training pipeline."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from dino_jax.evaluation import linear
from dino_jax.models.vit import build_vit
from test_knn import random_params

torch.set_num_threads(1)


@pytest.mark.parametrize("n,avgpool", [(1, False), (3, False), (1, True)])
def test_features_match_torch_reference(n, avgpool):
    model = build_vit("vit_custom", 8, embed_dim=64, depth=3, num_heads=2, img_size=32)
    params = random_params(model)
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    got = np.asarray(linear.feature_fn(model, n, avgpool)(params, images))
    inter = jax.jit(lambda p, x: model.apply({"params": p}, x, n, method=model.get_intermediate_layers))(params, images)
    want = ref.linear_features([torch.from_numpy(np.array(x)) for x in inter], avgpool).numpy()
    assert got.shape == (2, linear.feature_dim(model, n, avgpool))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if avgpool:  # interleaved [cls0, avg0, cls1, avg1, ...], not stacked [cls, avg]
        x = np.asarray(inter[-1])
        np.testing.assert_allclose(got[:, 0::2], x[:, 0], atol=1e-5)
        np.testing.assert_allclose(got[:, 1::2], x[:, 1:].mean(1), atol=1e-5)


def test_avgpool_needs_one_block():
    model = build_vit("vit_custom", 8, embed_dim=64, depth=2, num_heads=2, img_size=32)
    with pytest.raises(ValueError, match="n_last_blocks 1"):
        linear.feature_fn(model, 2, True)


def test_sgd_and_cosine_lr_match_torch():
    rng = np.random.default_rng(0)
    f_dim, c, epochs, base_lr = 6, 4, 3, 0.3
    lin = linear.init_linear(0, f_dim, c)
    tl = torch.nn.Linear(f_dim, c)
    with torch.no_grad():
        tl.weight.copy_(torch.from_numpy(np.asarray(lin["kernel"]).T.copy()))
        tl.bias.zero_()
    opt = torch.optim.SGD(tl.parameters(), base_lr, momentum=0.9, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
    mom = jax.tree.map(jnp.zeros_like, lin)
    for epoch in range(epochs):
        lr = linear.cosine_annealing_lr(base_lr, epoch, epochs)
        assert lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        for _ in range(2):
            x = rng.normal(size=(5, f_dim)).astype(np.float32)
            y = rng.integers(0, c, 5)
            lin, mom, loss = linear.sgd_step(lin, mom, x, y, np.ones(5, bool), jnp.float32(lr))
            opt.zero_grad()
            tloss = torch.nn.functional.cross_entropy(tl(torch.from_numpy(x)), torch.from_numpy(y))
            tloss.backward()
            opt.step()
            assert float(loss) == pytest.approx(tloss.item(), rel=1e-5)
        sched.step()
    sd = linear.to_reference_state_dict(lin)
    np.testing.assert_allclose(sd["module.linear.weight"], tl.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sd["module.linear.bias"], tl.bias.detach().numpy(), rtol=1e-5, atol=1e-6)
    # padded rows (valid False) do not change the step
    x = rng.normal(size=(4, f_dim)).astype(np.float32)
    y = rng.integers(0, c, 4)
    a = linear.sgd_step(lin, mom, x[:2], y[:2], np.ones(2, bool), jnp.float32(0.1))
    b = linear.sgd_step(lin, mom, x, y, np.array([True, True, False, False]), jnp.float32(0.1))
    np.testing.assert_allclose(np.asarray(a[0]["kernel"]), np.asarray(b[0]["kernel"]), atol=1e-7)


def test_probe_learns_separable_features_and_weights_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    c, f_dim = 6, 24
    centers = rng.normal(size=(c, f_dim)).astype(np.float32)

    def data(n):
        y = rng.integers(0, c, n)
        return (centers[y] + 0.3 * rng.normal(size=(n, f_dim))).astype(np.float32), y

    (xt, yt), (xv, yv) = data(600), data(150)
    logs = []
    res = linear.train_linear(lambda e: linear.array_batches(xt, yt, 64, seed=e),
                              lambda: linear.array_batches(xv, yv, 64), f_dim, c, epochs=8, lr=0.5, val_freq=2,
                              output_dir=str(tmp_path), log=logs.append)
    assert res["best_acc"] >= 99.0, logs
    lines = [json.loads(s) for s in (tmp_path / "log.txt").read_text().splitlines()]
    assert [s["epoch"] for s in lines] == list(range(8)) and "test_acc1" in lines[1] and "test_acc1" not in lines[0]
    # the written checkpoint is the reference layout and loads back into the same classifier
    ck = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=False)
    assert set(ck["state_dict"]) == {"module.linear.weight", "module.linear.bias"}
    assert tuple(ck["state_dict"]["module.linear.weight"].shape) == (c, f_dim)
    back = linear.load_linear_weights(str(tmp_path / "checkpoint.pth.tar"))
    np.testing.assert_array_equal(np.asarray(back["kernel"]), np.asarray(res["params"]["kernel"]))
    assert linear.evaluate_linear(back, linear.array_batches(xv, yv, 64))["acc1"] == res["last"]["acc1"]


def test_evaluate_loads_a_reference_linearweights_file(tmp_path):
    """A torch-written {'state_dict': {'module.linear.*'}} file gives torch's own predictions."""
    rng = np.random.default_rng(1)
    c, f_dim = 7, 10
    tl = torch.nn.Linear(f_dim, c)
    path = tmp_path / "dino_custom_linearweights.pth"
    torch.save({"state_dict": {"module.linear.weight": tl.weight.detach().clone(),
                               "module.linear.bias": tl.bias.detach().clone()}}, path)
    x = rng.normal(size=(50, f_dim)).astype(np.float32)
    with torch.no_grad():
        logits = tl(torch.from_numpy(x)).numpy()
    y = logits.argmax(1)
    y[:10] = (y[:10] + 1) % c  # 80% top-1 by construction
    stats = linear.evaluate_linear(linear.load_linear_weights(str(path)), linear.array_batches(x, y, 16))
    assert stats["acc1"] == pytest.approx(80.0)
    top5 = np.argsort(-logits, 1)[:, :5]
    assert stats["acc5"] == pytest.approx(100 * np.mean((top5 == y[:, None]).any(1)))
    with pytest.raises(FileNotFoundError, match="--linear_weights"):
        linear.load_linear_weights(str(tmp_path / "missing.pth"))


def test_train_iterator_gives_every_example_once_as_torchvision_random_resized_crops():
    """One epoch of the probe's training pipeline: each example once (the tail padded with valid=False), each image
    the crop window torchvision's RandomResizedCrop(scale 0.08-1) would draw (augment.sample_crop_windows, whose
    distribution tests/test_augment.py checks), resized bilinearly, maybe mirrored, normalised."""
    import tensorflow as tf

    from dino_jax import sharding
    from dino_jax.data import augment, pipeline
    from dino_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
    from dino_jax.data.sources import Source

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 40, 50, 3), np.uint8), np.arange(5) * 10
    source = Source("five", 5, 50, load=lambda i: {"image": tf.gather(images, i), "label": tf.gather(labels, i)})
    mesh = sharding.make_mesh(jax.devices()[:1])
    batches = list(pipeline.linear_train_iterator(source, global_batch=4, sharding=sharding.batch_sharding(mesh),
                                                  seed=3, epoch=1, crop_size=16))
    got = {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in ("image", "label", "valid")}
    assert got["valid"].tolist() == [True] * 5 + [False] * 3
    order = np.random.default_rng([3, 1]).permutation(5)
    np.testing.assert_array_equal(got["label"][:5], labels[order])
    flips = []
    for row, index in enumerate(order):
        crop_seed = augment.split(tf.constant([3 * 1000003 + 1, index], tf.int64), 2)[0]
        top, left, h, w = (int(t[0]) for t in augment.sample_crop_windows(crop_seed, 40, 50, 1, (0.08, 1.0)))
        want = np.clip(tf.image.resize(images[index, top:top + h, left:left + w] / 255.0, (16, 16), "bilinear",
                                       antialias=True).numpy(), 0, 1)
        image = got["image"][row] * np.float32(IMAGENET_STD) + np.float32(IMAGENET_MEAN)
        flips.append(np.abs(image - want[:, ::-1]).max() < 1e-5)
        np.testing.assert_allclose(image, want[:, ::-1] if flips[-1] else want, atol=1e-5)
    assert 0 < sum(flips) < 5  # p = 0.5 per image
