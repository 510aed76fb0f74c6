"""DINO's `DataAugmentationDINO` as tf.data ops on float32 [0, 1] HWC images.

Every random op takes an explicit `seed` (a shape-[2] int tensor) and uses only stateless TF RNG, so an image's crops
depend on (seed, epoch, example index) alone, never on thread count, element order or process count.

Semantics follow the reference's `DataAugmentationDINO` (main_dino.py), which runs torchvision on PIL images:
RandomResizedCrop with torchvision's sampling and fallback, PIL-like bicubic resizing with antialiasing, ColorJitter's
multiplicative brightness / mean-grey contrast / grey-blend saturation / HSV hue shift in a random order, ITU-R 601
grayscale, Gaussian blur with sigma in [0.1, 2] (reflect padding, so borders are not darkened), solarize at 128.
The differences that remain are float arithmetic instead of uint8 rounding between ops, and a true Gaussian kernel
where PIL approximates one with box blurs (tests/test_augment.py compares each op with PIL).

Speed (one TF thread inside tf.data, where every op costs ~10 us before it touches a pixel): crops are resized from
the uint8 image; colour ops that mix channels are one small matmul; jitter, grey, blur and solarize run only on the
crops whose decision asks for them (a tf.cond each); the mirror is folded into the blur's padding gather; the ops
avoid tf.where, channel slices and channel-axis broadcasts (slow on CPU). The antialiased resize (TF's
ScaleAndTranslate, kept for fidelity) runs both of its passes as the kernel's vectorised vertical pass over
one-pixel-wide row views (`_resize_rows`: bit-identical, about half the CPU); it is still about a third of the cost.
The blur does the same: both passes are row passes over a wide-channel view, with a transpose between, and the colour
ops run on the crops' transposes so that the resize's last transpose is the blur's first (benchmarks/README.md has
the numbers and what did not help).
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from dino_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD

GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L") and torchvision
RATIO = (3.0 / 4.0, 4.0 / 3.0)
BLUR_SIGMA = (0.1, 2.0)
BLUR_RADIUS = int(math.ceil(3 * BLUR_SIGMA[1]))  # fixed kernel support: 3 sigma of the largest sigma


def split(seed, n: int):
    """n independent seeds from one; shape (n, 2)."""
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), n)


def fold_in(seed, data):
    """A new seed from a seed and an integer (epoch, example index, ...)."""
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), tf.cast(data, tf.int64))


def uniform(seed, low=0.0, high=1.0, shape=()):
    return tf.random.stateless_uniform(shape, seed, low, high, dtype=tf.float32)


def to_float(image_uint8):
    return tf.cast(image_uint8, tf.float32) / 255.0


# ---------------------------------------------------------------- geometry


def sample_crop_windows(seed, height, width, n: int, scale, ratio=RATIO, attempts: int = 10):
    """torchvision RandomResizedCrop.get_params for n crops: (top, left, h, w), each int32 of shape (n,).

    Area fraction ~ U(scale), aspect ~ log-uniform(ratio); the first of `attempts` draws that fits wins; if none
    fits, a centre crop of the whole image with its aspect ratio clamped into `ratio`.
    """
    s = split(seed, 4)
    hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area = hf * wf * uniform(s[0], scale[0], scale[1], [n, attempts])
    aspect = tf.exp(uniform(s[1], math.log(ratio[0]), math.log(ratio[1]), [n, attempts]))
    w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)  # round half to even, as Python's round
    h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    h, w = tf.gather(h, first, batch_dims=1), tf.gather(w, first, batch_dims=1)
    in_ratio = wf / hf
    fb_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(hf * ratio[1]), tf.int32), width)
    fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(wf / ratio[0]), tf.int32), height)
    ok = tf.reduce_any(fits, axis=1)
    h, w = tf.where(ok, h, fb_h), tf.where(ok, w, fb_w)
    # torch.randint(0, H - h + 1): uniform over every valid offset; the fallback is centred.
    top = tf.cast(tf.floor(uniform(s[2], shape=[n]) * tf.cast(height - h + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(uniform(s[3], shape=[n]) * tf.cast(width - w + 1, tf.float32)), tf.int32)
    top = tf.where(ok, tf.minimum(top, height - h), (height - h) // 2)
    left = tf.where(ok, tf.minimum(left, width - w), (width - w) // 2)
    return top, left, h, w


def _rows_pass(rows, out_rows, scale):
    """Resize axis 1 of a (1, rows, 1, row_length) tensor to `out_rows` with TF's antialiased Keys cubic (the kernel
    tf.image.resize(method="bicubic", antialias=True) runs, called directly: any input dtype, float32 out)."""
    return tf.raw_ops.ScaleAndTranslate(images=rows, size=tf.stack([out_rows, 1]), scale=tf.stack([scale, 1.0]),
                                        translation=tf.zeros([2]), kernel_type="keyscubic", antialias=True)


def _resize_rows(rows, in_w, out_h, out_w, scale_h, scale_w, channels: int = 3, transposed: bool = False):
    """Antialiased bicubic resize of an (in_h, in_w, c) image given as its (1, in_h, 1, in_w * c) rows: (out_h, out_w,
    c) float32, bit-identical to ScaleAndTranslate on the (1, in_h, in_w, c) image, at about half the CPU.

    Why: ScaleAndTranslate runs its horizontal pass first, over the whole input, as a scalar loop over 3 channels per
    tap; its vertical pass adds whole rows (vectorised). Seen as one pixel wide with in_w * c channels, an image gets
    only the vectorised pass (the one-pixel-wide pass is a copy with weight 1). So each axis is resized as the
    vertical axis of such an image, with a transpose between and after (transposed=True: without the one after, the
    (out_w, out_h, c) transpose of the result)."""
    x = _rows_pass(rows, out_h, scale_h)  # (1, out_h, 1, in_w * c): the vertical pass
    x = tf.transpose(tf.reshape(x, tf.stack([out_h, in_w, channels])), [1, 0, 2])  # (in_w, out_h, c)
    x = _rows_pass(tf.reshape(x, tf.stack([1, in_w, 1, out_h * channels])), out_w, scale_w)  # the horizontal pass
    x = tf.reshape(x, tf.stack([out_w, out_h, channels]))
    return x if transposed else tf.transpose(x, [1, 0, 2])


def resize(image, size):
    """Bicubic with antialiasing, clipped to [0, 1]. This is PIL's BICUBIC (Keys a=-0.5, kernel stretched by the
    downscale factor) to within 0.3/255 on average; PIL also rounds to uint8 between its two passes.

    A uint8 image is resized as it is and scaled by 1/255 after (the same numbers as resizing to_float(image), up to
    float rounding), so the full-size image is never converted to float."""
    size = tf.convert_to_tensor(size, tf.int32)
    shape = tf.shape(image)
    scale = tf.cast(size, tf.float32) / tf.cast(shape[0:2], tf.float32)
    rows = tf.reshape(image, tf.stack([1, shape[0], 1, shape[1] * shape[2]]))
    x = _resize_rows(rows, shape[1], size[0], size[1], scale[0], scale[1], channels=image.shape[-1] or 3)
    return _resized_to_unit(x, image.dtype)


def _resized_to_unit(x, input_dtype):
    """A resize's float output in [0, 1]: uint8 input scaled by 1/255, then the bicubic overshoot clipped."""
    if input_dtype == tf.uint8:
        x = x * (1.0 / 255.0)
    return tf.clip_by_value(x, 0.0, 1.0)


def random_resized_crops(image, seed, n: int, size: int, scale, ratio=RATIO, transposed: bool = False):
    """n RandomResizedCrops of one (H, W, 3) image (float in [0, 1], or uint8): a list of (size, size, 3) float
    images in [0, 1]. Small images are upsampled. The image is viewed as (1, H, 1, W * 3) rows, so a crop is one
    strided slice that _resize_rows takes as it is; the n windows' bounds and scales are computed in one go and
    unstacked (one op per crop instead of several). transposed=True gives each crop as its (W, H, 3) transpose,
    one transpose fewer (views() transposes in the blur or the mirror instead)."""
    shape = tf.shape(image)
    channels = image.shape[-1] or 3
    top, left, h, w = sample_crop_windows(seed, shape[0], shape[1], n, scale, ratio)
    zeros = tf.zeros([n], tf.int32)
    begin = tf.unstack(tf.stack([zeros, top, zeros, left * channels], axis=1))
    end = tf.unstack(tf.stack([zeros + 1, top + h, zeros + 1, (left + w) * channels], axis=1))
    rows = tf.reshape(image, tf.stack([1, shape[0], 1, shape[1] * channels]))
    scales = float(size) / tf.cast(tf.stack([h, w], axis=1), tf.float32)
    scale_h, scale_w, w = tf.unstack(scales[:, 0]), tf.unstack(scales[:, 1]), tf.unstack(w)
    out = []
    for i in range(n):
        x = _resize_rows(tf.strided_slice(rows, begin[i], end[i]), w[i], size, size, scale_h[i], scale_w[i],
                         channels, transposed)
        out.append(_resized_to_unit(x, image.dtype))
    return out


# ---------------------------------------------------------------- photometric ops
# One (H, W, 3) image and scalar parameters each. Speed notes (TF on CPU, one thread inside tf.data): every op costs
# ~10 us before it touches a pixel, so the ops below are written with few ops; ops between a tensor and a scalar or a
# same-shape tensor are fast; a strided slice of one channel, broadcasting over the channel axis, a reduction over
# it, tf.pad(mode="REFLECT") and tf.where on images are several times slower, so the ops below avoid them. A colour
# transform that mixes channels (grey, saturation) is a (pixels, 3) @ (3, 3) matmul: one pass instead of nine.


def flip(image, do=True):
    """Mirror left-right where `do`: a tf.cond, so an image that is not mirrored costs nothing. (In a blurred crop
    views() folds the mirror into the blur's padding gather instead.)"""
    image = tf.convert_to_tensor(image)
    return tf.cond(tf.convert_to_tensor(do), lambda: tf.reverse(image, [-2]), lambda: image)


def _colour_matmul(image, matrix):
    """image (H, W, 3) @ matrix (3, 3): output channel c = sum_k image[..., k] * matrix[k, c]."""
    return tf.reshape(tf.matmul(tf.reshape(image, [-1, 3]), matrix), tf.shape(image))


_GREY_MATRIX = np.tile(np.float32(GREY_WEIGHTS)[:, None], (1, 3))  # every column: the luma weights


def grey(image):
    """ITU-R 601 luma, (..., 1)."""
    return tf.tensordot(image, tf.constant(np.float32(GREY_WEIGHTS)[:, None]), 1)


def to_grayscale(image):
    """3-channel grey, as RandomGrayscale(num_output_channels=3): one matmul with the luma weights in every column
    (the three channels come out bit-identical)."""
    return _colour_matmul(image, tf.constant(_GREY_MATRIX))


def _clip(image):
    return tf.clip_by_value(image, 0.0, 1.0)


def adjust_brightness(image, factor):
    """Multiplicative, as torchvision (not tf.image's additive brightness)."""
    return _clip(image * factor)


def adjust_contrast(image, factor):
    """Blend with the image's mean grey level, as torchvision. The mean grey is the luma of the per-channel means
    (the same number: luma is linear), which reads the image once instead of building a grey image."""
    mean_grey = tf.reduce_sum(tf.reduce_mean(image, axis=[0, 1]) * tf.constant(np.float32(GREY_WEIGHTS)))
    return _clip(image * factor + (1.0 - factor) * mean_grey)


def adjust_saturation(image, factor):
    """Blend with the grey image, as torchvision: factor * image + (1 - factor) * grey(image), written as one colour
    matmul with factor * I + (1 - factor) * (luma weights in every column)."""
    factor = tf.cast(factor, tf.float32)
    matrix = factor * tf.eye(3) + (1.0 - factor) * tf.constant(_GREY_MATRIX)
    return _clip(_colour_matmul(image, matrix))


def adjust_hue(image, delta):
    """Shift the HSV hue by delta (a fraction of the circle), as torchvision's adjust_hue. (The raw AdjustHue op:
    tf.image.adjust_hue adds dtype conversions around it.) No clamp after it: a hue shift keeps every pixel's
    largest and smallest channel (V and V - chroma) bit-exactly, so its output stays inside [0, 1]."""
    return tf.raw_ops.AdjustHue(images=image, delta=tf.cast(delta, tf.float32))


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def sample_jitter(seed, n: int = 1, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """ColorJitter(0.4, 0.4, 0.2, 0.1).get_params for n images: factors (n, 4) in JITTER_OPS order, and a
    uniformly random order of the four ops, (n, 4)."""
    s = split(seed, 2)
    low = tf.constant([1 - brightness, 1 - contrast, 1 - saturation, -hue])
    high = tf.constant([1 + brightness, 1 + contrast, 1 + saturation, hue])
    factors = low + (high - low) * uniform(s[0], shape=[n, 4])
    order = tf.argsort(uniform(s[1], shape=[n, 4]), axis=1)
    return factors, order


def color_jitter(image, factors, order):
    """torchvision ColorJitter: op order[k] (an index into JITTER_OPS) runs k-th with parameter factors[op];
    values are clamped to [0, 1] after each op."""
    factors, order = tf.unstack(factors, 4), tf.unstack(order, 4)  # one op each instead of four slices
    for position in range(4):
        image = tf.switch_case(order[position], [lambda op=op, j=j, x=image: op(x, factors[j])
                                                 for j, op in enumerate(JITTER_OPS)])
    return image


def gaussian_kernels(sigma, radius: int):
    """Normalised 1-D Gaussians, (n, 2 * radius + 1) for sigma of shape (n,)."""
    t = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * tf.square(t / sigma[:, None]))
    return k / tf.reduce_sum(k, axis=1, keepdims=True)


def _reflect_indices(length: int, r: int):
    """Indices that pad an axis of `length` by r on both sides with reflection (as tf.pad(mode="REFLECT"))."""
    return np.concatenate([np.arange(r, 0, -1), np.arange(length), np.arange(length - 2, length - 2 - r, -1)])


def _blur_radius(height, width, radius: int = BLUR_RADIUS):
    return min(radius, height - 1, width - 1)  # reflect padding needs r < side


def blur_taps(sigma, r: int, row_length: int):
    """(n, 2r + 1, 1, row_length * 3, 1) depthwise-conv taps for sigma of shape (n,): each image's 1-D Gaussian,
    repeated over the row_length * 3 channels of _rows_blur's view."""
    k = gaussian_kernels(sigma, r)
    return tf.tile(k[:, :, None, None, None], [1, 1, 1, row_length * 3, 1])


def _rows_blur(x, taps, indices):
    """Blur axis 0 of an (L, M, 3) image: the reflect padding is a row gather (`indices`), then one depthwise
    convolution over its (1, L + 2r, 1, M * 3) view, whose M * 3 channels keep the kernel vectorised (over 3
    channels, as (1, L, M, 3), the same convolution is ~2x slower and the column gather ~4x)."""
    length, other = x.shape[0], x.shape[1]
    rows = tf.gather(tf.reshape(x, [1, length, 1, other * 3]), indices, axis=1)
    out = tf.nn.depthwise_conv2d(rows, taps, [1, 1, 1, 1], "VALID")
    return tf.reshape(out, [length, other, 3])


def gaussian_blur(image, sigma=None, radius: int = BLUR_RADIUS, flip=None, taps=None, transposed: bool = False):
    """Separable Gaussian blur of one (H, W, 3) image with reflect padding (so a uniform image stays uniform at its
    borders): the vertical pass, a transpose, the horizontal pass as a vertical one, and a transpose back.
    transposed=True: `image` is the (W, H, 3) transpose (as random_resized_crops(transposed=True) gives it); the
    horizontal pass runs first and the result is (H, W, 3) without the transpose back.

    sigma: a scalar; or taps: (2r + 1, 1, W * 3, 1) as blur_taps builds them (views() builds those of all its crops
    in one go; a square image only, where both passes share them).
    flip: optional scalar bool: also mirror the image left-right, for free, by reversing the indices of the
    horizontal padding gather (the blur is symmetric, so blur and mirror commute).
    """
    height, width = (image.shape[1], image.shape[0]) if transposed else (image.shape[0], image.shape[1])
    r = _blur_radius(height, width, radius)
    if taps is None:
        if sigma is None:
            raise ValueError("gaussian_blur: pass sigma (a scalar, in pixels) or taps (as blur_taps builds them)")
        sigma = tf.reshape(tf.cast(sigma, tf.float32), [1])
        taps_v, taps_h = blur_taps(sigma, r, width)[0], blur_taps(sigma, r, height)[0]
    else:
        taps_v = taps_h = taps
    columns = _reflect_indices(width, r)
    if flip is not None:
        columns = tf.where(flip, columns[::-1].copy(), columns)
    vertical, horizontal = (taps_v, _reflect_indices(height, r)), (taps_h, columns)
    first, second = (horizontal, vertical) if transposed else (vertical, horizontal)
    x = _rows_blur(tf.transpose(_rows_blur(image, *first), [1, 0, 2]), *second)
    return x if transposed else tf.transpose(x, [1, 0, 2])


def solarize(image, threshold: float = 128.0 / 255.0):
    """PIL ImageOps.solarize(128): every value >= 128/255 becomes 1 - value."""
    return image + tf.cast(image >= threshold, tf.float32) * (1.0 - 2.0 * image)


def normalize(images):
    """ImageNet mean/std, with same-shape constants (a channel-axis broadcast is several times slower)."""
    images = tf.convert_to_tensor(images, tf.float32)
    shape = images.shape.as_list() if images.shape.is_fully_defined() else [3]
    mean = tf.constant(np.broadcast_to(np.float32(IMAGENET_MEAN), shape))
    inv_std = tf.constant(np.broadcast_to(1.0 / np.float32(IMAGENET_STD), shape))
    return (images - mean) * inv_std


# ---------------------------------------------------------------- DataAugmentationDINO


def sample_view_params(seed, n: int, p_blur=0.0, p_solarize=0.0, blur_sigma=BLUR_SIGMA) -> dict:
    """Every random decision of n crops after the crop itself: flip (p 0.5), jitter (p 0.8) with its factors and
    order, grey (p 0.2), blur (p_blur) with its sigma, solarize (p_solarize). p_*: a float or one per crop."""
    s = split(seed, 3)
    u = uniform(s[0], shape=[n, 5])
    factors, order = sample_jitter(s[1], n)
    return {"flip": u[:, 0] < 0.5, "jitter": u[:, 1] < 0.8, "factors": factors, "order": order,
            "grey": u[:, 2] < 0.2, "blur": u[:, 3] < np.broadcast_to(np.float32(p_blur), [n]),
            "sigma": uniform(s[2], blur_sigma[0], blur_sigma[1], [n]),
            "solarize": u[:, 4] < np.broadcast_to(np.float32(p_solarize), [n])}


def views(image, seed, *, n: int, size: int, scale, p_blur=0.0, p_solarize=0.0, blur_sigma=BLUR_SIGMA):
    """n crops of one image (float in [0, 1], or uint8), each: RandomResizedCrop -> flip -> ColorJitter -> grey ->
    blur -> solarize -> normalise (the reference's order), as (n, size, size, 3).

    Per crop, only what its decisions ask for runs: jitter, grey, blur and solarize each sit in a tf.cond, so a crop
    that is not blurred costs nothing in the blur (a crop with p_blur 1 is blurred without a cond). The mirror is
    applied after the colour ops (they are per pixel, or use the image mean: they commute with it): in a blurred
    crop it is folded into the blur's padding gather, otherwise it is a gather under a tf.cond. For the same
    reason the colour ops run on the crops' transposes, which the resize makes one transpose early: the blur's
    horizontal pass needs that layout, and the transpose back happens in the blur or before the mirror.
    """
    s = split(seed, 2)
    crops = random_resized_crops(image, s[0], n, size, scale, transposed=True)  # (W, H, 3): see above
    v = sample_view_params(s[1], n, p_blur, p_solarize, blur_sigma)
    flip_, jitter, grey_, blur, sol = (tf.unstack(v[k], n) for k in ("flip", "jitter", "grey", "blur", "solarize"))
    factors, order, sigma = tf.unstack(v["factors"], n), tf.unstack(v["order"], n), v["sigma"]
    p_blur, p_solarize = np.broadcast_to(np.float32(p_blur), [n]), np.broadcast_to(np.float32(p_solarize), [n])
    if np.max(p_blur) > 0:  # every crop's taps in one go, not ~10 small ops per blurred crop
        taps = tf.unstack(blur_taps(sigma, _blur_radius(size, size), size), n)
    out = []
    for i in range(n):
        x = crops[i]
        x = tf.cond(jitter[i], lambda i=i, x=x: color_jitter(x, factors[i], order[i]), lambda x=x: x)
        x = tf.cond(grey_[i], lambda x=x: to_grayscale(x), lambda x=x: x)
        blurred = lambda i=i, x=x: gaussian_blur(x, flip=flip_[i], taps=taps[i], transposed=True)  # noqa: E731
        mirrored = lambda i=i, x=x: flip(tf.transpose(x, [1, 0, 2]), flip_[i])  # noqa: E731
        if p_blur[i] >= 1:
            x = blurred()
        elif p_blur[i] > 0:
            x = tf.cond(blur[i], blurred, mirrored)
        else:
            x = mirrored()
        if p_solarize[i] > 0:
            x = tf.cond(sol[i], lambda x=x: solarize(x), lambda x=x: x)
        out.append(x)
    return normalize(tf.stack(out))


def multicrop(image_uint8, seed, *, global_size: int = 224, local_size: int = 96, global_scale=(0.4, 1.0),
              local_scale=(0.05, 0.4), n_local: int = 8, blur_sigma=BLUR_SIGMA):
    """DataAugmentationDINO: (globals (2, G, G, 3), locals (n_local, l, l, 3)), float32, ImageNet-normalised.

    Global 1 always blurred; global 2 blurred with p 0.1 and solarised with p 0.2; each local blurred with p 0.5.
    blur_sigma: the range of the blur's sigma in pixels of the crop (the reference's (0.1, 2.0); tiny crops such as
    the demo's 32 px need a proportionally smaller range, or the blur erases what the crop shows).
    The crops are cut from the uint8 image and resized from it (to_float of the whole image would be a full pass).
    """
    image = tf.convert_to_tensor(image_uint8)
    s = split(seed, 2)
    globals_ = views(image, s[0], n=2, size=global_size, scale=global_scale, p_blur=(1.0, 0.1),
                     p_solarize=(0.0, 0.2), blur_sigma=blur_sigma)
    if n_local == 0:
        return globals_, tf.zeros([0, local_size, local_size, 3])
    return globals_, views(image, s[1], n=n_local, size=local_size, scale=local_scale, p_blur=0.5,
                           blur_sigma=blur_sigma)


# ---------------------------------------------------------------- evaluation


def resize_shorter_and_center_crop(image, resize_size: int, crop_size: int, method: str = "bicubic"):
    """torchvision Resize(resize_size) (shorter side; longer side truncated) then CenterCrop(crop_size).

    `method="nearest"` is for label masks, which must stay aligned with the image and keep their values.
    """
    if crop_size > resize_size:
        raise ValueError(f"crop_size={crop_size} is larger than resize_size={resize_size}; "
                         "the centre crop must fit in the resized image")
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    short = tf.minimum(h, w)
    new_h = tf.where(h <= w, resize_size, tf.cast(resize_size * h / short, tf.int32))
    new_w = tf.where(w <= h, resize_size, tf.cast(resize_size * w / short, tf.int32))
    if method == "nearest":
        x = tf.image.resize(image, (new_h, new_w), method="nearest")
    else:
        x = resize(image, (new_h, new_w))
    top = tf.cast(tf.round(tf.cast(new_h - crop_size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - crop_size, tf.float32) / 2.0), tf.int32)
    return x[top:top + crop_size, left:left + crop_size]


def eval_transform(image_uint8, *, resize_size: int = 256, crop_size: int = 224):
    """The k-NN / linear-probe evaluation transform: Resize(256, bicubic) -> CenterCrop(224) -> normalise."""
    x = tf.ensure_shape(resize_shorter_and_center_crop(to_float(image_uint8), resize_size, crop_size),
                        [crop_size, crop_size, 3])
    return normalize(x)
