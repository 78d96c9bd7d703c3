"""Scoring a model on a loader: the inference loop shared by partial evaluation (during training) and
the full evaluation; batches to the device; sums across ranks."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from food_multids.helpers.progress import progress

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "num_classes", "position_ids")


def to_device(batch: dict, device: torch.device, dtype: torch.dtype | None = None) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key == "pixel_values" and dtype is not None:
                value = value.to(dtype)
        out[key] = value
    return out


def all_reduce_(tensors: list[torch.Tensor], op: str = "sum") -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)


class PerDatasetSums:
    """Running float64 sums per dataset with named rows ("loss", "correct", ...), kept on the device.

    One (rows, datasets) tensor underneath, so adding is an index_add_ with no host sync, and summing
    across ranks or copying to the host is a single call for all of them.
    """

    def __init__(self, fields: tuple[str, ...], num_datasets: int, device: torch.device):
        self.fields = fields
        self.tensor = torch.zeros(len(fields), num_datasets, dtype=torch.float64, device=device)

    def add(self, field: str, dataset_ids: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Add `values` (default: 1 each) to the datasets of `dataset_ids`."""
        values = torch.ones_like(dataset_ids, dtype=torch.float64) if values is None else values.double()
        self.tensor[self.fields.index(field)].index_add_(0, dataset_ids, values)

    def totals(self) -> dict[str, np.ndarray]:
        """Summed over all ranks, on the host: {field: per-dataset array}. Syncs (once)."""
        summed = self.tensor.clone()
        all_reduce_([summed])
        host = summed.cpu().numpy()
        return {name: host[i] for i, name in enumerate(self.fields)}

    def zero_(self) -> None:
        self.tensor.zero_()

    def state(self) -> list:
        return self.tensor.cpu().tolist()

    def load_state(self, state: list) -> None:
        loaded = torch.tensor(state, dtype=torch.float64, device=self.tensor.device)
        if loaded.shape != self.tensor.shape:
            raise ValueError(f"the checkpoint's per-dataset sums have shape {tuple(loaded.shape)} but this run has "
                             f"{tuple(self.tensor.shape)} ({', '.join(self.fields)} x datasets): it was written with "
                             "other datasets.dataset_configs")
        self.tensor = loaded


@dataclass
class EvalOutput:
    loss_sum: np.ndarray  # per dataset, all ranks
    correct: np.ndarray
    count: np.ndarray
    out_of_range: int = 0  # predictions >= the sample's num_classes (only possible with masking off)
    skipped: int = 0  # images that could not be loaded, all ranks
    skipped_per_dataset: np.ndarray | None = None
    predictions: dict[str, list] = field(default_factory=dict)  # this rank's rows when collected
    # per_row: this rank's sample_id, dataset_id, correct (0/1) and loss of every scored image
    per_row: dict[str, np.ndarray] = field(default_factory=dict)


@torch.inference_mode()
def evaluate(model, loader, device: torch.device, num_datasets: int, *, top_k: int = 0, masking: bool = True,
             dtype: torch.dtype | None = None, desc: str = "eval", progress_mode: str = "auto",
             own_classes: bool = False, per_row: bool = False, temperature: torch.Tensor | None = None,
             temperature_grid: torch.Tensor | None = None) -> EvalOutput:
    """Masked (as in training) loss and accuracy sums per dataset; with top_k > 0 also per-row predictions;
    with per_row, each image's correctness and loss (kept on the device, copied to the host once at the end:
    the paired comparison of two checkpoints needs them, the sums cannot give them).

    With masking, top-k slots beyond a dataset's num_classes are -1 (probability 0), never a class
    of another dataset. `own_classes` ranks (and softmaxes) over the sample's dataset's classes even
    for a model trained without masking (predictions for new images); the sums stay as trained.
    `temperature` (one per dataset): the top-k probabilities are softmax(logits / T) of the row's dataset
    (calibrated; the ranking is unchanged). `temperature_grid` (datasets x G): each row also gets
    `grid_nll` and `grid_conf`, its loss and top-1 probability at each of its dataset's G temperatures
    (what temperature fitting and the calibration metrics need, without keeping whole logit rows).
    """
    was_training = model.training
    model.eval()
    sums = PerDatasetSums(("loss", "correct", "count", "out_of_range", "skipped"), num_datasets, device)
    columns = ("sample_id", "dataset_id", "label", "prediction", "confidence", "loss", "topk", "topk_prob")
    rows: dict[str, list] = {k: [] for k in columns}
    if temperature_grid is not None:
        rows.update(grid_nll=[], grid_conf=[])
    kept: dict[str, list[torch.Tensor]] = {k: [] for k in ("sample_id", "dataset_id", "correct", "loss", "weight")}
    bar = progress(total=len(loader), desc=desc, unit="batch", mode=progress_mode, leave=False)
    for batch in loader:
        batch = to_device(batch, device, dtype)
        sums.add("skipped", batch["skipped_dataset_ids"])
        logits = model(**{k: batch[k] for k in MODEL_INPUTS})
        labels, ds, weights = batch["labels"], batch["dataset_ids"], batch["weights"].double()
        loss = F.cross_entropy(logits, labels, reduction="none").double()
        pred = logits.argmax(dim=-1)
        sums.add("loss", ds, loss * weights)
        sums.add("correct", ds, (pred == labels).double() * weights)
        sums.add("count", ds, weights)
        sums.add("out_of_range", ds, (pred >= batch["num_classes"]).double() * weights)
        if per_row:
            for key, value in (("sample_id", batch["sample_ids"]), ("dataset_id", ds), ("correct", pred == labels),
                               ("loss", loss), ("weight", weights)):
                kept[key].append(value.detach())
        if top_k:
            keep = batch["weights"] > 0
            scores = logits.float()
            if own_classes and not masking:
                outside = torch.arange(scores.shape[-1], device=scores.device)[None, :] >= batch["num_classes"][:, None]
                scores = scores.masked_fill(outside, float("-inf"))
            if temperature_grid is not None:
                # Over the row's own classes, as predictions are served (own_classes), even for a model
                # trained without masking: the temperatures describe the probabilities users get.
                outside = torch.arange(scores.shape[-1], device=scores.device)[None, :] >= batch["num_classes"][:, None]
                own = scores.masked_fill(outside, float("-inf"))
                grid = temperature_grid[ds]  # (batch, G): each row's dataset's temperatures
                scaled = own[:, None, :] / grid[:, :, None]  # (batch, G, labels)
                logp = scaled.log_softmax(dim=-1)
                labelled = labels >= 0
                picked = logp.gather(2, labels.clamp(min=0)[:, None, None].expand(-1, grid.shape[1], 1)).squeeze(2)
                nll = torch.where(labelled[:, None], -picked, torch.full_like(picked, float("nan")))
                rows["grid_nll"].extend(nll[keep].cpu().tolist())
                rows["grid_conf"].extend(logp.max(dim=-1).values.exp()[keep].cpu().tolist())
            probs = (scores if temperature is None else scores / temperature[ds][:, None]).softmax(dim=-1)
            k = min(top_k, logits.shape[-1])
            # Rank by logits: probabilities can underflow to ties at 0, logits keep -inf strictly last.
            top_i = scores.topk(k, dim=-1).indices
            top_p = probs.gather(1, top_i)
            if masking or own_classes:
                beyond = top_i >= batch["num_classes"][:, None]
                top_i, top_p = top_i.masked_fill(beyond, -1), top_p.masked_fill(beyond, 0.0)
            for key, value in (("sample_id", batch["sample_ids"]), ("dataset_id", ds), ("label", labels),
                               ("prediction", pred), ("confidence", top_p[:, 0]), ("loss", loss),
                               ("topk", top_i), ("topk_prob", top_p)):
                rows[key].extend(value[keep].cpu().tolist())
        bar.update(1)
    bar.close()
    totals = sums.totals()
    model.train(was_training)
    rows_out = {}
    if per_row and kept["weight"]:
        host = {key: torch.cat(parts).cpu().numpy() for key, parts in kept.items()}
        real = host.pop("weight") > 0  # a placeholder for a batch whose images all failed has weight 0
        rows_out = {"sample_id": host["sample_id"][real].astype(np.int64),
                    "dataset_id": host["dataset_id"][real].astype(np.int64),
                    "correct": host["correct"][real].astype(np.float64), "loss": host["loss"][real]}
    return EvalOutput(totals["loss"], totals["correct"], totals["count"], int(totals["out_of_range"].sum()),
                      int(totals["skipped"].sum()), totals["skipped"], rows if top_k else {}, rows_out)


def gather_rows(rows: dict[str, list], world: int) -> dict[str, list]:
    """Every rank's prediction rows, concatenated (each rank evaluated its own shard)."""
    if world == 1:
        return rows
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, rows)
    return {key: [v for part in parts for v in part[key]] for key in rows}
