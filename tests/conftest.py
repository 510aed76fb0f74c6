"""Shared test helpers: tiny configs so every test compiles in seconds on a 2-core CPU."""
import collections
import os
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NO_SKIPS = ("this project's tests never skip: a missing test dependency is an install error "
            "(pip install -e '.[test]'), and a test that cannot run here fails")


def _fail_if_skipped(report):
    """A skipped test or module is reported as failed, so that a broken install cannot turn claims into skips."""
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome, report.longrepr = "failed", f"{reason}\n{NO_SKIPS}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    _fail_if_skipped((yield).get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    _fail_if_skipped((yield).get_result())


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (setup.cfg): one worker per core, at most 4 (each end-to-end test starts 8-device XLA processes)."""
    return max(1, min(4, os.cpu_count() or 1))


def pytest_collection_modifyitems(items):
    """Modules with the most end-to-end (`slow`) tests first, in-module order kept.

    pytest-xdist hands whole files to its workers in this order (`--dist loadfile`), so the longest files start at
    once and the short ones fill the gaps, instead of a long file starting last and running alone.
    """
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


def tiny_config(**overrides):
    """A reference-default config shrunk to a 2-block ViT at 32 px with a small head."""
    from dino_jax.config import base_config

    c = base_config()
    c.arch, c.embed_dim, c.depth, c.num_heads, c.patch_size = "vit_custom", 48, 2, 2, 8
    c.global_crop_size, c.local_crop_size, c.local_crops_number = 32, 16, 2
    c.out_dim, c.head_hidden_dim, c.head_bottleneck_dim = 64, 32, 16
    c.batch_size, c.epochs, c.warmup_epochs = 8, 2, 1
    c.dataset = "demo"
    for k, v in overrides.items():
        c[k] = v
    return c


@pytest.fixture
def tiny():
    return tiny_config


def load_recipe(path):
    """The module of a recipe file such as configs/demo.py (relative to the repository root, or absolute)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe", os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def max_relative_error(a, b) -> float:
    """Largest per-tensor max|a-b| / max|a| over two pytrees (or dicts) of arrays with the same structure.

    The attention key bias is left out: its gradient is exactly zero in exact arithmetic (softmax ignores a shift
    shared by all keys), so Adam turns rounding noise into tiny updates that differ between any two correct
    implementations and that have no effect on any output.
    """
    import jax
    import numpy as np

    worst = 0.0
    leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
    leaves_b = jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b), (len(leaves_a), len(leaves_b))
    for (path, x), y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, (jax.tree_util.keystr(path), x.shape, y.shape)
        name = jax.tree_util.keystr(path)
        if "qkv" in name and "bias" in name:
            third = x.shape[-1] // 3
            keep = np.r_[0:third, 2 * third:3 * third]
            x, y = x[..., keep], y[..., keep]
        scale = np.abs(x).max()
        if scale > 0:
            worst = max(worst, float(np.abs(x - y).max() / scale))
        else:
            worst = max(worst, float(np.abs(y).max()))
    return worst
