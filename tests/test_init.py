"""The JAX initialisation draws every kind of parameter from the reference's distribution.

Each kind (the ViT's normal(0.02) Linears, zero biases, the patch conv's PyTorch-default uniform, LayerNorm and
BatchNorm, cls_token, pos_embed, the head's Linears, weight_v and weight_g) is pooled over the model and compared
with the torch reference's own init (tests/torch_reference.py, seeded): constants must be equal, random draws
must pass a two-sample Kolmogorov-Smirnov test and agree in mean and standard deviation.
"""
import jax
import numpy as np
import pytest
import torch
from scipy import stats

import torch_reference as R
from conftest import tiny_config
from dino_jax import convert, dino


def kind(path) -> str:
    names = [k.key for k in path]
    if names[-1] in ("cls_token", "pos_embed", "weight_v", "weight_g"):
        return names[-1]
    if names[-2] == "patch_embed":
        return f"patch_embed.{names[-1]}"
    if names[-2].startswith(("norm", "bn_")):
        return f"{names[-2].rstrip('_0123456789')}.{names[-1]}"
    return f"{names[0]}.linear.{names[-1]}"


def pooled(params) -> dict:
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        out.setdefault(kind(path), []).append(np.asarray(x, np.float64).ravel())
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def inits():
    """A ViT-Ti-wide 2-block model with a 4096-prototype head, initialised by each side from seed 0."""
    c = tiny_config(embed_dim=192, num_heads=3, patch_size=16, global_crop_size=64, out_dim=4096,
                    head_hidden_dim=256, head_bottleneck_dim=64, use_bn_in_head=True, norm_last_layer=False)
    model = dino.build_model(c)
    ours = jax.jit(lambda k: model.init(k, c.global_crop_size))(jax.random.PRNGKey(0))
    torch.manual_seed(0)
    student, _ = R.build_student_teacher(
        lambda patch_size, **kw: R.VisionTransformer(patch_size=patch_size, **kw), c.patch_size, c.out_dim,
        use_bn_in_head=True, norm_last_layer=False,
        backbone_kwargs=dict(img_size=c.global_crop_size, embed_dim=c.embed_dim, depth=c.depth,
                             num_heads=c.num_heads),
        head_kwargs=dict(hidden_dim=c.head_hidden_dim, bottleneck_dim=c.head_bottleneck_dim))
    theirs = convert.torch_to_flax(student.state_dict(), norm_last_layer=False)
    return pooled(ours), pooled(theirs)


KINDS = ["backbone.linear.kernel", "backbone.linear.bias", "head.linear.kernel", "head.linear.bias",
         "patch_embed.kernel", "patch_embed.bias", "norm.scale", "norm.bias", "bn.scale", "bn.bias", "cls_token",
         "pos_embed", "weight_v", "weight_g"]


def test_every_parameter_kind_is_covered(inits):
    ours, theirs = inits
    assert sorted(ours) == sorted(theirs) == sorted(KINDS)


@pytest.mark.parametrize("name", KINDS)
def test_init_matches_reference_distribution(inits, name):
    ours, theirs = inits[0][name], inits[1][name]
    if np.all(theirs == theirs[0]):  # a constant init (zeros, ones)
        np.testing.assert_array_equal(ours, theirs)
        return
    ks = stats.ks_2samp(ours, theirs)
    n, sd = len(ours), theirs.std()
    print(f"{name}: n={n}, mean {ours.mean():+.2e} vs {theirs.mean():+.2e}, std {ours.std():.4e} vs {sd:.4e}, "
          f"KS p={ks.pvalue:.3f}")
    assert ks.pvalue > 1e-3, ks
    assert abs(ours.mean() - theirs.mean()) < 5 * sd * np.sqrt(2 / n)
    assert abs(ours.std() / sd - 1) < 5 * np.sqrt(1 / n)
