"""Copy detection on Copydays, flagged like the reference's `eval_copy_detection.py`.

    python -m dino_jax.eval_copy_detection --pretrained_weights WORKDIR_OR_PTH --data_path /path/to/copydays \\
        --whitening_path /path/to/whitening_images --distractors_path /path/to/distractors

Prints "eval on <block> mAP=<m>" for each block found (see dino_jax.evaluation.copy_detection for the layout).
Differences from the reference: the blocks present are evaluated (the reference needs all 20 and hard-codes their
sizes); --whitening_path and --distractors_path are skipped when empty or absent (the reference's defaults are
placeholder paths, skipped the same way); with no --pretrained_weights the network is randomly initialised (the
reference downloads its released weights); --output writes the per-block mAP as JSON.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from dino_jax import paths
from dino_jax.evaluation import cli


def get_args_parser():
    p = argparse.ArgumentParser("Copy detection on Copydays (dino_jax)")
    p.add_argument("--data_path", default="/path/to/copydays/", type=str,
                   help="Copydays layout: original/, strong/, jpegqual/Q/, crops/C/ with .jpg images")
    p.add_argument("--whitening_path", default="", type=str,
                   help="folder of images to learn the PCA whitening on (the paper: 20k random YFCC100M images)")
    p.add_argument("--distractors_path", default="", type=str,
                   help="folder of distractor images added to the database (the paper: 10k YFCC100M images)")
    p.add_argument("--imsize", default=320, type=int, help="images are resized to imsize x imsize (bicubic)")
    p.add_argument("--batch_size_per_gpu", default=16, type=int, help="images per forward")
    cli.add_model_flags(p, 8)
    p.set_defaults(arch="vit_base")
    p.add_argument("--output", default=None, type=str, help="write the per-block mAP as JSON to this file")
    return p


def _optional_images(path: str, what: str) -> list[str]:
    from dino_jax.evaluation import images as imgs

    if not path or not paths.Path(path).is_dir():
        if path:
            print(f"note: --{what} {path} is not a folder; going without", flush=True)
        return []
    found = imgs.list_images(path)
    if not found:
        sys.exit(f"--{what} {path} holds no images ({', '.join(imgs.IMAGE_EXTENSIONS)})")
    return found


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from dino_jax.evaluation import copy_detection as cd

    try:
        blocks = cd.find_blocks(args.data_path)
        originals = blocks["original"]
        pos = {name: cd.positives(name, files, originals) for name, files in blocks.items()}
    except (OSError, ValueError) as e:
        sys.exit(str(e))
    distractors = _optional_images(args.distractors_path, "distractors_path")
    whitening = _optional_images(args.whitening_path, "whitening_path")
    model, params, _ = cli.load_backbone(args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    t0 = time.time()

    def extract(files, name):
        return cd.extract_descriptors(model, params, files, args.imsize, args.batch_size_per_gpu, name=name)

    queries = {name: extract(files, name) for name, files in blocks.items()}
    print(f"Extraction of queries features done: {sum(len(q) for q in queries.values())} images in "
          f"{len(queries)} blocks", flush=True)
    database = queries["original"]
    if distractors:
        print("Using distractors...", flush=True)
        database = np.concatenate([database, extract(distractors, "distractors")])
    print(f"Extraction of database and distractors features done. Shape: {database.shape} "
          f"({time.time() - t0:.1f}s)", flush=True)
    if whitening:
        print(f"Extracting features on {len(whitening)} images from {args.whitening_path} for learning the "
              "whitening operator.", flush=True)
        mean, proj = cd.train_whitening(extract(whitening, "whitening"))
        database = cd.apply_whitening(database, mean, proj)
        queries = {name: cd.apply_whitening(q, mean, proj) for name, q in queries.items()}
    results = cd.evaluate(queries, database, pos)
    for name, m in results.items():
        print(f"eval on {name} mAP={m:.3f}")
    if args.output:
        paths.write_json(args.output, {"mAP": results, "num_database": int(len(database)),
                                       "whitening": bool(whitening), "imsize": args.imsize,
                                       "pretrained_weights": args.pretrained_weights}, indent=2)
        print(f"results written to {args.output}", flush=True)
    return results


if __name__ == "__main__":
    main()
