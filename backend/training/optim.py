"""The optimizer and learning-rate schedule of the original recipe.

The original pins transformers 4.30.2, whose Trainer defaults to transformers' own AdamW (``adamw_hf``). It
differs from ``torch.optim.AdamW`` in where the bias correction goes: eps is added to sqrt(v) *before*
correcting, and the correction is folded into the step size, so the effective eps is eps / sqrt(1 - beta2^t)
(31.6x at step 1) and decoupled weight decay comes after the Adam step. transformers 5 no longer ships that
class, so :class:`AdamWHF` is written here from the update rule. Schedules come from transformers'
``get_scheduler``.
"""

from __future__ import annotations

import math

import torch

ADAM_BETAS = (0.9, 0.999)  # the transformers Trainer defaults the original ran with
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.0
MAX_GRAD_NORM = 1.0


class AdamWHF(torch.optim.Optimizer):
    """transformers 4.30's AdamW update, per parameter p with gradient g at step t:

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
        p -= lr * weight_decay * p                      (when weight_decay > 0)
    """

    def __init__(self, params, lr: float = 1e-3, betas=ADAM_BETAS, eps: float = ADAM_EPS, weight_decay: float = WEIGHT_DECAY):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW settings: lr {lr}, betas {betas}, eps {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                m.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def make_optimizer(name: str, params, learning_rate: float, device: torch.device) -> torch.optim.Optimizer:
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY,
                                 foreach=device.type == "cuda" or None)
    return AdamWHF(params, lr=learning_rate)


def warmup_steps(total_steps: int, steps: int = 0, ratio: float = 0.0) -> int:
    """As transformers' TrainingArguments: warmup_steps wins over warmup_ratio."""
    return steps if steps > 0 else math.ceil(total_steps * ratio)


def make_scheduler(name: str, optimizer, total_steps: int, warmup: int):
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def continue_schedule(scheduler, step: int) -> None:
    """After loading a saved schedule: set the learning rate of step ``step`` on this run's schedule (its
    end comes from this run's total, as transformers does on resume), through the scheduler's own step."""
    scheduler.last_epoch = step - 1
    scheduler.step()
