"""Independent plain-PyTorch model of the facebookresearch/dino reference, for parity tests.

Written from the reference's behaviour (main_dino.py, utils.py, vision_transformer.py, eval_knn.py and
eval_linear.py at HEAD 7c446df), not copied from it. It needs only torch and numpy (no timm, no torchvision) and
runs in float32 on a CPU. What it keeps from the reference, on purpose:

* the module and parameter names, so ``state_dict()`` keys equal the reference's (backbone files load with
  ``strict=True``; a ``MultiCropWrapper`` gives ``backbone.*`` / ``head.*``);
* the order in which modules are built and initialised, so that for one torch seed the initial weights and the
  drop-path draws are the ones the reference would produce;
* the order of floating-point operations where it is cheap to keep (e.g. the student logits are *divided* by the
  temperature, the EMA is ``t*m + (1-m)*s``), so the numbers match the reference bit for bit on the same torch.

Single process only: the center update and the k-NN feature bank do what the reference does with a world size of 1.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "trunc_normal_", "DropPath", "Mlp", "Attention", "Block", "PatchEmbed", "VisionTransformer",
    "vit_tiny", "vit_small", "vit_base", "WeightNormLinear", "DINOHead", "MultiCropWrapper", "DINOLoss",
    "cosine_scheduler", "clip_gradients", "cancel_gradients_last_layer", "get_params_groups", "LARS",
    "build_optimizer", "build_student_teacher", "ema_update", "train_step", "knn_classifier", "linear_features",
    "VIT_BACKBONE_KEYS",
]


# ----------------------------------------------------------------------------------------------------------------
# Initialisation


def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0):
    """The reference's ``utils.trunc_normal_``: bounds ``a``/``b`` are ABSOLUTE (so std .02 is untruncated in
    practice). Same sampling method (one uniform draw pushed through the inverse normal CDF, then clamped), hence
    the same numbers for a given seed. (``torch.nn.init.trunc_normal_`` is not used: it samples by rejection when
    most of the mass lies within the bounds, which draws other numbers.)"""

    def cdf(z: float) -> float:
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
    with torch.no_grad():
        tensor.uniform_(2 * lo - 1, 2 * hi - 1)
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.0)).add_(mean)
        tensor.clamp_(min=a, max=b)
    return tensor


def _init_linear_and_norm(m: nn.Module) -> None:
    """Reference ``VisionTransformer._init_weights``: Linear weight trunc_normal(.02), bias 0; LayerNorm 1/0.
    Conv2d (the patch embedding) is left at torch's default init."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------------------
# Vision Transformer


class DropPath(nn.Module):
    """Stochastic depth per sample: in training, keep a sample's residual branch with probability 1-p and divide it
    by 1-p. The mask is ``floor(keep + U[0,1))`` drawn with ``torch.rand`` of shape (B, 1, ..., 1), as the
    reference draws it, so a seeded run makes the same choices."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * mask


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2 (the reference's dropouts have p=0 and are left out: no parameters)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv Linear whose output rows are [q | k | v], each split by head;
    scores scaled by head_dim**-0.5. Returns (output, post-softmax attention)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out), attn


class Block(nn.Module):
    """Pre-norm transformer block: x + DP(attn(norm1 x)); x + DP(mlp(norm2 x)); one DropPath module used twice
    (independent draws, attention branch first). ``return_attention`` gives the attention of norm1(x)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, norm_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, return_attention: bool = False):
        y, attn = self.attn(self.norm1(x))
        if return_attention:
            return attn
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Conv2d(3, D, kernel=stride=P), tokens flattened row-major over (H/P, W/P)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """The reference ViT backbone (num_classes=0).

    ``pos_interp`` picks how the stored position embeddings are resized for another input size:
    ``'offset'`` = the current reference (bicubic, ``scale_factor=((h0+0.1)/sqrtN, (w0+0.1)/sqrtN)``);
    ``'exact'`` = bicubic to ``size=(h0, w0)`` (the sampling grid of the exact ratio h0/sqrtN, as the code that
    trained the released checkpoints used). Either way the stored table is used unchanged when the patch count
    equals the stored one and the input is square.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, norm_eps=1e-6, pos_interp="offset",
                 num_classes=0):
        super().__init__()
        if isinstance(img_size, (list, tuple)):
            img_size = img_size[0]
        if pos_interp not in ("offset", "exact"):
            raise ValueError(f"pos_interp must be 'offset' or 'exact', got {pos_interp!r}")
        if num_classes:
            raise ValueError("DINO backbones have no classifier (num_classes=0)")
        self.pos_interp = pos_interp
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        # Rates are float32 linspace values turned into Python floats, as in the reference.
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], norm_eps) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear_and_norm)

    def interpolate_pos_encoding(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embeddings for tokens ``x`` (B, 1+npatch, D) of an image of ``height`` x ``width`` pixels."""
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and height == width:
            return self.pos_embed
        dim = x.shape[-1]
        side = int(math.sqrt(n))
        h0 = height // self.patch_embed.patch_size
        w0 = width // self.patch_embed.patch_size
        grid = self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        if self.pos_interp == "offset":
            grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / math.sqrt(n), (w0 + 0.1) / math.sqrt(n)),
                                 mode="bicubic")
        else:
            grid = F.interpolate(grid, size=(h0, w0), mode="bicubic")
        if grid.shape[-2:] != (h0, w0):
            raise AssertionError(f"interpolated grid {tuple(grid.shape[-2:])} != {(h0, w0)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((self.pos_embed[:, :1], grid), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the CLS token prepended, plus (interpolated) position embeddings."""
        b, _, height, width = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        return tokens + self.interpolate_pos_encoding(tokens, height, width)

    def forward(self, x):
        """CLS token after the final LayerNorm, (B, D)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]

    def get_last_selfattention(self, x):
        """Post-softmax attention of the last block, (B, heads, N+1, N+1)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x, n: int = 1):
        """Token sequences after each of the last ``n`` blocks, each passed through the final LayerNorm."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                out.append(self.norm(x))
        return out


def vit_tiny(patch_size=16, **kw):
    """ViT-Tiny: D=192, 3 heads, depth 12, LN eps 1e-6."""
    return VisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4,
                             qkv_bias=True, **kw)


def vit_small(patch_size=16, **kw):
    """ViT-Small: D=384, 6 heads, depth 12, LN eps 1e-6."""
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4,
                             qkv_bias=True, **kw)


def vit_base(patch_size=16, **kw):
    """ViT-Base: D=768, 12 heads, depth 12, LN eps 1e-6."""
    return VisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
                             qkv_bias=True, **kw)


def _vit_backbone_keys(depth: int = 12) -> List[str]:
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"]
    return keys + ["norm.weight", "norm.bias"]


#: The reference's backbone state-dict keys, in the reference's order (depth 12).
VIT_BACKBONE_KEYS = _vit_backbone_keys(12)


# ----------------------------------------------------------------------------------------------------------------
# DINO head


class WeightNormLinear(nn.Module):
    """Bias-free Linear with legacy ``torch.nn.utils.weight_norm`` semantics along dim 0:
    W = v * (g / ||v||_row), computed by torch's own ``_weight_norm`` kernel when present (bit-exact with the
    reference's hook). Parameters ``weight_g`` (out, 1) then ``weight_v`` (out, in): the legacy key names and
    registration order."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        # Build (and so draw) the weight exactly as nn.Linear(in, out, bias=False) does: kaiming_uniform(a=sqrt 5).
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.weight_g = nn.Parameter(v.norm(dim=1, keepdim=True))
        self.weight_v = nn.Parameter(v)

    @property
    def weight(self) -> torch.Tensor:
        if hasattr(torch, "_weight_norm"):
            # The kernel the legacy hook calls (forward and backward), for bit-exact parity with the reference.
            return torch._weight_norm(self.weight_v, self.weight_g, 0)
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x):
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP (Linear-[BN]-GELU ... -Linear to the bottleneck; a single Linear when nlayers=1, key ``mlp.weight``),
    L2 normalisation (eps 1e-12), then a weight-normalised bias-free Linear to ``out_dim``. MLP Linears get
    trunc_normal(.02)/0; the last layer is built afterwards and keeps torch's default init, then g := 1 and g is
    frozen when ``norm_last_layer``."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: List[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per run of consecutive crops with the same last (width) dimension, concatenating
    the crops of a run along the batch, then the head once on all the features in crop order."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        if not isinstance(x, (list, tuple)):
            x = [x]
        feats, start = [], 0
        while start < len(x):
            end = start
            while end < len(x) and x[end].shape[-1] == x[start].shape[-1]:
                end += 1
            out = self.backbone(torch.cat(list(x[start:end])))
            if isinstance(out, tuple):
                out = out[0]
            feats.append(out)
            start = end
        return self.head(torch.cat(feats))


# ----------------------------------------------------------------------------------------------------------------
# Loss


class DINOLoss(nn.Module):
    """Reference DINOLoss. Teacher temperature is looked up per EPOCH in
    ``concat(linspace(warmup, teacher_temp, warmup_epochs), teacher_temp repeated)``. The loss averages, over the
    2*(ncrops-1) pairs (teacher global view iq, student view v != iq), the batch mean of
    sum_k -softmax((t - center)/temp)_k * log_softmax(s / student_temp)_k. After the loss the center becomes
    center*m + mean_rows(teacher_output)*(1-m) (buffer ``center``, (1, out_dim))."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def forward(self, student_output, teacher_output, epoch):
        student_chunks = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_chunks = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total, n_terms = 0, 0
        for iq, q in enumerate(teacher_chunks):
            for v, s in enumerate(student_chunks):
                if v == iq:
                    continue
                total += torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                n_terms += 1
        total /= n_terms
        self.update_center(teacher_output)
        return total

    @torch.no_grad()
    def update_center(self, teacher_output):
        """EMA of the center with the mean over all rows of the (raw, uncentred) teacher output."""
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


# ----------------------------------------------------------------------------------------------------------------
# Schedules and optimisation


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """Per-iteration schedule: linspace(start_warmup_value, base, W) (endpoint included) for the W warm-up
    iterations, then final + (base-final)/2 * (1 + cos(pi * j / (T-W))) for j = 0..T-W-1."""
    warmup_iters = warmup_epochs * niter_per_ep
    warm = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    j = np.arange(epochs * niter_per_ep - warmup_iters)
    cos = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * j / len(j)))
    out = np.concatenate((warm, cos))
    assert len(out) == epochs * niter_per_ep
    return out


def clip_gradients(model: nn.Module, clip: float) -> List[float]:
    """Per-tensor clipping: each gradient is scaled by clip/(||g||+1e-6) when that is < 1. Returns the norms."""
    norms = []
    for _, p in model.named_parameters():
        if p.grad is None:
            continue
        norm = p.grad.detach().norm(2)
        norms.append(norm.item())
        coef = clip / (norm + 1e-6)
        if coef < 1:
            p.grad.detach().mul_(coef)
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """While epoch < freeze_last_layer, set the grad of every parameter whose name contains 'last_layer' to None
    (so the optimiser skips it entirely: no update, no decay, no state change)."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


def get_params_groups(model: nn.Module):
    """[{'params': regularised}, {'params': rest, 'weight_decay': 0.}] over trainable parameters; regularised =
    name does not end in '.bias' and ndim != 1 (so cls_token, pos_embed, weight_v and a trainable weight_g are)."""
    reg, not_reg = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".bias") or p.ndim == 1:
            not_reg.append(p)
        else:
            reg.append(p)
    return [{"params": reg}, {"params": not_reg, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """The reference's LARS (Barlow Twins style). For each parameter with a grad: if ndim != 1, dp = g + wd*p and
    dp *= eta*||p||/||dp|| (1 when either norm is 0); ndim == 1 tensors use the raw grad (no wd, no trust ratio,
    whatever their group says). Then mu = momentum*mu + dp and p -= lr*mu."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(p_norm)
                    ratio = torch.where(p_norm > 0.0,
                                        torch.where(u_norm > 0, group["eta"] * p_norm / u_norm, one), one)
                    dp = dp.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(dp)
                p.add_(state["mu"], alpha=-group["lr"])


def build_optimizer(student: nn.Module, name: str = "adamw") -> torch.optim.Optimizer:
    """main_dino's optimisers over get_params_groups: AdamW defaults (betas .9/.999, eps 1e-8), SGD(lr=0,
    momentum=.9), or LARS. lr and group-0 wd are set every iteration by train_step."""
    groups = get_params_groups(student)
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)
    if name == "lars":
        return LARS(groups)
    raise ValueError(name)


def build_student_teacher(arch="vit_small", patch_size=16, out_dim=65536, drop_path_rate=0.1,
                          use_bn_in_head=False, norm_last_layer=True, backbone_kwargs=None, head_kwargs=None):
    """main_dino's construction order: student backbone (with drop path), teacher backbone, student head,
    teacher head (always norm_last_layer=True, as in the reference), then teacher := student weights and no
    grads for the teacher. ``arch`` is 'vit_tiny'|'vit_small'|'vit_base' or a callable(patch_size=, **kw)."""
    factory = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}.get(arch, arch)
    bkw, hkw = dict(backbone_kwargs or {}), dict(head_kwargs or {})
    s_backbone = factory(patch_size=patch_size, drop_path_rate=drop_path_rate, **bkw)
    t_backbone = factory(patch_size=patch_size, **bkw)
    embed_dim = s_backbone.embed_dim
    student = MultiCropWrapper(s_backbone, DINOHead(embed_dim, out_dim, use_bn=use_bn_in_head,
                                                    norm_last_layer=norm_last_layer, **hkw))
    teacher = MultiCropWrapper(t_backbone, DINOHead(embed_dim, out_dim, use_bn_in_head, **hkw))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, m) -> None:
    """teacher_p <- teacher_p*m + (1-m)*student_p for every parameter pair in order (buffers untouched)."""
    for ps, pt in zip(student.parameters(), teacher.parameters()):
        pt.mul_(m).add_((1 - m) * ps.detach())


def train_step(student, teacher, dino_loss, optimizer, images: Sequence[torch.Tensor], epoch: int, it: int,
               lr_schedule, wd_schedule, momentum_schedule, clip_grad: float, freeze_last_layer: int) -> float:
    """One iteration of main_dino.train_one_epoch in fp32 (no autocast, no GradScaler): set lr (all groups) and
    wd (group 0) from the schedules at global iteration ``it``; teacher on images[:2], student on all crops;
    loss (updates the center); zero_grad, backward; per-tensor clip if clip_grad; drop last-layer grads while
    epoch < freeze_last_layer; optimizer.step(); teacher EMA from the updated student with momentum_schedule[it].
    Raises FloatingPointError where the reference would exit on a non-finite loss. Returns loss.item()."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr_schedule[it]
        if i == 0:
            group["weight_decay"] = wd_schedule[it]
    images = list(images)
    teacher_output = teacher(images[:2])
    student_output = student(images)
    loss = dino_loss(student_output, teacher_output, epoch)
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"Loss is {value}, stopping training")
    optimizer.zero_grad()
    loss.backward()
    if clip_grad:
        clip_gradients(student, clip_grad)
    cancel_gradients_last_layer(epoch, student, freeze_last_layer)
    optimizer.step()
    ema_update(student, teacher, momentum_schedule[it])
    return value


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes=1000):
    """eval_knn's weighted k-NN (features already L2-normalised): cosine top-k neighbours, each votes for its
    label with exp(sim/T), classes ranked by summed votes; returns (top1, top5) in percent, top-5 counted over
    the first min(5, k) ranked classes. Test rows go in chunks of num_test//100 like the reference, but at least
    one row per chunk (the reference crashes below 100 test images; per-row results are unchanged)."""
    train_t = train_features.t()
    n_test = test_labels.shape[0]
    step = max(1, n_test // 100)
    top1 = top5 = 0.0
    total = 0
    n5 = min(5, k, num_classes)
    for start in range(0, n_test, step):
        feats = test_features[start:start + step]
        targets = test_labels[start:start + step]
        b = targets.shape[0]
        sim = torch.mm(feats, train_t)
        dist, idx = sim.topk(k, largest=True, sorted=True)
        neighbours = torch.gather(train_labels.view(1, -1).expand(b, -1), 1, idx)
        one_hot = torch.zeros(b * k, num_classes, dtype=train_features.dtype, device=train_features.device)
        one_hot.scatter_(1, neighbours.reshape(-1, 1), 1)
        weights = dist.clone().div_(T).exp_()
        probs = torch.sum(one_hot.view(b, -1, num_classes) * weights.view(b, -1, 1), 1)
        _, pred = probs.sort(1, True)
        correct = pred.eq(targets.view(-1, 1))
        top1 += correct.narrow(1, 0, 1).sum().item()
        top5 += correct.narrow(1, 0, n5).sum().item()
        total += b
    return top1 * 100.0 / total, top5 * 100.0 / total


def linear_features(intermediate_outputs: Sequence[torch.Tensor], avgpool: bool = False) -> torch.Tensor:
    """eval_linear's ViT feature: CLS tokens of the given (normed) block outputs concatenated, earliest first;
    with ``avgpool`` (only valid for one block) the CLS vector u and the mean patch token a of the last block are
    stacked on a new last axis and flattened, i.e. interleaved [u0, a0, u1, a1, ...] of length 2D."""
    out = torch.cat([x[:, 0] for x in intermediate_outputs], dim=-1)
    if avgpool:
        if len(intermediate_outputs) != 1:
            raise ValueError("the reference's avgpool feature only works with n_last_blocks=1")
        avg = torch.mean(intermediate_outputs[-1][:, 1:], dim=1)
        out = torch.stack((out, avg), dim=-1).reshape(out.shape[0], -1)
    return out
