"""Batch samplers: the training mix (sharded, resumable) and sharded evaluation.

Training order is a pure function of (seed, epoch, strategy), so a run resumed at (epoch, batch)
sees exactly the batches an uninterrupted run would have seen. The loop, not the sampler, counts
consumed batches: DataLoader workers prefetch ahead of what was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np


def mix_proportions(sizes: Sequence[int], strategy: str, weights: Sequence[float] | None = None,
                    temperature: float = 1.0) -> np.ndarray:
    """Target share of each dataset in a batch for a mixing strategy."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if strategy == "concat":
        raw = sizes
    elif strategy == "weighted":
        raw = np.asarray(weights, dtype=np.float64)
    elif strategy in ("temperature", "adaptive"):  # adaptive starts from (and keeps a share of) this mix
        raw = sizes ** (1.0 / temperature)
    else:
        raise ValueError(f"unknown mix strategy {strategy!r}")
    return raw / raw.sum()


class MixingSampler:
    """Yields this rank's micro-batches (lists of row indices), epoch after epoch.

    concat: every row once per epoch, shuffled; the epoch is padded to a whole number of global batches
    by wrapping around, so every row is seen at least once on some rank.
    weighted / temperature: an epoch has as many rows as the data; each global batch draws its
    datasets in the target proportions (largest-remainder rounding per batch); rows within a dataset
    are taken in a seeded shuffled order, wrapping (oversampling) when a dataset runs out, with a
    fresh order each epoch when resample_each_epoch is on.
    adaptive: as weighted, with proportions that change during training: `schedule` lists
    (epoch, batch, proportions) from which each applies. The order stays a pure function of the seed and
    the schedule, so a resumed run given the same schedule sees the same batches.
    """

    def __init__(self, dataset_ids: np.ndarray, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, strategy: str = "concat",
                 proportions: np.ndarray | None = None, resample_each_epoch: bool = False,
                 schedule: Sequence[tuple[int, int, Sequence[float]]] = ()):
        self.dataset_ids = np.asarray(dataset_ids, dtype=np.int64)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.shuffle, self.strategy = seed, shuffle, strategy
        self.resample_each_epoch = resample_each_epoch
        self.num_datasets = int(self.dataset_ids.max(initial=-1)) + 1
        self.proportions = proportions
        self.epoch, self.start_batch = 0, 0
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = max(1, math.ceil(len(self.dataset_ids) / self.global_batch))
        self.schedule = list(schedule)
        self._counts_cache: dict[tuple, np.ndarray] = {}

    def set_schedule(self, schedule: Sequence[tuple[int, int, Sequence[float]]]) -> None:
        """adaptive: the proportions from (epoch, batch) on, for every update so far (in order)."""
        self.schedule = [(int(e), int(b), list(p)) for e, b, p in schedule]

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_position(self, epoch: int, batch: int) -> None:
        """Start the next iteration at micro-batch `batch` of `epoch` (resume)."""
        self.epoch, self.start_batch = epoch, batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All global rows of an epoch, in order, length batches_per_epoch * global_batch."""
        n = len(self.dataset_ids)
        total = self.batches_per_epoch * self.global_batch
        if self.strategy == "concat":
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            return np.resize(order, total)
        return self._mixed_order(epoch, total)

    def _mixed_order(self, epoch: int, total: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 1])
        pools = [np.flatnonzero(self.dataset_ids == d) for d in range(self.num_datasets)]
        adaptive = self.strategy == "adaptive"
        counts = self._adaptive_counts(epoch) if adaptive else self._per_batch_counts(rng)
        needed = counts.sum(axis=0)
        if adaptive and not self.resample_each_epoch:  # earlier epochs drew other amounts
            before = sum((self._adaptive_counts(e).sum(axis=0) for e in range(epoch)),
                         np.zeros(self.num_datasets, dtype=np.int64))
        streams = []
        for d, pool in enumerate(pools):
            # One pass of a dataset's rows spans epochs unless resampled: it continues where the last
            # epoch stopped, so an undersampled dataset still cycles through all its rows over time.
            draw_epoch = epoch if self.resample_each_epoch else 0
            offset = 0 if self.resample_each_epoch else epoch * int(needed[d])
            if adaptive and not self.resample_each_epoch:
                offset = int(before[d])
            reps = math.ceil((offset + needed[d]) / max(1, len(pool))) + 1
            drng = np.random.default_rng([self.seed, draw_epoch, 2, d])
            cycle = np.concatenate([drng.permutation(pool) if self.shuffle else pool for _ in range(reps)])
            streams.append(cycle[offset:offset + needed[d]])
        order = np.empty(total, dtype=np.int64)
        cursor = np.zeros(self.num_datasets, dtype=np.int64)
        for b in range(counts.shape[0]):
            parts = []
            for d in range(self.num_datasets):
                parts.append(streams[d][cursor[d]:cursor[d] + counts[b, d]])
                cursor[d] += counts[b, d]
            batch = np.concatenate(parts)
            # adaptive: each batch shuffled by its own generator, so a new schedule entry at batch k leaves
            # the batches before k exactly as they were (the shared stream would shift with the counts).
            shuffle = np.random.default_rng([self.seed, epoch, 3, b]) if adaptive else rng
            order[b * self.global_batch:(b + 1) * self.global_batch] = shuffle.permutation(batch)
        return order

    def _adaptive_counts(self, epoch: int) -> np.ndarray:
        """Per-batch counts of an epoch under the proportions the schedule gives each batch (its own
        generator: the counts of batches before a schedule entry do not depend on it)."""
        starts = [(b, p) for e, b, p in self.schedule if e == epoch]
        current = next((p for e, _, p in reversed(self.schedule) if e < epoch), self.proportions)
        key = (epoch, tuple(current), tuple((b, tuple(p)) for b, p in starts))
        if key not in self._counts_cache:
            # One entry per epoch: the current schedule's (an earlier epoch's stays for the stream offsets).
            self._counts_cache = {k: v for k, v in self._counts_cache.items() if k[0] != epoch}
            targets = np.tile(np.asarray(current, dtype=np.float64), (self.batches_per_epoch, 1))
            for b, p in starts:
                targets[b:] = np.asarray(p, dtype=np.float64)
            rng = np.random.default_rng([self.seed, epoch, 4])
            self._counts_cache[key] = self._per_batch_counts(rng, np.cumsum(targets, axis=0))
        return self._counts_cache[key]

    def _per_batch_counts(self, rng: np.random.Generator, cumulative: np.ndarray | None = None) -> np.ndarray:
        """(batches, datasets) row counts with each batch's total = global_batch and the running
        totals tracking the target proportions (so small shares are not rounded away). `cumulative`:
        per batch, the sum of the targets so far (adaptive); otherwise the fixed proportions."""
        target = np.asarray(self.proportions, dtype=np.float64)
        counts = np.zeros((self.batches_per_epoch, self.num_datasets), dtype=np.int64)
        given = np.zeros(self.num_datasets)
        for b in range(self.batches_per_epoch):
            ideal = (target * self.global_batch * (b + 1) if cumulative is None
                     else cumulative[b] * self.global_batch) - given
            base = np.floor(ideal).clip(min=0).astype(np.int64)
            short = self.global_batch - base.sum()
            if short > 0:
                frac = ideal - base + rng.random(self.num_datasets) * 1e-9
                base[np.argsort(-frac)[:short]] += 1
            elif short < 0:
                for d in np.argsort(-base)[: -short]:
                    base[d] -= 1
            counts[b], given = base, given + base
        return counts

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.epoch, self.start_batch
        order = self.epoch_order(epoch)
        lo = self.rank * self.batch_size
        for b in range(start, self.batches_per_epoch):
            chunk = order[b * self.global_batch:(b + 1) * self.global_batch]
            yield chunk[lo:lo + self.batch_size].tolist()
        self.epoch, self.start_batch = epoch + 1, 0


class ShardedEvalSampler:
    """Every row exactly once across ranks; each rank gets the same number of batches (ZeRO-3 runs
    collectives inside forward). Padding slots are encoded as negative indices (-1 - row) and carry
    weight 0 in the metrics."""

    def __init__(self, n: int, batch_size: int, world_size: int = 1, rank: int = 0):
        rows = np.arange(n)
        per_rank = math.ceil(len(rows) / world_size) if len(rows) else 0
        mine = rows[rank::world_size]
        pad = per_rank - len(mine)
        filler = -1 - rows[:pad] if pad > 0 else np.empty(0, dtype=np.int64)
        self.indices = np.concatenate([mine, filler]).astype(np.int64)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield self.indices[start:start + self.batch_size].tolist()
