"""ViT-S/8: the released model reaches 78.3% k-NN / 79.7% linear on ImageNet (reference README).

Confirmed by the maintainer (reference issue #104, not the README): 800 epochs at 16 images per GPU on 64
V100-32GB (batch 1024), fp16 off (dino_jax computes in float32 by default).
Not confirmed: the crops (global (0.25, 1), local (0.05, 0.25), 10 local crops) are assumed to be the released
ViT-S/16's; the args.txt is not reachable offline, and every other value keeps the reference default.
"""
from dino_jax.config import base_config, check_variant


def get_config(variant: str = ""):
    check_variant("configs/vits8.py", variant, ("",))
    c = base_config()
    c.arch, c.patch_size = "vit_small", 8
    c.batch_size, c.epochs = 1024, 800
    c.global_crops_scale, c.local_crops_scale, c.local_crops_number = (0.25, 1.0), (0.05, 0.25), 10
    return c.lock()
