"""Recovery after structured pruning: distil the dense model into the pruned one on
calibration text.

The loss is the KL divergence from the teacher's next-token distribution to the student's
(temperature T, scaled by T^2), as Minitron (Muralidharan et al. 2024) found best for
recovering pruned LLMs with little data, optionally plus the mean squared error between the
two models' last hidden states (normalised by the teacher's, on the hidden channels the
student kept: `kept_hidden`). AdamW, a linear warm-up over the first 10% of the steps then a
cosine decay to zero, gradients clipped to norm 1. The teacher runs under no_grad; nothing
else is stored, so a step costs one teacher forward and one student forward and backward.
"""

from __future__ import annotations

import itertools
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.batches import as_batches
from prunekit.errors import PruneError
from prunekit.progress import Progress


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of T^2 KL(softmax(teacher / T) || softmax(student / T))."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, -1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def distill(student: nn.Module, teacher: nn.Module, batches, steps: int, lr: float = 1e-4,
            temperature: float = 1.0, hidden_weight: float = 0.0,
            kept_hidden: list[int] | None = None, weight_decay: float = 0.0,
            progress: bool = False) -> dict:
    """Train `student` (in place) for `steps` steps on `batches` (cycled; {'input_ids': (b,
    T)} or tensors) to match `teacher`. Returns {"loss_first", "loss_last", "steps",
    "seconds", "tokens"}; the student is left in eval mode."""
    if not isinstance(steps, int) or steps < 1:
        raise PruneError(f"distillation steps must be a positive integer, got {steps!r}")
    if not lr > 0 or not temperature > 0 or hidden_weight < 0:
        raise PruneError(f"distillation needs lr > 0, temperature > 0 and hidden_weight >= 0 "
                         f"(got {lr}, {temperature}, {hidden_weight})")
    data = as_batches(batches)
    if not data:
        raise PruneError("distillation needs at least one batch of token ids")
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 10)

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    teacher.eval()
    student.train()
    keep = torch.as_tensor(kept_hidden) if kept_hidden is not None else None
    first = last = None
    tokens = 0
    start = time.perf_counter()
    try:
        with Progress(enabled=progress) as bar:
            task = bar.add("distillation", total=steps)
            for step, b in zip(range(steps), itertools.cycle(data)):
                ids = b["input_ids"] if isinstance(b, dict) else b
                want_h = hidden_weight > 0
                with torch.no_grad():
                    t_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=want_h)
                s_out = student(input_ids=ids, use_cache=False, output_hidden_states=want_h)
                loss = distill_loss(s_out.logits, t_out.logits, temperature)
                if want_h:
                    th, sh = t_out.hidden_states[-1], s_out.hidden_states[-1]
                    if keep is not None:
                        th = th[..., keep]
                    if th.shape != sh.shape:
                        raise PruneError(f"hidden-state loss: the student's last hidden state "
                                         f"is {tuple(sh.shape)}, the teacher's "
                                         f"{tuple(th.shape)}; pass kept_hidden (the plan's "
                                         f"kept channels) or hidden_weight=0")
                    loss = loss + hidden_weight * F.mse_loss(sh, th) / th.pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise PruneError(f"distillation diverged at step {step} (loss {value}); "
                                     f"use a smaller lr (now {lr})")
                first = value if first is None else first
                last = value
                tokens += ids.numel()
                bar.advance(task)
    finally:
        student.eval()
        opt.zero_grad(set_to_none=True)
    return {"loss_first": first, "loss_last": last, "steps": steps,
            "seconds": time.perf_counter() - start, "tokens": tokens}
