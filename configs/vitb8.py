"""ViT-B/8: the released model reaches 77.4% k-NN / 80.1% linear on ImageNet (reference README).

Not confirmed: its recipe was not published and its args.txt is not reachable offline. This mirrors ViT-B/16's
quoted settings (teacher temperature 0.04 -> 0.07 over 50 epochs, freeze_last_layer 3, crops (0.25, 1) /
(0.05, 0.25) x 10) with patch 8, batch 1024 and 300 epochs (our choices); float32 compute, as the maintainer
recommends for /8 models.
"""
from dino_jax.config import base_config, check_variant


def get_config(variant: str = ""):
    check_variant("configs/vitb8.py", variant, ("",))
    c = base_config()
    c.arch, c.patch_size = "vit_base", 8
    c.batch_size, c.epochs = 1024, 300
    c.teacher_temp, c.warmup_teacher_temp_epochs = 0.07, 50
    c.freeze_last_layer = 3
    c.global_crops_scale, c.local_crops_scale, c.local_crops_number = (0.25, 1.0), (0.05, 0.25), 10
    return c.lock()
