"""A tiny config file for end-to-end runs of `python -m dino_jax.main` in tests/test_reliability.py.

`--config=tests/reliability_config.py` gives the 2-block 32-px ViT of conftest.tiny_config on 64 demo images:
8 steps per epoch, 2 epochs, no periodic evaluation. Override anything with --config.KEY=VALUE.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_config  # noqa: E402


def get_config():
    c = tiny_config(dataset="demo:train:64", batch_size=8, epochs=2, warmup_epochs=1, drop_path_rate=0.0,
                    log_every_steps=1, checkpoint_every_steps=4, max_checkpoints=2, keep_every_epochs=0,
                    eval_every_epochs=0)
    return c
