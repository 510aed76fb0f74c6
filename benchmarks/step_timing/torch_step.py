"""The independent PyTorch reference step (tests/torch_reference.py) on the trainer's shapes and config: the same
ViT, crops, head, out_dim, DINOLoss, AdamW, per-tensor clipping and EMA. fp32 on a CPU; on a GPU, main_dino's
mixed-precision step in bf16 (no GradScaler needed), or TF32 matmuls for float32 as JAX's default precision has."""
from __future__ import annotations

import torch

from dino_jax import schedules
from tests import torch_reference as R

from .flops import best_matmul_tflops


class TorchStep:
    def __init__(self, c, batch_size: int, steps_per_epoch: int, dtype: str, device):
        self.device = device
        torch.manual_seed(0)
        bkw = dict(img_size=c.global_crop_size, pos_interp=c.get("pos_embed_interp", "offset"))
        arch = c.arch
        if arch == "vit_custom":
            bkw.update(embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads)
            arch = lambda patch_size, **kw: R.VisionTransformer(patch_size=patch_size, **kw)  # noqa: E731
        hkw = dict(nlayers=c.head_nlayers, hidden_dim=c.head_hidden_dim, bottleneck_dim=c.head_bottleneck_dim)
        student, teacher = R.build_student_teacher(arch, c.patch_size, c.out_dim, c.drop_path_rate,
                                                   use_bn_in_head=c.use_bn_in_head,
                                                   norm_last_layer=c.norm_last_layer,
                                                   backbone_kwargs=bkw, head_kwargs=hkw)
        self.student, self.teacher = student.to(device).train(), teacher.to(device).train()
        ncrops = 2 + c.local_crops_number
        self.loss = R.DINOLoss(c.out_dim, ncrops, c.warmup_teacher_temp, c.teacher_temp,
                               c.warmup_teacher_temp_epochs, c.epochs, c.student_temp, c.center_momentum).to(device)
        self.opt = R.build_optimizer(self.student, c.optimizer)
        self.sched = schedules.training_schedules(c, steps_per_epoch)
        self.c, self.spe = c, steps_per_epoch
        g = torch.randn(2, batch_size, 3, c.global_crop_size, c.global_crop_size, device=device)
        loc = torch.randn(max(c.local_crops_number, 1), batch_size, 3, c.local_crop_size, c.local_crop_size,
                          device=device)
        self.images = [g[0], g[1]] + [loc[i] for i in range(c.local_crops_number)]
        self.autocast = torch.bfloat16 if device.type == "cuda" and dtype == "bfloat16" else None
        if device.type == "cuda" and dtype == "float32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.it = 0

    def step(self):
        c, it = self.c, self.it
        epoch = it // self.spe
        if self.autocast is None:  # exactly the reference step (fp32)
            R.train_step(self.student, self.teacher, self.loss, self.opt, self.images, epoch, it, self.sched["lr"],
                         self.sched["wd"], self.sched["momentum"], c.clip_grad, c.freeze_last_layer)
        else:  # main_dino's mixed-precision step: autocast around the forwards and the loss only
            for i, group in enumerate(self.opt.param_groups):
                group["lr"] = self.sched["lr"][it]
                if i == 0:
                    group["weight_decay"] = self.sched["wd"][it]
            with torch.autocast(self.device.type, dtype=self.autocast):
                t_out = self.teacher(self.images[:2])
                s_out = self.student(self.images)
                loss = self.loss(s_out, t_out, epoch)
            loss.item()
            self.opt.zero_grad()
            loss.backward()
            if c.clip_grad:
                R.clip_gradients(self.student, c.clip_grad)
            R.cancel_gradients_last_layer(epoch, self.student, c.freeze_last_layer)
            self.opt.step()
            R.ema_update(self.student, self.teacher, self.sched["momentum"][it])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.it += 1

    def matmul_probe_tflops(self, n: int = 2048, reps: int = 8) -> float:
        """The CPU peak probe's matmul in torch (MKL on a CPU): how far the two frameworks' kernels differ here."""
        dtype = self.autocast or torch.float32
        a = torch.randn(n, n, device=self.device, dtype=dtype)
        b = torch.randn(n, n, device=self.device, dtype=dtype)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        return best_matmul_tflops(lambda: (a @ b, sync()), n, reps)
