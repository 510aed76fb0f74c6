"""ViT-Ti/16 (vit_tiny: 192 wide, 3 heads) on the reference defaults at batch 512 (8 GPUs x 64).

The reference publishes no ViT-Ti DINO recipe or number, so nothing here is confirmed beyond the defaults of
`main_dino.py`. It is the cheapest real-size model: useful to check a TPU/GPU setup end to end before paying for
ViT-S. Expect well below ViT-S/16's 69.3% k-NN at 100 epochs.
"""
from dino_jax.config import base_config, check_variant


def get_config(variant: str = ""):
    check_variant("configs/vitt16.py", variant, ("",))
    c = base_config()
    c.arch, c.patch_size = "vit_tiny", 16
    c.batch_size = 512
    return c.lock()
