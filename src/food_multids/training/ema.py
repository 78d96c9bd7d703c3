"""An exponential moving average of the weights that train (training.ema).

The shadow copy is float32 whatever the training dtype (a bf16 average would round away updates of
1 - decay, 0.1 % at 0.999). It covers what trains: every parameter with requires_grad, i.e. the whole
model in full fine-tuning, the adapters, head and merger with LoRA. Under ZeRO stages 0-2 every rank holds
the full parameters after each step, so every rank keeps the same shadow (no communication); under ZeRO-3
the parameters are partitioned and the config refuses training.ema.

Until `start_step` the average equals the weights; after it, at each optimizer step,
shadow = decay * shadow + (1 - decay) * weights. `applied()` puts the average into the model for an
evaluation (and the best-model save it may trigger) and restores the trained weights after. Memory: the
float32 shadow, one temporary tensor per update, and a copy of the trained weights (their dtype) while
an evaluation runs; checkpoints hold the shadow once (rank 0's model-states file).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float, start_step: int = 0):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.decay, self.start_step = float(decay), int(start_step)
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.averaged_steps = 0  # optimizer steps folded into the average (0 until start_step)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step`: follow the weights until start_step, average after it (no host sync).
        float32 weights in one fused call; others (bf16) one tensor at a time, so that the float32 copy of
        a weight exists for one tensor only, not for the whole model at once."""
        follow = step <= self.start_step
        if all(p.dtype == torch.float32 for p in self.params):
            current = [p.detach() for p in self.params]
            if follow:
                torch._foreach_copy_(self.shadow, current)
            else:
                torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)
        else:
            for shadow, p in zip(self.shadow, self.params, strict=True):
                if follow:
                    shadow.copy_(p.detach())
                else:
                    shadow.lerp_(p.detach().float(), 1.0 - self.decay)
        if not follow:
            self.averaged_steps += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The average in the model's parameters for the duration; the trained weights back after."""
        trained = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            for p, t in zip(self.params, trained, strict=True):
                p.copy_(t)

    def state(self) -> dict:
        return {"shadow": [s.cpu() for s in self.shadow], "averaged_steps": self.averaged_steps,
                "decay": self.decay, "start_step": self.start_step}

    def load_state(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow, strict=True)):
            raise ValueError(f"the checkpoint's weight average holds {len(shadow)} tensors but this model trains "
                             f"{len(self.shadow)} with other shapes: it was written with other model settings")
        for mine, saved in zip(self.shadow, shadow, strict=True):
            mine.copy_(saved.to(mine.device))
        self.averaged_steps = int(state["averaged_steps"])
