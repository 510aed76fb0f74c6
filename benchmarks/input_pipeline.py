"""Throughput of the DINO training input pipeline from JPEG files (2x224 + 10x96 crops, the reference's multi-crop).

    python benchmarks/input_pipeline.py [--batch 32] [--batches 20] [--n_local 10]

Writes a few dozen JPEGs (scikit-image's bundled photos at several sizes) to a temporary ImageFolder, reads them
through `folder:` and `pipeline.train_iterator` (decode, augment, batch, global jax.Array) and prints a table; the
last line is `images_per_second_per_core=X`. On a shared machine other jobs lower the number: the table shows the
load average and the CPU time the hypervisor gave to other guests during the timed batches ("stolen").
"""
import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
from PIL import Image  # noqa: E402

from steal import stolen_cpu_seconds, stolen_share  # noqa: E402

from dino_jax import sharding  # noqa: E402
from dino_jax.data import configure_tensorflow, pipeline, sources  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
SIZES = (0.4, 0.6, 0.8, 1.0)  # fractions of each photo's size (ImageNet images are ~400x350 on average)


def write_jpegs(root: str) -> int:
    import skimage.data

    count = 0
    for i, name in enumerate(PHOTOS):
        photo = Image.fromarray(getattr(skimage.data, name)())
        folder = os.path.join(root, f"class{i % 2}")
        os.makedirs(folder, exist_ok=True)
        for f in SIZES:
            for flip in (False, True):
                im = photo.resize((int(photo.width * f), int(photo.height * f)), Image.BICUBIC)
                im = im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im
                im.save(os.path.join(folder, f"{name}_{f}_{int(flip)}.jpg"), quality=90)
                count += 1
    return count


def main():
    configure_tensorflow()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="timed batches, after 3 warm-up batches")
    parser.add_argument("--n_local", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        n_files = write_jpegs(root)
        source = sources.load_source(f"folder:{root}")
        it = pipeline.train_iterator(source, global_batch=args.batch, seed=0,
                                     sharding=sharding.batch_sharding(sharding.make_mesh(jax.devices()[:1])),
                                     local_crops_number=args.n_local)
        for _ in range(3):
            jax.block_until_ready(next(it))
        t0, c0, s0 = time.time(), time.process_time(), stolen_cpu_seconds()
        for _ in range(args.batches):
            batch = jax.block_until_ready(next(it))
        wall, cpu = time.time() - t0, time.process_time() - c0
        stolen = stolen_share(s0, wall)
    images = args.batch * args.batches
    rate = images / wall
    cores = os.cpu_count()
    print(f"{'JPEG files':<28}{n_files}")
    print(f"{'crops per image':<28}2x{batch['global'].shape[2]} + {args.n_local}x{batch['local'].shape[2]}")
    print(f"{'images timed':<28}{images} ({args.batches} batches of {args.batch})")
    print(f"{'wall seconds':<28}{wall:.2f}")
    print(f"{'process CPU seconds':<28}{cpu:.2f} ({cpu / wall:.2f} cores busy)")
    print(f"{'images/s':<28}{rate:.1f}")
    print(f"{'images per CPU-second':<28}{images / cpu:.1f} (what one free core would do)")
    print(f"{'crops/s':<28}{rate * (2 + args.n_local):.0f}")
    print(f"{'load average (1 min)':<28}{os.getloadavg()[0]:.2f} on {cores} cores")
    print(f"{'CPU stolen by the host':<28}{stolen} (other guests of a shared VM host)")
    print(f"images_per_second_per_core={rate / cores:.1f}")


if __name__ == "__main__":
    main()
