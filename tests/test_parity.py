"""Parity of the core (ViT, head, loss, center, schedules, whole training steps) with an independent PyTorch
implementation of the reference (tests/torch_reference.py), on shared random weights in float32."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as R  # noqa: E402
from conftest import max_relative_error, tiny_config  # noqa: E402
from dino_jax import convert, dino, schedules  # noqa: E402
from dino_jax.models.head import DINOHead  # noqa: E402
from dino_jax.models.vit import build_vit  # noqa: E402

torch.set_default_dtype(torch.float32)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


@pytest.fixture(scope="module")
def vit_tiny_pair():
    torch.manual_seed(0)
    ref = R.vit_tiny(patch_size=16).eval()
    params = convert.torch_to_flax(ref.state_dict())["backbone"]
    return ref, params


@pytest.mark.parametrize("interp", ["offset", "exact"])
@pytest.mark.parametrize("hw", [(224, 224), (96, 96), (64, 112)])
def test_vit_features_attention_intermediate(vit_tiny_pair, hw, interp):
    ref, params = vit_tiny_pair
    ref.pos_interp = interp
    model = build_vit("vit_tiny", 16, pos_embed_interp=interp)
    x = np.random.default_rng(1).normal(size=(2,) + hw + (3,)).astype(np.float32)
    v = {"params": params}
    with torch.no_grad():
        want = ref(nchw(x)).numpy()
        want_attn = ref.get_last_selfattention(nchw(x)).numpy()
        want_mid = [t.numpy() for t in ref.get_intermediate_layers(nchw(x), 3)]
    got = model.apply(v, x)
    got_attn = model.apply(v, x, method=model.get_last_selfattention)
    got_mid = model.apply(v, x, 3, method=model.get_intermediate_layers)
    tol = 1e-5 if hw == (224, 224) else 1e-4  # interpolation involved
    errs = [rel(got, want), rel(got_attn, want_attn)] + [rel(g, w) for g, w in zip(got_mid, want_mid)]
    print(f"ViT-Ti/16 {hw} {interp}: features {errs[0]:.1e}, attention {errs[1]:.1e}, intermediate {max(errs[2:]):.1e}")
    assert max(errs) <= tol


@pytest.mark.parametrize("use_bn,norm_last_layer", [(False, True), (True, False)])
def test_head(use_bn, norm_last_layer):
    torch.manual_seed(0)
    ref = R.DINOHead(64, 512, use_bn=use_bn, norm_last_layer=norm_last_layer, hidden_dim=128, bottleneck_dim=32)
    with torch.no_grad():  # a non-trivial gain so that a dropped g would show
        ref.last_layer.weight_g.uniform_(0.5, 1.5) if not norm_last_layer else None
    sd = {f"head.{k}": v for k, v in ref.state_dict().items()}
    params = convert.torch_to_flax(sd)["head"]
    head = DINOHead(512, use_bn=use_bn, norm_last_layer=norm_last_layer, hidden_dim=128, bottleneck_dim=32)
    x = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    err = rel(head.apply({"params": params}, x), want)
    print(f"head bn={use_bn} norm_last_layer={norm_last_layer}: {err:.1e}")
    assert err <= 1e-5


def test_loss_and_center():
    rng = np.random.default_rng(0)
    b, k, ncrops = 6, 300, 5
    student = rng.normal(size=(ncrops * b, k)).astype(np.float32)
    teacher = rng.normal(size=(2 * b, k)).astype(np.float32)
    ref = R.DINOLoss(k, ncrops, 0.04, 0.07, 3, 10)
    ref.center.copy_(torch.from_numpy(rng.normal(size=(1, k)).astype(np.float32)))
    center = ref.center.numpy().copy()
    epoch = 1
    want = ref(torch.from_numpy(student), torch.from_numpy(teacher), epoch).item()
    temp = schedules.teacher_temp_schedule(0.04, 0.07, 3, 10)[epoch]
    got = float(dino.dino_loss(student, teacher, center, temp, ncrops))
    new_center = dino.update_center(jnp.asarray(center), teacher)
    print(f"loss rel err {abs(got - want) / abs(want):.1e}, center {rel(new_center, ref.center.numpy()):.1e}")
    assert abs(got - want) / abs(want) <= 1e-6
    assert rel(new_center, ref.center.numpy()) <= 1e-6


@pytest.mark.parametrize("args", [(0.0005, 1e-6, 100, 1251, 10), (0.04, 0.4, 7, 3, 0), (0.996, 1, 5, 4, 2)])
def test_cosine_scheduler_equals_reference(args):
    base, final, epochs, niter, warmup = args
    np.testing.assert_array_equal(schedules.cosine_scheduler(base, final, epochs, niter, warmup),
                                  R.cosine_scheduler(base, final, epochs, niter, warmup))


def test_teacher_temp_schedule_per_epoch():
    ref = R.DINOLoss(8, 4, 0.04, 0.07, 30, 100)
    np.testing.assert_array_equal(schedules.teacher_temp_schedule(0.04, 0.07, 30, 100), ref.teacher_temp_schedule)


@pytest.mark.parametrize("optimizer,norm_last_layer", [("adamw", True), ("adamw", False), ("sgd", True),
                                                        ("lars", False)])
def test_two_training_steps_match_torch(optimizer, norm_last_layer):
    """Step 0 inside the last-layer freeze, step 1 after it; clipping and weight decay active."""
    c = tiny_config(optimizer=optimizer, norm_last_layer=norm_last_layer, drop_path_rate=0.0, epochs=2,
                    warmup_epochs=0, lr=0.05 if optimizer != "adamw" else 0.0005, clip_grad=0.3, batch_size=4,
                    freeze_last_layer=1, warmup_teacher_temp=0.04, teacher_temp=0.07,
                    warmup_teacher_temp_epochs=2, momentum_teacher=0.9, global_crop_size=32)
    spe = 1
    torch.manual_seed(0)
    backbone_kwargs = dict(img_size=32, embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads)
    student, teacher = R.build_student_teacher(
        lambda patch_size, **kw: R.VisionTransformer(patch_size=patch_size, **kw), c.patch_size, c.out_dim, 0.0,
        norm_last_layer=norm_last_layer, backbone_kwargs=backbone_kwargs,
        head_kwargs=dict(hidden_dim=c.head_hidden_dim, bottleneck_dim=c.head_bottleneck_dim))
    with torch.no_grad():  # move every tensor off its special init (zero biases, unit scales, g = 1)
        for name, p in student.named_parameters():
            if "weight_g" not in name:
                p.add_(0.02 * torch.randn_like(p))
        if not norm_last_layer:
            student.head.last_layer.weight_g.uniform_(0.5, 1.5)
        teacher.load_state_dict(student.state_dict())
    ncrops = 2 + c.local_crops_number
    loss_ref = R.DINOLoss(c.out_dim, ncrops, c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs,
                          c.epochs)
    opt = R.build_optimizer(student, optimizer)
    sched = schedules.training_schedules(c, spe)

    model = dino.build_model(c)
    state = dino.create_train_state(c, model, spe, jax.random.PRNGKey(0))
    params = convert.torch_to_flax(student.state_dict())
    state = state.replace(params=params, teacher_params=jax.tree.map(jnp.copy, params),
                          opt_state=state.tx.init(params))
    step = jax.jit(dino.make_train_step(c, spe))

    prototypes0 = np.asarray(state.params["head"]["last_layer"]["weight_v"]).copy()
    rng = np.random.default_rng(0)
    for it in range(2):
        g = rng.normal(size=(c.batch_size, 2, 32, 32, 3)).astype(np.float32)
        loc = rng.normal(size=(c.batch_size, c.local_crops_number, 16, 16, 3)).astype(np.float32)
        images = [nchw(g[:, i]) for i in range(2)] + [nchw(loc[:, i]) for i in range(c.local_crops_number)]
        want_loss = R.train_step(student, teacher, loss_ref, opt, images, it // spe, it, sched["lr"], sched["wd"],
                                 sched["momentum"], c.clip_grad, c.freeze_last_layer)
        state, metrics = step(state, {"global": g, "local": loc})
        assert abs(float(metrics["loss"]) - want_loss) <= 1e-5 * abs(want_loss)
        errs = {
            "student": max_relative_error(convert.torch_to_flax(student.state_dict()), state.params),
            "teacher": max_relative_error(convert.torch_to_flax(teacher.state_dict()), state.teacher_params),
            "center": rel(state.center, loss_ref.center.numpy()),
        }
        print(f"{optimizer} norm_last_layer={norm_last_layer} step {it}: " +
              ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        assert max(errs.values()) <= 1e-5, errs
        moved = not np.array_equal(np.asarray(state.params["head"]["last_layer"]["weight_v"]), prototypes0)
        assert moved == (it >= c.freeze_last_layer * spe)  # frozen during epoch 0 only


def _plain_gelu(x):
    return 0.5 * x * jax.lax.erfc(-x / np.sqrt(2.0).astype(x.dtype))


def test_weight_norm_prototypes_and_their_custom_gradients():
    """The prototype layer (its column norm and output scaling have hand-written backward passes) against the
    reference's weight-normalised Linear in float64 torch: outputs and the gradients of x, v and g, 65536 wide."""
    from dino_jax.models.head import WeightNormPrototypes

    rng = np.random.default_rng(0)
    n, d, k = 24, 32, 65536
    x = rng.normal(size=(n, d)).astype(np.float32)
    v = rng.uniform(-0.2, 0.2, size=(d, k)).astype(np.float32)
    g = rng.uniform(0.5, 1.5, size=(1, k)).astype(np.float32)
    cot = rng.normal(size=(n, k)).astype(np.float32)
    layer = WeightNormPrototypes(k, norm_last_layer=False)
    params = {"params": {"weight_v": jnp.asarray(v), "weight_g": jnp.asarray(g)}}
    got_y, vjp = jax.vjp(lambda p, x: layer.apply(p, x), params, jnp.asarray(x))
    d_params, d_x = vjp(jnp.asarray(cot))
    xt, vt, gt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, v.T, g.T))
    want_y = xt @ (gt * vt / vt.norm(dim=1, keepdim=True)).T  # torch weight_norm, dim=0 on the (K, d) weight
    want_y.backward(torch.from_numpy(cot.astype(np.float64)))
    assert rel(got_y, want_y.detach().numpy()) <= 1e-6
    assert rel(d_x, xt.grad.numpy()) <= 1e-5
    assert rel(d_params["params"]["weight_v"], vt.grad.numpy().T) <= 1e-5
    assert rel(d_params["params"]["weight_g"], gt.grad.numpy().T) <= 1e-5


def test_gelu_and_its_custom_gradient():
    """The erf-form GELU with its hand-written backward equals jax.grad of the textbook formula and torch's."""
    from dino_jax.models.vit import gelu

    x = jnp.asarray(np.concatenate([np.linspace(-12, 12, 4001), np.random.default_rng(0).normal(size=1000)]),
                    jnp.float32)
    cot = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    got_y, vjp = jax.vjp(gelu, x)
    want_y, want_vjp = jax.vjp(_plain_gelu, x)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vjp(cot)[0], want_vjp(cot)[0], rtol=1e-5, atol=1e-6)
    xt = torch.from_numpy(np.array(x)).requires_grad_()
    torch.nn.functional.gelu(xt).backward(torch.from_numpy(np.asarray(cot)))
    np.testing.assert_allclose(vjp(cot)[0], xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_softmax_and_its_custom_gradient():
    """The attention softmax with PyTorch's backward equals jax.nn.softmax and its autodiff gradient, and torch's,
    on logits with large, tied and -1e9 entries (a masked-out key)."""
    from dino_jax.models.vit import softmax

    rng = np.random.default_rng(0)
    x = rng.normal(scale=4.0, size=(3, 5, 7, 9)).astype(np.float32)
    x[0, 0, 0] = 50.0  # saturated row
    x[1, 1, 1, :4] = -1e9
    x[2, 2, 2] = x[2, 2, 2, 0]  # a row of ties
    x = jnp.asarray(x)
    cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    got_y, vjp = jax.vjp(softmax, x)
    want_y, want_vjp = jax.vjp(lambda v: jax.nn.softmax(v, axis=-1), x)
    np.testing.assert_array_equal(got_y, want_y)
    np.testing.assert_allclose(vjp(cot)[0], want_vjp(cot)[0], rtol=1e-5, atol=1e-6)
    xt = torch.from_numpy(np.array(x)).requires_grad_()
    torch.softmax(xt, -1).backward(torch.from_numpy(np.asarray(cot)))
    np.testing.assert_allclose(vjp(cot)[0], xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_layer_norm_and_its_custom_gradient():
    """Our LayerNorm module equals flax's nn.LayerNorm (same parameters, forward and gradients) and torch's
    layer_norm, on features with offsets, tiny and large spreads."""
    from dino_jax.models.vit import LN_EPS, LayerNorm

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6, 48)).astype(np.float32) * rng.uniform(1e-3, 30, size=(4, 6, 1)).astype(np.float32)
    x += rng.normal(scale=5.0, size=(4, 6, 1)).astype(np.float32)
    x = jnp.asarray(x)
    cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    ours, flax_ln = LayerNorm(), nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32)
    params = ours.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_ln.init(jax.random.PRNGKey(0), x))
    params = {"params": {"scale": jnp.asarray(rng.normal(size=48), jnp.float32),
                         "bias": jnp.asarray(rng.normal(size=48), jnp.float32)}}
    got_y, got_vjp = jax.vjp(lambda p, v: ours.apply(p, v), params, x)
    want_y, want_vjp = jax.vjp(lambda p, v: flax_ln.apply(p, v), params, x)
    np.testing.assert_array_equal(got_y, want_y)
    for got, want in zip(jax.tree.leaves(got_vjp(cot)), jax.tree.leaves(want_vjp(cot))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    xt = torch.from_numpy(np.array(x)).requires_grad_()
    wt, bt = (torch.from_numpy(np.array(params["params"][k])).requires_grad_() for k in ("scale", "bias"))
    torch.nn.functional.layer_norm(xt, (48,), wt, bt, eps=LN_EPS).backward(torch.from_numpy(np.asarray(cot)))
    (d_params, d_x) = got_vjp(cot)
    np.testing.assert_allclose(d_x, xt.grad.numpy(), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(d_params["params"]["scale"], wt.grad.numpy(), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(d_params["params"]["bias"], bt.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_collapse_warning_on_the_demos_monitor_values():
    """Teacher (entropy, batch-mean entropy) pairs logged by the demo runs of docs/demo_recipe_history.md, K = 1024."""
    def warn(entropy, batch_entropy):
        return dino.collapse_warning({"teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy}, 1024)

    for healthy in [(6.57, 6.84), (3.65, 4.76), (0.10, 1.00), (5.50, 6.02)]:  # momentum 0.996; early steps; e22; e25
        assert warn(*healthy) is None, healthy
    assert "uniform" in warn(6.92, 6.92)
    assert "same prototypes" in warn(0.05, 0.2)
    for same_output in [(1.09, 1.10), (5.04, 5.04), (2.63, 2.63)]:  # e18 (momentum 0.98) from step ~240
        assert "same teacher output" in warn(*same_output), same_output


def test_backbone_chunks_give_the_same_step():
    """config.backbone_chunks splits each crop size's batch into independent backbone calls: without drop-path
    the step's loss and updated state must equal the unsplit step's (to float32 rounding)."""
    batch = {"global": jax.random.normal(jax.random.PRNGKey(1), (4, 2, 32, 32, 3)),
             "local": jax.random.normal(jax.random.PRNGKey(2), (4, 2, 16, 16, 3))}
    results = {}
    for chunks in (1, 2, 4):
        c = tiny_config(drop_path_rate=0.0, batch_size=4, backbone_chunks=chunks)
        model = dino.build_model(c)
        state = dino.create_train_state(c, model, 10, jax.random.PRNGKey(0))
        state, metrics = jax.jit(dino.make_train_step(c, 10))(state, batch)
        results[chunks] = (float(metrics["loss"]), state.params, state.teacher_params, state.center)
    for chunks in (2, 4):
        assert abs(results[chunks][0] - results[1][0]) < 1e-5 * abs(results[1][0])
        for a, b in zip(results[1][1:], results[chunks][1:]):
            assert max_relative_error(a, b) < 1e-5

    c = tiny_config(batch_size=4, backbone_chunks=3)
    model = dino.build_model(c)
    state = dino.create_train_state(c, model, 10, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="backbone_chunks=3 must divide the per-step batch of 4 images"):
        dino.make_train_step(c, 10)(state, batch)
