"""Linear probe on frozen features, flagged like the reference's `eval_linear.py`.

    python -m dino_jax.eval_linear --pretrained_weights WORKDIR_OR_PTH --data_path /path/to/imagenet --output_dir out
    python -m dino_jax.eval_linear --arch vit_base --n_last_blocks 1 --avgpool_patchtokens \\
        --pretrained_weights dino_vitbase16_pretrain.pth --evaluate --linear_weights dino_vitbase16_linearweights.pth \\
        --data_path /path/to/imagenet

Differences from the reference: --evaluate reads the classifier from --linear_weights (the reference downloads
the released file for --arch); --dataset takes a dino_jax spec; --num_labels defaults to the data's class count;
--no_train_augment trains on centre-crop features computed once (much faster on a CPU; not the reference
protocol, which re-augments every epoch). Outputs in --output_dir: log.txt (JSON per epoch) and
checkpoint.pth.tar with {'state_dict': {'module.linear.weight', 'module.linear.bias'}, 'epoch', 'best_acc'},
loadable by the reference's LinearClassifier and by --evaluate.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from dino_jax import paths
from dino_jax.evaluation import cli


def get_args_parser():
    p = argparse.ArgumentParser("Evaluation with linear classification (dino_jax)")
    p.add_argument("--n_last_blocks", default=4, type=int,
                   help="concatenate the CLS tokens of the last n blocks: n=4 for ViT-Small, n=1 for ViT-Base")
    p.add_argument("--avgpool_patchtokens", default=False, type=cli.bool_flag, nargs="?", const=True,
                   help="also the mean patch token, interleaved with the CLS (only with n_last_blocks 1; "
                        "True for ViT-Base)")
    cli.add_model_flags(p, 16)
    p.add_argument("--epochs", default=100, type=int, help="number of training epochs")
    p.add_argument("--lr", default=0.001, type=float,
                   help="learning rate per 256 images (scaled by the global batch / 256), cosine to 0 per epoch")
    p.add_argument("--batch_size_per_gpu", default=128, type=int, help="images per device per batch")
    cli.add_data_flags(p)
    p.add_argument("--num_labels", default=None, type=int, help="classes of the classifier (default: from the data)")
    p.add_argument("--val_freq", default=1, type=int, help="epoch frequency of validation")
    p.add_argument("--output_dir", default=".", help="where log.txt and checkpoint.pth.tar go")
    p.add_argument("--evaluate", action="store_true", help="only validate the classifier in --linear_weights")
    p.add_argument("--linear_weights", default=None,
                   help="reference-layout linear weights for --evaluate (default OUTPUT_DIR/checkpoint.pth.tar)")
    p.add_argument("--train_augment", default=True, type=cli.bool_flag,
                   help="RandomResizedCrop+flip every epoch (the reference); false = centre-crop features once")
    p.add_argument("--seed", default=0, type=int)
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from dino_jax import sharding
    from dino_jax.data import pipeline
    from dino_jax.evaluation import linear

    if args.avgpool_patchtokens and args.n_last_blocks != 1:
        sys.exit("--avgpool_patchtokens needs --n_last_blocks 1 (the reference's interleaved [cls, avg] feature is "
                 "only defined for one block)")
    model, params, info = cli.load_backbone(args.pretrained_weights, args.checkpoint_key, args.arch,
                                               args.patch_size)
    train, val, resize, crop = cli.open_train_val(args, cli.demo_image_size(info), info)
    num_labels = args.num_labels or max(train.num_classes, val.num_classes)
    gb = cli.global_batch_size(args.batch_size_per_gpu)
    mesh = sharding.make_mesh()
    params = jax.device_put(params, sharding.replicated(mesh))
    feat_dim = linear.feature_dim(model, args.n_last_blocks, args.avgpool_patchtokens)
    print(f"data: {train.num_examples} train and {val.num_examples} val images, {num_labels} labels; features "
          f"{feat_dim}-d (n_last_blocks {args.n_last_blocks}, avgpool {args.avgpool_patchtokens}); global batch {gb}",
          flush=True)

    def val_feature_batches():
        return linear.image_feature_batches(model, params, cli.eval_batches(val, gb, resize, crop),
                                            args.n_last_blocks, args.avgpool_patchtokens)

    if args.evaluate:
        path = args.linear_weights or paths.join(args.output_dir, "checkpoint.pth.tar")
        lin = linear.load_linear_weights(path)
        if lin["kernel"].shape[0] != feat_dim:
            sys.exit(f"{path} expects {lin['kernel'].shape[0]}-d features but this backbone with --n_last_blocks "
                     f"{args.n_last_blocks} --avgpool_patchtokens {args.avgpool_patchtokens} gives {feat_dim}-d; "
                     "use the flags the classifier was trained with (ViT-S: n=4; ViT-B: n=1 with avgpool)")
        stats = linear.evaluate_linear(lin, val_feature_batches())
        print(f"Accuracy of the network on the {stats['n']} test images: {stats['acc1']:.1f}% "
              f"(top-5 {stats['acc5']:.1f}%, loss {stats['loss']:.4f})")
        return stats

    lr = args.lr * gb / 256.0
    if args.train_augment:
        def train_epoch(epoch):
            batches = pipeline.linear_train_iterator(train, global_batch=gb, sharding=sharding.batch_sharding(mesh),
                                                     seed=args.seed, epoch=epoch, crop_size=crop)
            return linear.image_feature_batches(model, params, batches, args.n_last_blocks,
                                                args.avgpool_patchtokens)
    else:
        print("computing centre-crop train features once (--train_augment false)...", flush=True)
        t0 = time.time()
        feats, labels = [], []
        for b in linear.image_feature_batches(model, params, cli.eval_batches(train, gb, resize, crop),
                                              args.n_last_blocks, args.avgpool_patchtokens):
            valid = sharding.to_host(b["valid"]).astype(bool)
            feats.append(sharding.to_host(b["features"])[valid])
            labels.append(sharding.to_host(b["label"])[valid])
        feats, labels = np.concatenate(feats), np.concatenate(labels)
        print(f"  {len(labels)} train features in {time.time() - t0:.1f}s", flush=True)

        def train_epoch(epoch):
            return linear.array_batches(feats, labels, gb, seed=args.seed * 100003 + epoch)

    result = linear.train_linear(train_epoch, val_feature_batches, feat_dim, num_labels, epochs=args.epochs, lr=lr,
                                 val_freq=args.val_freq, seed=args.seed, output_dir=args.output_dir)
    if jax.process_index() == 0 and args.output_dir:
        paths.write_json(paths.join(args.output_dir, "linear_summary.json"), {
            "best_acc": result["best_acc"], "last": result["last"], "epochs": args.epochs, "lr": lr,
            "n_last_blocks": args.n_last_blocks, "avgpool_patchtokens": args.avgpool_patchtokens,
            "pretrained_weights": args.pretrained_weights, "checkpoint_key": args.checkpoint_key}, indent=2)
    return result


if __name__ == "__main__":
    main()
