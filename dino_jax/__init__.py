"""DINO self-supervised Vision Transformers in JAX/Flax."""
