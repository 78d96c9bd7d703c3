"""Adaptive mixing: dataset proportions steered by each dataset's loss during training.

The update is an exponentiated-gradient step on log-weights, as in DoReMi's Group-DRO step (Xie et al.
2023) and Skill-It's multiplicative weights (Chen et al. 2023): at every update, with the signal s_h
(each dataset's masked cross-entropy on its partial-evaluation subset, or on the last logging window),

    smoothed_h = a * smoothed_h + (1 - a) * s_h            (a = smoothing; the first value as is)
    excess_h   = smoothed_h - reference_h                   (reference: none -> 0; first_eval -> first value)
    log_w_h   += step_size * excess_h
    w          = softmax(log_w)
    mix        = (1 - c) * w + c * prior                    (c = prior_mix, prior = the temperature mix)
    mix        = max(mix, min_weight), renormalised

so a dataset whose loss is higher (or falls slower than its start) gets more of the next batches, and the
prior share keeps every dataset in the stream. log_w starts at log(prior). Pure numpy: the trainer
checkpoints `AdaptiveMix.state()`; the sampler gets each update as a schedule entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from food_multids.config import MixAdaptiveSettings


@dataclass
class AdaptiveMix:
    settings: MixAdaptiveSettings
    prior: np.ndarray
    log_weights: np.ndarray = field(init=False)
    smoothed: np.ndarray | None = None
    reference: np.ndarray | None = None
    updates: int = 0

    def __post_init__(self) -> None:
        self.prior = np.asarray(self.prior, dtype=np.float64)
        self.log_weights = np.log(np.maximum(self.prior, 1e-12))

    def mix(self) -> np.ndarray:
        """The proportions for the next batches."""
        s = self.settings
        w = np.exp(self.log_weights - self.log_weights.max())
        mixed = (1 - s.prior_mix) * w / w.sum() + s.prior_mix * self.prior
        mixed = np.maximum(mixed, s.min_weight)
        return mixed / mixed.sum()

    def update(self, signal: np.ndarray) -> np.ndarray:
        """One step from per-dataset losses (NaN: a dataset with no sample this time keeps its value)."""
        s = self.settings
        signal = np.asarray(signal, dtype=np.float64)
        fresh = np.isfinite(signal)
        if self.smoothed is None:
            self.smoothed = np.full(len(signal), np.nan)
        seen = np.isfinite(self.smoothed)
        # A dataset's first value is taken as is; NaN until a dataset has had a sample.
        self.smoothed = np.where(fresh & seen,
                                 s.smoothing * self.smoothed + (1 - s.smoothing) * np.where(fresh, signal, 0),
                                 np.where(fresh, signal, self.smoothed))
        if self.reference is None:
            self.reference = np.full(len(signal), np.nan if s.reference == "first_eval" else 0.0)
        self.reference = np.where(np.isnan(self.reference), self.smoothed, self.reference)  # first_eval: first value
        # A dataset not seen yet does not move (its excess is 0 until it has a value).
        self.log_weights = self.log_weights + s.step_size * np.nan_to_num(self.smoothed - self.reference, nan=0.0)
        self.updates += 1
        return self.mix()

    def state(self) -> dict:
        return {"log_weights": self.log_weights.tolist(), "updates": self.updates,
                "smoothed": None if self.smoothed is None else self.smoothed.tolist(),
                "reference": None if self.reference is None else self.reference.tolist()}

    def load_state(self, state: dict) -> None:
        self.log_weights = np.asarray(state["log_weights"], dtype=np.float64)
        self.updates = state["updates"]
        self.smoothed = None if state["smoothed"] is None else np.asarray(state["smoothed"], dtype=np.float64)
        self.reference = None if state["reference"] is None else np.asarray(state["reference"], dtype=np.float64)
