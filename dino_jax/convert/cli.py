"""python -m dino_jax.convert: a reference .pth to a dino_jax workdir, or back with --to_torch."""
from __future__ import annotations

import argparse
import sys

from dino_jax import paths
from dino_jax.convert.workdir import torch_file_to_workdir, workdir_to_torch_file


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dino_jax.convert",
        description="Convert reference DINO .pth files to dino_jax checkpoints (default) or back (--to_torch).")
    parser.add_argument("--input", required=True, help=".pth file, or with --to_torch a dino_jax workdir/checkpoint")
    parser.add_argument("--output", required=True, help="dino_jax workdir, or with --to_torch the .pth to write")
    parser.add_argument("--checkpoint_key", default="teacher", choices=("teacher", "student"),
                        help="which network goes into a backbone file, or is read from a reference full "
                             "checkpoint's state dict by key (.pth -> dino_jax converts a full checkpoint whole)")
    parser.add_argument("--arch", default=None, help="check that the file is this arch (vit_tiny|vit_small|vit_base)")
    parser.add_argument("--patch_size", default=None, type=int, help="check that the file has this patch size")
    parser.add_argument("--num_heads", default=None, type=int, help="heads, when embed_dim is not a multiple of 64")
    parser.add_argument("--out_dim", default=None, type=int,
                        help="prototypes of the fresh head given to a backbone-only file (default 65536)")
    parser.add_argument("--steps_per_epoch", default=None, type=int,
                        help="iterations per epoch of the reference run (default: from its optimizer state)")
    parser.add_argument("--to_torch", action="store_true", help="dino_jax -> reference .pth")
    parser.add_argument("--full", action="store_true", help="with --to_torch: a full training checkpoint")
    args = parser.parse_args(argv)
    if not paths.Path(args.input).exists():
        sys.exit(f"--input {args.input}: no such file or folder")
    if args.full and not args.to_torch:
        sys.exit("--full goes with --to_torch (a .pth full checkpoint is detected automatically the other way)")
    try:
        if args.to_torch:
            workdir_to_torch_file(args.input, args.output, checkpoint_key=args.checkpoint_key, full=args.full)
        else:
            torch_file_to_workdir(args.input, args.output, checkpoint_key=args.checkpoint_key, arch=args.arch,
                                  patch_size=args.patch_size, num_heads=args.num_heads,
                                  steps_per_epoch=args.steps_per_epoch, out_dim=args.out_dim)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
        sys.exit(f"error: {e}")
    print("done", flush=True)

