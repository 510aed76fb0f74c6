"""A package, so that code outside the tests imports the PyTorch reference as `tests.torch_reference` (the
train-step benchmark does). The tests themselves import their helpers as top-level modules: conftest.py puts this
folder on sys.path."""
