"""Weighted k-NN evaluation, flagged like the reference's `eval_knn.py`.

    python -m dino_jax.eval_knn --pretrained_weights WORKDIR_OR_PTH --data_path /path/to/imagenet
    python -m dino_jax.eval_knn --pretrained_weights runs/demo --dataset demo --nb_knn 10 20 --output knn.json
    python -m dino_jax.eval_knn --pretrained_weights runs/demo   # the run's own periodic k-NN protocol

Differences from the reference: --dataset takes a dino_jax spec (tfds:NAME, folder:PATH with train/ and val/, or
demo, whose train/val splits are used); num_classes comes from the data instead of being 1000; any number of test
images works; without --pretrained_weights the network is randomly initialised (the reference would download the
released weights, which needs a network); on a dino_jax workdir with no data flag, the run's own k-NN protocol
(bank, queries, sizes, grey input) is repeated, so the result equals what the trainer logged.
"""
from __future__ import annotations

import argparse
import io
import sys
import time

import jax
import numpy as np

from dino_jax import paths
from dino_jax.evaluation import cli


# ----------------------------------------------------------------------------------------------------------
# Feature dump / load in the reference's file names (torch tensors when torch is installed, else .npy).

FEATURE_FILES = ("trainfeat", "testfeat", "trainlabels", "testlabels")


def dump_features(path: str, arrays):
    try:
        import torch
    except ImportError:
        torch = None
    for name, a in zip(FEATURE_FILES, arrays):
        if torch is not None:
            paths.torch_save(torch.from_numpy(np.ascontiguousarray(a)), paths.join(path, f"{name}.pth"))
        else:
            buf = io.BytesIO()
            np.save(buf, a)
            paths.write_bytes(paths.join(path, f"{name}.npy"), buf.getvalue())
    print(f"features written to {path}", flush=True)


def load_features(path: str):
    out = []
    for name in FEATURE_FILES:
        pth, npy = paths.Path(path, f"{name}.pth"), paths.Path(path, f"{name}.npy")
        if pth.exists():
            out.append(paths.torch_load(pth).numpy())
        elif npy.exists():
            out.append(np.load(io.BytesIO(npy.read_bytes())))
        else:
            sys.exit(f"--load_features {path}: missing {name}.pth (or .npy); it must hold trainfeat, testfeat, "
                     "trainlabels and testlabels as written by --dump_features")
    return out


# ----------------------------------------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser("Evaluation with weighted k-NN (dino_jax)")
    p.add_argument("--batch_size_per_gpu", default=128, type=int, help="images per device per batch")
    p.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int,
                   help="numbers of nearest neighbours; 20 usually works best")
    p.add_argument("--temperature", default=0.07, type=float, help="temperature of the voting weights exp(sim/T)")
    cli.add_model_flags(p, 16)
    p.add_argument("--dump_features", default=None, help="folder to save the computed features and labels in")
    p.add_argument("--load_features", default=None, help="folder of features saved by --dump_features")
    cli.add_data_flags(p)
    p.add_argument("--output", default=None, type=str, help="write the results as JSON to this file")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from dino_jax.evaluation import knn

    t0 = time.time()
    if args.load_features:
        train_f, test_f, train_l, test_l = load_features(args.load_features)
        num_classes = int(max(train_l.max(), test_l.max())) + 1
    else:
        model, params, info = cli.load_backbone(args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
        train, val, resize, crop = cli.open_train_val(args, cli.demo_image_size(info), info)
        protocol = knn.KnnProtocol(train, val, cli.global_batch_size(args.batch_size_per_gpu), resize, crop,
                                   tuple(args.nb_knn), args.temperature)
        num_classes = protocol.num_classes
        print(f"data: {train.num_examples} train and {val.num_examples} val images, {num_classes} classes; "
              f"resize {resize}, crop {crop}; global batch {protocol.global_batch}", flush=True)
        print("extracting features for the train (bank) and val (queries) sets...", flush=True)
        train_f, train_l, test_f, test_l = protocol.features(model, params)
        if args.dump_features and jax.process_index() == 0:
            dump_features(args.dump_features, (train_f, test_f, train_l, test_l))
    print(f"features ready: train {train_f.shape}, test {test_f.shape} ({time.time() - t0:.1f}s); k-NN...",
          flush=True)
    results = knn.knn_classifier_multi_k(train_f, train_l, test_f, test_l, args.nb_knn, args.temperature, num_classes)
    for k in results:
        print(f"{k}-NN classifier result: Top1: {results[k]['top1']}, Top5: {results[k]['top5']}")
    print(knn.format_table(results), flush=True)
    if args.output and jax.process_index() == 0:
        paths.write_json(args.output, {
            "results": {str(k): v for k, v in results.items()}, "temperature": args.temperature,
            "num_train": int(len(train_f)), "num_test": int(len(test_f)), "num_classes": num_classes,
            "pretrained_weights": args.pretrained_weights, "checkpoint_key": args.checkpoint_key}, indent=2)
        print(f"results written to {args.output}", flush=True)
    return results


if __name__ == "__main__":
    main()
