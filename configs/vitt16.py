"""ViT-Ti/16 (vit_tiny: 192 wide, 3 heads) on the reference defaults.

The reference publishes no ViT-Ti DINO number. It is the cheapest real-size model: useful to check a TPU/GPU
setup end to end before paying for ViT-S. Expect well below ViT-S/16's 69.3% k-NN at 100 epochs.
"""
from dino_jax.config import base_config


def get_config():
    c = base_config()
    c.arch, c.patch_size = "vit_tiny", 16
    c.batch_size = 512
    return c.lock()
