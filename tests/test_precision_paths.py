"""The accelerator code paths against the float32 einsum path on CPU: bfloat16 compute, jax.nn.dot_product_attention
and rematerialised blocks give the same DINO loss and gradients within measured tolerances, and in bfloat16 the
numerically sensitive parts (residual stream, LayerNorm statistics, softmax, loss) stay float32."""
import jax
import jax.extend.core
import jax.numpy as jnp
import pytest
from conftest import max_relative_error, tiny_config

from dino_jax import dino

BATCH = 4
BF16_EPS = 2.0 ** -7  # bfloat16's machine epsilon (8 significant bits, 7 stored)


def views(config, key):
    """Crop-major global (2*B, G, G, 3) and local (L*B, l, l, 3) images, as the reference feeds its backbone."""
    kg, kl = jax.random.split(key)
    g, l, n = config.global_crop_size, config.local_crop_size, config.local_crops_number
    return (jax.random.normal(kg, (2 * BATCH, g, g, 3)), jax.random.normal(kl, (n * BATCH, l, l, 3)))


def dino_objective(config):
    """(params, images, rng) -> the DINO loss of the student on all views against the teacher (the same params,
    no gradient) on the global views: the train step's loss, from the model's backbone and head."""
    model = dino.build_model(config)

    def outputs(params, crops, train, rng):
        feats = [model.backbone.apply({"params": params["backbone"]}, x, train,
                                      rngs={"drop_path": jax.random.fold_in(rng, i)} if train else {})
                 for i, x in enumerate(crops)]
        return model.head.apply({"params": params["head"]}, jnp.concatenate(feats, axis=0))

    def loss(params, crops, rng):
        teacher = jax.lax.stop_gradient(outputs(params, crops[:1], False, rng))
        student = outputs(params, crops, True, rng)
        n_crops = 2 + config.local_crops_number
        center = jnp.zeros((1, config.out_dim), jnp.float32)
        return dino.dino_loss(student, teacher, center, config.teacher_temp, n_crops, config.student_temp)

    return model, loss


def loss_and_grads(**overrides):
    config = tiny_config(**overrides)
    model, loss = dino_objective(config)
    params = model.init(jax.random.PRNGKey(0), config.global_crop_size)
    crops = views(config, jax.random.PRNGKey(1))
    value, grads = jax.jit(jax.value_and_grad(loss))(params, crops, jax.random.PRNGKey(2))
    return float(value), grads


@pytest.fixture(scope="module")
def float32_einsum():
    return loss_and_grads()


def test_remat_gives_the_same_loss_and_gradients(float32_einsum):
    loss, grads = loss_and_grads(remat=True)
    assert abs(loss - float32_einsum[0]) <= 1e-6 * abs(float32_einsum[0])
    assert max_relative_error(float32_einsum[1], grads) <= 1e-6


def test_dot_product_attention_gives_the_einsum_loss_and_gradients(float32_einsum):
    # Measured over 3 seeds: loss <= 2.4e-7 relative, gradients <= 3.4e-6 (the fused op sums in another order).
    loss, grads = loss_and_grads(attention="dot_product_attention")
    assert abs(loss - float32_einsum[0]) <= 1e-6 * abs(float32_einsum[0])
    assert max_relative_error(float32_einsum[1], grads) <= 1e-5


def test_bfloat16_loss_and_gradients_within_its_precision(float32_einsum):
    # Each matmul rounds its inputs to bfloat16, a relative error <= eps/2 each. Worst case, the errors add up
    # along the longest chain of matmuls: 16 in the forward (6 per block x 2 blocks, 4 in the head), so the loss
    # is within 8 eps, and 32 forward and backward, so the gradients are within 16 eps. Measured over 3 seeds:
    # loss 0.13-1.2 eps, gradients 3.1-6.3 eps (per tensor, max error over max value).
    loss, grads = loss_and_grads(dtype="bfloat16")
    assert abs(loss - float32_einsum[0]) <= 8 * BF16_EPS * abs(float32_einsum[0])
    assert max_relative_error(float32_einsum[1], grads) <= 16 * BF16_EPS
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def _equations(jaxpr):
    """Every equation of a jaxpr, inside pjit, custom_vjp, remat and control-flow bodies too."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _equations(inner)


def test_bfloat16_keeps_the_residual_stream_statistics_softmax_and_loss_in_float32():
    config = tiny_config(dtype="bfloat16")
    model, loss = dino_objective(config)
    params = model.init(jax.random.PRNGKey(0), config.global_crop_size)
    crops = views(config, jax.random.PRNGKey(1))
    closed = jax.make_jaxpr(loss)(params, crops, jax.random.PRNGKey(2))
    eqns = list(_equations(closed.jaxpr))
    out_dtypes = lambda name: [str(o.aval.dtype) for e in eqns if e.primitive.name == name for o in e.outvars]  # noqa: E731
    # LayerNorm means and variances, softmax maxima and sums, the head's L2 norms and the loss's means: float32.
    reductions = out_dtypes("reduce_sum") + out_dtypes("reduce_max")
    assert reductions and set(reductions) == {"float32"}, set(reductions)
    assert set(out_dtypes("exp")) == {"float32"}  # softmax and log-softmax (GELU's exp is only in its backward)
    # The residual stream: every add of two (images, tokens, embed_dim) arrays (bias adds broadcast a vector).
    tokens = [e for e in eqns if e.primitive.name == "add" and e.outvars[0].aval.ndim == 3
              and e.outvars[0].aval.shape[-1] == config.embed_dim
              and all(v.aval.shape == e.outvars[0].aval.shape for v in e.invars)]
    assert tokens and {str(e.outvars[0].aval.dtype) for e in tokens} == {"float32"}
    # The matmuls of the blocks (qkv, q.k, attention.v, proj, fc1, fc2) take bfloat16 inputs.
    bf16_dots = [e for e in eqns if e.primitive.name == "dot_general"
                 and {str(v.aval.dtype) for v in e.invars} == {"bfloat16"}]
    calls = 3  # teacher on the global views, student on the global and on the local views
    assert len(bf16_dots) >= 6 * config.depth * calls, len(bf16_dots)
    assert closed.out_avals[0].dtype == jnp.float32
