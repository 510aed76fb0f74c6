"""Dataset sources: TFDS (mock data, and tiny datasets built here in both file formats), image folders with odd
files, the procedural demo."""
import logging

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from dino_jax.data import demo, sources


def examples(source, n=None):
    ds = source.dataset() if n is None else source.element(tf.data.Dataset.range(n))
    return list(ds.as_numpy_iterator())


# ---------------------------------------------------------------- TFDS (never a real tfds.load: it hangs offline)


def test_tfds_cifar10_under_mock_data():
    with tfds.testing.mock_data(num_examples=6):
        source = sources.load_source("tfds:cifar10:train")
        assert (source.num_examples, source.num_classes) == (6, 10)
        got = examples(source)
    assert [int(e["index"]) for e in got] == list(range(6))
    for e in got:
        assert e["image"].shape == (32, 32, 3) and e["image"].dtype == np.uint8
        assert 0 <= e["label"] < 10 and e["label"].dtype == np.int32
    assert len({e["image"].tobytes() for e in got}) == 6


def test_tfds_split_argument_and_variable_size_images():
    with tfds.testing.mock_data(num_examples=4):
        source = sources.load_source("tfds:imagenet2012", "validation")
        assert source.name == "tfds:imagenet2012:validation" and source.num_classes == 1000
        shapes = {e["image"].shape for e in examples(source)}
    assert all(s[2] == 3 for s in shapes)


def test_tfds_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        sources.load_source("tfds:no_such_dataset_xyz")


@pytest.mark.parametrize("spec", ["tfds:", "folder:", "imagenet", ""])
def test_bad_specs_say_what_is_expected(spec):
    with pytest.raises(ValueError, match="tfds:NAME|folder:PATH"):
        sources.load_source(spec)


# ---------------------------------------------------------------- image folder


@pytest.fixture
def odd_folder(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), np.uint8)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    Image.fromarray(rgb).save(tmp_path / "cat" / "rgb.jpg", quality=95)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cat" / "cmyk.jpg", quality=95)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "dog" / "grey.png")
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "dog" / "rgba.png")
    Image.fromarray(rgb[:3, :2]).save(tmp_path / "dog" / "tiny.png")
    Image.fromarray(rgb).save(tmp_path / "dog" / "pic.tiff")  # not decodable by TF: PIL path
    (tmp_path / "dog" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    (tmp_path / "dog" / "notes.txt").write_text("ignored: not an image extension")
    return tmp_path, rgb


def test_folder_decodes_odd_files_and_skips_corrupt_ones_with_one_warning(odd_folder, caplog):
    root, rgb = odd_folder
    with caplog.at_level(logging.WARNING):
        source = sources.load_source(f"folder:{root}")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "corrupt.jpg" in warnings[0].getMessage()
    assert source.num_examples == 6 and source.num_classes == 2
    assert [s.endswith("corrupt.jpg") for s in source.skipped] == [True]
    got = {e["index"]: e for e in examples(source)}
    files = ["cat/cmyk.jpg", "cat/rgb.jpg", "dog/grey.png", "dog/pic.tiff", "dog/rgba.png", "dog/tiny.png"]
    for i, name in enumerate(files):  # sorted by class, then by file name
        e = got[i]
        assert e["image"].dtype == np.uint8 and e["image"].shape[2] == 3, name
        assert e["label"] == (0 if name.startswith("cat") else 1)
        want = np.asarray(Image.open(root / name).convert("RGB"))
        tolerance = 2.0 if name.endswith(".jpg") else 0.0  # JPEG decoders differ in rounding
        assert np.abs(e["image"].astype(float) - want).mean() <= tolerance, name
    assert got[5]["image"].shape == (3, 2, 3)
    grey = got[2]["image"]
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], rgb[..., 0])


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}/missing.*no such directory"):
        sources.load_source(f"folder:{tmp_path}/missing")
    with pytest.raises(ValueError, match="no class subfolders"):
        sources.load_source(f"folder:{tmp_path}")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("")
    with pytest.raises(ValueError, match="no image files"):
        sources.load_source(f"folder:{tmp_path}")


def test_grayscale_and_subset_options(odd_folder):
    root, _ = odd_folder
    source = sources.load_source(f"folder:{root}", grayscale=True, max_examples=3)
    got = examples(source)
    assert source.num_examples == 3 and [int(e["index"]) for e in got] == [0, 2, 4]
    for e in got:
        assert np.array_equal(e["image"][..., 0], e["image"][..., 2])


# ---------------------------------------------------------------- demo


def test_demo_is_deterministic_and_splits_differ():
    a = demo.generate(64, 32, seed=0)
    b = demo.generate(64, 32, seed=0)
    c = demo.generate(64, 32, seed=1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    prefix = demo.generate(40, 32, seed=0)  # demo:train:N is the first N images of demo:train
    for x, y in zip(a, prefix):
        np.testing.assert_array_equal(x[:40], y)
    train = sources.load_source("demo:train:50", image_size=32)
    val = sources.load_source("demo", "val", image_size=32, max_examples=50)
    t, v = examples(train), examples(val)
    assert train.num_classes == 10 and train.has_mask and len(t) == 50 and len(v) == 50
    assert not np.array_equal(t[0]["image"], v[0]["image"])
    assert t[0]["image"].shape == (32, 32, 3) and t[0]["mask"].shape == (32, 32)


def test_demo_masks_line_up_with_the_objects():
    images, labels, masks = demo.generate(300, 48, seed=3, grayscale=True)
    lum = images[..., 0].astype(np.float32)
    area = masks.reshape(len(masks), -1).mean(1)
    assert area.min() > 0.02 and area.max() < 0.6  # radius 0.25-0.42 of the side, every shape

    def contrast(m):
        """Mean |pixel - mean of a 3-px ring around the mask| inside the mask, per image (grey levels). The
        object's two tones lie on either side of the background under it, so it is the deviation, not the mean
        tone, that stands out."""
        from scipy.ndimage import binary_dilation

        ring = np.stack([binary_dilation(x, iterations=3) & ~x for x in m.astype(bool)])
        around = (lum * ring).sum((1, 2)) / np.maximum(ring.sum((1, 2)), 1)
        deviation = np.abs(lum - around[:, None, None])
        return (deviation * m).sum((1, 2)) / np.maximum(m.sum((1, 2)), 1)

    aligned, shuffled = contrast(masks), contrast(np.roll(masks, 1, axis=0))
    assert np.median(aligned) > 35 and (aligned > 10).mean() > 0.95
    assert np.median(shuffled) < np.median(aligned) / 2  # the measure can tell a misaligned mask
    assert np.bincount(labels, minlength=10).min() > 10


def test_demo_colour_option():
    grey = demo.generate(8, 32, seed=0, grayscale=True)[0].astype(int)
    colour = demo.generate(8, 32, seed=0, grayscale=False)[0].astype(int)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    assert np.abs(colour[..., 0] - colour[..., 2]).mean() > 5


def weighted_knn_top1(bank, bank_labels, queries, query_labels, k=20, t=0.07, num_classes=10):
    """The reference's eval_knn.py vote: cosine similarity, top-k, weights exp(sim / T)."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sim = queries @ bank.T
    top = np.argsort(-sim, axis=1)[:, :k]
    votes = np.zeros((len(queries), num_classes))
    np.add.at(votes, (np.arange(len(queries))[:, None], bank_labels[top]), np.exp(np.take_along_axis(sim, top, 1) / t))
    return 100.0 * (votes.argmax(1) == query_labels).mean()


def test_raw_pixels_do_not_solve_the_demo():
    """Weighted 20-NN on raw pixels (2000-image bank, 1000 queries, 32 px grey): 11.8% at chance 10% (on the masks
    alone: 60.4%)."""
    bank, bank_labels, bank_masks = demo.generate(2000, 32, seed=0, grayscale=True)
    queries, query_labels, masks = demo.generate(1000, 32, seed=12345, grayscale=True)
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0  # noqa: E731
    acc = weighted_knn_top1(flat(bank), bank_labels, flat(queries), query_labels)
    assert acc < 25.0, acc
    # The same vote on the object masks alone does better: the class is in the images, raw pixels just bury it.
    assert weighted_knn_top1(flat(bank_masks), bank_labels, flat(masks), query_labels) > acc
