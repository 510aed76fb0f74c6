"""What the three notebooks share: TensorFlow and logging set up as `python -m dino_jax.main` has them, the one
demo run they all use, and a figure display that works after training has switched matplotlib to Agg.

Importing it does the setup. The notebooks import it from colab/ (the kernel's working folder, or the clone's
colab/ in Colab), so it is not part of the installed package.
"""
import importlib.util
import io
import logging
import os
import pathlib
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ start-up chatter

import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from IPython.display import Image, display  # noqa: E402

from dino_jax import train  # noqa: E402
from dino_jax.data import configure_tensorflow  # noqa: E402
from dino_jax.evaluation import cli  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICK = os.environ.get("DINO_JAX_QUICK") == "1"  # CI: tiny splits and a few steps (the numbers then mean nothing)
DEMO_WORKDIR = os.environ.get("DINO_JAX_WORKDIR") or os.path.join(
    tempfile.gettempdir(), "dino_jax_demo_quick" if QUICK else "dino_jax_demo")

configure_tensorflow()  # no GPUs for TF, one intra-op thread


class _TrainerLines(logging.Filter):
    """dino_jax's log lines without its config dump, and other libraries' errors; not orbax's per-checkpoint notes."""

    def filter(self, record):
        if "dino_jax" in record.pathname:
            return not str(record.msg).startswith("config:")
        return record.levelno >= logging.ERROR or (record.levelno >= logging.WARNING and "orbax" not in record.pathname)


_absl_logger = logging.getLogger("absl")  # dino_jax and orbax log through absl.logging
_absl_logger.setLevel(logging.INFO)
if not any(isinstance(f, _TrainerLines) for f in _absl_logger.filters):
    _absl_logger.addFilter(_TrainerLines())
print(f"jax {jax.__version__}, devices {jax.devices()}; quick mode: {QUICK}; demo workdir: {DEMO_WORKDIR}")


def show(fig, dpi=80):
    """Display a figure as a PNG and close it: plt.show() shows nothing once training's PNG writers chose Agg."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    display(Image(data=buffer.getvalue()))


def demo_config():
    """configs/demo.py as it is in the checkout (not part of the package), shrunk for CI when DINO_JAX_QUICK=1."""
    spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()  # locked: existing keys can be set, new keys cannot
    if QUICK:
        config.dataset, config.batch_size, config.epochs = "demo:train:256", 32, 1
        config.warmup_epochs = min(config.warmup_epochs, config.epochs)
        config.eval_train_dataset, config.eval_dataset = "demo:train:256", "demo:val:128"
        config.eval_every_epochs, config.eval_batch_size, config.log_every_steps = 1, 128, 4
    return config


def demo_workdir():
    """The finished demo run that train_demo.ipynb writes; trained here first when it is missing, so that any
    notebook can run alone (summary.json is the trainer's last file)."""
    if not os.path.isfile(os.path.join(DEMO_WORKDIR, "summary.json")):
        print(f"no finished demo run in {DEMO_WORKDIR}: training one now (what train_demo.ipynb does)")
        train.train_and_evaluate(demo_config(), DEMO_WORKDIR)
    return DEMO_WORKDIR


def load_images(source, resize_size, crop_size, batch_size=250):
    """Every example of `source` as the evaluation preprocesses it: {"image": (N, S, S, 3), "label": (N,), ...}."""
    parts = {}
    for batch in cli.eval_batches(source, batch_size, resize_size, crop_size):
        valid = np.asarray(batch["valid"])
        for key in ("image", "label", "mask"):
            if key in batch:
                parts.setdefault(key, []).append(np.asarray(batch[key])[valid])
    return {key: np.concatenate(arrays) for key, arrays in parts.items()}
