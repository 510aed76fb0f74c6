"""Whole training steps compared with the PyTorch reference (tests/torch_reference.py) update by update.

For every tensor of the student, the teacher and the center, and for every step, the error is
||Δ_jax - Δ_ref|| / ||Δ_ref|| with Δ = value after the step - value before and the reference run in float64.
The bound comes from float32's own noise: 10x the float32 reference's error on the same Δ, plus a small floor.
The runs are long and fast enough for every rule to show: 3 epochs of 2 steps with lr warm-up, a teacher
temperature warm-up over all 3 epochs, the prototypes frozen for the first epoch, weight decay on its cosine,
per-step updates ~1e-3 of the weights, a teacher that starts away from the student, and clipping that fires.
"""
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as R
from conftest import tiny_config
from dino_jax import convert, dino

SPE = 2  # steps per epoch
TOLERANCE = 10.0  # x the float32 reference's own error
FLOOR = 2e-6  # relative; below it both float32 implementations are at rounding level

# Peak per-step lr (per 256 images it is lr * 256 / batch) and weight decay big enough to show in one step.
RECIPES = {
    "adamw": dict(optimizer="adamw", lr=1e-3, weight_decay=0.5, weight_decay_end=2.0),
    "sgd": dict(optimizer="sgd", lr=0.1, weight_decay=0.5, weight_decay_end=2.0),
    "lars": dict(optimizer="lars", lr=1.0, weight_decay=0.5, weight_decay_end=2.0),
}


def make_config(optimizer, batch_size=4, **overrides):
    recipe = dict(RECIPES[optimizer])
    recipe["lr"] *= 256 / batch_size
    c = tiny_config(drop_path_rate=0.0, batch_size=batch_size, epochs=3, warmup_epochs=1, min_lr=1e-5,
                    clip_grad=0.3, freeze_last_layer=1, warmup_teacher_temp=0.04, teacher_temp=0.07,
                    warmup_teacher_temp_epochs=3, momentum_teacher=0.9, **recipe)
    for k, v in overrides.items():
        c[k] = v
    return c


def make_batches(c, seed=0):
    rng = np.random.default_rng(seed)
    g, l = c.global_crop_size, c.local_crop_size
    return [(rng.normal(size=(c.batch_size, 2, g, g, 3)).astype(np.float32),
             rng.normal(size=(c.batch_size, c.local_crops_number, l, l, 3)).astype(np.float32))
            for _ in range(c.epochs * SPE)]


def reference_models(c):
    backbone_kwargs = dict(img_size=c.global_crop_size, embed_dim=c.embed_dim, depth=c.depth,
                           num_heads=c.num_heads)
    return R.build_student_teacher(
        lambda patch_size, **kw: R.VisionTransformer(patch_size=patch_size, **kw), c.patch_size, c.out_dim, 0.0,
        use_bn_in_head=c.use_bn_in_head, norm_last_layer=c.norm_last_layer, backbone_kwargs=backbone_kwargs,
        head_kwargs=dict(hidden_dim=c.head_hidden_dim, bottleneck_dim=c.head_bottleneck_dim))


def initial_weights(c, seed=0):
    """Reference-initialised student; every tensor moved off its special init (zero biases, unit scales, g = 1)
    and the teacher moved away from the student, so a wrong EMA direction or a dropped decay shows."""
    torch.manual_seed(seed)
    student, teacher = reference_models(c)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "weight_g" not in name:
                p.add_(0.02 * torch.randn_like(p))
            elif not c.norm_last_layer:
                p.uniform_(0.5, 1.5)
        teacher.load_state_dict(student.state_dict())
        for name, p in teacher.named_parameters():
            if "weight_g" not in name:
                p.add_(0.01 * torch.randn_like(p))
            elif not c.norm_last_layer:
                p.mul_(torch.empty_like(p).uniform_(0.9, 1.1))
    return student.state_dict(), teacher.state_dict()


def _snapshot(student, teacher, center):
    out = {f"student.{k}": v.detach().numpy().astype(np.float64) for k, v in student.state_dict().items()}
    out.update({f"teacher.{k}": v.detach().numpy().astype(np.float64) for k, v in teacher.state_dict().items()})
    out["center"] = center.detach().numpy().astype(np.float64)
    return out


def reference_run(c, init, batches, dtype, skip=None):
    """The reference's training loop in `dtype`: snapshots before and after every step, and the number of
    gradient tensors clipping rescaled at each step. Iteration `skip` is not run (a non-finite step skipped)."""
    student, teacher = reference_models(c)
    student.load_state_dict(init[0])
    teacher.load_state_dict(init[1])
    student.to(dtype), teacher.to(dtype)
    ncrops = 2 + c.local_crops_number
    loss = R.DINOLoss(c.out_dim, ncrops, c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs,
                      c.epochs, c.student_temp, c.center_momentum).to(dtype)
    opt = R.build_optimizer(student, c.optimizer)
    n = c.epochs * SPE
    lr = R.cosine_scheduler(c.lr * c.batch_size / 256, c.min_lr, c.epochs, SPE, c.warmup_epochs)
    wd = R.cosine_scheduler(c.weight_decay, c.weight_decay_end, c.epochs, SPE)
    momentum = R.cosine_scheduler(c.momentum_teacher, 1, c.epochs, SPE)
    snaps, clipped = [_snapshot(student, teacher, loss.center)], []
    for it, (g, loc) in enumerate(batches[:n]):
        if it == skip:
            snaps.append(snaps[-1])
            clipped.append(0)
            continue
        images = [torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dtype)
                  for x in list(g.swapaxes(0, 1)) + list(loc.swapaxes(0, 1))]
        R.train_step(student, teacher, loss, opt, images, it // SPE, it, lr, wd, momentum, c.clip_grad,
                     c.freeze_last_layer)
        # Gradients left at the clip norm are the ones clipping rescaled (the frozen prototypes have none).
        norms = [p.grad.norm().item() for p in student.parameters() if p.grad is not None]
        clipped.append(sum(abs(x - c.clip_grad) < 1e-4 * c.clip_grad for x in norms))
        snaps.append(_snapshot(student, teacher, loss.center))
    return snaps, clipped


def jax_run(c, init, batches, devices=1):
    """The project's own step (dino.create_train_state / make_train_step) from the same weights; snapshots in
    the reference's state-dict layout."""
    from dino_jax import sharding

    model = dino.build_model(c)
    params = jax.tree.map(jnp.asarray, convert.torch_to_flax(init[0], norm_last_layer=c.norm_last_layer))
    teacher = jax.tree.map(jnp.asarray, convert.torch_to_flax(init[1], norm_last_layer=c.norm_last_layer))
    shapes = jax.eval_shape(lambda r: model.init(r, c.global_crop_size), jax.random.PRNGKey(0))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, shapes)
    state = dino.create_train_state(c, model, SPE, jax.random.PRNGKey(0), params=params)
    state = state.replace(teacher_params=teacher)
    mesh = sharding.make_mesh()
    assert mesh.size == devices, mesh
    step = sharding.jit_train_step(dino.make_train_step(c, SPE), mesh)
    state = sharding.shard_state(state, mesh)

    def snapshot(state):
        params, teacher, center = jax.device_get((state.params, state.teacher_params, state.center))
        out = {f"student.{k}": v.numpy().astype(np.float64)
               for k, v in convert.flax_to_torch(params, include_head=True).items()}
        out.update({f"teacher.{k}": v.numpy().astype(np.float64)
                    for k, v in convert.flax_to_torch(teacher, include_head=True).items()})
        out["center"] = np.asarray(center, np.float64)
        return out

    snaps = [snapshot(state)]
    for g, loc in batches:
        state, _ = step(state, jax.device_put({"global": g, "local": loc}, sharding.batch_sharding(mesh)))
        snaps.append(snapshot(state))
    return snaps


def _matching_keys(snap_ref, snap_jax):
    """The reference's keys (backbone.* prefixes dropped) that both runs hold; BatchNorm buffers left out."""
    keys = {}
    for k in snap_ref:
        kj = k.replace(".backbone.", ".")
        if kj in snap_jax and "running_" not in k and "num_batches" not in k:
            keys[k] = kj
    return keys


def _delta(a, b, key):
    d = b[key] - a[key]
    if key.endswith("attn.qkv.bias"):  # the key bias: exactly zero gradient, Adam turns noise into updates
        third = d.shape[-1] // 3
        d = np.concatenate([d[:third], d[2 * third:]])
    return d.ravel()


def zero_gradient_keys(c):
    """With a BatchNorm head, the biases that only shift a BatchNorm's input: those of the head Linears before a
    BN and the backbone's final LayerNorm bias (the first head Linear maps it to such a shift). Like the
    attention key bias (see `_delta`), their gradient is exactly zero, so Adam turns rounding noise into updates
    that differ between any two float32 implementations and change no output: they are not compared."""
    if not c.use_bn_in_head:
        return set()
    biases = [f"head.mlp.{3 * j}.bias" for j in range(c.head_nlayers - 1)] + ["backbone.norm.bias"]
    return {f"{net}.{b}" for net in ("student", "teacher") for b in biases}


def update_errors(ref64, ref32, got, ignore=()):
    """Per step and tensor: (error of `got`, error of the float32 reference, ||Δ_ref64||), errors relative."""
    keys = {k: v for k, v in _matching_keys(ref64[0], got[0]).items() if k not in ignore}
    missing = {k for k in ref64[0] if "running_" not in k and "num_batches" not in k} - set(keys) - set(ignore)
    assert not missing, f"tensors the JAX state lacks: {sorted(missing)}"
    out = []
    for t in range(len(ref64) - 1):
        step = {}
        for k, kj in keys.items():
            want = _delta(ref64[t], ref64[t + 1], k)
            scale = np.linalg.norm(want)
            d32 = np.linalg.norm(_delta(ref32[t], ref32[t + 1], k) - want)
            dj = np.linalg.norm(_delta(got[t], got[t + 1], kj) - want)
            step[k] = (dj / scale, d32 / scale, scale) if scale > 0 else (dj, d32, 0.0)
        out.append(step)
    return out


def check(c, got, label, skip=None):
    """The reference in float64 and float32 from the same weights and batches; every update within bounds.
    With `skip`, JAX gets NaN images at that step and the reference does not run it."""
    init = initial_weights(c)
    batches = make_batches(c)
    ref64, clipped = reference_run(c, init, batches, torch.float64, skip)
    ref32, _ = reference_run(c, init, batches, torch.float32, skip)
    if skip is not None:
        batches[skip][0][0, 0, 0, 0, 0] = np.nan
    got = got(init, batches)
    errors = update_errors(ref64, ref32, got, zero_gradient_keys(c))
    worst_ratio, failures = 0.0, []
    for t, step in enumerate(errors):
        for k, (ej, e32, scale) in step.items():
            bound = TOLERANCE * e32 + FLOOR
            worst_ratio = max(worst_ratio, ej / bound)
            if ej > bound:
                failures.append(f"step {t} {k}: {ej:.2e} > {bound:.2e} (float32 ref {e32:.2e}, |Δ| {scale:.1e})")
    worst_jax = max(max(e[0] for e in step.values()) for step in errors)
    worst_32 = max(max(e[1] for e in step.values()) for step in errors)
    print(f"{label}: worst JAX error {worst_jax:.2e}, worst float32-reference error {worst_32:.2e}, "
          f"worst error/bound {worst_ratio:.2f}, tensors clipped per step {clipped}")
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} in all)"
    epochs = [sum(clipped[e:e + SPE]) for e in range(0, len(clipped), SPE)]
    assert min(epochs) > 0, f"clipping must fire in every epoch: {clipped}"
    return errors


@pytest.mark.parametrize("optimizer,norm_last_layer", [("adamw", True), ("adamw", False), ("sgd", True),
                                                        ("lars", False)])
def test_updates_match_reference(optimizer, norm_last_layer):
    c = make_config(optimizer, norm_last_layer=norm_last_layer)
    errors = check(c, lambda init, batches: jax_run(c, init, batches), f"{optimizer} nll={norm_last_layer}")
    # The prototypes are frozen during epoch 0 and move afterwards, in both implementations.
    frozen = [step["student.head.last_layer.weight_v"][2] for step in errors]
    assert frozen[:SPE] == [0.0] * SPE and min(frozen[SPE:]) > 0, frozen


_EIGHT_DEVICES = r"""
import pickle, sys
sys.path.insert(0, {tests!r})
import test_update_parity as T
with open({path!r}, "rb") as f:
    c, init, batches = pickle.load(f)
with open({path!r}, "wb") as f:
    pickle.dump(T.jax_run(c, init, batches, devices=8), f)
"""


def _jax_run_on_8_devices(c, init, batches, tmp_path):
    path = str(tmp_path / "run.pkl")
    with open(path, "wb") as f:
        pickle.dump((c, init, batches), f)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _EIGHT_DEVICES.format(tests=os.path.dirname(__file__), path=path)],
                   env=env, check=True)
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.mark.parametrize("devices", [1, 8])
def test_batchnorm_head_updates_match_reference(devices, tmp_path):
    """use_bn_in_head: the head's batch statistics are over all crops of the global batch (SyncBatchNorm)."""
    c = make_config("adamw", batch_size=8, use_bn_in_head=True, norm_last_layer=False)
    if devices == 1:
        run = lambda init, batches: jax_run(c, init, batches)  # noqa: E731
    else:
        run = lambda init, batches: _jax_run_on_8_devices(c, init, batches, tmp_path)  # noqa: E731
    check(c, run, f"bn head, {devices} device(s)")


def test_a_skipped_step_keeps_every_schedule_on_the_global_step():
    """NaN images at step 1 (inside the lr warm-up and the prototypes' freeze): JAX skips the step, the reference
    does not run it, and every later update still matches: lr, weight decay, the unfreezing at step 2, momentum
    and teacher temperature follow the global iteration in both, and Adam's step count only counts updates."""
    c = make_config("adamw", norm_last_layer=False, skip_nonfinite_steps=True)
    errors = check(c, lambda init, batches: jax_run(c, init, batches), "adamw, step 1 skipped", skip=1)
    assert all(ej == 0 for ej, _, _ in errors[1].values())


def test_adam_matches_torch_adam_to_float32_rounding():
    """optim.scale_by_adam against torch.optim.Adam (float32 moments, float64 bias corrections) over 200 steps of
    random gradients: the same update to float32 rounding (optax's float32 1 - 0.999^t was 1.3e-5 off at t = 1)."""
    from dino_jax import optim

    rng = np.random.default_rng(0)
    grads = rng.normal(size=(200, 1000)).astype(np.float32) * np.logspace(-4, 1, 1000, dtype=np.float32)
    p = torch.zeros(1000, requires_grad=True)
    opt = torch.optim.Adam([p], lr=1.0)
    tx = optim.scale_by_adam()
    state = tx.init(jnp.zeros(1000))
    update = jax.jit(tx.update)
    worst = 0.0
    for g in grads:
        with torch.no_grad():
            p.zero_()  # lr 1 and no decay: p after the step is minus the update, exactly
        p.grad = torch.from_numpy(g)
        opt.step()
        want = -p.detach().numpy()
        got, state = update(jnp.asarray(g), state)
        worst = max(worst, float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want)))
    print(f"Adam update vs torch: worst relative error {worst:.1e}")
    assert worst < 2e-6
