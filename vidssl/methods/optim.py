"""Optimisers and schedules shared by the methods: LARS, warm-up + cosine, EMA momentum.

One place for the learning-rate and momentum schedules so that every method steps them the
same way (per optimiser step, not per epoch).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.optim import Optimizer

__all__ = ["LARS", "cosine_momentum", "warmup_cosine"]


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), as SimCLR uses it.

    Follows the SimCLR reference implementation (google-research/simclr ``lars_optimizer.py``):
    weight decay is added to the gradient, the step is scaled by the trust ratio
    ``eta * ||w|| / ||g||`` (1 when either norm is zero), then SGD momentum is applied. Parameter
    groups with ``lars_adaptation=False`` (biases and norm layers, as SimCLR excludes them) take a
    plain SGD-with-momentum step.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (SimCLR: ``0.3 * batch_size / 256``).
        momentum: SGD momentum (SimCLR: 0.9).
        weight_decay: L2 coefficient added to the gradient (SimCLR: 1e-6).
        eta: trust coefficient (SimCLR: 0.001).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ):
        if lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_adaptation=True
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step (``closure`` re-evaluates the loss, as in SGD)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"] != 0:
                    grad = grad.add(p, alpha=group["weight_decay"])
                lr = group["lr"]
                if group["lars_adaptation"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["eta"] * w_norm / g_norm,
                        torch.ones_like(w_norm),
                    )
                    grad = grad * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-lr)
        return loss


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Return the learning-rate multiplier at optimiser step ``step``.

    Linear warm-up from ``1 / warmup_steps`` to 1 over ``warmup_steps`` (Goyal et al. 2017, used
    by SimCLR), then half-cosine decay to ``min_ratio`` at ``total_steps`` (Loshchilov & Hutter
    2017 without restarts, as SimCLR and MoCo v2 use).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """Return the EMA momentum at ``step``: cosine ramp from ``base`` to ``final``.

    BYOL (Grill et al. 2020, sec. 3.2): ``tau = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2``;
    MoCo v3 uses the same schedule.
    """
    progress = min(1.0, step / max(1, total_steps))
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
