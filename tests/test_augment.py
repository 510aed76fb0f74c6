"""DataAugmentationDINO ops: eager == tf.data, PIL/torchvision semantics, sampling distributions, probabilities."""
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from dino_jax.data import augment as A

SEED = tf.constant([3, 7], tf.int64)


def photo(h=64, w=80):
    """A real photo (skimage's astronaut), resized: colour, edges and flat areas."""
    import skimage.data

    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((w, h), Image.BICUBIC))


def tfrun(fn, *args):
    """fn(*args) eagerly and inside tf.data; both must agree (they can differ: big_vision's ops_image_test)."""
    eager = tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
    ds = tf.data.Dataset.from_tensors(tuple(tf.convert_to_tensor(a) for a in args)).map(lambda *a: fn(*a))
    graph = next(iter(ds.as_numpy_iterator()))
    tf.nest.map_structure(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), eager, graph)
    return eager


U8 = photo()
X = U8.astype(np.float32) / 255.0

OPS = {
    "crop_windows": lambda x, s: A.sample_crop_windows(s, tf.shape(x)[0], tf.shape(x)[1], 5, (0.05, 0.4)),
    "random_resized_crops": lambda x, s: tf.stack(A.random_resized_crops(x, s, 3, 24, (0.2, 1.0))),
    "flip": lambda x, s: A.flip(x, A.uniform(s) < 0.5),
    "grayscale": lambda x, s: A.to_grayscale(x),
    "brightness": lambda x, s: A.adjust_brightness(x, 1.3),
    "contrast": lambda x, s: A.adjust_contrast(x, 0.7),
    "saturation": lambda x, s: A.adjust_saturation(x, 1.2),
    "hue": lambda x, s: A.adjust_hue(x, 0.08),
    "color_jitter": lambda x, s: A.color_jitter(x, *[t[0] for t in A.sample_jitter(s, 1)]),
    "blur": lambda x, s: A.gaussian_blur(x, A.uniform(s, 0.1, 2.0), flip=A.uniform(s) < 0.5),
    "solarize": lambda x, s: A.solarize(x),
    "normalize": lambda x, s: A.normalize(x[None]),
    "views": lambda x, s: A.views(x, s, n=3, size=16, scale=(0.1, 0.5), p_blur=0.5, p_solarize=(0.0, 0.2, 1.0)),
    "multicrop": lambda x, s: A.multicrop(tf.cast(x * 255, tf.uint8), s, global_size=32, local_size=16,
                                          n_local=3),
    "eval_transform": lambda x, s: A.eval_transform(tf.cast(x * 255, tf.uint8), resize_size=40, crop_size=32),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_eager_equals_tf_data(name):
    out = tfrun(OPS[name], X, SEED)
    assert all(np.isfinite(o).all() for o in tf.nest.flatten(out))


def test_multicrop_shapes_and_normalisation():
    g, l = A.multicrop(U8, SEED, global_size=32, local_size=16, n_local=4)
    assert g.shape == (2, 32, 32, 3) and l.shape == (4, 16, 16, 3)
    # normalised: [0, 1] maps into [-mean/std, (1-mean)/std]
    lo = -np.array(A.IMAGENET_MEAN) / np.array(A.IMAGENET_STD)
    hi = (1 - np.array(A.IMAGENET_MEAN)) / np.array(A.IMAGENET_STD)
    assert (g.numpy() >= lo - 1e-5).all() and (g.numpy() <= hi + 1e-5).all()
    other = A.multicrop(U8, SEED + 1, global_size=32, local_size=16, n_local=4)[0]
    assert not np.allclose(g, other)


# ---------------------------------------------------------------- RandomResizedCrop


def test_crop_area_and_log_aspect_follow_torchvision_distributions():
    n, side, scale = 4000, 1000, (0.05, 0.4)
    top, left, h, w = (t.numpy() for t in A.sample_crop_windows(SEED, side, side, n, scale))
    area = h * w / side**2
    log_ratio = np.log(w / h)
    # Uniform area fraction: quantiles match (rounding to whole pixels is negligible at 1000 px).
    q = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(np.quantile(area, q), scale[0] + q * (scale[1] - scale[0]), atol=0.015)
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    np.testing.assert_allclose(np.quantile(log_ratio, q), lo + q * (hi - lo), atol=0.02)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= side).all() and (left + w <= side).all()
    # Offsets are uniform over the valid range: they reach both ends.
    rel = top / np.maximum(side - h, 1)
    assert rel.min() < 0.01 and rel.max() > 0.99 and abs(rel.mean() - 0.5) < 0.03


def test_crop_fallback_is_a_centre_crop_with_clamped_ratio():
    # A 10 x 1000 strip with scale near 1: no draw fits, so torchvision crops the centre at ratio 4/3.
    top, left, h, w = (int(t[0]) for t in A.sample_crop_windows(SEED, 10, 1000, 1, (0.9, 1.0)))
    assert (top, h, w) == (0, 10, 13) and left == (1000 - 13) // 2
    top, left, h, w = (int(t[0]) for t in A.sample_crop_windows(SEED, 1000, 10, 1, (0.9, 1.0)))
    assert (left, w, h) == (0, 10, 13) and top == (1000 - 13) // 2


def test_resize_matches_pil_bicubic_with_antialiasing():
    big = photo(300, 360)
    for size in (96, 500):  # downscale (antialiased) and upscale
        ours = A.resize(tf.constant(big / 255.0, tf.float32), (size, size)).numpy()
        pil = np.asarray(Image.fromarray(big).resize((size, size), Image.BICUBIC)) / 255.0
        assert np.abs(ours - pil).mean() < 0.6 / 255
    plain = tf.image.resize(tf.constant(big / 255.0, tf.float32), (96, 96), "bicubic").numpy()
    pil = np.asarray(Image.fromarray(big).resize((96, 96), Image.BICUBIC)) / 255.0
    assert np.abs(np.clip(plain, 0, 1) - pil).mean() > 1.0 / 255  # without antialiasing it would not match


def test_resize_of_uint8_equals_resize_of_float():
    """multicrop resizes crops of the uint8 image (no full-image float conversion): the same numbers."""
    for size in (24, 100):
        a = A.resize(tf.constant(U8), (size, size)).numpy()
        b = A.resize(tf.constant(X), (size, size)).numpy()
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def test_resize_equals_tf_antialiased_bicubic():
    """resize runs ScaleAndTranslate's vertical pass twice over row views (_resize_rows) instead of calling it on the
    image: the same numbers as tf.image.resize(bicubic, antialias=True), for downscales, upscales and odd shapes."""
    big = photo(300, 360)
    for size in ((96, 96), (500, 500), (61, 250), (224, 100)):
        ours = A.resize(tf.constant(big), size).numpy()
        tf_ = tf.image.resize(tf.constant(big, tf.float32), size, "bicubic", antialias=True).numpy() / 255.0
        np.testing.assert_allclose(ours, np.clip(tf_, 0, 1), rtol=0, atol=2e-6)


def test_random_resized_crops_equal_crop_then_resize():
    image = photo(120, 150)
    top, left, h, w = (t.numpy() for t in A.sample_crop_windows(SEED, 120, 150, 5, (0.05, 1.0)))
    crops = A.random_resized_crops(tf.constant(image), SEED, 5, 48, (0.05, 1.0))
    for i in range(5):
        window = image[top[i]:top[i] + h[i], left[i]:left[i] + w[i]].astype(np.float32)
        want = tf.image.resize(window, (48, 48), "bicubic", antialias=True).numpy() / 255.0
        np.testing.assert_allclose(crops[i].numpy(), np.clip(want, 0, 1), rtol=0, atol=2e-6)


def test_small_images_are_upsampled():
    tiny = np.full((5, 3, 3), 200, np.uint8)
    g, l = A.multicrop(tiny, SEED, global_size=32, local_size=16, n_local=2)
    assert g.shape == (2, 32, 32, 3) and np.isfinite(g.numpy()).all()


# ---------------------------------------------------------------- colour, as torchvision on PIL images


def pil_image():
    return Image.fromarray(U8)


@pytest.mark.parametrize("op,enhancer,factor", [
    (A.adjust_brightness, ImageEnhance.Brightness, 1.3),
    (A.adjust_brightness, ImageEnhance.Brightness, 0.6),
    (A.adjust_contrast, ImageEnhance.Contrast, 1.4),
    (A.adjust_contrast, ImageEnhance.Contrast, 0.6),
    (A.adjust_saturation, ImageEnhance.Color, 1.2),
    (A.adjust_saturation, ImageEnhance.Color, 0.8),
])
def test_jitter_ops_match_torchvision_pil(op, enhancer, factor):
    """torchvision's ColorJitter on PIL images calls these ImageEnhance classes."""
    want = np.asarray(enhancer(pil_image()).enhance(factor)) / 255.0
    got = op(tf.constant(X), factor).numpy()
    assert np.abs(got - want).mean() < 1.0 / 255 and np.abs(got - want).max() < 3.0 / 255


def test_brightness_is_multiplicative():
    dark = np.full((4, 4, 3), 0.2, np.float32)
    np.testing.assert_allclose(A.adjust_brightness(dark, 1.4), 0.28, atol=1e-6)  # additive would give 0.6
    np.testing.assert_allclose(tf.image.adjust_brightness(dark, 0.4), 0.6, atol=1e-6)


def test_hue_matches_torchvision_pil():
    """torchvision's PIL adjust_hue: HSV in uint8, hue channel shifted by uint8(factor * 255)."""
    for factor in (0.1, -0.07):
        h, s, v = pil_image().convert("HSV").split()
        h = Image.fromarray((np.asarray(h, np.uint8) + np.uint8(np.int64(factor * 255) % 256)).astype(np.uint8), "L")
        want = np.asarray(Image.merge("HSV", (h, s, v)).convert("RGB")) / 255.0
        got = A.adjust_hue(tf.constant(X), factor).numpy()
        assert np.abs(got - want).mean() < 2.0 / 255


def test_hue_keeps_each_pixels_max_and_min():
    """Why adjust_hue needs no clamp: the shift keeps every pixel's largest and smallest channel exactly."""
    x = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    x[:8] = 1.0
    for delta in (0.1, -0.07, 0.5):
        y = A.adjust_hue(tf.constant(x), delta).numpy()
        np.testing.assert_array_equal(y.max(-1), x.max(-1))
        np.testing.assert_array_equal(y.min(-1), x.min(-1))


def test_grayscale_matches_pil():
    want = np.asarray(pil_image().convert("L")) / 255.0
    got = A.to_grayscale(tf.constant(X)).numpy()
    assert got.shape == X.shape and np.abs(got - want[..., None]).max() < 1.0 / 255
    assert np.array_equal(got[..., 0], got[..., 2])


def test_color_jitter_order_matters_and_follows_order():
    x = tf.constant(X)
    factors = tf.constant([1.4, 0.6, 1.2, 0.1])
    a = A.color_jitter(x, factors, tf.constant([0, 1, 2, 3])).numpy()
    b = A.color_jitter(x, factors, tf.constant([3, 2, 1, 0])).numpy()
    manual = A.adjust_hue(A.adjust_saturation(A.adjust_contrast(A.adjust_brightness(x, 1.4), 0.6), 1.2), 0.1)
    np.testing.assert_allclose(a, manual, atol=1e-6)
    assert np.abs(a - b).max() > 0.01
    orders = A.sample_jitter(SEED, 2400)[1].numpy()
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    # Uniform over the 24 permutations.
    counts = np.unique([tuple(o) for o in orders], axis=0, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > 60 and counts.max() < 140


# ---------------------------------------------------------------- blur, solarize


def test_blur_changes_pixels_and_keeps_a_bright_uniform_image_bright():
    out = A.gaussian_blur(tf.constant(X), 1.5).numpy()
    assert np.abs(out - X).mean() > 0.01
    bright = np.full((24, 24, 3), 0.9, np.float32)
    for sigma in (0.1, 1.0, 2.0):
        np.testing.assert_allclose(A.gaussian_blur(tf.constant(bright), sigma).numpy(), 0.9, atol=1e-5)
    # A blurred step edge is monotone and symmetric: a true low-pass filter.
    step = np.zeros((16, 16, 3), np.float32)
    step[:, 8:] = 1.0
    row = A.gaussian_blur(tf.constant(step), 1.5).numpy()[8, :, 0]
    assert (np.diff(row) >= -1e-6).all() and abs(row[7] + row[8] - 1.0) < 1e-5


def test_blur_is_close_to_pil_gaussian_blur():
    from PIL import ImageFilter

    for sigma in (0.5, 2.0):
        want = np.asarray(pil_image().filter(ImageFilter.GaussianBlur(sigma))) / 255.0
        got = A.gaussian_blur(tf.constant(X), sigma).numpy()
        assert np.abs(got - want).mean() < 2.0 / 255


def test_blur_with_flip_is_the_blur_of_the_mirror():
    """views() folds the horizontal flip into the blur's padding gather."""
    x = tf.constant(X)
    for do in (True, False):
        got = A.gaussian_blur(x, 1.3, flip=tf.constant(do)).numpy()
        want = A.gaussian_blur(A.flip(x, do), 1.3).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_blur_of_a_non_square_image_blurs_each_axis_with_its_own_length():
    """The two passes view the image with different row lengths (W * 3, then H * 3 after the transpose)."""
    tall = X[:40, :24]
    out = A.gaussian_blur(tf.constant(tall), 1.5).numpy()
    want = A.gaussian_blur(tf.constant(tall.transpose(1, 0, 2).copy()), 1.5).numpy().transpose(1, 0, 2)
    assert out.shape == tall.shape
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="pass sigma"):
        A.gaussian_blur(tf.constant(tall))


def test_solarize_matches_pil_threshold_128():
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (2, 1, 3))
    want = np.asarray(ImageOps.solarize(Image.fromarray(ramp), 128))
    got = np.round(A.solarize(tf.constant(ramp / 255.0, tf.float32)).numpy() * 255)
    np.testing.assert_array_equal(got, want)
    assert got[0, 127, 0] == 127 and got[0, 128, 0] == 127


# ---------------------------------------------------------------- probabilities


def binomial_ok(hits, n, p):
    return abs(hits - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1e-9


def test_view_probabilities_match_the_reference():
    n = 20000
    v = {k: t.numpy() for k, t in A.sample_view_params(SEED, n, p_blur=0.5, p_solarize=0.2).items()}
    for key, p in (("flip", 0.5), ("jitter", 0.8), ("grey", 0.2), ("blur", 0.5), ("solarize", 0.2)):
        assert binomial_ok(v[key].sum(), n, p), (key, v[key].mean())
    assert not binomial_ok(v["grey"].sum(), n, 0.25)  # the check has the power to notice a wrong p
    f = v["factors"]
    for j, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert lo <= f[:, j].min() < lo + 0.01 and hi - 0.01 < f[:, j].max() <= hi
    assert 0.1 <= v["sigma"].min() < 0.12 and 1.98 < v["sigma"].max() <= 2.0
    # The decisions are independent of each other.
    both = (v["flip"] & v["grey"]).sum()
    assert binomial_ok(both, n, 0.1)
    g1 = {k: t.numpy() for k, t in A.sample_view_params(SEED, n, p_blur=(1.0, 0.1) * (n // 2)).items()}
    assert g1["blur"][0::2].all() and binomial_ok(g1["blur"][1::2].sum(), n // 2, 0.1)


def test_views_apply_their_decisions():
    image = tf.constant(X)
    never = A.views(image, SEED, n=4, size=24, scale=(0.3, 1.0), p_blur=0.0, p_solarize=0.0).numpy()
    always_solar = A.views(image, SEED, n=4, size=24, scale=(0.3, 1.0), p_blur=0.0, p_solarize=1.0).numpy()
    always_blur = A.views(image, SEED, n=4, size=24, scale=(0.3, 1.0), p_blur=1.0, p_solarize=0.0).numpy()
    assert all(np.abs(always_solar[i] - never[i]).max() > 0.1 for i in range(4))
    assert all(np.abs(always_blur[i] - never[i]).max() > 0.05 for i in range(4))


def test_views_equal_the_reference_order_of_ops():
    """views() mirrors after the colour ops (folded into the blur where there is one): the same images as
    crop -> flip -> jitter -> grey -> blur -> solarize -> normalise, op by op, with the same decisions."""
    n, size, p_blur, p_sol = 6, 24, (1.0, 0.5, 0.5, 0.5, 0.0, 0.5), (0.0, 0.0, 0.5, 0.5, 0.5, 1.0)
    got = A.views(tf.constant(U8), SEED, n=n, size=size, scale=(0.1, 0.6), p_blur=p_blur, p_solarize=p_sol).numpy()
    s = A.split(SEED, 2)
    crops = A.random_resized_crops(tf.constant(X), s[0], n, size, (0.1, 0.6))
    v = A.sample_view_params(s[1], n, p_blur, p_sol)
    seen = set()
    for i in range(n):
        x = A.flip(crops[i], v["flip"][i])
        x = A.color_jitter(x, v["factors"][i], v["order"][i]) if v["jitter"][i] else x
        x = A.to_grayscale(x) if v["grey"][i] else x
        x = A.gaussian_blur(x, v["sigma"][i]) if v["blur"][i] and p_blur[i] > 0 else x
        x = A.solarize(x) if v["solarize"][i] and p_sol[i] > 0 else x
        np.testing.assert_allclose(got[i], A.normalize(x[None]).numpy()[0], rtol=0, atol=2e-5)
        seen.add((bool(v["flip"][i]), bool(v["blur"][i] and p_blur[i] > 0)))
    assert len(seen) >= 3  # mirrored and not, blurred and not


def test_eval_transform_matches_torchvision_resize_and_centre_crop():
    img = photo(60, 90)  # landscape: shorter side 60 -> 40, longer int(40 * 90 / 60) = 60
    out = A.eval_transform(img, resize_size=40, crop_size=32).numpy()
    resized = Image.fromarray(img).resize((60, 40), Image.BICUBIC)
    left, top = int(round((60 - 32) / 2.0)), int(round((40 - 32) / 2.0))
    want = np.asarray(resized.crop((left, top, left + 32, top + 32))) / 255.0
    got = out * np.array(A.IMAGENET_STD) + np.array(A.IMAGENET_MEAN)
    assert out.shape == (32, 32, 3) and np.abs(got - want).mean() < 1.0 / 255
    with pytest.raises(ValueError, match="crop_size=64"):
        A.eval_transform(img, resize_size=40, crop_size=64)
