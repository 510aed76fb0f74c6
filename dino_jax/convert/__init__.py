"""PyTorch <-> Flax checkpoints: the reference's .pth files (backbone-only and full training checkpoints) to dino_jax
parameters and TrainStates, and back.

    keymap           the table pairing each reference state-dict key with its Flax path and layout change
    state_dict       torch_to_flax / flax_to_torch for backbones and heads
    full_checkpoint  reference full checkpoints (optimizer moments, center, args) <-> TrainState
    files            .pth reading, and load_pretrained for a .pth or a dino_jax workdir
    workdir          a .pth into a dino_jax workdir and back
    cli              python -m dino_jax.convert (imported by nothing else)

CLI:
    python -m dino_jax.convert --input dino_deitsmall16_pretrain.pth --output WORKDIR [--checkpoint_key teacher]
    python -m dino_jax.convert --to_torch --input WORKDIR --output teacher.pth [--full]
"""
from dino_jax.convert.files import is_full_checkpoint, load_pretrained, load_torch_file
from dino_jax.convert.full_checkpoint import (
    config_from_reference, infer_steps_per_epoch, reference_args, reference_checkpoint_to_state,
    state_to_reference_checkpoint,
)
from dino_jax.convert.keymap import StateDictMismatchError
from dino_jax.convert.state_dict import flax_to_torch, infer_model_config, torch_to_flax
from dino_jax.convert.workdir import torch_file_to_workdir, workdir_to_torch_file

__all__ = ["StateDictMismatchError", "config_from_reference", "flax_to_torch", "infer_model_config",
           "infer_steps_per_epoch", "is_full_checkpoint", "load_pretrained", "load_torch_file",
           "reference_args", "reference_checkpoint_to_state", "state_to_reference_checkpoint", "torch_file_to_workdir",
           "torch_to_flax", "workdir_to_torch_file"]
