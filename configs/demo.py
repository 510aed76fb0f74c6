"""CPU demo: a tiny ViT learns the built-in procedural `demo` dataset in minutes on 2 CPU cores.

Values that differ from the reference recipe (configs/vits16.py), and why (measured on a 2-core CPU):
(filled in by the tuning runs)
"""
from dino_jax.config import base_config


def get_config():
    c = base_config()
    c.dataset = "demo:train"
    c.eval_train_dataset, c.eval_dataset = "demo:train:2000", "demo:val"
    c.grayscale_input = True
    c.arch, c.embed_dim, c.depth, c.num_heads, c.patch_size = "vit_custom", 192, 4, 3, 8
    c.drop_path_rate = 0.0
    c.global_crop_size, c.local_crop_size, c.local_crops_number = 32, 16, 4
    c.blur_sigma = (0.1, 0.5)
    c.out_dim, c.norm_last_layer, c.head_hidden_dim, c.head_bottleneck_dim = 1024, False, 1024, 256
    c.momentum_teacher, c.teacher_temp, c.warmup_teacher_temp = 0.99, 0.04, 0.04
    c.batch_size, c.epochs, c.warmup_epochs, c.lr = 64, 12, 1, 2e-3
    c.eval_every_epochs, c.eval_resize_size, c.eval_crop_size, c.eval_batch_size = 2, 32, 32, 250
    c.log_every_steps, c.checkpoint_every_steps, c.keep_every_epochs = 50, 500, 1000
    return c.lock()
