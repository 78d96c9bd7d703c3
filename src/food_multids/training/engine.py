"""DeepSpeed setup: distributed init, the resolved DeepSpeed config, optimizer and LR schedule."""

from __future__ import annotations

import copy
import logging
import math

import torch

from food_multids.config import ProjectConfig

logger = logging.getLogger(__name__)

# Keys filled from training/model settings (HF Trainer's "auto" values work the same way).
_FILLED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")


def resolve_deepspeed_config(cfg: ProjectConfig, world_size: int, dtype: torch.dtype) -> dict:
    """The user's `deepspeed:` section with batch sizes, clipping and precision filled in."""
    ds = copy.deepcopy(cfg.deepspeed)
    t = cfg.training
    for section in ("optimizer", "scheduler"):
        if section in ds:
            logger.warning("deepspeed.%s is ignored: the optimizer (AdamW, per-part learning rates) and the "
                           "schedule come from training.* (learning_rate, lr_scheduler_type, warmup_*)", section)
            ds.pop(section)
    for key in _FILLED:
        if key in ds and ds[key] != "auto":
            logger.warning("deepspeed.%s=%r is replaced by the value derived from training.*", key, ds[key])
    ds["train_micro_batch_size_per_gpu"] = t.per_device_train_batch_size
    ds["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    ds["train_batch_size"] = t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size
    ds["gradient_clipping"] = t.max_grad_norm
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    if dtype == torch.bfloat16:
        # bf16 has fp32's exponent range and no loss scale to adjust: DeepSpeed's default per-tensor
        # inf/NaN scan (two reductions per gradient tensor plus a host sync every step) buys nothing.
        # A non-finite loss still stops training at the next logging step (Trainer._log_train_window).
        ds["bf16"].setdefault("check_grad_overflow", False)
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": dtype == torch.float16}
    ds.setdefault("zero_optimization", {"stage": 0})
    if world_size == 1 and t.single_process_zero_stage is not None:
        # ZeRO-2 on one process partitions nothing but still copies every gradient through its buckets.
        ds["zero_optimization"] = {**ds["zero_optimization"], "stage": t.single_process_zero_stage}
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    if ds["zero_optimization"].get("stage", 0) == 3:
        ds["zero_optimization"].setdefault("stage3_gather_16bit_weights_on_model_save", True)
    return ds


def lr_lambda(kind: str, warmup: int, total: int):
    """Linear warmup, then cosine or linear decay to 0, or constant."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


def create_engine(model, cfg: ProjectConfig, ds_config: dict, total_steps: int, device: torch.device):
    """deepspeed.initialize with a torch AdamW over per-part param groups and a LambdaLR schedule."""
    import deepspeed

    t = cfg.training
    groups = model.param_groups(t.learning_rate, t.vision_lr, t.head_lr, t.weight_decay)
    if not groups:
        raise ValueError("nothing to train: model.freeze_* freeze every part and the head has no parameters")
    # The fused kernel runs the whole update in a few launches instead of one per tensor.
    optimizer = torch.optim.AdamW(groups, fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t.lr_scheduler_type, t.warmup(total_steps), total_steps))
    engine, optimizer, _, schedule = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config, dist_init_required=False)
    return engine, optimizer, schedule
