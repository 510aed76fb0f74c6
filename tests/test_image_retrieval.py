"""Revisited Oxford/Paris retrieval: the revisited mAP / mP@k against hand values and a brute-force walk of the
ranking, perfect vs random descriptors, multi-scale features vs the torch reference, and the CLI."""
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino_jax.evaluation import image_retrieval as ret
from dino_jax.evaluation import images as imgs
from protocol_data import run_cli, tiny_reference_vit, torch_input

torch.set_num_threads(1)


def brute_force_ap_and_pk(ranked, ok, junk, ks):
    """Walk the ranked list, dropping junk; trapezoid AP; P@k with k capped at the last positive (revisitop)."""
    kept = [d for d in ranked if d not in set(junk)]
    ap, hits, last = 0.0, 0, 0
    for rank, d in enumerate(kept):
        if d in set(ok):
            left = 1.0 if rank == 0 else hits / rank
            hits += 1
            ap += (left + hits / (rank + 1)) / 2 / len(ok)
            last = rank + 1
    pk = []
    for k in ks:
        kq = min(last, k)
        pk.append(sum(1 for d in kept[:kq] if d in set(ok)) / kq)
    return ap, pk


def test_known_ranking_gives_the_hand_computed_map():
    # Database 0..5, one query ranked 3, 0, 5, 1, 2, 4. Easy {0}, hard {2}, junk {5}.
    ranks = np.array([[3, 0, 5, 1, 2, 4]]).T
    gnd = [{"easy": [0], "hard": [2], "junk": [5], "bbx": [0, 0, 1, 1]}]
    # Medium: positives {0, 2}, junk {5} -> kept list 3, 0, 1, 2, 4: positives at ranks 1 and 3.
    #   AP = 1/2 * [(0/1 + 1/2)/2 + (1/3 + 2/4)/2] = 1/3;  P@1 = 0, P@5 = P@10 = 2/4 (k capped at 4).
    m, aps, mp, _ = ret.compute_map(ranks, ret.protocol(gnd, "medium"), [1, 5, 10])
    assert m == pytest.approx(1 / 3) and aps[0] == pytest.approx(1 / 3)
    np.testing.assert_allclose(mp, [0, 0.5, 0.5])
    # Hard: positives {2}, junk {5, 0} -> kept list 3, 1, 2, 4: the positive at rank 2. AP = (0/2 + 1/3)/2 = 1/6.
    m, _, mp, _ = ret.compute_map(ranks, ret.protocol(gnd, "hard"), [1, 5, 10])
    assert m == pytest.approx(1 / 6)
    np.testing.assert_allclose(mp, [0, 1 / 3, 1 / 3])
    # Easy (revisitop's third protocol): positives {0}, junk {5, 2} -> kept 3, 0, 1, 4: AP = (0/1 + 1/2)/2 = 1/4.
    assert ret.compute_map(ranks, ret.protocol(gnd, "easy"))[0] == pytest.approx(1 / 4)
    res = ret.evaluate(ranks, gnd)
    assert res["medium"]["mAP"] == pytest.approx(100 / 3) and res["hard"]["mP@k"][5] == pytest.approx(100 / 3)


def test_map_matches_a_brute_force_walk_on_random_rankings():
    rng = np.random.default_rng(0)
    n_db, n_q, ks = 30, 12, [1, 5, 10]
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    gnd = []
    for i in range(n_q):
        ids = rng.permutation(n_db)
        gnd.append({"easy": ids[:rng.integers(0, 4)], "hard": ids[4:4 + rng.integers(1, 5)],
                    "junk": ids[10:10 + rng.integers(0, 6)]})
    for name in ("medium", "hard"):
        g = ret.protocol(gnd, name)
        m, aps, mp, prs = ret.compute_map(ranks, g, ks)
        want = [brute_force_ap_and_pk(list(ranks[:, i]), list(g[i]["ok"]), list(g[i]["junk"]), ks)
                for i in range(n_q)]
        np.testing.assert_allclose(aps, [w[0] for w in want], rtol=1e-12)
        np.testing.assert_allclose(prs, [w[1] for w in want], rtol=1e-12)
        assert m == pytest.approx(np.mean([w[0] for w in want]))
        assert 0.05 < m < 0.95  # a case where the ranking decides something


def test_perfect_descriptors_give_map_1_and_random_ones_do_not():
    n_classes, per_class = 6, 5
    labels = np.repeat(np.arange(n_classes), per_class)
    q_labels = np.arange(n_classes)
    gnd = [{"easy": np.flatnonzero(labels == c)[:3], "hard": np.flatnonzero(labels == c)[3:], "junk": []}
           for c in q_labels]
    perfect = np.eye(n_classes, dtype=np.float32)
    res = ret.evaluate(ret.rank_database(perfect[labels], perfect[q_labels]), gnd)
    assert res["medium"]["mAP"] == pytest.approx(100) and res["hard"]["mAP"] == pytest.approx(100)
    assert res["medium"]["mP@k"] == pytest.approx({1: 100, 5: 100, 10: 100})
    maps = []
    for seed in range(5):
        r = np.random.default_rng(seed)
        db, q = imgs_l2(r.normal(size=(len(labels), 16))), imgs_l2(r.normal(size=(n_classes, 16)))
        maps.append(ret.evaluate(ret.rank_database(db, q), gnd)["medium"]["mAP"])
    assert np.mean(maps) < 45, maps  # chance is ~ 5/30 positives


def imgs_l2(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_bilinear_resize_matches_torch_interpolate():
    x = np.random.default_rng(2).normal(size=(37, 23, 3)).astype(np.float32)
    t = torch.from_numpy(x.transpose(2, 0, 1)[None].copy())
    for s in ret.MULTISCALE[1:]:
        want = F.interpolate(t, scale_factor=s, mode="bilinear", align_corners=False)[0].numpy().transpose(1, 2, 0)
        got = imgs.resize_bilinear(x, want.shape[:2], scale=s)
        np.testing.assert_allclose(got, want, atol=1e-5)
    want = F.interpolate(t, size=(64, 40), mode="bilinear", align_corners=False)[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(imgs.resize_bilinear(x, (64, 40)), want, atol=1e-5)


def test_thumbnail_and_multiscale_features_match_the_torch_reference(tmp_path):
    from PIL import Image

    from dino_jax.evaluation import cli

    net = tiny_reference_vit(tmp_path / "vit.pth")
    model, params, _ = cli.load_backbone(str(tmp_path / "vit.pth"), "teacher", "vit_small", 8)
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (90, 130, 3), np.uint8)).save(tmp_path / "a.jpg")
    image = ret.load_image(str(tmp_path / "a.jpg"), 64)
    assert image.shape == (44, 64, 3)  # thumbnail keeps the aspect ratio: 130x90 -> 64x44
    assert ret.load_image(str(tmp_path / "a.jpg"), 32, bbx=[10, 20, 74, 60]).shape == (20, 32, 3)  # 64x40 box
    x = torch_input(image)
    with torch.no_grad():  # the reference's multi_scale: mean of the scales' CLS, then L2-normalised
        want = sum(net(x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
                   for s in ret.MULTISCALE) / 3
    want = (want / want.norm())[0].numpy()
    np.testing.assert_allclose(ret.image_feature(model, params, image, multiscale=True), want, atol=2e-5)
    with torch.no_grad():
        single = net(x)[0].numpy()
    np.testing.assert_allclose(ret.image_feature(model, params, image), single, rtol=1e-4, atol=1e-5)


def test_missing_ground_truth_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="gnd_roxford5k.pkl"):
        ret.load_dataset(str(tmp_path), "roxford5k")
    (tmp_path / "roxford5k").mkdir()
    with open(tmp_path / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": []}, f)
    with pytest.raises(KeyError, match="'gnd'"):
        ret.load_dataset(str(tmp_path), "roxford5k")


def _landmark_dataset(root, rng):
    """4 'landmarks' (smooth random colour fields); the database holds 3 views of each (a shift, a flip, a darker
    crop) at sizes that are not square; each query is a fourth view. Easy = first two views, hard = the third."""
    from PIL import Image

    d = root / "roxford5k" / "jpg"
    d.mkdir(parents=True)
    imlist, qimlist, gnd = [], [], []
    for c in range(4):
        base = np.asarray(Image.fromarray(rng.integers(0, 255, (6, 8, 3), np.uint8)).resize((160, 120),
                                                                                             Image.BICUBIC))
        views = [base[5:, 3:], base[:, ::-1], (base[10:110, 10:150] * 0.7).astype(np.uint8), base[:100]]
        for v, view in enumerate(views):
            name = f"lm{c}_v{v}"
            Image.fromarray(np.ascontiguousarray(view)).save(d / f"{name}.jpg", quality=95)
            (qimlist if v == 3 else imlist).append(name)
        gnd.append({"easy": [3 * c, 3 * c + 1], "hard": [3 * c + 2], "junk": [], "bbx": [0, 0, 159, 99]})
    with open(root / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return imlist, qimlist, gnd


@pytest.mark.slow
def test_cli_on_a_constructed_revisited_dataset(tmp_path):
    """The CLI's mAP equals the brute-force mAP of the torch reference's features of the same thumbnails."""
    imlist, qimlist, gnd = _landmark_dataset(tmp_path, np.random.default_rng(4))
    net = tiny_reference_vit(tmp_path / "vit.pth")
    out = run_cli("dino_jax.eval_image_retrieval", "--data_path", tmp_path, "--dataset", "roxford5k",
                  "--imsize", 64, "--pretrained_weights", tmp_path / "vit.pth", "--arch", "vit_small",
                  "--patch_size", 8, "--output", tmp_path / "ret.json")
    print(out)
    assert ">> roxford5k: mAP M:" in out and ">> roxford5k: mP@k[1, 5, 10] M:" in out
    got = json.loads((tmp_path / "ret.json").read_text())

    def feats(names):
        with torch.no_grad():
            f = np.stack([net(torch_input(ret.load_image(str(tmp_path / "roxford5k" / "jpg" / f"{n}.jpg"), 64)))[0]
                          .numpy() for n in names])
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    sim = feats(imlist) @ feats(qimlist).T
    for name, keys in (("medium", ("easy", "hard")), ("hard", ("hard",))):
        aps = []
        for i, g in enumerate(gnd):
            ok = [j for k in keys for j in g[k]]
            junk = list(g["junk"]) + (list(g["easy"]) if name == "hard" else [])
            aps.append(brute_force_ap_and_pk(list(np.argsort(-sim[:, i], kind="stable")), ok, junk, [1])[0])
        assert got[name]["mAP"] == pytest.approx(100 * np.mean(aps), abs=1e-6), name
