"""What XLA:CPU makes of the model's hot spots: the forms chosen for speed (dino_jax/models/vit.py) must survive
compilation, or the step silently goes back to the slower program (benchmarks/README.md, CPU section)."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.models import vit


def compiled_hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_gelu_backward_recomputes_erf_instead_of_reading_the_forwards():
    """Forward and backward each evaluate erf; were they merged, the forward would write erf(x) out for the backward."""
    mlp = vit.Mlp(768)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 37, 192)), jnp.float32)
    cot = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    params = mlp.init(jax.random.PRNGKey(0), x)
    hlo = compiled_hlo(jax.grad(lambda p, x: jnp.sum(mlp.apply(p, x) * cot)), params, x)
    erfs = re.findall(r"= f32\[[\d,]+\]\{[\d,]*\} erf\(", hlo)
    assert len(erfs) == 2, f"{len(erfs)} erf ops in the MLP's forward + backward, want 2 (one each)"


def test_attention_scales_q_so_no_score_sized_constant_is_built():
    """The 1/sqrt(head_dim) scale goes on q (B, N, H, hd), not on the (B, H, N, N) scores: XLA:CPU would otherwise
    hold a score-sized array of the constant and read it in every block."""
    b, n, heads = 4, 197, 3
    attention = vit.Attention(192, heads)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(b, n, 192)), jnp.float32)
    params = attention.init(jax.random.PRNGKey(0), x)
    hlo = compiled_hlo(lambda p, x: attention.apply(p, x)[0], params, x)
    scores = f"f32[{b},{heads},{n},{n}]"
    constant_scores = [line for line in hlo.splitlines()
                       if f"= {scores}" in line and re.search(r" broadcast\(%constant[.\d]*\)", line)]
    assert not constant_scores, "score-sized broadcasts of a constant:\n" + "\n".join(constant_scores)


def test_the_cpu_attention_form_equals_the_reference_order_used_elsewhere():
    """On CPU the model runs `_attend_q_scaled`; TPU and GPU run `_attend_scores_scaled` (the reference's order). The
    parity tests run on CPU only, so the two forms are compared here: outputs, attention and all gradients."""
    rng = np.random.default_rng(0)
    for heads, head_dim in ((3, 64), (4, 48)):  # scale 1/8 (exact either way) and 1/sqrt(48) (rounding only)
        c = heads * head_dim
        q, k, v = (jnp.asarray(rng.normal(size=(2, 37, heads, head_dim)), jnp.float32) for _ in range(3))
        kernel = jnp.asarray(rng.normal(size=(c, c)) * 0.05, jnp.float32)
        bias = jnp.asarray(rng.normal(size=(c,)), jnp.float32)
        cot = (jnp.asarray(rng.normal(size=(2, 37, c)), jnp.float32),
               jnp.asarray(rng.normal(size=(2, heads, 37, 37)), jnp.float32))
        results = []
        for form in (vit._attend_q_scaled, vit._attend_scores_scaled):
            out, vjp = jax.vjp(lambda *a: form(*a, jnp.float32), q, k, v, kernel, bias)
            results.append(list(out) + list(vjp(cot)))
        for name, got, want in zip(("output", "attention", "dq", "dk", "dv", "dkernel", "dbias"), *results):
            err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            assert err <= 1e-6, f"head_dim {head_dim}: {name} differs by {err:.1e} (relative to its largest entry)"
