"""What a training run runs on, built once when it starts: build_run(...) -> RunParts (the model with its
head, freezing, LoRA and speed-ups; the DeepSpeed engine; the image encoder, collator, mixing sampler and
loader; the weight average). The Trainer (loop.py) keeps the parts and runs the steps."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from food_multids.config import ProjectConfig
from food_multids.data.adaptive_mix import AdaptiveMix
from food_multids.data.collator import create_collator
from food_multids.data.dataset import RecordDataset
from food_multids.data.labels import resolve_label_names
from food_multids.data.sampler import MixingSampler, mix_proportions
from food_multids.model.classifier import ClassifierMeta, LabelSpace, check_image_token, create_classifier
from food_multids.model.loading import load_tokenizer
from food_multids.model.lora import apply_lora
from food_multids.model.speedups import prepare_model
from food_multids.runtime.device import Placement
from food_multids.training.ema import WeightAverage
from food_multids.training.engine import create_engine, resolve_deepspeed_config
from food_multids.training.losses import Objective, class_counts, weight_table

logger = logging.getLogger(__name__)


@dataclass
class RunParts:
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    encoder: Any  # data.collator.ImageEncoder
    collator: Any
    sampler: MixingSampler
    train_loader: Any  # torch DataLoader
    target_mix: np.ndarray
    adaptive: AdaptiveMix | None
    ema: WeightAverage | None
    total_steps: int
    zero_stage: int
    lora: bool
    parameter_counts: dict[str, int]


def label_spaces(cfg: ProjectConfig, train: pd.DataFrame) -> dict[str, LabelSpace]:
    """Per-dataset label space with class names (label_name fields or a class_names file)."""
    names = resolve_label_names(cfg, train)
    return {spec.name: LabelSpace(spec.index, spec.num_classes, names[spec.name]) for spec in cfg.datasets}


def build_objective(cfg: ProjectConfig, train: pd.DataFrame, device: torch.device) -> Objective | None:
    """training.loss as a per-row objective, its class weights from the training set's counts; None for
    plain cross-entropy (train_step's default path)."""
    settings = cfg.training.loss
    if not settings.differs_from_ce():
        return None
    counts = class_counts(train["label"].to_numpy(), train["dataset_id"].to_numpy(),
                          [d.num_classes for d in cfg.datasets])
    table = weight_table(settings, list(cfg.dataset_names), counts, cfg.model.num_labels)
    if table is not None:
        for spec, row in zip(cfg.datasets, table, strict=True):
            used = row[:spec.num_classes]
            logger.info("Class weights of %s (training.loss %s%s): %.3g to %.3g", spec.name, settings.type,
                        f", class_weights {settings.class_weights}" if isinstance(settings.class_weights, str) else "",
                        used.min(), used.max())
    return Objective(settings, table, device)


def build_run(cfg: ProjectConfig, train: pd.DataFrame, place: Placement, dtype: torch.dtype, model_path: Path,
              make_loader: Callable[..., Any]) -> RunParts:
    """The run's parts, seeded by training.seed (the new head's initialisation and anything else random).
    `make_loader(dataset, batch_sampler, collator)`: the trainer's DataLoader settings."""
    t, names = cfg.training, list(cfg.dataset_names)
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    meta = ClassifierMeta(num_labels=cfg.model.num_labels, pooling=cfg.model.pooling,
                          enable_logits_masking=cfg.model.enable_logits_masking,
                          label_spaces=label_spaces(cfg, train), prompt=cfg.model.prompt)
    model = create_classifier(model_path, meta, cfg.model.torch_dtype, place.device, cfg.model.attn_implementation)
    model.freeze(cfg.model.freeze_vision_tower, cfg.model.freeze_merger, cfg.model.freeze_language_model)
    lora = cfg.model.finetuning == "lora"
    if lora:  # adapters + head (+ merger unless frozen) are all that train
        counts = apply_lora(model, cfg.model.lora, cfg.model.freeze_merger, model_path)
        if place.is_main:
            logger.info("LoRA r=%d alpha=%g on %d layers: %d of %d parameters train", cfg.model.lora.r,
                        cfg.model.lora.alpha, counts["adapted_layers"], counts["trainable_parameters"],
                        counts["total_parameters"])
    parameter_counts = model.parameter_counts()
    speedups = prepare_model(model, cfg.model, training=True)
    tokenizer = load_tokenizer(model_path)
    processor = model.kind.preprocessor_config(model_path, cfg.model.min_pixels, cfg.model.max_pixels)
    encoder, collator = create_collator(model_path, cfg.model, tokenizer, processor_config=processor)
    check_image_token(collator, model, model_path)
    sizes = np.bincount(train["dataset_id"].to_numpy(dtype=np.int64), minlength=len(names))
    global_batch = t.per_device_train_batch_size * place.world
    small = {n: int(c) for n, c in zip(names, sizes, strict=True) if c < global_batch}
    if small and place.is_main:
        logger.warning("Datasets with fewer training rows than one global batch (%d = %d per device x %d): %s; "
                       "each epoch sees them in less than one batch (lower per_device_train_batch_size?)",
                       global_batch, t.per_device_train_batch_size, place.world, small)
    target_mix = mix_proportions(sizes, cfg.data.mix_strategy, [d.weight for d in cfg.datasets],
                                 cfg.data.mix_temperature)
    sampler = MixingSampler(train["dataset_id"].to_numpy(), t.per_device_train_batch_size, place.world, place.rank,
                            t.seed, t.shuffle, cfg.data.mix_strategy, target_mix, cfg.data.resample_each_epoch)
    adaptive = AdaptiveMix(cfg.data.mix_adaptive, target_mix) if cfg.data.mix_strategy == "adaptive" else None
    train_loader = make_loader(RecordDataset(train, encoder, t.max_consecutive_bad_images), sampler, collator)
    total_steps = t.optimizer_steps(len(sampler))
    ds_config = resolve_deepspeed_config(cfg, place.world, dtype)
    engine, optimizer, scheduler = create_engine(model, cfg, ds_config, total_steps, place.device)
    zero_stage = ds_config["zero_optimization"].get("stage", 0)
    ema = None
    if t.ema is not None:
        if zero_stage == 3:
            raise ValueError("params:training.ema is not supported with ZeRO-3 (the parameters are partitioned); "
                             "use ZeRO-2 or set training.ema: null")
        ema = WeightAverage(engine.module, t.ema.decay, t.ema.start_step)
        if place.is_main:
            logger.info("Weight average of %d trained tensors (training.ema decay %g from step %d): the partial "
                        "evaluations score it and the best model saved is it", len(ema.params), t.ema.decay,
                        t.ema.start_step)
    if place.is_main:
        logger.info("Training %s on %s (%d process(es), ZeRO-%d, %s): %d optimizer steps, %d trainable parameters, "
                    "epoch = %d micro-batches of %d per process; target mix %s; %s", model_path.name,
                    place.device.type, place.world, zero_stage, dtype, total_steps,
                    parameter_counts["trainable_parameters"], len(sampler), t.per_device_train_batch_size,
                    {n: round(float(p), 3) for n, p in zip(names, target_mix, strict=True)}, speedups)
    return RunParts(engine, optimizer, scheduler, tokenizer, encoder, collator, sampler, train_loader, target_mix,
                    adaptive, ema, total_steps, zero_stage, lora, parameter_counts)
