"""Draw the README's demo pictures from a training run's workdir.

    python scripts/demo_pictures.py --workdir /tmp/dino_demo [--out docs/images]

Writes demo_knn.png (the teacher's k-NN top-1 and attention Jaccard at each evaluation, from metrics.jsonl, with
the random-init values from summary.json, or the latest checkpoint's, at epoch 0) and demo_attention.png (the
trainer's attention PNGs at random init and at the last evaluation, side by side).
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os

import matplotlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_small(fig, path: str, dpi: int = 80):
    """A PNG with a 128-colour palette: a fraction of the size of a full-colour one, for a file kept in git."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    Image.open(buffer).convert("RGB").quantize(128).save(path, optimize=True)


def read_summary(workdir: str) -> dict:
    """summary.json of a finished run; for a run still training, the summary in its latest checkpoint."""
    path = os.path.join(workdir, "summary.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    from dino_jax import checkpoint

    return checkpoint.Checkpointer(workdir).restore_meta()["summary"]


def read_run(workdir: str):
    """(epochs, k-NN top-1, Jaccard) at init and at each evaluation of the run."""
    summary = read_summary(workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    spe = next((r["step"] / r["epoch"] for r in rows if r.get("epoch")), None)
    evals = [r for r in rows if "knn_top1" in r]
    if spe is None or not evals:
        raise SystemExit(f"{workdir}/metrics.jsonl has no evaluation rows; train with an eval dataset first")
    epochs = [0.0] + [r["step"] / spe for r in evals]
    knn = [summary["knn_top1_random_init"]] + [r["knn_top1"] for r in evals]
    jaccard = [summary.get("attention_jaccard_random_init")] + [r.get("attention_jaccard") for r in evals]
    return epochs, knn, jaccard


def draw_curves(workdir: str, path: str):
    epochs, knn, jaccard = read_run(workdir)
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.0, 2.4))
    left.plot(epochs, knn, "o-", color="tab:blue")
    left.axhline(10, color="grey", linestyle=":", linewidth=1)
    left.set(xlabel="epoch", ylabel="teacher 20-NN top-1 (%)", title="k-NN on demo:val (chance 10 %)")
    if all(j is not None for j in jaccard):
        right.plot(epochs, jaccard, "o-", color="tab:orange")
    right.set(xlabel="epoch", ylabel="Jaccard", title="attention vs object masks")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(9)
    fig.tight_layout()
    save_small(fig, path)


def draw_attention(workdir: str, path: str):
    pngs = sorted(glob.glob(os.path.join(workdir, "attention", "epoch*.png")))
    init = os.path.join(workdir, "attention", "init.png")
    if not pngs or not os.path.isfile(init):
        raise SystemExit(f"{workdir}/attention needs init.png and at least one epochNNNN.png")
    last = pngs[-1]
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.6))
    for ax, png, title in ((axes[0], init, "random init"),
                           (axes[1], last, f"after epoch {int(os.path.basename(last)[5:9])}")):
        ax.imshow(plt.imread(png))
        ax.set_axis_off()
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_small(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a run of python -m dino_jax.main")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "images"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    draw_curves(args.workdir, os.path.join(args.out, "demo_knn.png"))
    draw_attention(args.workdir, os.path.join(args.out, "demo_attention.png"))
    print(f"wrote {args.out}/demo_knn.png and {args.out}/demo_attention.png")


if __name__ == "__main__":
    main()
