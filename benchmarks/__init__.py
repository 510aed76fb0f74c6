"""Benchmarks. The step-timing harness runs as a module from the repository root (`python -m benchmarks.train_step`)
so that it imports dino_jax and the tests' PyTorch reference (`tests.torch_reference`) as packages."""
