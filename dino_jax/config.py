"""The reference's `main_dino.py` defaults as one ml_collections config; every recipe in configs/ starts here.

Names follow the reference's command-line arguments, so `--config.lr=...` means what `--lr` means there.
Differences: `batch_size` is the GLOBAL batch (the reference's batch_size_per_gpu times the GPU count), and the
dataset is a spec string (`tfds:NAME[:split]`, `folder:PATH` or `demo`).
"""
from __future__ import annotations

import ml_collections


def base_config():
    """Every key a run reads, locked: a recipe or override that names a key not here is an error, not a new key."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Model.
    c.arch = "vit_small"  # vit_tiny | vit_small | vit_base | vit_custom (then embed_dim, depth, num_heads)
    c.embed_dim = 384
    c.depth = 12
    c.num_heads = 6
    c.patch_size = 16
    c.drop_path_rate = 0.1
    c.pos_embed_interp = "offset"  # 'offset' = current reference code (+0.1); 'exact' = released checkpoints
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params, LayerNorm, softmax and loss stay float32)
    c.attention = "einsum"  # einsum | dot_product_attention (fused kernels where the backend has them)
    c.remat = False
    # Independent backbone calls per crop size (same maths). 2 was ~10 % faster in in-process A/B runs on a
    # 2-core CPU but not in benchmarks/train_step.py, so 1 (benchmarks/README.md).
    c.backbone_chunks = 1

    # Head.
    c.out_dim = 65536
    c.norm_last_layer = True
    c.use_bn_in_head = False
    c.head_nlayers = 3
    c.head_hidden_dim = 2048
    c.head_bottleneck_dim = 256

    # Teacher and loss.
    c.momentum_teacher = 0.996
    c.warmup_teacher_temp = 0.04
    c.teacher_temp = 0.04
    c.warmup_teacher_temp_epochs = 0
    c.student_temp = 0.1
    c.center_momentum = 0.9

    # Optimisation.
    c.optimizer = "adamw"  # adamw | sgd | lars
    c.batch_size = 1024  # global; the reference's 64 per GPU on 16 GPUs
    c.epochs = 100
    c.stop_after_epochs = 0  # >0: train only the first N epochs of the `epochs` schedule (rerun with 0 to finish)
    c.lr = 0.0005  # per 256 images (linear scaling rule on the global batch)
    c.min_lr = 1e-6
    c.warmup_epochs = 10
    c.weight_decay = 0.04
    c.weight_decay_end = 0.4
    c.clip_grad = 3.0
    c.freeze_last_layer = 1
    c.skip_nonfinite_steps = False  # False: stop on a NaN/Inf step; True: skip isolated bad steps (logged)

    # Data and augmentation.
    c.dataset = "tfds:imagenet2012:train"
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.global_crop_size = 224
    c.local_crop_size = 96
    c.global_crops_scale = (0.4, 1.0)
    c.local_crops_scale = (0.05, 0.4)
    c.local_crops_number = 8
    c.blur_sigma = (0.1, 2.0)  # Gaussian blur sigma range, in pixels of the crop
    c.grayscale_input = False  # demo only: convert every image to grey before augmenting

    # Evaluation during training (k-NN on a labelled split and attention maps).
    c.eval_every_epochs = 10
    c.eval_train_dataset = ml_collections.config_dict.placeholder(str)  # k-NN bank, e.g. tfds:imagenet2012:train
    c.eval_dataset = ml_collections.config_dict.placeholder(str)  # k-NN queries, e.g. tfds:imagenet2012:validation
    c.eval_resize_size = 256
    c.eval_crop_size = 224
    c.eval_batch_size = 256
    c.eval_max_train_examples = 0  # 0 = the whole bank
    c.nb_knn = (10, 20, 100, 200)
    c.knn_temperature = 0.07
    c.attention_images = 4  # validation images in the attention picture after each evaluation (0: no picture)
    c.attention_threshold = 0.6

    # Logging and checkpoints.
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_every_epochs = 20  # the reference's saveckp_freq
    c.max_checkpoints = 3
    # Keys (comma-separated) allowed to differ from the checkpoint's config when resuming, e.g. "lr,seed"; see
    # RESUME_SAFE / RESUME_REFUSED below for the keys that never need it / can never change.
    c.allow_resume_changes = ""
    return c.lock()


class UnknownVariant(LookupError):
    """configs/NAME.py:VARIANT names no variant of that recipe; main.py prints the message alone. A LookupError,
    because ml_collections turns a ValueError from get_config into a multi-line flag error with a traceback."""


def check_variant(recipe: str, variant: str, variants: tuple) -> str:
    """`variant` when it is one of `variants` ('' = the recipe itself), else UnknownVariant naming the valid ones."""
    if variant not in variants:
        valid = ", ".join(f"{recipe}:{v}" if v else recipe for v in variants)
        raise UnknownVariant(f"{recipe} has no variant {variant!r}; use one of: {valid}")
    return variant


# Resuming from a checkpoint with a changed config (train._check_resumable): these keys change what the saved arrays
# mean or where the run is in its schedules, so a change is refused ...
RESUME_REFUSED = frozenset({
    "arch", "embed_dim", "depth", "num_heads", "patch_size", "out_dim", "norm_last_layer", "use_bn_in_head",
    "head_nlayers", "head_hidden_dim", "head_bottleneck_dim", "optimizer", "epochs", "batch_size", "dataset"})
# ... these change nothing in the saved state, its schedules or the data order, so a change is fine ...
RESUME_SAFE = frozenset({
    "stop_after_epochs", "data_dir", "attention", "remat", "backbone_chunks", "skip_nonfinite_steps",
    "eval_every_epochs", "eval_train_dataset", "eval_dataset", "eval_resize_size", "eval_crop_size",
    "eval_batch_size", "eval_max_train_examples", "nb_knn", "knn_temperature", "attention_images",
    "attention_threshold", "log_every_steps", "checkpoint_every_steps", "keep_every_epochs", "max_checkpoints",
    "allow_resume_changes"})
# ... and every other key (lr, seed, schedules' values, augmentation, ...) changes the course of the run: allowed
# only when listed in allow_resume_changes, and logged.


class UserError(ValueError):
    """A mistake in the command (config, workdir, data, checkpoint): main.py prints the message alone, no traceback."""


def validate(c) -> None:
    """Raise UserError naming the first invalid value: run before any data, model or workdir work."""
    from dino_jax.models.vit import ARCHS

    def bad(key, why):
        raise UserError(f"--config.{key}={c[key]!r}: {why}")

    choices = {"optimizer": ("adamw", "sgd", "lars"), "dtype": ("float32", "bfloat16"),
               "attention": ("einsum", "dot_product_attention"), "pos_embed_interp": ("offset", "exact"),
               "arch": (*sorted(ARCHS), "vit_custom")}
    for key, allowed in choices.items():
        if c[key] not in allowed:
            bad(key, f"unknown value; use one of {', '.join(allowed)}")
    for key in ("batch_size", "epochs", "patch_size", "log_every_steps", "checkpoint_every_steps", "out_dim"):
        if not isinstance(c[key], int) or c[key] < 1:
            bad(key, "must be a whole number >= 1")
    for key in ("stop_after_epochs", "warmup_epochs", "local_crops_number", "keep_every_epochs", "eval_every_epochs",
                "attention_images"):
        if not isinstance(c[key], int) or c[key] < 0:
            bad(key, "must be a whole number >= 0")
    if c.warmup_epochs > c.epochs:
        bad("warmup_epochs", f"longer than the run (epochs={c.epochs})")
    for key in ("global_crop_size", "local_crop_size"):
        if c[key] < c.patch_size or c[key] % c.patch_size:
            bad(key, f"must be a multiple of patch_size={c.patch_size} (the ViT cuts crops into whole patches)")
    for key in ("global_crops_scale", "local_crops_scale"):
        lo, hi = c[key]
        if not 0 < lo <= hi <= 1:
            bad(key, "must be (min, max) with 0 < min <= max <= 1 (fractions of the image area)")
    for key in ("dataset", "eval_train_dataset", "eval_dataset"):
        if c[key] or key == "dataset":
            problem = dataset_spec_problem(c[key])
            if problem:
                bad(key, problem)
    unknown = [k for k in allowed_resume_changes(c) if k not in c]
    if unknown:
        bad("allow_resume_changes", f"no config key called {', '.join(map(repr, unknown))}")


def allowed_resume_changes(c) -> list:
    return [k.strip() for k in (c.allow_resume_changes or "").split(",") if k.strip()]


def dataset_spec_problem(spec) -> str | None:
    """What is wrong with a dataset spec string (see data.sources.load_source), or None."""
    if not isinstance(spec, str):
        return "a dataset spec is a string: tfds:NAME[:SPLIT], folder:PATH or demo[:SPLIT][:N]"
    kind, _, rest = spec.partition(":")
    if kind == "tfds" and not rest.partition(":")[0]:
        return "expected tfds:NAME[:SPLIT], e.g. tfds:imagenet2012:train"
    if kind == "folder" and not rest:
        return "expected folder:PATH with PATH/<class>/<image files>"
    if kind == "demo":
        parts = rest.split(":") if rest else []
        if len(parts) > 2 or (parts and parts[0] not in ("train", "val")) or (
                len(parts) == 2 and not (parts[1].isdigit() and int(parts[1]) > 0)):
            return "expected demo[:SPLIT][:N] with SPLIT train or val and N a number of examples >= 1"
        return None
    if kind not in ("tfds", "folder"):
        return f"unknown kind {kind!r}; use tfds:NAME[:SPLIT], folder:PATH or demo[:SPLIT][:N]"
    return None
