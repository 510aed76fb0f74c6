"""The parts of `python -m benchmarks.train_step`: analytic FLOPs and peaks (flops), the trainer's jitted step on
synthetic batches (jax_step), the PyTorch reference step on the same shapes (torch_step) and the table (report)."""
