"""Image retrieval on revisited Oxford / Paris, flagged like the reference's `eval_image_retrieval.py`.

    python -m dino_jax.eval_image_retrieval --pretrained_weights WORKDIR_OR_PTH --data_path /path/to/revisited \\
        --dataset roxford5k --imsize 224 --multiscale 0
    python -m dino_jax.eval_image_retrieval ... --dataset rparis6k --imsize 512 --multiscale 1

--data_path holds <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/ (see dino_jax.evaluation.image_retrieval).
Differences from the reference: any dataset name with that layout is accepted (the protocol is the same);
--crop_queries crops the queries to their boxes (the revisitop protocol; the reference and its numbers do not);
with no --pretrained_weights the network is randomly initialised (the reference downloads its Google Landmarks v2
model); --output writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from dino_jax import paths
from dino_jax.evaluation import cli


def get_args_parser():
    p = argparse.ArgumentParser("Image Retrieval on revisited Paris and Oxford (dino_jax)")
    p.add_argument("--data_path", default="/path/to/revisited_paris_oxford/", type=str,
                   help="folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/")
    p.add_argument("--dataset", default="roxford5k", type=str, help="roxford5k or rparis6k (or any such layout)")
    p.add_argument("--multiscale", default=False, type=cli.bool_flag,
                   help="average the features at scales 1, 1/sqrt(2), 1/2")
    p.add_argument("--imsize", default=224, type=int, help="longer image side after the (aspect-keeping) resize")
    p.add_argument("--crop_queries", default=False, type=cli.bool_flag,
                   help="crop each query to its gnd bbx first (revisitop protocol; the reference does not)")
    cli.add_model_flags(p, 16)
    p.add_argument("--output", default=None, type=str, help="write the results as JSON to this file")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from dino_jax.evaluation import image_retrieval as ret

    try:
        cfg = ret.load_dataset(args.data_path, args.dataset)
    except (OSError, KeyError, ValueError) as e:
        sys.exit(str(e))
    model, params, _ = cli.load_backbone(args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    db_paths = [ret.image_path(cfg, n) for n in cfg["imlist"]]
    q_paths = [ret.image_path(cfg, n) for n in cfg["qimlist"]]
    missing = [p for p in db_paths + q_paths if not paths.Path(p).is_file()]
    if missing:
        sys.exit(f"{len(missing)} images listed in gnd_{args.dataset}.pkl are missing, e.g. {missing[0]}")
    print(f"train: {len(db_paths)} imgs / query: {len(q_paths)} imgs", flush=True)
    t0 = time.time()
    bbxs = [g["bbx"] for g in cfg["gnd"]] if args.crop_queries else None
    db = ret.extract_features(model, params, db_paths, args.imsize, args.multiscale, name="database")
    q = ret.extract_features(model, params, q_paths, args.imsize, args.multiscale, bbxs=bbxs, name="queries")
    print(f"features: database {db.shape}, queries {q.shape} ({time.time() - t0:.1f}s)", flush=True)
    ks = [1, 5, 10]
    res = ret.evaluate(ret.rank_database(db, q), cfg["gnd"], ks)
    m, h = res["medium"], res["hard"]
    print(f">> {args.dataset}: mAP M: {m['mAP']:.2f}, H: {h['mAP']:.2f}")
    print(f">> {args.dataset}: mP@k{ks} M: {np.around([m['mP@k'][k] for k in ks], 2)}, "
          f"H: {np.around([h['mP@k'][k] for k in ks], 2)}", flush=True)
    if args.output:
        paths.write_json(args.output, {"dataset": args.dataset, "imsize": args.imsize, "multiscale": args.multiscale,
                                       "crop_queries": args.crop_queries,
                                       "pretrained_weights": args.pretrained_weights, **res}, indent=2)
        print(f"results written to {args.output}", flush=True)
    return res


if __name__ == "__main__":
    main()
