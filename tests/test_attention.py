"""Attention maps, the reference's threshold masks, Jaccard, and the visualize_attention CLI."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from dino_jax.evaluation import attention
from dino_jax.models.vit import build_vit
from test_knn import random_params


def _brute_force_mask(a, threshold):
    """The smallest set of largest entries whose sum is >= threshold * total (no ties in random data)."""
    flat = a.ravel()
    order = np.argsort(-flat)
    csum = np.cumsum(flat[order]) / flat.sum()
    m = int(np.searchsorted(csum, threshold - 1e-12) + 1)  # first m with csum[m-1] >= threshold
    keep = np.zeros(flat.size, bool)
    keep[order[:m]] = True
    return keep.reshape(a.shape)


@pytest.mark.parametrize("threshold", [0.1, 0.6, 0.9])
def test_threshold_masks_match_brute_force(threshold):
    rng = np.random.default_rng(int(threshold * 10))
    attn = rng.dirichlet(np.full(35, 0.3), size=4).reshape(4, 5, 7).astype(np.float32)
    got = attention.threshold_masks(attn, threshold)
    assert got.shape == attn.shape and got.dtype == bool
    for j in range(4):
        want = _brute_force_mask(attn[j].astype(np.float64), threshold)
        np.testing.assert_array_equal(got[j], want, err_msg=f"head {j}")
        assert attn[j][got[j]].sum() >= threshold * attn[j].sum() - 1e-6
    np.testing.assert_array_equal(np.asarray(attention.threshold_masks(jnp.asarray(attn), threshold)), got)
    # unnormalised maps give the same masks (the reference normalises each map to sum 1)
    np.testing.assert_array_equal(attention.threshold_masks(attn * 7.0, threshold), got)


def test_upsample_and_jaccard():
    x = np.arange(6).reshape(1, 2, 3)
    up = attention.upsample_nearest(x, 4)
    assert up.shape == (1, 8, 12)
    assert up[0, 5, 9] == x[0, 1, 2] and up[0, 3, 4] == x[0, 0, 1]
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), np.uint8)
    b[1:3] = 255  # a 0..255 mask
    assert attention.jaccard(a, b) == pytest.approx(4 / 12)
    assert attention.jaccard(a, b.astype(bool)) == pytest.approx(4 / 12)
    assert attention.jaccard(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_attention_maps_any_size_and_jaccard_protocol(tmp_path):
    model = build_vit("vit_custom", 8, embed_dim=64, depth=2, num_heads=2, img_size=32)
    params = random_params(model)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(37, 45, 3)).astype(np.float32)  # not a multiple of the patch: cropped to 32x40
    maps = attention.attention_maps(model, params, image)
    assert maps.shape == (2, 4, 5)
    full = np.asarray(model.apply({"params": params}, image[None, :32, :40],
                                  method=model.get_last_selfattention))
    np.testing.assert_allclose(maps, full[0, :, 0, 1:].reshape(2, 4, 5), rtol=1e-5, atol=1e-7)

    images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    attn = attention.attention_maps_batch(model, params, images)
    # ground truth = head 1's own 0.6 mask: head 1 scores 1 on every image
    gt = attention.upsample_nearest(attention.threshold_masks(attn[:, 1], 0.6), 8)
    scores = attention.attention_jaccard_scores(model, params, images, gt, 8, 0.6)
    assert scores["per_head"][1] == pytest.approx(1.0)
    assert scores["best_head"] == pytest.approx(1.0) and scores["best_head_index"] == 1
    assert scores["best_head_per_image"] == pytest.approx(1.0)
    assert 0.0 <= scores["mean_map"] <= 1.0
    inverse = attention.attention_jaccard(model, params, images, ~gt, 8, 0.6)
    assert inverse < 1.0
    assert attention.attention_jaccard(model, params, images, gt, 8, 0.6, which="mean_map") == scores["mean_map"]

    path = attention.save_attention_grid(str(tmp_path / "grid" / "step0.png"), model, params, images[:2], 8, 0.6)
    assert os.path.getsize(path) > 1000
    written = attention.save_attention_pngs(str(tmp_path / "pngs"), images[0], attn[0],
                                            attention.threshold_masks(attn[0], 0.6), 8, 0.6)
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(["img.png", "attn-head0.png", "attn-head1.png", "attn-mean.png",
                            "mask_th0.6_head0.png", "mask_th0.6_head1.png"])


def test_visualize_attention_cli(tmp_path):
    """The CLI end to end: a dino_jax-loadable checkpoint when convert is there, else random init."""
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 60, 3), np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((50, 60), np.uint8)
    mask[10:40, 20:50] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dino_jax.visualize_attention", "--arch", "vit_tiny", "--patch_size", "16",
           "--image_path", str(tmp_path / "in.png"), "--image_size", "40", "56", "--threshold", "0.6",
           "--output_dir", str(out), "--mask_path", str(tmp_path / "mask.png")]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    files = sorted(os.listdir(out))
    want = ["img.png", "attn-mean.png", "jaccard.json"] + [f"attn-head{j}.png" for j in range(3)] + \
        [f"mask_th0.6_head{j}.png" for j in range(3)]
    assert files == sorted(want), files
    img = np.asarray(Image.open(out / "img.png"))
    assert img.shape[:2] == (32, 48)  # 40x56 cropped to multiples of 16
    result = json.loads((out / "jaccard.json").read_text())
    assert len(result["per_head"]) == 3 and 0 <= result["mean_map_jaccard"] <= 1


def test_visualize_attention_cli_on_a_reference_pth_matches_torch(tmp_path):
    """A reference-layout backbone .pth through the whole CLI gives the torch reference's attention maps."""
    pytest.importorskip("dino_jax.convert")
    import torch

    import torch_reference as ref
    from dino_jax import visualize_attention

    torch.manual_seed(0)
    net = ref.VisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2).eval()
    torch.save(net.state_dict(), tmp_path / "tiny_pretrain.pth")
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "out"
    visualize_attention.main(["--pretrained_weights", str(tmp_path / "tiny_pretrain.pth"), "--arch", "vit_small",
                              "--patch_size", "8", "--image_path", str(tmp_path / "in.png"), "--image_size", "32",
                              "48", "--threshold", "0.5", "--output_dir", str(out)])
    assert {f"attn-head{j}.png" for j in range(2)} | {"mask_th0.5_head1.png"} <= set(os.listdir(out))
    image = visualize_attention.load_image(str(tmp_path / "in.png"), (32, 48))
    normed = (image - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    with torch.no_grad():
        want = net.get_last_selfattention(torch.from_numpy(normed.transpose(2, 0, 1)[None].copy()))
    want = want[0, :, 0, 1:].reshape(2, 4, 6).numpy()
    from dino_jax.evaluation import cli

    model, params, info = cli.load_backbone(str(tmp_path / "tiny_pretrain.pth"), "teacher", "vit_small", 8)
    assert (model.embed_dim, model.depth, model.num_heads) == (128, 2, 2)
    np.testing.assert_allclose(attention.attention_maps(model, params, normed), want, rtol=1e-4, atol=1e-6)
