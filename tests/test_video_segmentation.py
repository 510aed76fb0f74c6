"""DAVIS label propagation and the J/F scorer: propagation of a translating object with exact features (and a
static-feature control that must fail), the propagation step vs a brute-force loop, the mask upsampling vs torch,
J and F vs hand values and brute-force distances, the palette PNGs, and the CLI on a DAVIS-layout video."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino_jax.evaluation import video_segmentation as vs
from protocol_data import run_cli, tiny_reference_vit

torch.set_num_threads(1)

GRID, OBJ, PATCH = 12, 4, 8


def _translating_object(n_frames=7):
    """Per frame: object top-left (row, col) in patches, moving right 1 patch a frame and down every other."""
    return [(2 + t // 2, 1 + t) for t in range(n_frames)]


def _exact_features(pos):
    """One-hot codes: an object patch is coded by its place on the object, a background patch by its place in
    the frame, so the object's codes move with it."""
    feats = np.zeros((GRID, GRID, OBJ * OBJ + GRID * GRID), np.float32)
    for i in range(GRID):
        for j in range(GRID):
            di, dj = i - pos[0], j - pos[1]
            inside = 0 <= di < OBJ and 0 <= dj < OBJ
            feats[i, j, di * OBJ + dj if inside else OBJ * OBJ + i * GRID + j] = 1
    return feats


def _mask(pos, scale=1):
    m = np.zeros((GRID * scale, GRID * scale), np.uint8)
    m[pos[0] * scale:(pos[0] + OBJ) * scale, pos[1] * scale:(pos[1] + OBJ) * scale] = 1
    return m


def _propagate_and_score(features, positions):
    first_seg = np.eye(2, dtype=np.float32)[_mask(positions[0])].transpose(2, 0, 1)
    soft = list(vs.propagate(features, first_seg))  # the reference's n_last_frames 7, window 12, top-5, T 0.1
    pred = [_mask(positions[0], PATCH)] + [vs.to_mask(s, PATCH, (GRID * PATCH, GRID * PATCH)) for s in soft]
    gt = [_mask(p, PATCH) for p in positions]
    j = [vs.region_jaccard(g, p) for g, p in zip(gt[1:], pred[1:])]
    f = [vs.boundary_f(g, p) for g, p in zip(gt[1:], pred[1:])]
    return np.array(j), np.array(f), vs.score_video(np.stack(gt), np.stack(pred))


def test_exact_features_track_a_translating_object():
    positions = _translating_object()
    j, f, scores = _propagate_and_score([_exact_features(p) for p in positions], positions)
    print(f"exact features: J per frame {np.round(j, 3)}, F {np.round(f, 3)}")
    assert j.mean() > 0.8 and j.min() > 0.7 and f.mean() > 0.8
    np.testing.assert_allclose(scores["J"][0], j[:-1])  # DAVIS leaves out the first and the last frame
    np.testing.assert_allclose(scores["F"][0], f[:-1])
    # Control: features that only code the position in the frame leave the label where it started.
    static = [_exact_features((-100, -100))] * len(positions)
    j_static, _, _ = _propagate_and_score(static, positions)
    print(f"static features: J per frame {np.round(j_static, 3)}")
    assert j_static.mean() < 0.5 and j_static[-1] == 0


def _brute_force_step(feat_tar, feats_src, segs_src, grid, size, topk, temperature):
    """Per target patch: exp(cos/T) over every context patch in its window, keep the top-k, weighted labels."""
    h, w = grid
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    t, s = norm(feat_tar.astype(np.float64)), norm(feats_src.astype(np.float64))
    out = np.zeros((segs_src.shape[1], h * w))
    for q in range(h * w):
        vals, labs = [], []
        for n in range(len(s)):
            for k in range(h * w):
                near = abs(q // w - k // w) <= size and abs(q % w - k % w) <= size
                vals.append(np.exp(t[q] @ s[n, k] / temperature) if near else 0.0)
                labs.append(segs_src[n, :, k])
        vals = np.array(vals)
        keep = vals >= np.sort(vals)[-topk]
        out[:, q] = (vals * keep) @ np.array(labs) / np.sum(vals * keep)
    return out


def test_propagation_step_and_context_match_a_brute_force_loop():
    rng = np.random.default_rng(0)
    grid, d, c = (5, 6), 8, 3
    feats = rng.normal(size=(6, 30, d)).astype(np.float32)
    first_seg = np.eye(c, dtype=np.float32)[rng.integers(0, c, 30)].T
    got = np.asarray(vs.label_propagation(feats[5], feats[:3], np.stack([first_seg] * 3), 0.1, grid=grid,
                                          size_mask_neighborhood=2, topk=4))
    want = _brute_force_step(feats[5], feats[:3], np.stack([first_seg] * 3), grid, 2, 4, 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # The context is the first frame plus the last n_last_frames predictions.
    soft = list(vs.propagate(feats.reshape(6, 5, 6, d), first_seg.reshape(c, 5, 6), n_last_frames=2,
                             size_mask_neighborhood=2, topk=4))
    preds = [first_seg]
    for t in range(1, 6):
        ctx = [0] + list(range(max(1, t - 2), t))
        preds.append(_brute_force_step(feats[t], feats[ctx], np.stack([preds[i] for i in ctx]), grid, 2, 4, 0.1))
        np.testing.assert_allclose(soft[t - 1].reshape(c, 30), preds[t], rtol=1e-4, atol=1e-6, err_msg=str(t))


def test_mask_upsampling_matches_torch():
    from PIL import Image

    soft = np.random.default_rng(1).random((3, 4, 5)).astype(np.float32)
    soft[2] = 0  # an empty channel stays 0 (the reference only rescales channels with a positive max)
    up = F.interpolate(torch.from_numpy(soft[None]), scale_factor=8, mode="bilinear", align_corners=False)[0]
    for ch in range(3):
        if up[ch].max() > 0:
            up[ch] = (up[ch] - up[ch].min()) / (up[ch] - up[ch].min()).max()
    want = np.asarray(Image.fromarray(up.argmax(0).numpy().astype(np.uint8)).resize((45, 30), Image.NEAREST))
    np.testing.assert_array_equal(vs.to_mask(soft, 8, (30, 45)), want)


def test_boundary_map_by_hand_and_f_against_brute_force_distances():
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    np.testing.assert_array_equal(vs.boundary_map(m).astype(int),
                                  [[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]])
    yy, xx = np.mgrid[:200, :240]
    gt = (yy - 100) ** 2 / 50 ** 2 + (xx - 110) ** 2 / 70 ** 2 < 1
    radius = int(np.ceil(0.008 * np.hypot(200, 240)))
    assert radius == 3
    for shift in (0, 2, 5, 12):
        pred = np.roll(gt, (shift, shift // 2), axis=(0, 1))
        bg, bp = np.argwhere(vs.boundary_map(gt)), np.argwhere(vs.boundary_map(pred))
        dist = np.sqrt(((bp[:, None, :] - bg[None]) ** 2).sum(-1))
        precision, recall = np.mean(dist.min(1) <= radius), np.mean(dist.min(0) <= radius)
        want_f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert vs.boundary_f(gt, pred) == pytest.approx(want_f), shift
        assert vs.region_jaccard(gt, pred) == pytest.approx((gt & pred).sum() / (gt | pred).sum())
        assert (vs.boundary_f(gt, pred) == 1.0) == (shift <= 2)
    empty = np.zeros_like(gt)
    assert vs.region_jaccard(empty, empty) == 1 and vs.boundary_f(empty, empty) == 1
    assert vs.region_jaccard(gt, empty) == 0 and vs.boundary_f(gt, empty) == 0


def test_palette_and_indexed_png(tmp_path):
    from PIL import Image

    pal = vs.davis_palette()
    np.testing.assert_array_equal(pal[:6], [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128],
                                            [128, 0, 128]])
    assert pal[255].tolist() == [224, 224, 192]  # DAVIS's void colour
    labels = np.random.default_rng(2).integers(0, 4, (9, 11)).astype(np.uint8)
    vs.write_indexed_png(tmp_path / "m.png", labels)
    im = Image.open(tmp_path / "m.png")
    assert im.mode == "P" and im.getpalette()[:12] == pal[:4].ravel().tolist()
    np.testing.assert_array_equal(vs.read_indexed(str(tmp_path / "m.png")), labels)
    with pytest.raises(ValueError, match="indexed"):
        Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "rgb.png")
        vs.read_indexed(str(tmp_path / "rgb.png"))


def _davis_video(root, name="square", n_frames=6, h=72, w=144):
    """A bright textured square moving right 9 px a frame over a dark gradient, object 1; annotations for all
    frames. 72x144 frames become 64x128 at --short_side 64 (an 8x16 grid of 8-px patches)."""
    from PIL import Image

    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text(f"{name}\n")
    fdir, adir = root / "JPEGImages" / "480p" / name, root / "Annotations" / "480p" / name
    fdir.mkdir(parents=True), adir.mkdir(parents=True)
    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(3)
    texture = rng.integers(160, 255, (24, 24, 3))
    for t in range(n_frames):
        img = np.stack([xx * 0.3, yy * 0.5, np.full_like(xx, 40)], -1).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        y0, x0 = 20, 10 + 9 * t
        img[y0:y0 + 24, x0:x0 + 24] = texture
        mask[y0:y0 + 24, x0:x0 + 24] = 1
        Image.fromarray(img).save(fdir / f"{t:05d}.jpg", quality=95)
        vs.write_indexed_png(adir / f"{t:05d}.png", mask)
    return adir


@pytest.mark.slow
def test_cli_on_a_davis_layout_video(tmp_path):
    from PIL import Image

    from dino_jax import eval_video_segmentation

    adir = _davis_video(tmp_path / "davis")
    tiny_reference_vit(tmp_path / "vit.pth")
    out_dir = tmp_path / "out"
    out = run_cli("dino_jax.eval_video_segmentation", "--data_path", tmp_path / "davis", "--output_dir", out_dir,
                  "--pretrained_weights", tmp_path / "vit.pth", "--arch", "vit_small", "--patch_size", 8,
                  "--short_side", 64, "--size_mask_neighborhood", 4)
    print(out)
    written = sorted(os.listdir(out_dir / "square"))
    assert written == [f"{t:05d}.png" for t in range(6)]
    for t, name in enumerate(written):
        im = Image.open(out_dir / "square" / name)
        assert im.mode == "P" and im.size == (144, 72)
        assert im.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
    np.testing.assert_array_equal(vs.read_indexed(str(out_dir / "square" / "00000.png")),
                                  vs.read_indexed(str(adir / "00000.png")))
    scores = json.loads((out_dir / "scores.json").read_text())
    assert 0 <= scores["J-Mean"] <= 1 and 0 <= scores["F-Mean"] <= 1 and "square_1" in scores["per_object"]
    assert "J&F-Mean" in out
    # --score_only on the ground truth itself scores 1.
    shutil.copytree(adir, tmp_path / "gt_as_results" / "square")
    perfect = eval_video_segmentation.main(["--data_path", str(tmp_path / "davis"), "--output_dir",
                                            str(tmp_path / "gt_as_results"), "--score_only"])
    assert perfect["J&F-Mean"] == 1.0 and perfect["J-Recall"] == 1.0
