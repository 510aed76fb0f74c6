"""Shared by the retrieval, copy-detection and video-segmentation tests: a tiny reference-layout ViT file and a
CLI runner, so each CLI test loads real (if random) weights through --pretrained_weights in about a second."""
import os
import subprocess
import sys

import numpy as np


def tiny_reference_vit(path, patch_size=8, seed=0):
    """Save a 2-block, 64-d (1 head) reference ViT's state dict to `path`; return the torch module (eval mode)."""
    import torch

    import torch_reference as ref

    torch.manual_seed(seed)
    net = ref.VisionTransformer(img_size=32, patch_size=patch_size, embed_dim=64, depth=2, num_heads=1).eval()
    torch.save(net.state_dict(), path)
    return net


def torch_input(image):
    """A normalised (H, W, 3) numpy image as the (1, 3, H, W) torch tensor the reference feeds its ViT."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, np.float32).transpose(2, 0, 1)[None]))


def run_cli(module, *args):
    """Run `python -m module args` on the CPU; return its stdout (the test fails with its output otherwise)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    res = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout
