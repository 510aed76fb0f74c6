"""ViT-S/16 with the reference's `main_dino.py` defaults (the "vanilla" run of the reference README).

Reference result for this recipe (100 epochs, 2x224 + 8x96 crops, 8 GPUs x 64 = batch 512, 1.75 days on V100s):
69.3% k-NN / 74.0% linear on ImageNet. The released ViT-S/16 (74.5 k-NN / 77.0 linear) used 800 epochs,
global scale (0.25, 1), local scale (0.05, 0.25) and 10 local crops; `--config=configs/vits16.py:release`
selects those. The reference's "boosted" run (300 epochs, teacher_temp 0.04->0.07 over 30 epochs,
norm_last_layer False, batch 1024; 73.3 / 76.0, 2.6 days on 16 V100s) is `:boosted`.
"""
from dino_jax.config import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.arch, c.patch_size = "vit_small", 16
    c.batch_size = 512
    if variant == "boosted":
        c.batch_size, c.epochs = 1024, 300
        c.teacher_temp, c.warmup_teacher_temp_epochs, c.norm_last_layer = 0.07, 30, False
    elif variant == "release":
        c.batch_size, c.epochs = 1024, 800
        c.global_crops_scale, c.local_crops_scale, c.local_crops_number = (0.25, 1.0), (0.05, 0.25), 10
    elif variant:
        raise ValueError(f"unknown variant {variant!r} for vits16.py; use '', 'boosted' or 'release'")
    return c.lock()
