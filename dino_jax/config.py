"""The reference's `main_dino.py` defaults as one ml_collections config; every recipe in configs/ starts here.

Names follow the reference's command-line arguments, so `--config.lr=...` means what `--lr` means there.
Differences: `batch_size` is the GLOBAL batch (the reference's batch_size_per_gpu times the GPU count), and the
dataset is a spec string (`tfds:NAME[:split]`, `folder:PATH` or `demo`).
"""
import ml_collections


def base_config():
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
    c.attention_images = 4
    c.attention_threshold = 0.6

    # Logging and checkpoints.
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_every_epochs = 20  # the reference's saveckp_freq
    c.max_checkpoints = 3
    return c
