"""The training loop: DeepSpeed steps, per-dataset windows, partial evaluation, best model, checkpoints.

Read top to bottom: `Trainer.run` prepares, optionally resumes, then iterates micro-batches; every
optimizer step goes through `_after_step` (log -> evaluate -> checkpoint -> stop?).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from food_multids.config import ProjectConfig
from food_multids.config.paths import resolve_path
from food_multids.data.adaptive_mix import AdaptiveMix
from food_multids.data.dataset import RecordDataset
from food_multids.data.sampler import ShardedEvalSampler
from food_multids.data.tables import partial_eval_subset
from food_multids.helpers.interrupts import StopFlag, TrainingInterrupted
from food_multids.helpers.metrics import (
    format_eval_lines,
    format_train_line,
    format_train_lines,
    stratified_summary,
    summarize,
)
from food_multids.helpers.progress import progress
from food_multids.model.classifier import (
    TRAINING_INFO,
)
from food_multids.model.loading import resolve_dtype
from food_multids.runtime.device import Placement
from food_multids.runtime.files import fsync_tree, write_json_atomic
from food_multids.runtime.scoring import (
    MODEL_INPUTS,
    EvalOutput,
    PerDatasetSums,
    all_reduce_,
    evaluate,
    gather_rows,
    to_device,
)
from food_multids.tracking import Trackers
from food_multids.training import checkpoint as ckpt
from food_multids.training.ema import WeightAverage
from food_multids.training.losses import Objective
from food_multids.training.output_dir import FINISHED, prepare_output_dir, reporting_write_failure
from food_multids.training.selection import BestModelSelector, metric_rows
from food_multids.training.setup import build_objective, build_run

logger = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    history: dict
    manifest: dict


TRAIN_SUMS = ("loss", "correct", "count", "skipped")


def train_step(engine, batch: dict, device: torch.device, dtype: torch.dtype, sums: PerDatasetSums,
               objective: Objective | None = None) -> None:
    """One micro-batch: forward, masked cross-entropy (or training.loss's `objective`), backward and
    DeepSpeed's step (which applies the optimizer at accumulation boundaries); the batch's loss, hits,
    count and failed images (and objective) are added to `sums` on the device, with no host
    synchronisation. The trainer and bench/gpu.py both call it."""
    if batch.get("all_failed"):
        raise RuntimeError(f"all {batch['skipped']} images of a training batch failed to load (see the warnings "
                           "above): training stops rather than take a step on no data. Fix or remove those images "
                           "in the training JSONL and resume (training.resume_from_checkpoint: auto).")
    batch = to_device(batch, device, dtype)
    logits = engine(**{k: batch[k] for k in MODEL_INPUTS})
    losses = F.cross_entropy(logits, batch["labels"], reduction="none")
    if objective is None:
        engine.backward(losses.mean())
    else:
        optimised = objective(logits, batch["labels"], batch["num_classes"], batch["dataset_ids"], ce=losses)
        engine.backward(optimised.mean())
    engine.step()
    with torch.no_grad():
        ds = batch["dataset_ids"]
        if objective is not None:
            sums.add("objective", ds, optimised.detach())
        sums.add("loss", ds, losses.detach())
        sums.add("correct", ds, logits.argmax(-1) == batch["labels"])
        sums.add("count", ds)
        sums.add("skipped", batch["skipped_dataset_ids"])


class Trainer:
    def __init__(self, cfg: ProjectConfig, place: Placement, train: pd.DataFrame, eval_subset: pd.DataFrame,
                 full_eval: pd.DataFrame | None = None, run_id: str | None = None, tracking_uri: str | None = None):
        """`place`: this process's device and rank in the process group its caller joined (join_process_group)."""
        self.cfg, self.t, self.place = cfg, cfg.training, place
        self.train_df, self.eval_df, self.full_eval_df = train, eval_subset, full_eval
        self.device, self.rank, self.world, self.is_main = place.device, place.rank, place.world, place.is_main
        self.names = list(cfg.dataset_names)
        self.dtype = resolve_dtype(cfg.model.torch_dtype, self.device)
        self.output_dir = self.t.resolved_output_dir()
        self.trackers = Trackers(cfg, run_id, tracking_uri, enabled=self.is_main)
        self.model_path = resolve_path(cfg.model.name_or_path)
        self.greater_is_better = self.t.best_metric_greater_is_better()
        # State that a checkpoint carries (see _state / _restore).
        self.global_step, self.micro_step, self.epoch, self.batch_in_epoch = 0, 0, 0, 0
        # Training metrics since the last logging step (a checkpoint carries them: exact resume).
        self.objective = build_objective(cfg, train, self.device)
        self.ema: WeightAverage | None = None  # training.ema, built with the engine
        fields = TRAIN_SUMS + (("objective",) if self.objective is not None else ())
        self.window = PerDatasetSums(fields, len(self.names), self.device)
        self.evals_without_improvement, self.eval_count = 0, 0
        # N_h, each dataset's full validation size: the weights of the overall partial estimate.
        self.population = (np.bincount(full_eval["dataset_id"].to_numpy(dtype=np.int64), minlength=len(self.names))
                           if full_eval is not None else None)
        # Equal eval ratios sample every dataset alike: the pooled value is then the estimate itself.
        self.proportional = len({d.eval_ratio for d in cfg.datasets}) == 1
        # The best model and the candidates kept for the full-set re-rank (a checkpoint carries them).
        self.selector = BestModelSelector(self.t.metric_for_best_model, self.t.best_model_selection,
                                          self.greater_is_better, z=self.t.selection_z,
                                          confidence=cfg.evaluation.confidence,
                                          keep_top_k=self.t.keep_top_k_checkpoints,
                                          num_datasets=len(self.names), population=self.population,
                                          proportional=self.proportional)
        self.records: list[dict] = []
        # Adaptive mixing: every update's (epoch, micro-batch, proportions), from which the sampler's order
        # follows; a checkpoint carries it. _mix_changed restarts the loader on the new proportions.
        self.mix_schedule: list[tuple[int, int, list[float]]] = []
        self._mix_changed = False
        self.stopped_early = False
        self.stop = StopFlag()
        # Built by _build (setup.py's build_run) when the run starts, after the output folder is prepared.
        self.engine = self.optimizer = self.scheduler = None
        self.tokenizer = self.encoder = self.collator = self.sampler = self.train_loader = None
        self.target_mix: np.ndarray | None = None
        self.adaptive: AdaptiveMix | None = None
        self.lora, self.total_steps, self.zero_stage = cfg.model.finetuning == "lora", 0, 0
        self.parameter_counts: dict[str, int] = {}
        self._window_start = 0.0

    @property
    def best(self) -> dict | None:
        return self.selector.best

    # -- setup ------------------------------------------------------------------------------------
    def _build(self) -> None:
        """The model, engine, data pipeline and sampler of this run (setup.py), kept on the trainer."""
        parts = build_run(self.cfg, self.train_df, self.place, self.dtype, self.model_path, self._loader)
        self.engine, self.optimizer, self.scheduler = parts.engine, parts.optimizer, parts.scheduler
        self.tokenizer, self.encoder, self.collator = parts.tokenizer, parts.encoder, parts.collator
        self.lora = parts.lora
        self.sampler, self.train_loader, self.total_steps = parts.sampler, parts.train_loader, parts.total_steps
        self.target_mix, self.adaptive, self.ema = parts.target_mix, parts.adaptive, parts.ema
        self.zero_stage, self.parameter_counts = parts.zero_stage, parts.parameter_counts

    def _loader(self, dataset, batch_sampler, collator=None) -> DataLoader:
        workers = self.t.dataloader_num_workers
        # Its own generator: each new iterator draws a base seed for its workers, which from the global
        # generator would shift the random stream (LoRA dropout) of a resumed run, whose iterator starts
        # mid-epoch. (Workers do nothing random with it today.)
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collator or self.collator,
                          num_workers=workers,
                          pin_memory=self.t.dataloader_pin_memory and self.device.type == "cuda",
                          persistent_workers=False, prefetch_factor=4 if workers else None,
                          generator=torch.Generator().manual_seed(self.t.seed + self.rank))

    def _eval_loader(self, frame: pd.DataFrame, batch_size: int) -> DataLoader:
        dataset = RecordDataset(frame, self.encoder, self.t.max_consecutive_bad_images)
        return self._loader(dataset, ShardedEvalSampler(len(frame), batch_size, self.world, self.rank))

    # -- resume ------------------------------------------------------------------------------------
    def _prepare_output_dir(self) -> Path | None:
        """Checkpoint to resume from, or None (then leftovers of an earlier run are cleared): output_dir.py's
        policy, with this run's ranks."""
        return prepare_output_dir(self.output_dir, self.t, self.is_main, self._barrier)

    def _state(self) -> dict:
        return {"global_step": self.global_step, "micro_step": self.micro_step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "window": self.window.state(), **self.selector.state(),
                "evals_without_improvement": self.evals_without_improvement, "eval_count": self.eval_count,
                "mix_schedule": self.mix_schedule, "adaptive_mix": self.adaptive.state() if self.adaptive else None,
                # Rank 0's client state is the one DeepSpeed writes (ZeRO <= 2): no host copy on the other ranks.
                "ema": self.ema.state() if self.ema is not None and self.is_main else None,
                "records": self.records, "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                                 "python": random.getstate(),
                                                 # dropout (LoRA) on a GPU draws from the device's generator
                                                 "cuda": torch.cuda.get_rng_state(self.device)
                                                 if self.device.type == "cuda" else None}}

    def _restore(self, source: Path) -> None:
        # A LoRA checkpoint holds only what trains (the frozen base is loaded from model.name_or_path).
        _, state = self.engine.load_checkpoint(str(source.parent), tag=source.name, load_module_strict=not self.lora)
        if state is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {source}")
        for key in ("global_step", "micro_step", "epoch", "batch_in_epoch", "evals_without_improvement",
                    "eval_count", "records"):
            setattr(self, key, state[key])
        self.window.load_state(state["window"])
        self.selector.load_state(state)
        self.mix_schedule = [tuple(entry) for entry in state.get("mix_schedule") or []]
        if self.adaptive is not None and state.get("adaptive_mix"):
            self.adaptive.load_state(state["adaptive_mix"])
        if self.ema is not None:
            if not state.get("ema"):
                raise ValueError(f"training.ema is set but the checkpoint {source} holds no weight average (it was "
                                 "written without training.ema): resume without it, or start fresh")
            self.ema.load_state(state["ema"])
        self.sampler.set_schedule(self.mix_schedule)
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if self.is_main:
            logger.info("Resumed from %s: step %d, epoch %d, micro-batch %d of the epoch", source,
                        self.global_step, self.epoch, self.batch_in_epoch)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> TrainingResult:
        """Train to the end; SIGINT/SIGTERM stop after the current optimizer step with a checkpoint
        saved, raising TrainingInterrupted."""
        with self.stop.active():
            try:
                result = self._run()
            except BaseException:
                self.trackers.close(failed=True)
                raise
            self.trackers.close()
        if self.stop.signum is not None:  # arrived during the last step: the run is complete, but stop here
            raise TrainingInterrupted(self.stop.signum, f"stopped by {signal.Signals(self.stop.signum).name} as "
                                      f"training finished (step {self.global_step}); the run is complete in "
                                      f"{self.output_dir}")
        return result

    def _run(self) -> TrainingResult:
        source = self._prepare_output_dir()
        if source is not None and self.is_main:  # one rank reads the files; a mismatch stops the launcher
            ckpt.verify_checkpoint(source)  # before anything is loaded from it
        self._build()
        if source is not None:
            self._restore(source)
        self.engine.train()
        bar = progress(total=self.total_steps, initial=self.global_step, desc="train", unit="step",
                       mode=self.t.progress_bar) if self.is_main else None
        self._window_start = time.perf_counter()
        done = self.global_step >= self.total_steps or self.stopped_early
        while not done:
            self.sampler.set_position(self.epoch, self.batch_in_epoch)
            for batch in self.train_loader:
                self._train_micro_batch(batch)
                self.batch_in_epoch += 1
                if self.micro_step % self.t.gradient_accumulation_steps == 0:
                    self.global_step += 1
                    if self.ema is not None:
                        self.ema.update(self.global_step)
                    if bar is not None:
                        bar.update(1)
                    done = self._after_step(bar)
                    if done or self._mix_changed:  # new proportions: restart the loader where we are
                        break
            self._mix_changed = False
            if not done and self.batch_in_epoch >= len(self.sampler):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if bar is not None:
            bar.close()
        return self._finish()

    def _train_micro_batch(self, batch: dict) -> None:
        train_step(self.engine, batch, self.device, self.dtype, self.window, self.objective)
        self.micro_step += 1

    def _after_step(self, bar) -> bool:
        step = self.global_step
        last = step >= self.total_steps
        if step % self.t.logging_steps == 0 or last:
            self._log_train_window(bar)
        if step % self.t.eval_steps == 0 or last:
            with self.ema.applied() if self.ema is not None else contextlib.nullcontext():  # a new best's save too
                self._evaluate_and_track()
        saved = step % self.t.save_steps == 0 or last
        if saved:
            self._save_checkpoint()
        if not (last or self.stopped_early) and self._stop_requested():
            if not saved:
                self._save_checkpoint()
            self._interrupted(bar)
        return last or self.stopped_early

    def _stop_requested(self) -> bool:
        """A signal arrived (on any rank). One process: a plain attribute read every step. Several: all
        ranks must stop at the same step, so they agree at logging steps (which sync anyway)."""
        if self.world == 1:
            return self.stop.signum is not None
        if self.global_step % self.t.logging_steps:
            return False
        flag = torch.tensor([1.0 if self.stop.signum is not None else 0.0], device=self.device)
        all_reduce_([flag], op="max")
        return bool(flag.item())

    def _interrupted(self, bar) -> None:
        if bar is not None:
            bar.close()
        path = self.output_dir / "checkpoints" / ckpt.step_tag(self.global_step)
        name = signal.Signals(self.stop.signum).name if self.stop.signum else "a signal on another rank"
        raise TrainingInterrupted(self.stop.signum or signal.SIGTERM,
                                  f"training stopped by {name} at step {self.global_step} of {self.total_steps}; "
                                  f"resumable checkpoint {path}; run again with training.resume_from_checkpoint: "
                                  "auto to continue exactly where it stopped")

    def _log_train_window(self, bar) -> None:
        sums = self.window.totals()
        elapsed = time.perf_counter() - self._window_start
        if not np.isfinite(sums["loss"]).all():
            bad = [n for n, v in zip(self.names, sums["loss"], strict=True) if not np.isfinite(v)]
            raise FloatingPointError(
                f"non-finite training loss for {bad} in the {self.t.logging_steps} steps up to step "
                f"{self.global_step}; "
                "lower training.learning_rate, or set deepspeed.bf16.check_grad_overflow: true to skip steps with "
                "non-finite gradients")
        metrics = summarize(sums["loss"], sums["correct"], sums["count"], self.names)
        total = sums["count"].sum()
        if "objective" in sums:  # what training.loss optimises, beside the plain masked cross-entropy
            for i, name in enumerate(self.names):
                if sums["count"][i]:
                    metrics[f"{name}_objective"] = float(sums["objective"][i] / sums["count"][i])
            metrics["overall_objective"] = float(sums["objective"].sum() / total) if total else float("nan")
        for i, name in enumerate(self.names):
            metrics[f"{name}_share"] = float(sums["count"][i] / total) if total else 0.0
        metrics["learning_rate"] = float(self.scheduler.get_last_lr()[-1])
        metrics["images_per_second"] = float(total / elapsed) if elapsed > 0 else 0.0
        metrics["epoch"] = self.epoch + self.batch_in_epoch / len(self.sampler)
        metrics["skipped_images"] = float(sums["skipped"].sum())
        for i, name in enumerate(self.names):
            if sums["skipped"][i]:
                metrics[f"{name}_skipped_images"] = float(sums["skipped"][i])
        self.window.zero_()
        self._window_start = time.perf_counter()
        if self.adaptive is not None and self.cfg.data.mix_adaptive.signal == "train_loss":
            self._steer([metrics.get(f"{n}_loss", float("nan")) for n in self.names], "train_loss")
        if not self.is_main:
            return
        self.records.append({"step": self.global_step, "kind": "train", "metrics": metrics})
        if self.t.log_format == "seed":
            for line in format_train_lines(metrics, self.names):
                logger.info(line)
            logger.info("step %d/%d  lr %.3g  %.1f img/s  mix %s", self.global_step, self.total_steps,
                        metrics["learning_rate"], metrics["images_per_second"],
                        {n: round(metrics[f"{n}_share"], 3) for n in self.names})
        else:
            logger.info(format_train_line(metrics, self.names, self.global_step, self.total_steps))
        self.trackers.log({f"train_{k}": v for k, v in metrics.items()}, self.global_step)
        if bar is not None and "overall_loss" in metrics:
            bar.set_postfix(loss=f"{metrics['overall_loss']:.4f}", acc=f"{metrics['overall_accuracy']:.3f}",
                            img_s=f"{metrics['images_per_second']:.1f}")

    def _score(self, frame: pd.DataFrame, desc: str) -> EvalOutput:
        return evaluate(self.engine.module, self._eval_loader(frame, self.t.per_device_eval_batch_size), self.device,
                        len(self.names), masking=self.cfg.model.enable_logits_masking, dtype=self.dtype, desc=desc,
                        progress_mode=self.t.progress_bar, per_row=True)

    def _metric_rows(self, out: EvalOutput) -> dict[str, np.ndarray] | None:
        """Every rank's per-image values of metric_for_best_model: identical on every rank, so all decide alike."""
        rows = gather_rows({k: v.tolist() for k, v in out.per_row.items()}, self.world)
        return metric_rows(self.t.metric_for_best_model, self.names, rows)

    def _evaluate_and_track(self) -> None:
        strategy = self.t.eval_subset_strategy
        frame = partial_eval_subset(self.eval_count, strategy, self.eval_df, self.full_eval_df, self.cfg.datasets,
                                    self.t.seed)
        self.eval_count += 1
        out = self._score(frame, "partial eval")
        metrics = stratified_summary(out.loss_sum, out.correct, out.count, self.names, self.population,
                                     self.cfg.evaluation.confidence, self.proportional)
        if not self.cfg.model.enable_logits_masking:
            metrics["out_of_range_predictions"] = float(out.out_of_range)
        key = self.t.metric_for_best_model  # one the evaluation produces: ProjectConfig checked it
        rows = self._metric_rows(out)
        if strategy == "fresh" and self.t.best_model_selection == "paired" and rows is not None:
            # A fresh draw gives the unbiased curve, but two checkpoints are compared on the same images:
            # the fixed subset, scored alongside (the price: a second partial evaluation).
            rows = self._metric_rows(self._score(self.eval_df, "selection eval"))
        if self.adaptive is not None and self.cfg.data.mix_adaptive.signal == "eval_loss":
            self._steer([metrics.get(f"{n}_loss", float("nan")) for n in self.names], "eval_loss")
        verdict = self.selector.observe(self.global_step, metrics, rows, strategy)
        improved, reason = verdict.improved, verdict.reason
        if self.is_main:
            logger.info("Partial evaluation at step %d (%s subset, %d samples):", self.global_step, strategy,
                        int(out.count.sum()))
            for line in format_eval_lines(metrics, self.names):
                logger.info(line)
            if not improved or not verdict.kept:  # a new best says why on its 🏆 line
                logger.info("Best model %s: %s", "replaced" if improved else "kept", reason)
            self.records.append({"step": self.global_step, "kind": "eval", "metrics": metrics, "subset": strategy,
                                 "improved": improved, "reason": reason})
            self.trackers.log({f"eval_{k}": v for k, v in metrics.items()}, self.global_step)
        if improved:
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
            patience = self.t.early_stopping_patience
            if patience is not None and self.evals_without_improvement >= patience:
                self.stopped_early = True
                if self.is_main:
                    logger.info("Early stopping at step %d: %s has not improved (%s) for %d evaluations (best %.4f at "
                                "step %d)", self.global_step, key, self.t.best_model_selection,
                                self.evals_without_improvement, self.best["value"], self.best["step"])
        if verdict.kept:
            self._save_model(verdict.entry, improved, reason)

    def _steer(self, signal: list[float], kind: str) -> None:
        """Adaptive mixing: new proportions from each dataset's loss, from the next micro-batch on (every rank
        computes the same: the losses are all-reduced)."""
        mix = self.adaptive.update(np.asarray(signal, dtype=np.float64))
        self.mix_schedule.append((self.epoch, self.batch_in_epoch, [float(p) for p in mix]))
        self.sampler.set_schedule(self.mix_schedule)
        self._mix_changed = True
        if not self.is_main:
            return
        weights = {n: float(p) for n, p in zip(self.names, mix, strict=True)}
        logger.info("Adaptive mix from step %d (%s %s): %s", self.global_step, kind,
                    {n: round(float(v), 4) for n, v in zip(self.names, signal, strict=True)},
                    {n: round(v, 3) for n, v in weights.items()})
        self.records.append({"step": self.global_step, "kind": "mix", "signal": kind,
                             "metrics": {**weights,
                                         **{f"{n}_signal": float(v) for n, v in zip(self.names, signal, strict=True)}}})
        self.trackers.log({**{f"mix_weight_{n}": v for n, v in weights.items()},
                           **{f"mix_signal_{n}": float(v) for n, v in zip(self.names, signal, strict=True)}},
                          self.global_step)

    def _gathered_state_dict(self) -> dict | None:
        if self.zero_stage == 3:
            # Every rank must call it; with LoRA only what trains (the frozen base is never saved).
            return self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=self.lora)
        return self.engine.module.state_dict() if self.is_main else None

    def _save_model(self, entry: dict, is_best: bool, reason: str = "") -> None:
        """Write this step's model (every rank takes part: ZeRO-3 gathers), publish it under best/ and
        point best.json at the best and the candidates."""
        state = self._gathered_state_dict()
        if self.is_main:
            staged = self.output_dir / f".best-staging-{self.global_step}"
            shutil.rmtree(staged, ignore_errors=True)
            run = {"mlflow_run_id": self.trackers.run_id}
            info = {**self.best, **run} if is_best else {
                "metric": self.best["metric"], "value": entry["value"], "step": entry["step"],
                "greater_is_better": self.greater_is_better, "subset": self.t.eval_subset_strategy, **run}
            try:
                with reporting_write_failure("best model", staged):
                    self.engine.module.save_pretrained(staged, self.tokenizer, self._preprocessor_config(), state)
                    # The model says which run and step it comes from, whichever catalog version is loaded later.
                    # With the backbone and settings it was trained with: a later full_eval/report, run with
                    # other parameters, still describes this model.
                    write_json_atomic(staged / TRAINING_INFO, {
                        **info, "backbone": str(self.model_path.resolve()), "parameters": self.cfg.to_params(),
                        "finetuning": self.cfg.model.finetuning, **self.parameter_counts})
                    path = ckpt.publish_best(self.output_dir, staged, entry["step"], {**self.best, **run},
                                             self.selector.candidates)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            metric, value = self.best["metric"], entry["value"]
            if is_best:
                logger.info("🏆 New best model! %s: %.4f (step %d; %s) -> %s", metric, value, self.global_step,
                            reason or "replaced", path)
                self.trackers.log({"best_model_step": float(self.global_step), f"best_{metric}": value},
                                  self.global_step)
            else:
                logger.info("Kept step %d (%s %.4f) among the %d candidates for the full-set re-rank -> %s",
                            self.global_step, metric, value, len(self.selector.candidates), path)
        self._barrier()

    def _preprocessor_config(self) -> dict:
        return self.engine.module.kind.preprocessor_config(self.model_path, self.cfg.model.min_pixels,
                                                           self.cfg.model.max_pixels)

    def _save_checkpoint(self) -> None:
        tag = ckpt.step_tag(self.global_step)
        path = self.output_dir / "checkpoints" / tag
        what = f"checkpoint of step {self.global_step}"
        with reporting_write_failure(what, path):  # an incomplete folder has no COMPLETE marker: never used
            self.engine.save_checkpoint(str(path.parent), tag=tag, client_state=self._state(),
                                        exclude_frozen_parameters=self.lora)
            if not self.is_main and os.environ.get("LOCAL_RANK", "0") == "0":
                # Another machine's shards reach shared storage before rank 0 seals the checkpoint (rank 0
                # syncs its own machine's in mark_complete); one process per machine is enough.
                fsync_tree(path)
        self._barrier()
        if self.is_main:
            with reporting_write_failure(what, path):
                ckpt.mark_complete(path, self.global_step, {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch})
            removed = ckpt.prune_checkpoints(self.output_dir, self.t.save_total_limit,
                                             self.best["step"] if self.best else None)
            logger.info("Checkpoint %s%s", path, f" (removed {[p.name for p in removed]})" if removed else "")
        self._barrier()

    def _barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def _finish(self) -> TrainingResult:
        best = ckpt.read_best_pointer(self.output_dir)
        manifest = {"output_dir": str(self.output_dir), "total_steps": self.total_steps,
                    "final_step": self.global_step, "stopped_early": self.stopped_early,
                    "checkpoints": [{"step": s, "path": str(p)} for s, p in ckpt.complete_checkpoints(self.output_dir)],
                    "best": best, "mlflow_run_id": self.trackers.run_id, "world_size": self.world}
        history = {"records": self.records, "best": self.best, "datasets": self.names,
                   "metric_for_best_model": self.t.metric_for_best_model,
                   "best_model_selection": self.t.best_model_selection, "candidates": self.selector.candidates,
                   "confidence": self.cfg.evaluation.confidence,
                   "eval_subset_strategy": self.t.eval_subset_strategy,
                   "target_mix": {n: float(p) for n, p in zip(self.names, self.target_mix, strict=True)},
                   "mix_strategy": self.cfg.data.mix_strategy}
        if self.is_main:
            # The final step: where a later full evaluation logs its metrics (monotonic steps for WandB).
            for kept in (best.get("candidates") or [best]) if best else []:
                info_file = Path(kept["path"]) / TRAINING_INFO
                write_json_atomic(info_file, {**json.loads(info_file.read_text()), "final_step": self.global_step})
            write_json_atomic(self.output_dir / FINISHED, manifest)
        return TrainingResult(history, manifest)
