"""ViT-B/8: the released model reaches 77.4% k-NN / 80.1% linear on ImageNet.

Its exact recipe was not published in the repository; this mirrors ViT-B/16's known settings with patch 8 (the
most expensive released model: /8 has 4x the tokens of /16). float32 compute, as recommended for /8.
"""
from dino_jax.config import base_config


def get_config():
    c = base_config()
    c.arch, c.patch_size = "vit_base", 8
    c.batch_size, c.epochs = 1024, 300
    c.teacher_temp, c.warmup_teacher_temp_epochs = 0.07, 50
    c.freeze_last_layer = 3
    c.global_crops_scale, c.local_crops_scale, c.local_crops_number = (0.25, 1.0), (0.05, 0.25), 10
    return c.lock()
