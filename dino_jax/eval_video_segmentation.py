"""DAVIS-2017 video object segmentation by label propagation, flagged like the reference's
`eval_video_segmentation.py`, plus the J&F scores.

    python -m dino_jax.eval_video_segmentation --pretrained_weights WORKDIR_OR_PTH --data_path /path/to/davis \\
        --output_dir davis_out --n_last_frames 7 --size_mask_neighborhood 12 --topk 5
    python -m dino_jax.eval_video_segmentation --data_path /path/to/davis --output_dir davis_out --score_only

Writes <output_dir>/<video>/<frame>.png (indexed, DAVIS palette) for the videos of ImageSets/2017/val.txt, then,
when every frame of a video has a ground-truth annotation, prints the DAVIS semi-supervised J&F summary and writes
<output_dir>/scores.json. Differences from the reference: the scoring (the reference leaves it to
davis2017-evaluation); --score_only scores an existing output folder (e.g. the reference's); --temperature and
--short_side expose the reference's fixed 0.1 and 480; --video_list picks another list file; with no
--pretrained_weights the network is randomly initialised (the reference downloads its released weights).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from dino_jax import paths
from dino_jax.evaluation import cli


def get_args_parser():
    p = argparse.ArgumentParser("Evaluation with video object segmentation on DAVIS 2017 (dino_jax)")
    cli.add_model_flags(p, 16)
    p.add_argument("--output_dir", default=".", help="where the segmentations (and scores.json) go")
    p.add_argument("--data_path", default="/path/to/davis/", type=str,
                   help="DAVIS layout: ImageSets/2017/val.txt, JPEGImages/480p/<video>/, Annotations/480p/<video>/")
    p.add_argument("--n_last_frames", type=int, default=7, help="number of preceding frames in the context")
    p.add_argument("--size_mask_neighborhood", default=12, type=int,
                   help="restrict the source patches to this many rows/columns around each target patch (0 = all)")
    p.add_argument("--topk", type=int, default=5, help="accumulate labels from the top k neighbours")
    p.add_argument("--temperature", type=float, default=0.1, help="affinity exp(cos / T) (the reference fixes 0.1)")
    p.add_argument("--short_side", type=int, default=480, help="frames are resized to this short side")
    p.add_argument("--video_list", default="ImageSets/2017/val.txt", help="list of videos, relative to --data_path")
    p.add_argument("--bs", type=int, default=6, help="unused (the reference's flag; frames go one at a time)")
    p.add_argument("--score_only", action="store_true", help="only score the segmentations in --output_dir")
    return p


def read_video_list(args) -> list[str]:
    path = paths.join(args.data_path, args.video_list)
    if not paths.Path(path).is_file():
        sys.exit(f"{path}: no such file; --data_path must be a DAVIS folder with {args.video_list} "
                 "(one video name a line), JPEGImages/480p/ and Annotations/480p/")
    videos = [line.strip() for line in paths.Path(path).read_text().splitlines() if line.strip()]
    if not videos:
        sys.exit(f"{path} lists no videos")
    return videos


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from dino_jax.evaluation import images as imgs
    from dino_jax.evaluation import video_segmentation as vs

    if args.n_last_frames < 0 or args.topk < 1:
        sys.exit("--n_last_frames must be >= 0 and --topk >= 1")
    videos = read_video_list(args)
    if not args.score_only:
        model, params, _ = cli.load_backbone(args.pretrained_weights, args.checkpoint_key, args.arch,
                                                args.patch_size)
        for i, video in enumerate(videos):
            frame_dir = os.path.join(args.data_path, "JPEGImages", "480p", video)
            try:
                frames = [f for f in imgs.list_images(frame_dir) if f.endswith(".jpg")]
            except FileNotFoundError as e:
                sys.exit(f"video {video}: {e}")
            if not frames:
                sys.exit(f"{frame_dir} holds no .jpg frames")
            first = os.path.splitext(os.path.basename(frames[0]))[0] + ".png"
            annotation = os.path.join(args.data_path, "Annotations", "480p", video, first)
            print(f"[{i}/{len(videos)}] Begin to segment video {video} ({len(frames)} frames).", flush=True)
            t0 = time.time()
            try:
                vs.segment_video(model, params, frames, annotation, os.path.join(args.output_dir, video),
                                 n_last_frames=args.n_last_frames, size_mask_neighborhood=args.size_mask_neighborhood,
                                 topk=args.topk, temperature=args.temperature, short_side=args.short_side)
            except (OSError, ValueError) as e:
                sys.exit(f"video {video}: {e}")
            print(f"  {video}: {len(frames)} masks in {time.time() - t0:.1f}s", flush=True)
    try:
        scores = vs.score_results(args.data_path, args.output_dir, videos)
    except (OSError, ValueError) as e:
        if args.score_only:
            sys.exit(f"cannot score: {e}")
        print(f"not scored ({e})", flush=True)
        return None
    print(f"{'J&F-Mean':>9} {'J-Mean':>7} {'J-Recall':>8} {'F-Mean':>7} {'F-Recall':>8}")
    print(f"{scores['J&F-Mean']:9.3f} {scores['J-Mean']:7.3f} {scores['J-Recall']:8.3f} {scores['F-Mean']:7.3f} "
          f"{scores['F-Recall']:8.3f}")
    for name, s in scores["per_object"].items():
        print(f"  {name}: J {s['J']:.3f}  F {s['F']:.3f}")
    paths.write_json(paths.join(args.output_dir, "scores.json"), scores, indent=2)
    return scores


if __name__ == "__main__":
    main()
