"""Which checkpoint is the best, and which are kept for the full-set re-rank: pure state, no torch.

Every partial evaluation hands `BestModelSelector.observe` its metrics (`metrics.stratified_summary`) and
each scored image's value of metric_for_best_model (`metric_rows`). The rule (training.best_model_selection)
decides whether the checkpoint replaces the best; the candidates are the best plus the
keep_top_k_checkpoints - 1 others with the best partial estimates. The trainer saves a model folder when
`observe` says the checkpoint is kept, and checkpoints `state()` for an exact resume; bench/selection.py
replays the same decisions on recorded per-image results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from food_multids.helpers.metrics import (
    Rule,
    choose_best,
    sampled_fractions,
    stratified_mean_se,
    stratum_weights,
    z_for,
)


def metric_rows(key: str, names: Sequence[str], rows: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The per-image values of metric `key` ("overall_accuracy", "<dataset>_loss", ...) from scored rows
    (sample_id, dataset_id, correct, loss), restricted to that dataset; None for a metric with no
    per-image value (out_of_range_predictions) or no rows."""
    prefix, _, metric = key.rpartition("_")
    if metric not in ("accuracy", "loss") or prefix not in (*names, "overall") or not len(rows.get("sample_id", [])):
        return None
    ids = np.asarray(rows["dataset_id"], dtype=np.int64)
    keep = np.ones(len(ids), bool) if prefix == "overall" else ids == list(names).index(prefix)
    return {"sample_id": np.asarray(rows["sample_id"], dtype=np.int64)[keep], "dataset_id": ids[keep],
            "value": np.asarray(rows["correct" if metric == "accuracy" else "loss"], dtype=np.float64)[keep]}


@dataclass(frozen=True)
class Verdict:
    improved: bool  # the checkpoint is the new best
    reason: str
    kept: bool  # its model folder must be written (the best, or a re-rank candidate)
    entry: dict  # {"step", "value", "ci_low", "ci_high"}


class BestModelSelector:
    def __init__(self, key: str, rule: Rule, greater_is_better: bool, *, z: float = 1.0, confidence: float = 0.95,
                 keep_top_k: int = 1, num_datasets: int, population: np.ndarray | None = None,
                 proportional: bool = False):
        self.key, self.rule, self.greater, self.z = key, rule, greater_is_better, z
        self.z_confidence, self.keep_top_k, self.num_datasets = z_for(confidence), keep_top_k, num_datasets
        self.population, self.proportional = population, proportional
        self.best: dict | None = None
        self.best_rows: dict[str, np.ndarray] | None = None  # the best model's per-image values
        self.candidates: list[dict] = []

    def stratified(self, strata: np.ndarray, values: np.ndarray) -> tuple[float, float]:
        """Stratified mean of per-image `values` over the datasets `strata` and its standard error."""
        counts = np.bincount(strata, minlength=self.num_datasets).astype(np.float64)
        return stratified_mean_se(values, strata, stratum_weights(counts, self.population, self.proportional),
                                  sampled_fractions(counts, self.population))

    def bound(self, metrics: dict, rows: dict | None) -> float | None:
        """The pessimistic end of the metric's confidence interval: lower for accuracies, upper for losses
        (a normal interval of the stratified mean where no Wilson interval is logged)."""
        found = metrics.get(f"{self.key}_ci_low" if self.greater else f"{self.key}_ci_high")
        if found is None and rows is not None:
            mean, se = self.stratified(rows["dataset_id"], rows["value"])
            found = mean - self.z_confidence * se if self.greater else mean + self.z_confidence * se
        return found

    def paired(self, rows: dict | None) -> tuple[tuple[float, float] | None, int]:
        """((this checkpoint - the best, standard error), how many images) over the images both were scored on."""
        if rows is None or self.best_rows is None:
            return None, 0
        _, mine, theirs = np.intersect1d(rows["sample_id"], self.best_rows["sample_id"], assume_unique=True,
                                         return_indices=True)
        if not len(mine):
            return None, 0
        return self.stratified(rows["dataset_id"][mine],
                               rows["value"][mine] - self.best_rows["value"][theirs]), len(mine)

    def observe(self, step: int, metrics: dict, rows: dict | None, subset: str = "fixed") -> Verdict:
        """Judge one partial evaluation (`rows`: `metric_rows`, on the images the comparison uses)."""
        value = metrics[self.key]
        bound = self.bound(metrics, rows)
        paired, images = self.paired(rows) if self.rule == "paired" else (None, 0)
        improved, reason = choose_best(self.rule, self.greater, value, self.best, z=self.z, paired=paired, bound=bound,
                                       paired_images=images)
        entry = {"step": step, "value": value, "ci_low": metrics.get(f"{self.key}_ci_low"),
                 "ci_high": metrics.get(f"{self.key}_ci_high")}
        if improved:
            self.best = {"metric": self.key, "value": value, "step": step, "greater_is_better": self.greater,
                         "subset": subset, "selection": self.rule, "best_model_reason": reason, "bound": bound}
            self.best_rows = rows
        return Verdict(improved, reason, self._keep(entry, improved), entry)

    def _keep(self, entry: dict, improved: bool) -> bool:
        """Keep this checkpoint if it is the best or among the keep_top_k - 1 others with the best partial
        estimates (ties: the earlier step); the candidate it pushes out is dropped."""
        sign = 1.0 if self.greater else -1.0
        others = [c for c in [*self.candidates, entry] if c["step"] != self.best["step"]]
        others.sort(key=lambda c: (-sign * c["value"], c["step"]))
        best = entry if improved else next(c for c in self.candidates if c["step"] == self.best["step"])
        keep = sorted([best, *others[:self.keep_top_k - 1]], key=lambda c: c["step"])
        if entry not in keep:
            return False
        self.candidates = keep
        return True

    def state(self) -> dict:
        return {"best": self.best, "best_rows": self.best_rows, "candidates": self.candidates}

    def load_state(self, state: dict) -> None:
        self.best, self.best_rows = state.get("best"), state.get("best_rows")
        self.candidates = state.get("candidates") or []
        if self.best and not self.candidates:  # a checkpoint written before candidates were kept
            self.candidates = [{"step": self.best["step"], "value": self.best["value"]}]
