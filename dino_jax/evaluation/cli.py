"""Command-line plumbing every evaluation CLI shares: model and data flags, loading a backbone, the eval data.

The CLIs (`eval_knn`, `eval_linear`, `visualize_attention`, `eval_image_retrieval`, `eval_copy_detection`,
`eval_video_segmentation`) are thin: their flags and outputs follow the reference scripts, and everything they have
in common lives here, so no module imports a CLI module.
"""
from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from dino_jax import paths


def bool_flag(s):
    """argparse type for the reference's boolean flags (`--use_cuda False` style)."""
    if str(s).lower() in ("1", "true", "yes", "on"):
        return True
    if str(s).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")



def add_model_flags(parser: argparse.ArgumentParser, patch_size: int = 16):
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="dino_jax workdir (or its checkpoints/<step>) or a reference .pth file; empty = random "
                             "init (the reference downloads its released weights instead)")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='which network of a full checkpoint to evaluate: "teacher" (default) or "student"')
    parser.add_argument("--arch", default="vit_small", type=str,
                        help="vit_tiny | vit_small | vit_base; a checkpoint's own architecture wins when it has one")
    parser.add_argument("--patch_size", default=patch_size, type=int, help="patch resolution of the model")


def add_data_flags(parser: argparse.ArgumentParser):
    parser.add_argument("--data_path", default=None, type=str,
                        help="folder with train/ and val/ ImageFolders (class = subfolder), as in the reference; "
                             "default for a dino_jax workdir: its training run's evaluation data")
    parser.add_argument("--dataset", default=None, type=str,
                        help="instead of --data_path: a dataset spec, tfds:NAME (train + --val_split), "
                             "folder:PATH (PATH/train, PATH/val) or demo (its train and val splits)")
    parser.add_argument("--val_split", default="validation", type=str, help="TFDS split used as val with tfds:NAME")
    parser.add_argument("--data_dir", default=None, type=str, help="TFDS data_dir")
    parser.add_argument("--resize_size", default=None, type=int,
                        help="eval resize of the shorter side (default 256; the demo's native size for demo)")
    parser.add_argument("--crop_size", default=None, type=int,
                        help="eval centre crop (default 224; the demo's native size for demo)")


def load_backbone(pretrained_weights: str, checkpoint_key: str = "teacher", arch: str = "vit_small",
                  patch_size: int = 16, seed: int = 0):
    """(model, params, info) from a dino_jax workdir or a reference .pth, or a random init when no path is given."""
    from dino_jax.models.vit import build_vit

    if pretrained_weights:
        if not paths.Path(pretrained_weights).exists():
            sys.exit(f"--pretrained_weights {pretrained_weights}: no such file or folder. Pass a dino_jax workdir "
                     "(the --workdir of a training run) or a reference .pth file.")
        from dino_jax import convert

        params, info = convert.load_pretrained(pretrained_weights, checkpoint_key=checkpoint_key)
        info = dict(info)
        if info.get("arch") not in (None, arch) or info.get("patch_size") not in (None, patch_size):
            print(f"note: {pretrained_weights} holds {info.get('arch')}/{info.get('patch_size')}; using that "
                  f"instead of --arch {arch} --patch_size {patch_size}", flush=True)
        kw = {k: info[k] for k in ("embed_dim", "depth", "num_heads", "img_size") if info.get(k) is not None}
        if info.get("pos_embed_interp"):
            kw["pos_embed_interp"] = info["pos_embed_interp"]
        model = build_vit(info.get("arch") or arch, info.get("patch_size") or patch_size, **kw)
        print(f"loaded {info.get('arch') or arch}/{model.patch_size} ({checkpoint_key}) from {pretrained_weights}",
              flush=True)
        return model, params, info
    model = build_vit(arch, patch_size)
    print(f"WARNING: no --pretrained_weights given; evaluating a RANDOMLY INITIALISED {arch}/{patch_size} "
          "(the reference would download its released weights, which needs a network)", flush=True)
    x = np.zeros((1, model.img_size, model.img_size, 3), np.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), x)["params"]
    info = {"arch": arch, "patch_size": patch_size, "embed_dim": model.embed_dim, "depth": model.depth,
            "num_heads": model.num_heads, "img_size": model.img_size, "random_init": True}
    return model, params, info


def trained_on_grey(info) -> bool:
    """Whether the run that wrote the checkpoint saw grey images only (`grayscale_input`); says so when it did."""
    grey = bool((info.get("training_config") or {}).get("grayscale_input"))
    if grey:
        print("note: the checkpoint was trained on grey input (grayscale_input); evaluating on grey images",
              flush=True)
    return grey


def open_train_val(args, image_size: int | None = None, info: dict | None = None):
    """(train source, val source, resize_size, crop_size) from --data_path / --dataset.

    With neither, a dino_jax checkpoint's own periodic-evaluation protocol is repeated (the same bank, queries,
    sizes and grey input), so the number matches what the trainer logged. A checkpoint trained on grey input
    (`grayscale_input`) is always evaluated on grey images.
    """
    from dino_jax.data import sources

    info = info or {}
    grey = trained_on_grey(info)
    if not args.data_path and not args.dataset:
        protocol = info.get("training_config") or {}
        if not (protocol.get("eval_train_dataset") and protocol.get("eval_dataset")):
            sys.exit("give --data_path (a folder with train/ and val/) or --dataset (a spec: tfds:NAME, folder:PATH "
                     "or demo); only a dino_jax workdir whose run had eval_train_dataset/eval_dataset needs neither")
        from dino_jax.evaluation import knn

        train, val = knn.training_sources(protocol, data_dir=args.data_dir)
        print(f"no --data_path/--dataset: repeating the training run's k-NN protocol (bank "
              f"{protocol['eval_train_dataset']}, queries {protocol['eval_dataset']})", flush=True)
        return (train, val, args.resize_size or protocol["eval_resize_size"],
                args.crop_size or protocol["eval_crop_size"])
    if args.data_path and args.dataset:
        sys.exit("give only one of --data_path (a folder with train/ and val/) or --dataset (a spec)")
    spec = args.dataset or f"folder:{args.data_path.rstrip('/')}"
    kind, _, rest = spec.partition(":")
    demo = kind == "demo"
    if kind == "folder":
        for sub in ("train", "val"):
            if not paths.Path(rest, sub).is_dir():
                sys.exit(f"{paths.join(rest, sub)} is not a folder; --data_path/--dataset folder:PATH must hold "
                         "train/ and val/ ImageFolders (train/<class>/<image>, val/<class>/<image>)")
        train = sources.load_source(f"folder:{paths.join(rest, 'train')}", grayscale=grey)
        val = sources.load_source(f"folder:{paths.join(rest, 'val')}", grayscale=grey)
    elif kind == "tfds":
        name = rest.partition(":")[0]
        train = sources.load_source(f"tfds:{name}", "train", data_dir=args.data_dir, grayscale=grey)
        val = sources.load_source(f"tfds:{name}", args.val_split, data_dir=args.data_dir, grayscale=grey)
    elif demo:
        size = image_size or 32
        train = sources.load_source(spec, "train", image_size=size, grayscale=grey)
        val = sources.load_source(spec, "val", image_size=size, grayscale=grey)
    else:
        sys.exit(f"--dataset {spec!r}: unknown kind {kind!r}; use tfds:NAME, folder:PATH or demo")
    native = image_size or 32
    resize = args.resize_size or (native if demo else 256)
    crop = args.crop_size or (native if demo else 224)
    return train, val, resize, crop


def demo_image_size(info) -> int | None:
    """The demo is rendered at the resolution the checkpoint was trained at (its img_size), else at 32 px."""
    return None if info.get("random_init") else info.get("img_size")


def global_batch_size(per_device: int) -> int:
    return per_device * jax.device_count()


def eval_batches(source, global_batch: int, resize_size: int, crop_size: int):
    from dino_jax import sharding
    from dino_jax.data import pipeline

    mesh = sharding.make_mesh()
    return pipeline.eval_iterator(source, global_batch=global_batch, sharding=sharding.batch_sharding(mesh),
                                  resize_size=resize_size, crop_size=crop_size)
