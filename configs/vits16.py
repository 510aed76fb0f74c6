"""ViT-S/16. `configs/vits16.py` is the reference README's "vanilla" run, `:boosted` its boosted run, `:release`
our best guess at the released model's recipe.

Confirmed (reference README): '' = `main_dino.py --arch vit_small` with every other argument at its default on
8 GPUs x 64 images (batch 512, 100 epochs, 2x224 + 8x96 crops): 69.3% k-NN / 74.0% linear, 1.75 days on V100s.
`:boosted` = `--epochs 300 --teacher_temp 0.07 --warmup_teacher_temp_epochs 30 --norm_last_layer false` on
2 nodes x 8 GPUs x 64 (batch 1024): 73.3% / 76.0%, 2.6 days on 16 V100s.
Not confirmed: `:release` (the released ViT-S/16, 74.5% / 77.0%). Its args.txt is not reachable offline; 800
epochs, global crop scale (0.25, 1), local (0.05, 0.25) and 10 local crops are a third party's quote of it, the
batch of 1024 is assumed, and every other value keeps the reference default.
"""
from dino_jax.config import base_config, check_variant


def get_config(variant: str = ""):
    check_variant("configs/vits16.py", variant, ("", "boosted", "release"))
    c = base_config()
    c.arch, c.patch_size = "vit_small", 16
    c.batch_size = 512
    if variant == "boosted":
        c.batch_size, c.epochs = 1024, 300
        c.teacher_temp, c.warmup_teacher_temp_epochs, c.norm_last_layer = 0.07, 30, False
    elif variant == "release":
        c.batch_size, c.epochs = 1024, 800
        c.global_crops_scale, c.local_crops_scale, c.local_crops_number = (0.25, 1.0), (0.05, 0.25), 10
    return c.lock()
