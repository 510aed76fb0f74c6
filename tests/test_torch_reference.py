"""Self-checks of tests/torch_reference.py against facts of the reference and hand computations."""
import math

import numpy as np
import pytest
import torch

import torch_reference as R  # noqa: E402  (tests/ is on sys.path via conftest)


def tiny_vit(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)
    args.update(kw)
    return R.VisionTransformer(**args)


# ------------------------------------------------------------------------------------------------ backbone


@pytest.mark.parametrize("factory,patch,count", [
    ("vit_tiny", 16, 5_524_416), ("vit_small", 16, 21_665_664), ("vit_small", 8, 21_670_272),
    ("vit_base", 16, 85_798_656),
])
def test_backbone_parameter_counts(factory, patch, count):
    model = getattr(R, factory)(patch_size=patch)
    assert sum(p.numel() for p in model.parameters()) == count


def test_backbone_state_dict_keys_and_shapes():
    model = R.vit_small(patch_size=16)
    sd = model.state_dict()
    expected = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(12):
        expected += [f"blocks.{i}.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                     for p in ("weight", "bias")]
    expected += ["norm.weight", "norm.bias"]
    assert list(sd) == expected == R.VIT_BACKBONE_KEYS
    d = 384
    assert sd["cls_token"].shape == (1, 1, d)
    assert sd["pos_embed"].shape == (1, 197, d)
    assert sd["patch_embed.proj.weight"].shape == (d, 3, 16, 16)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * d, d)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (4 * d, d)
    assert sd["blocks.0.mlp.fc2.weight"].shape == (d, 4 * d)
    assert model.norm.eps == 1e-6 and model.blocks[3].norm1.eps == 1e-6
    assert isinstance(model.blocks[0].mlp.act, torch.nn.GELU) and model.blocks[0].mlp.act.approximate == "none"


def test_init_statistics():
    torch.manual_seed(0)
    model = R.vit_small()
    w = model.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert torch.all(model.blocks[0].mlp.fc1.bias == 0) and torch.all(model.norm.weight == 1)
    # the patch conv keeps torch's default U(+-1/sqrt(fan_in)) init
    bound = 1 / math.sqrt(3 * 16 * 16)
    conv = model.patch_embed.proj.weight
    assert conv.abs().max().item() <= bound and conv.abs().max().item() > 0.9 * bound
    # same seed, same weights (a deterministic draw order)
    torch.manual_seed(0)
    again = R.vit_small()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_trunc_normal_bounds_are_absolute():
    torch.manual_seed(0)
    x = R.trunc_normal_(torch.empty(200_000), std=0.02)
    assert abs(x.std().item() - 0.02) < 2e-4   # +-2 absolute = 100 sigma: no visible truncation
    y = R.trunc_normal_(torch.empty(100_000), std=1.0, a=-0.5, b=0.5)
    assert y.min().item() >= -0.5 and y.max().item() <= 0.5


def _bicubic_np(grid, out_size, ratio):
    """Separable Keys bicubic (A=-0.75), align_corners=False, border taps clamped, no antialias; ``ratio`` maps an
    output index to the input: src = ratio*(dst+0.5)-0.5. grid: (n, n, D)."""
    a = -0.75

    def weights(t):
        def near(x):  # |x| <= 1
            return ((a + 2) * x - (a + 3)) * x * x + 1

        def far(x):  # 1 < |x| < 2
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])

    def resize_axis(x, out, r):
        n = x.shape[0]
        rows = []
        for o in range(out):
            src = r * (o + 0.5) - 0.5
            f = math.floor(src)
            w = weights(src - f)
            idx = np.clip(np.arange(f - 1, f + 3), 0, n - 1)
            rows.append(np.tensordot(w, x[idx], axes=1))
        return np.stack(rows)

    x = resize_axis(grid, out_size[0], ratio[0])
    return resize_axis(x.transpose(1, 0, 2), out_size[1], ratio[1]).transpose(1, 0, 2)


@pytest.mark.parametrize("mode", ["offset", "exact"])
@pytest.mark.parametrize("hw", [(96, 96), (64, 96), (320, 240)])
def test_pos_embed_interpolation_matches_bicubic(mode, hw):
    torch.manual_seed(0)
    model = R.VisionTransformer(img_size=224, patch_size=16, embed_dim=8, depth=1, num_heads=2, pos_interp=mode)
    h0, w0 = hw[0] // 16, hw[1] // 16
    x = torch.zeros(1, 1 + h0 * w0, 8)
    pe = model.interpolate_pos_encoding(x, *hw).detach().numpy()[0]
    assert pe.shape == (1 + h0 * w0, 8)
    np.testing.assert_array_equal(pe[0], model.pos_embed.detach().numpy()[0, 0])
    grid = model.pos_embed.detach().numpy()[0, 1:].reshape(14, 14, 8).astype(np.float64)
    if mode == "offset":
        ratio = (14 / (h0 + 0.1), 14 / (w0 + 0.1))
    else:
        ratio = (14 / h0, 14 / w0)
    want = _bicubic_np(grid, (h0, w0), ratio).reshape(-1, 8)
    np.testing.assert_allclose(pe[1:], want, atol=2e-6, rtol=0)


def test_pos_embed_shortcut_and_token_counts():
    model = R.vit_tiny(patch_size=16)
    x224 = torch.zeros(1, 197, 192)
    assert model.interpolate_pos_encoding(x224, 224, 224) is model.pos_embed
    assert model.prepare_tokens(torch.randn(2, 3, 96, 96)).shape == (2, 37, 192)
    assert model.prepare_tokens(torch.randn(1, 3, 64, 96)).shape == (1, 25, 192)
    exact = R.vit_tiny(patch_size=16, pos_interp="exact")
    exact.load_state_dict(model.state_dict())
    a = model.interpolate_pos_encoding(torch.zeros(1, 37, 192), 96, 96)
    b = exact.interpolate_pos_encoding(torch.zeros(1, 37, 192), 96, 96)
    assert a.shape == b.shape == (1, 37, 192)
    assert not torch.allclose(a, b)  # the +0.1 shifts the sampling grid


def test_forward_variants_consistent():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    x = torch.randn(3, 3, 32, 32)
    cls = model(x)
    inter = model.get_intermediate_layers(x, n=2)
    assert cls.shape == (3, 48) and len(inter) == 2 and inter[0].shape == (3, 17, 48)
    torch.testing.assert_close(inter[-1][:, 0], cls, rtol=0, atol=0)
    attn = model.get_last_selfattention(x)
    assert attn.shape == (3, 2, 17, 17)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 2, 17))


def test_drop_path_rule_and_behaviour():
    model = tiny_vit(depth=4, drop_path_rate=0.3)
    assert isinstance(model.blocks[0].drop_path, torch.nn.Identity)
    rates = [b.drop_path.drop_prob for b in model.blocks[1:]]
    np.testing.assert_allclose(rates, [0.1, 0.2, 0.3], rtol=1e-6)
    dp = R.DropPath(0.5).train()
    torch.manual_seed(0)
    x = torch.ones(64, 3, 2)
    y = dp(x)
    per_sample = y[:, 0, 0]
    assert set(per_sample.tolist()) == {0.0, 2.0}
    assert torch.all(y == per_sample[:, None, None])
    assert torch.equal(dp.eval()(x), x)


# ------------------------------------------------------------------------------------------------ head, wrapper


def test_head_keys_shapes_and_frozen_g():
    head = R.DINOHead(384, 1000)
    assert list(head.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                                       "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v"]
    assert head.last_layer.weight_g.shape == (1000, 1) and head.last_layer.weight_v.shape == (1000, 256)
    assert not head.last_layer.weight_g.requires_grad and torch.all(head.last_layer.weight_g == 1)
    bn = R.DINOHead(384, 1000, use_bn=True, norm_last_layer=False)
    params = [n for n, _ in bn.named_parameters()]
    assert params == ["mlp.0.weight", "mlp.0.bias", "mlp.1.weight", "mlp.1.bias", "mlp.3.weight", "mlp.3.bias",
                      "mlp.4.weight", "mlp.4.bias", "mlp.6.weight", "mlp.6.bias", "last_layer.weight_g",
                      "last_layer.weight_v"]
    assert bn.last_layer.weight_g.requires_grad
    one = R.DINOHead(384, 10, nlayers=1)
    assert [n for n, _ in one.named_parameters()] == ["mlp.weight", "mlp.bias", "last_layer.weight_g",
                                                      "last_layer.weight_v"]
    # the last layer keeps torch's Linear default init U(+-1/sqrt(256))
    v = head.last_layer.weight_v
    assert v.abs().max().item() <= 1 / 16 and v.abs().max().item() > 0.9 / 16


def test_head_weight_norm_and_cosine_logits():
    torch.manual_seed(0)
    head = R.DINOHead(16, 40, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    x = torch.randn(5, 16)
    logits = head(x)
    assert logits.abs().max().item() <= 1 + 1e-6   # g = 1: cosine similarities
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    g, v = head.last_layer.weight_g.detach(), head.last_layer.weight_v.detach()
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    want = z @ (g * v / v.norm(dim=1, keepdim=True)).t()
    torch.testing.assert_close(head(x), want, rtol=1e-5, atol=1e-6)
    if hasattr(torch.nn.utils, "weight_norm"):   # legacy implementation, when this torch still has it
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lin = torch.nn.utils.weight_norm(torch.nn.Linear(8, 40, bias=False))
        with torch.no_grad():
            lin.weight_g.copy_(g)
            lin.weight_v.copy_(v)
        torch.testing.assert_close(head.last_layer(z), lin(z), rtol=0, atol=1e-6)


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return x.mean(dim=(2, 3))


def test_multicrop_wrapper_groups_consecutive_resolutions():
    backbone, head = _Recorder(), _Recorder()
    head.forward = lambda x: (head.calls.append(tuple(x.shape)), x)[1]
    wrapper = R.MultiCropWrapper(backbone, head)
    crops = [torch.full((2, 3, 8, 8), float(i)) for i in range(2)] + \
            [torch.full((2, 3, 4, 4), float(i)) for i in range(2, 5)]
    out = wrapper(crops)
    assert backbone.calls == [(4, 3, 8, 8), (6, 3, 4, 4)]
    assert head.calls == [(10, 3)]
    np.testing.assert_array_equal(out[:, 0].numpy(), np.repeat(np.arange(5.0), 2))
    backbone.calls.clear()
    wrapper([crops[2], crops[0], crops[3]])
    assert backbone.calls == [(2, 3, 4, 4), (2, 3, 8, 8), (2, 3, 4, 4)]


# ------------------------------------------------------------------------------------------------ loss


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_dino_loss_hand_computed():
    rng = np.random.default_rng(0)
    b, k, ncrops = 3, 7, 4
    s = rng.normal(size=(ncrops * b, k)).astype(np.float32)
    t = rng.normal(size=(2 * b, k)).astype(np.float32)
    loss_fn = R.DINOLoss(k, ncrops, 0.04, 0.07, 30, 100)
    np.testing.assert_allclose(loss_fn.teacher_temp_schedule[[0, 1, 29, 30, 99]],
                               [0.04, 0.04 + 0.03 / 29, 0.07, 0.07, 0.07])
    center0 = rng.normal(size=(1, k)).astype(np.float32)
    loss_fn.center = torch.from_numpy(center0.copy())
    epoch = 1
    loss = loss_fn(torch.from_numpy(s), torch.from_numpy(t), epoch).item()
    temp = 0.04 + 0.03 / 29
    q = np.exp(_np_log_softmax((t.astype(np.float64) - center0) / temp))
    logp = _np_log_softmax(s.astype(np.float64) / 0.1)
    terms = [(-q[i * b:(i + 1) * b] * logp[v * b:(v + 1) * b]).sum(-1).mean()
             for i in range(2) for v in range(ncrops) if v != i]
    assert len(terms) == 2 * (ncrops - 1)
    np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)
    np.testing.assert_allclose(loss_fn.center.numpy(), 0.9 * center0 + 0.1 * t.mean(0, keepdims=True), rtol=1e-5,
                               atol=1e-6)


# ------------------------------------------------------------------------------------------------ schedules, optim


def test_cosine_scheduler_hand_values():
    np.testing.assert_allclose(R.cosine_scheduler(1.0, 0.0, 2, 2, warmup_epochs=1), [0.0, 1.0, 1.0, 0.5])
    c = math.cos(math.pi / 4)
    np.testing.assert_allclose(R.cosine_scheduler(0.996, 1, 1, 4),
                               [0.996, 1 - 0.002 * (1 + c), 0.998, 1 - 0.002 * (1 - c)])
    s = R.cosine_scheduler(2.0, 0.1, 3, 4, warmup_epochs=1, start_warmup_value=0.5)
    assert len(s) == 12
    np.testing.assert_allclose(s[:4], [0.5, 1.0, 1.5, 2.0])
    assert s[4] == 2.0 and s[-1] > 0.1


def test_clip_gradients_per_tensor():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1, 2))
    m = torch.nn.Module()
    m.a, m.b = a, b
    a.grad = torch.tensor([3.0, 4.0])
    b.grad = torch.tensor([[0.3, 0.4]])
    norms = R.clip_gradients(m, 1.0)
    np.testing.assert_allclose(norms, [5.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(a.grad.numpy(), np.array([3.0, 4.0]) / (5 + 1e-6), rtol=1e-6)
    np.testing.assert_array_equal(b.grad.numpy(), np.array([[0.3, 0.4]], np.float32))


def test_cancel_gradients_and_param_groups():
    head = R.DINOHead(8, 6, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    for p in head.parameters():
        p.grad = torch.ones_like(p)
    R.cancel_gradients_last_layer(1, head, 1)
    assert head.last_layer.weight_v.grad is not None
    R.cancel_gradients_last_layer(0, head, 1)
    assert head.last_layer.weight_v.grad is None and head.last_layer.weight_g.grad is None
    assert head.mlp[0].weight.grad is not None

    vit = tiny_vit()
    reg, rest = R.get_params_groups(vit)
    ids = {id(p): n for n, p in vit.named_parameters()}
    reg_names = {ids[id(p)] for p in reg["params"]}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= reg_names
    assert not any(n.endswith(".bias") or n.endswith("norm1.weight") for n in reg_names)
    assert rest["weight_decay"] == 0.0 and "weight_decay" not in reg
    assert len(reg["params"]) + len(rest["params"]) == len(list(vit.parameters()))
    # weight_g: regularised when trainable, absent when frozen
    frozen = R.DINOHead(8, 6, hidden_dim=8, bottleneck_dim=4)
    names = lambda m, ps: {n for n, p in m.named_parameters() if any(p is q for q in ps)}  # noqa: E731
    assert "last_layer.weight_g" in names(head, R.get_params_groups(head)[0]["params"])
    g0, g1 = R.get_params_groups(frozen)
    assert "last_layer.weight_g" not in names(frozen, g0["params"] + g1["params"])


def test_lars_hand_computation():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    bias = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    zero = torch.nn.Parameter(torch.zeros(2, 2))
    opt = R.LARS([{"params": [w, bias, zero], "weight_decay": 0.5}], lr=0.1)
    w.grad = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    bias.grad = torch.tensor([0.5, -1.0])
    zero.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    opt.step()
    dp = np.array([[1.0 + 0.5 * 3, 0.5 * 4], [0.0, 0.0]])        # grad + wd * p
    q = 0.001 * 5.0 / math.sqrt(2.5 ** 2 + 2.0 ** 2)               # eta * ||p|| / ||dp||
    mu_w = q * dp
    np.testing.assert_allclose(w.detach().numpy(), [[3.0, 4.0], [0.0, 0.0]] - 0.1 * mu_w, rtol=1e-6)
    # 1-D: no weight decay, no trust ratio
    np.testing.assert_allclose(bias.detach().numpy(), [1.0 - 0.05, 2.0 + 0.1], rtol=1e-6)
    # ||p|| = 0: trust ratio 1
    np.testing.assert_allclose(zero.detach().numpy(), -0.1 * np.array([[1.0, 2.0], [3.0, 4.0]]), rtol=1e-6)
    # second step: mu = 0.9 mu + dp
    bias.grad = torch.tensor([1.0, 1.0])
    w.grad = None
    zero.grad = None
    opt.step()
    mu_b = 0.9 * np.array([0.5, -1.0]) + 1.0
    np.testing.assert_allclose(bias.detach().numpy(), np.array([0.95, 2.1]) - 0.1 * mu_b, rtol=1e-6)
    np.testing.assert_allclose(w.detach().numpy(), [[3.0, 4.0], [0.0, 0.0]] - 0.1 * mu_w, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ train step


def _tiny_dino(**kw):
    factory = lambda patch_size=8, **k: tiny_vit(patch_size=patch_size, **k)  # noqa: E731
    return R.build_student_teacher(factory, patch_size=8, out_dim=32, drop_path_rate=0.1,
                                   head_kwargs=dict(hidden_dim=24, bottleneck_dim=8), **kw)


def test_train_step_order_freeze_and_ema():
    torch.manual_seed(0)
    student, teacher = _tiny_dino()
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))
    assert not any(p.requires_grad for p in teacher.parameters())
    opt = R.build_optimizer(student, "adamw")
    loss_fn = R.DINOLoss(32, 4, 0.04, 0.04, 0, 2)
    lr = R.cosine_scheduler(1e-3, 1e-6, 2, 2, warmup_epochs=1)
    wd = R.cosine_scheduler(0.04, 0.4, 2, 2)
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)] + \
            [torch.randn(2, 3, 16, 16, generator=g) for _ in range(2)]
    v0 = student.head.last_layer.weight_v.detach().clone()
    t0 = [p.detach().clone() for p in teacher.parameters()]

    # momentum 1: teacher frozen; epoch 0 < freeze 1: last layer untouched
    loss = R.train_step(student, teacher, loss_fn, opt, crops, 0, 1, lr, wd, np.ones(4), 3.0, 1)
    assert math.isfinite(loss)
    assert opt.param_groups[0]["lr"] == lr[1] and opt.param_groups[1]["lr"] == lr[1]
    assert opt.param_groups[0]["weight_decay"] == wd[1] and opt.param_groups[1]["weight_decay"] == 0.0
    assert torch.equal(student.head.last_layer.weight_v, v0)
    assert not torch.equal(student.backbone.cls_token, t0[0])
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), t0))
    assert torch.count_nonzero(loss_fn.center) > 0

    # momentum 0: teacher := new student (every parameter, frozen weight_g included); epoch 1: last layer moves
    R.train_step(student, teacher, loss_fn, opt, crops, 1, 2, lr, wd, np.zeros(4), 3.0, 1)
    assert not torch.equal(student.head.last_layer.weight_v, v0)
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), student.parameters()))


def test_train_step_clipping_bounds_every_gradient():
    torch.manual_seed(0)
    student, teacher = _tiny_dino()
    opt = R.build_optimizer(student, "sgd")
    loss_fn = R.DINOLoss(32, 2, 0.04, 0.04, 0, 1)
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    R.train_step(student, teacher, loss_fn, opt, crops, 0, 0, np.zeros(1), np.zeros(1), np.ones(1), 1e-4, 0)
    norms = [p.grad.norm().item() for p in student.parameters() if p.grad is not None]
    assert norms and max(norms) <= 1e-4 * (1 + 1e-5)


# ------------------------------------------------------------------------------------------------ evaluation


def test_knn_classifier_hand_case_and_small_test_sets():
    train = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2])
    test = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [-1.0, 0.1]]), dim=1)
    test_labels = torch.tensor([0, 1, 0])
    top1, top5 = R.knn_classifier(train, labels, test, test_labels, k=2, T=0.07, num_classes=3)
    assert top1 == pytest.approx(200 / 3) and top5 == pytest.approx(200 / 3)   # top-5 over min(5, k)=2 classes
    top1, top5 = R.knn_classifier(train, labels, test, test_labels, k=5, T=0.07, num_classes=3)
    assert top1 == pytest.approx(200 / 3) and top5 == 100.0
    # vote weights exp(sim/T): one very close neighbour beats two far ones
    train2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.3]]), dim=1)
    assert R.knn_classifier(train2, torch.tensor([0, 1, 1]), q, torch.tensor([0]), 3, 0.07, 2)[0] == 100.0
    assert R.knn_classifier(train2, torch.tensor([0, 1, 1]), q, torch.tensor([0]), 3, 100.0, 2)[0] == 0.0


def test_knn_chunking_does_not_change_results():
    g = torch.Generator().manual_seed(0)
    tr = torch.nn.functional.normalize(torch.randn(200, 8, generator=g), dim=1)
    te = torch.nn.functional.normalize(torch.randn(250, 8, generator=g), dim=1)
    trl, tel = torch.randint(0, 6, (200,), generator=g), torch.randint(0, 6, (250,), generator=g)
    full = R.knn_classifier(tr, trl, te, tel, 10, 0.07, 6)
    hits1 = hits5 = 0.0
    for i in range(250):
        a, b = R.knn_classifier(tr, trl, te[i:i + 1], tel[i:i + 1], 10, 0.07, 6)
        hits1, hits5 = hits1 + a / 100, hits5 + b / 100
    assert full[0] == pytest.approx(hits1 * 100 / 250) and full[1] == pytest.approx(hits5 * 100 / 250)


def test_linear_features_interleaved():
    tokens = torch.zeros(1, 3, 2)
    tokens[0, 0] = torch.tensor([1.0, 2.0])
    tokens[0, 1:] = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    np.testing.assert_array_equal(R.linear_features([tokens], avgpool=True).numpy(), [[1.0, 20.0, 2.0, 30.0]])
    other = tokens + 100
    np.testing.assert_array_equal(R.linear_features([tokens, other]).numpy(), [[1.0, 2.0, 101.0, 102.0]])
    with pytest.raises(ValueError):
        R.linear_features([tokens, other], avgpool=True)
