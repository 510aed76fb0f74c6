"""PyTorch <-> Flax conversion against the independent torch reference (tests/torch_reference.py): outputs after
conversion, exact round trips, strict loading, both weight-norm namings, clear errors, a reference full checkpoint
that resumes training step for step, and the CLI both ways."""
import argparse
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_reference as R  # noqa: E402
from conftest import max_relative_error, tiny_config  # noqa: E402
from dino_jax import convert, dino  # noqa: E402
from dino_jax.convert import cli as convert_cli  # noqa: E402
from dino_jax.models.head import DINOHead  # noqa: E402
from dino_jax.models.vit import build_vit  # noqa: E402

D, DEPTH, HEADS, PATCH, IMG = 64, 2, 2, 8, 32


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def perturb(module, seed: int):
    """Non-zero biases, non-unit norms and gains, so that a dropped or mis-mapped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))


def torch_model(use_bn=False, norm_last_layer=True, seed=0):
    torch.manual_seed(seed)
    backbone = R.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS)
    head = R.DINOHead(D, 96, use_bn=use_bn, norm_last_layer=norm_last_layer, hidden_dim=48, bottleneck_dim=16)
    model = R.MultiCropWrapper(backbone, head)
    perturb(model, seed)
    return model  # train mode like the reference's head (BatchNorm on batch statistics); the ViT has no dropout


def flax_model(use_bn=False, norm_last_layer=True):
    return (build_vit("vit_custom", PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, img_size=IMG),
            DINOHead(96, use_bn=use_bn, norm_last_layer=norm_last_layer, hidden_dim=48, bottleneck_dim=16))


def parametrized_names(state_dict):
    """The same weights under torch's newer weight-norm parametrization names, taken from a real module."""
    g, v = state_dict["head.last_layer.weight_g"], state_dict["head.last_layer.weight_v"]
    lin = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(v.shape[1], v.shape[0], bias=False))
    with torch.no_grad():
        lin.parametrizations.weight.original0.copy_(g)
        lin.parametrizations.weight.original1.copy_(v)
    out = {k: t for k, t in state_dict.items() if "last_layer" not in k}
    out.update({f"head.last_layer.{k}": t for k, t in lin.state_dict().items()})
    assert "head.last_layer.parametrizations.weight.original0" in out
    return out


@pytest.mark.parametrize("use_bn,norm_last_layer,naming", [(False, True, "legacy"), (True, False, "parametrizations")])
def test_outputs_match_torch(use_bn, norm_last_layer, naming):
    ref = torch_model(use_bn, norm_last_layer)
    sd = ref.state_dict() if naming == "legacy" else parametrized_names(ref.state_dict())
    params = convert.torch_to_flax(sd)
    assert ("weight_g" in params["head"]["last_layer"]) == (not norm_last_layer)
    vit, head = flax_model(use_bn, norm_last_layer)
    x = np.random.default_rng(0).normal(size=(4, IMG, IMG, 3)).astype(np.float32)
    with torch.no_grad():
        feats = ref.backbone(nchw(x))
        want = [feats.numpy(), ref.backbone.get_last_selfattention(nchw(x)).numpy(), ref.head(feats).numpy()]
    vb = {"params": params["backbone"]}
    got = [vit.apply(vb, x), vit.apply(vb, x, method=vit.get_last_selfattention),
           head.apply({"params": params["head"]}, vit.apply(vb, x))]
    errs = [rel(g, w) for g, w in zip(got, want)]
    print(f"bn={use_bn} norm_last_layer={norm_last_layer} {naming}: CLS {errs[0]:.1e}, attention {errs[1]:.1e}, "
          f"head {errs[2]:.1e}")
    assert max(errs) <= 1e-5


def test_flax_torch_flax_is_exact_and_loads_strictly():
    ref = torch_model(use_bn=True, norm_last_layer=False)
    params = convert.torch_to_flax(ref.state_dict())
    sd = convert.flax_to_torch(params, include_head=True)
    back = convert.torch_to_flax(sd)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    fresh = R.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS)
    fresh.load_state_dict(convert.flax_to_torch(params["backbone"]), strict=True)
    head = R.DINOHead(D, 96, use_bn=True, norm_last_layer=False, hidden_dim=48, bottleneck_dim=16)
    head.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("head.")}, strict=True)
    for k, v in ref.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            mine = fresh.state_dict() if k.startswith("backbone.") else head.state_dict()
            torch.testing.assert_close(mine[k.split(".", 1)[1]], v, rtol=0, atol=0)
    # norm_last_layer=True: no g parameter in Flax, g = ones (K, 1) in torch.
    fixed = convert.torch_to_flax(torch_model().state_dict())
    out = convert.flax_to_torch(fixed, include_head=True, prefix="module.")
    assert out["module.head.last_layer.weight_g"].shape == (96, 1)
    assert bool((out["module.head.last_layer.weight_g"] == 1).all())


def test_full_checkpoint_keys_prefixes_and_inference():
    teacher, student = torch_model(seed=0), torch_model(seed=1)
    ckpt = {"teacher": teacher.state_dict(), "student": {f"module.{k}": v for k, v in student.state_dict().items()}}
    for key, net in (("teacher", teacher), ("student", student)):
        got = convert.torch_to_flax(ckpt, checkpoint_key=key)["backbone"]["cls_token"]
        np.testing.assert_array_equal(got, net.backbone.cls_token.detach().numpy())
    info = convert.infer_model_config(ckpt)
    assert info == dict(arch="vit_custom", patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=1, img_size=IMG,
                        out_dim=96, use_bn_in_head=False, norm_last_layer=True, head_nlayers=3, head_hidden_dim=48,
                        head_bottleneck_dim=16)
    torch.manual_seed(0)
    tiny = R.vit_tiny(patch_size=16).state_dict()
    info = convert.infer_model_config(tiny)
    assert (info["arch"], info["num_heads"], info["depth"], info["img_size"]) == ("vit_tiny", 3, 12, 224)
    assert convert.torch_to_flax(tiny, arch="deit_tiny", patch_size=16)["backbone"]["patch_embed"]["kernel"].shape \
        == (16, 16, 3, 192)


def test_wrong_architecture_errors_list_keys_and_shapes():
    torch.manual_seed(0)
    tiny = R.vit_tiny(patch_size=16).state_dict()
    with pytest.raises(convert.StateDictMismatchError) as e:
        convert.torch_to_flax(tiny, arch="vit_small")
    msg = str(e.value)
    print(msg.splitlines()[1][:300])
    assert "vit_small/16" in msg and "patch_embed.proj.weight: (192, 3, 16, 16), expected (384, 3, 16, 16)" in msg
    with pytest.raises(convert.StateDictMismatchError, match=r"patch_embed.proj.weight: \(192, 3, 16, 16\), expected "
                                                             r"\(192, 3, 8, 8\)"):
        convert.torch_to_flax(tiny, patch_size=8)
    broken = dict(tiny)
    broken["blocks.3.mlp.fc1.weight"] = torch.zeros(100, 192)
    del broken["blocks.5.attn.proj.bias"]
    broken["blocks.5.attn.extra"] = torch.zeros(3)
    with pytest.raises(convert.StateDictMismatchError) as e:
        convert.torch_to_flax(broken)
    msg = str(e.value)
    assert "blocks.3.mlp.fc1.weight: (100, 192), expected (768, 192)" in msg
    assert "missing (1): blocks.5.attn.proj.bias (192,)" in msg and "unexpected (1): blocks.5.attn.extra (3,)" in msg
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}
    with pytest.raises(convert.StateDictMismatchError, match=r"not a DINO ViT.*conv1.weight \(64, 3, 7, 7\)"):
        convert.torch_to_flax(resnet)
    with pytest.raises(ValueError, match="no state dict under checkpoint_key 'student'"):
        convert.torch_to_flax({"teacher": tiny, "epoch": {}}, checkpoint_key="student")


def _reference_run(config, n_steps: int):
    """A torch reference run of `n_steps` iterations (one per epoch): student, teacher, loss, optimizer,
    schedules (built with the reference's cosine_scheduler) and the batches it used."""
    spe = 1
    torch.manual_seed(0)
    student, teacher = R.build_student_teacher(
        lambda patch_size, **kw: R.VisionTransformer(patch_size=patch_size, **kw), config.patch_size,
        config.out_dim, 0.0, norm_last_layer=config.norm_last_layer,
        backbone_kwargs=dict(img_size=IMG, embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads),
        head_kwargs=dict(hidden_dim=config.head_hidden_dim, bottleneck_dim=config.head_bottleneck_dim))
    perturb(student, 0)
    teacher.load_state_dict(student.state_dict())
    loss = R.DINOLoss(config.out_dim, 2 + config.local_crops_number, config.warmup_teacher_temp,
                      config.teacher_temp, config.warmup_teacher_temp_epochs, config.epochs)
    opt = R.build_optimizer(student, config.optimizer)
    lr = config.lr * config.batch_size / 256
    sched = (R.cosine_scheduler(lr, config.min_lr, config.epochs, spe, warmup_epochs=config.warmup_epochs),
             R.cosine_scheduler(config.weight_decay, config.weight_decay_end, config.epochs, spe),
             R.cosine_scheduler(config.momentum_teacher, 1, config.epochs, spe))
    rng = np.random.default_rng(0)
    batches = [{"global": rng.normal(size=(config.batch_size, 2, IMG, IMG, 3)).astype(np.float32),
                "local": rng.normal(size=(config.batch_size, config.local_crops_number, 16, 16, 3)).astype(np.float32)}
               for _ in range(config.epochs)]

    def step(it, nets=(student, teacher, loss, opt)):
        b = batches[it]
        images = [nchw(b["global"][:, i]) for i in range(2)] + \
                 [nchw(b["local"][:, i]) for i in range(config.local_crops_number)]
        R.train_step(*nets, images, it, it, *sched, config.clip_grad, config.freeze_last_layer)

    for it in range(n_steps):
        step(it)
    return student, teacher, loss, opt, batches, step


def _compare(state, student, teacher, loss):
    return {"student": max_relative_error(convert.torch_to_flax(student.state_dict()), state.params),
            "teacher": max_relative_error(convert.torch_to_flax(teacher.state_dict()), state.teacher_params),
            "center": rel(state.center, loss.center.numpy())}


def full_config():
    return tiny_config(embed_dim=D, num_heads=1, norm_last_layer=False, drop_path_rate=0.0, epochs=4,
                       warmup_epochs=0, lr=0.01, clip_grad=0.3, batch_size=4, freeze_last_layer=1,
                       warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2,
                       momentum_teacher=0.9, global_crop_size=IMG, out_dim=64, head_hidden_dim=32)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """Two torch iterations with one iteration per epoch (epoch 0: last layer frozen; epoch 1: it trains), saved
    as main_dino.py writes checkpoint.pth (args: the pickled argparse Namespace). The torch objects go on
    training in the test that uses them."""
    c = full_config()
    run = student, teacher, loss, opt, _, _ = _reference_run(c, 2)
    assert float(loss.center.abs().max()) > 0
    path = tmp_path_factory.mktemp("reference") / "checkpoint.pth"
    torch.save({"student": {f"module.{k}": v for k, v in student.state_dict().items()},
                "teacher": teacher.state_dict(), "optimizer": opt.state_dict(), "epoch": 2,
                "args": argparse.Namespace(**convert.reference_args(c)), "dino_loss": loss.state_dict()}, path)
    return c, path, run


def test_reference_full_checkpoint_resumes_step_for_step(reference_run, tmp_path):
    """The reference checkpoint converted, then one step on each side. Back to a reference checkpoint, loaded by
    torch; one more step on each side."""
    c, path, (student, teacher, loss, opt, batches, torch_step) = reference_run
    state = convert.reference_checkpoint_to_state(convert.load_torch_file(str(path)), c)
    assert int(state.step) == 2
    errs = _compare(state, student, teacher, loss)
    assert max(errs.values()) == 0.0, errs

    train_step = jax.jit(dino.make_train_step(c, 1))
    torch_step(2)
    state, _ = train_step(state, batches[2])
    errs = _compare(state, student, teacher, loss)
    print("step from a converted reference checkpoint: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) <= 1e-5, errs

    back = convert.state_to_reference_checkpoint(state, c, epoch=3)
    torch.save(back, tmp_path / "back.pth")
    back = convert.load_torch_file(str(tmp_path / "back.pth"))
    student2, teacher2, loss2, opt2, _, _ = _reference_run(c, 0)
    student2.load_state_dict({k.removeprefix("module."): v for k, v in back["student"].items()}, strict=True)
    teacher2.load_state_dict(back["teacher"], strict=True)
    loss2.load_state_dict(back["dino_loss"], strict=True)
    opt2.load_state_dict(back["optimizer"])
    steps = {i: float(s["step"]) for i, s in opt.state_dict()["state"].items()}  # torch's own run, 3 steps
    assert steps == {i: float(s["step"]) for i, s in opt2.state_dict()["state"].items()}
    assert sorted(set(steps.values())) == [2.0, 3.0]  # the last layer was frozen for one step
    torch_step(3, (student2, teacher2, loss2, opt2))
    state, _ = train_step(state, batches[3])
    errs = _compare(state, student2, teacher2, loss2)
    print("torch step from a dino_jax state written as a reference checkpoint: " +
          ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) <= 1e-5, errs


def _cli(*args):
    res = subprocess.run([sys.executable, "-m", "dino_jax.convert", *map(str, args)], capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_cli_round_trips(reference_run, tmp_path):
    """Full checkpoint .pth -> dino_jax workdir -> full .pth through subprocesses; backbone .pth -> workdir -> .pth
    in-process; load_pretrained reads the .pth and the workdir alike."""
    _, path, _ = reference_run
    ckpt = convert.load_torch_file(str(path))
    print(_cli("--input", path, "--output", tmp_path / "run"))
    print(_cli("--to_torch", "--full", "--input", tmp_path / "run", "--output", tmp_path / "back.pth"))
    back = convert.load_torch_file(str(tmp_path / "back.pth"))
    assert back["epoch"] == 2
    for part in ("student", "teacher"):
        assert list(back[part]) == list(ckpt[part])
        for k, v in ckpt[part].items():
            torch.testing.assert_close(back[part][k], v, rtol=0, atol=0)
    torch.testing.assert_close(back["dino_loss"]["center"], ckpt["dino_loss"]["center"], rtol=0, atol=0)
    assert [g["params"] for g in back["optimizer"]["param_groups"]] == \
        [g["params"] for g in ckpt["optimizer"]["param_groups"]]
    assert back["optimizer"]["state"].keys() == ckpt["optimizer"]["state"].keys()
    for i, s in ckpt["optimizer"]["state"].items():
        assert float(back["optimizer"]["state"][i]["step"]) == float(s["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(back["optimizer"]["state"][i][k], s[k], rtol=0, atol=0)

    net = torch_model(seed=3).backbone
    torch.save(net.state_dict(), tmp_path / "pretrain.pth")
    convert_cli.main(["--input", str(tmp_path / "pretrain.pth"), "--output", str(tmp_path / "run2"), "--out_dim", "32"])
    convert_cli.main(["--to_torch", "--input", str(tmp_path / "run2"), "--output", str(tmp_path / "pretrain2.pth")])
    again = convert.load_torch_file(str(tmp_path / "pretrain2.pth"))
    assert list(again) == list(net.state_dict())
    for k, v in net.state_dict().items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=0)
    p1, info1 = convert.load_pretrained(str(tmp_path / "pretrain.pth"))
    p2, info2 = convert.load_pretrained(str(tmp_path / "run2"))
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    assert info2.pop("pos_embed_interp") == "offset"  # recorded in a dino_jax config, unknown for a .pth
    assert info2.pop("training_config")["embed_dim"] == D  # the run's config, for the evaluation CLIs
    assert info1 == info2 == dict(arch="vit_custom", patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=1,
                                  img_size=IMG)
    p3, _ = convert.load_pretrained(str(tmp_path / "run"), checkpoint_key="student")
    np.testing.assert_array_equal(p3["cls_token"], ckpt["student"]["module.backbone.cls_token"].numpy())


def test_cli_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="no such file"):
        convert_cli.main(["--input", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "out")])
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "resnet.pth")
    with pytest.raises(SystemExit, match=r"not a DINO ViT state dict.*conv1.weight \(64, 3, 7, 7\)"):
        convert_cli.main(["--input", str(tmp_path / "resnet.pth"), "--output", str(tmp_path / "out")])
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(SystemExit, match=r"pip install 'dino_jax\[torch\]'"):
        convert.load_torch_file(str(tmp_path / "resnet.pth"))
