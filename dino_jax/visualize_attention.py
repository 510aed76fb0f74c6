"""Self-attention maps of the last block's CLS token, flagged like the reference's `visualize_attention.py`.

    python -m dino_jax.visualize_attention --pretrained_weights WORKDIR_OR_PTH --image_path cat.jpg \\
        --image_size 480 480 --threshold 0.6 --output_dir attn/

Writes img.png, attn-head{j}.png, attn-mean.png and, with --threshold, mask_th{t}_head{j}.png. With --mask_path
(a ground-truth object mask image) it also prints and saves (jaccard.json) the Jaccard of each head's mask and of
the head-mean mask at --threshold (0.6, the paper's value, when not given). Differences from the reference: with
no --image_path a bundled scikit-image photo (skimage.data.chelsea) is used instead of a download; with no
--pretrained_weights the network is randomly initialised (the reference downloads its released weights).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from dino_jax import paths
from dino_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from dino_jax.evaluation import cli


def load_image(path: str | None, image_size, grey: bool = False) -> np.ndarray:
    """RGB float32 (H, W, 3) in [0, 1], resized to image_size = (H, W) with PIL bilinear (the reference's
    transforms.Resize on a PIL image); `grey` turns it into 3-channel luminance (for grey-trained models)."""
    from PIL import Image

    if path:
        if not paths.Path(path).is_file():
            sys.exit(f"--image_path {path}: no such file")
        img = paths.open_image(path).convert("RGB")
    else:
        import skimage.data

        print("no --image_path given: using the bundled scikit-image photo skimage.data.chelsea()", flush=True)
        img = Image.fromarray(skimage.data.chelsea())
    if grey:
        img = img.convert("L").convert("RGB")
    h, w = image_size
    return np.asarray(img.resize((w, h), Image.BILINEAR), np.float32) / 255.0


def load_mask(path: str, image_size) -> np.ndarray:
    """Ground-truth mask as bool (H, W): any image, resized nearest; foreground = above half its value range."""
    from PIL import Image

    if not paths.Path(path).is_file():
        sys.exit(f"--mask_path {path}: no such file")
    m = paths.open_image(path)
    m = m.convert("L") if m.mode not in ("L", "1", "P") else m
    h, w = image_size
    a = np.asarray(m.resize((w, h), Image.NEAREST))
    if m.mode == "P":  # palette masks (e.g. PASCAL VOC): class ids, 0 = background, 255 = void
        return (a > 0) & (a < 255)
    return a > (127 if a.max() > 1 else 0)


def get_args_parser():
    p = argparse.ArgumentParser("Visualize self-attention maps (dino_jax)")
    cli.add_model_flags(p, 8)
    p.add_argument("--image_path", default=None, type=str, help="image to visualise (default: a bundled photo)")
    p.add_argument("--image_size", default=(480, 480), type=int, nargs=2, metavar=("H", "W"),
                   help="resize the image to H W (bilinear) before the forward")
    p.add_argument("--output_dir", default=".", help="where the PNGs go")
    p.add_argument("--threshold", type=float, default=None,
                   help="keep this fraction of each head's attention mass in the masks (the paper uses 0.6)")
    p.add_argument("--mask_path", default=None, type=str,
                   help="ground-truth object mask image: report the Jaccard of the thresholded attention masks")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from dino_jax.evaluation import attention

    model, params, info = cli.load_backbone(args.pretrained_weights, args.checkpoint_key, args.arch,
                                               args.patch_size)
    patch = model.patch_size
    image = load_image(args.image_path, args.image_size, cli.trained_on_grey(info))
    normed = (image - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    normed = attention.crop_to_patch_multiple(normed, patch)
    attn = attention.attention_maps(model, params, normed, patch)  # (heads, h, w)
    masks = attention.threshold_masks(attn, args.threshold) if args.threshold is not None else None
    written = attention.save_attention_pngs(args.output_dir, normed, attn, masks, patch, args.threshold)
    print(f"{attn.shape[0]} heads on a {attn.shape[1]}x{attn.shape[2]} patch grid; wrote {len(written)} PNGs to "
          f"{args.output_dir}", flush=True)
    if args.mask_path:
        t = 0.6 if args.threshold is None else args.threshold
        gt = load_mask(args.mask_path, args.image_size)[:normed.shape[0], :normed.shape[1]]
        per_head = [attention.jaccard(m, gt) for m in attention.upsample_nearest(attention.threshold_masks(attn, t),
                                                                                 patch)]
        mean_map = attention.jaccard(attention.upsample_nearest(attention.threshold_masks(attn.mean(0), t), patch), gt)
        result = {"threshold": t, "per_head": per_head, "best_head": int(np.argmax(per_head)),
                  "best_head_jaccard": float(max(per_head)), "mean_map_jaccard": mean_map}
        print(f"Jaccard at threshold {t}: per head {[round(v, 3) for v in per_head]}, best head "
              f"{result['best_head']} ({result['best_head_jaccard']:.3f}), head-mean map {mean_map:.3f}")
        paths.write_json(paths.join(args.output_dir, "jaccard.json"), result, indent=2)
        return result
    return None


if __name__ == "__main__":
    main()
