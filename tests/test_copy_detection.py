"""Copydays copy detection: CLS ⊕ GeM descriptors vs the torch reference, the reference's whitening, per-block
mAP on perfect, random and hand-ranked descriptors, and the CLI on a Copydays-layout set made from the demo data."""
import json
import os

import numpy as np
import pytest
import torch

from dino_jax.evaluation import copy_detection as cd
from protocol_data import run_cli, tiny_reference_vit, torch_input

torch.set_num_threads(1)


def holidays_ap(ranked, positives):
    """Brute force: walk the top list; each hit adds a trapezoid of width 1/|positives|."""
    ap, hits = 0.0, 0
    for rank, d in enumerate(ranked):
        if d in positives:
            left = 1.0 if rank == 0 else hits / rank
            hits += 1
            ap += (left + hits / (rank + 1)) / 2 / len(positives)
    return ap


def test_descriptors_match_the_torch_reference(tmp_path):
    from PIL import Image

    from dino_jax.evaluation import cli

    net = tiny_reference_vit(tmp_path / "vit.pth")
    model, params, _ = cli.load_backbone(str(tmp_path / "vit.pth"), "teacher", "vit_base", 8)
    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(50, 70, 3), (40, 40, 3), (81, 33, 3)]):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(rng.integers(0, 255, shape, np.uint8)).save(paths[-1])
    got = cd.extract_descriptors(model, params, paths, imsize=48, batch_size=2)
    with torch.no_grad():
        x = torch.cat([torch_input(cd.load_image(p, 48)) for p in paths])
        tokens = net.get_intermediate_layers(x, n=1)[0]
        b, d = len(paths), tokens.shape[-1]
        grid = tokens[:, 1:].reshape(b, 6, 6, d).clamp(min=1e-6).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.avg_pool2d(grid.pow(4), (6, 6)).pow(1 / 4).reshape(b, -1)
        want = torch.cat([tokens[:, 0], pooled], dim=1).numpy()
    assert got.shape == (3, 128)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_whitening_is_the_reference_pca():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8)) + 3.0
    mean, proj = cd.train_whitening(feats)
    cov = feats.T @ feats / len(feats)  # uncentred, as the reference
    np.testing.assert_allclose(proj @ cov @ proj.T, np.eye(8), atol=1e-8)
    d = np.linalg.eigvalsh(cov)[::-1]
    np.testing.assert_allclose(np.linalg.norm(proj, axis=1), d ** -0.5, rtol=1e-8)  # rows by decreasing energy
    np.testing.assert_allclose(mean, feats.mean(0))
    np.testing.assert_allclose(cd.apply_whitening(feats[:2], mean, proj), (feats[:2] - mean) @ proj.T, rtol=1e-5)


def test_block_map_perfect_random_and_hand_ranked():
    originals = [f"/c/original/{2000 + i}00.jpg" for i in range(8)]
    strong = [f"/c/strong/{2000 + i}0{j}.jpg" for i in (0, 3) for j in (1, 2)] + ["/c/strong/200501.jpg"]
    pos = {"original": cd.positives("original", originals, originals),
           "jpegqual/50": cd.positives("jpegqual/50", originals, originals),
           "strong": cd.positives("strong", strong, originals + ["/c/distractors/200099.jpg"])}
    assert pos["strong"] == [[0, 8], [0, 8], [3], [3], [5]]  # prefix "2000" also names the distractor
    eye = np.eye(9, dtype=np.float32)
    strong_ids = [0, 0, 3, 3, 5]
    perfect = {"original": eye[:8], "jpegqual/50": eye[:8] + 0.1, "strong": eye[strong_ids]}
    db = eye.copy()
    db[8] = eye[0]  # the distractor that shares the prefix is an exact copy too
    got = cd.evaluate(perfect, db, pos)
    assert got == pytest.approx({"original": 1.0, "jpegqual/50": 1.0, "strong": 1.0})
    rng = np.random.default_rng(2)
    rand = cd.evaluate({k: rng.normal(size=v.shape) for k, v in perfect.items()}, rng.normal(size=(9, 9)), pos)
    assert max(rand.values()) < 0.7, rand
    # Hand-ranked: query 0 of 'original' ranks its original 3rd: AP = (0/2 + 1/3)/2 = 1/6; the others are exact.
    q = eye[:8].copy()
    q[0] = 0.9 * eye[4] + 0.8 * eye[6] + 0.5 * eye[0]
    got = cd.evaluate({"original": q}, eye[:8], {"original": pos["original"]})
    assert got["original"] == pytest.approx((7 + 1 / 6) / 8)
    # and any random case agrees with the brute-force walk of the top 20
    qs, dbs = rng.normal(size=(5, 6)), rng.normal(size=(30, 6))
    many = [[int(j) for j in rng.choice(30, rng.integers(1, 4), replace=False)] for _ in range(5)]
    sims = (qs / np.linalg.norm(qs, axis=1, keepdims=True)) @ (dbs / np.linalg.norm(dbs, axis=1, keepdims=True)).T
    want = np.mean([holidays_ap(list(np.argsort(-s)[:20]), p) for s, p in zip(sims, many)])
    assert cd.evaluate({"strong": qs}, dbs, {"strong": many})["strong"] == pytest.approx(want)


def test_layout_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="original"):
        cd.find_blocks(str(tmp_path))
    with pytest.raises(ValueError, match="crops/50: 1 images for 2 originals"):
        cd.positives("crops/50", ["a.jpg"], ["a.jpg", "b.jpg"])


def _copydays_from_demo(root):
    """Originals = 10 demo images (64 px); strong = flipped + darkened + JPEG q10 copies of 5 of them; jpegqual/10;
    crops/50 (central half, resized back); 6 distractors and 12 whitening images from other demo images."""
    from PIL import Image, ImageOps

    from dino_jax.data import demo

    images, _, _ = demo.generate(28, 64, seed=7)
    for sub in ("original", "strong", "jpegqual/10", "crops/50", "distractors", "whitening"):
        os.makedirs(root / sub)
    for i in range(10):
        name = f"{2000 + i}00.jpg"
        im = Image.fromarray(images[i])
        im.save(root / "original" / name, quality=95)
        im.save(root / "jpegqual/10" / name, quality=10)
        im.crop((16, 16, 48, 48)).resize((64, 64), Image.BICUBIC).save(root / "crops/50" / name, quality=95)
        if i % 2 == 0:
            ImageOps.mirror(im).point(lambda v: int(v * 0.8)).save(root / "strong" / f"{2000 + i}01.jpg", quality=10)
    for i in range(10, 16):
        Image.fromarray(images[i]).save(root / "distractors" / f"d{i}.jpg")
    for i in range(16, 28):
        Image.fromarray(images[i]).save(root / "whitening" / f"w{i}.png")


@pytest.mark.slow
def test_cli_on_a_copydays_layout_made_from_the_demo(tmp_path):
    _copydays_from_demo(tmp_path)
    tiny_reference_vit(tmp_path / "vit.pth")
    out = run_cli("dino_jax.eval_copy_detection", "--data_path", tmp_path, "--imsize", 64,
                  "--distractors_path", tmp_path / "distractors", "--whitening_path", tmp_path / "whitening",
                  "--pretrained_weights", tmp_path / "vit.pth", "--batch_size_per_gpu", 4,
                  "--output", tmp_path / "cd.json")
    print(out)
    got = json.loads((tmp_path / "cd.json").read_text())
    assert set(got["mAP"]) == {"original", "strong", "jpegqual/10", "crops/50"}
    assert got["num_database"] == 16 and got["whitening"]
    assert got["mAP"]["original"] == pytest.approx(1.0)  # an exact copy is its own nearest neighbour
    for block, m in got["mAP"].items():
        assert 0 <= m <= 1 and f"eval on {block} mAP={m:.3f}" in out
