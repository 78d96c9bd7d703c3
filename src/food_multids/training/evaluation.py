"""The inference loop shared by partial evaluation (during training) and the full evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from food_multids.progress import progress

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


@dataclass
class EvalOutput:
    loss_sum: np.ndarray  # per dataset, all ranks
    correct: np.ndarray
    count: np.ndarray
    out_of_range: int = 0  # predictions >= the sample's num_classes (only possible with masking off)
    skipped: int = 0  # images that could not be loaded, all ranks
    skipped_per_dataset: np.ndarray | None = None
    predictions: dict[str, list] = field(default_factory=dict)  # this rank's rows when collected


@torch.inference_mode()
def evaluate(model, loader, device: torch.device, num_datasets: int, *, top_k: int = 0, masking: bool = True,
             dtype: torch.dtype | None = None, desc: str = "eval", progress_mode: str = "auto") -> EvalOutput:
    """Masked (as in training) loss and accuracy sums per dataset; with top_k > 0 also per-row predictions.

    With masking, top-k slots beyond a dataset's num_classes are -1 (probability 0), never a class
    of another dataset.
    """
    was_training = model.training
    model.eval()
    # loss, correct, count, out-of-range, images that failed to load
    sums = torch.zeros(5, num_datasets, dtype=torch.float64, device=device)
    rows: dict[str, list] = {k: [] for k in ("sample_id", "dataset_id", "label", "prediction", "confidence", "loss", "topk", "topk_prob")}
    bar = progress(total=len(loader), desc=desc, unit="batch", mode=progress_mode, leave=False)
    for batch in loader:
        batch = to_device(batch, device, dtype)
        failed = batch["skipped_dataset_ids"]
        sums[4].index_add_(0, failed, torch.ones_like(failed, dtype=torch.float64))
        logits = model(**{k: batch[k] for k in MODEL_INPUTS})
        labels, ds, weights = batch["labels"], batch["dataset_ids"], batch["weights"].double()
        loss = F.cross_entropy(logits, labels, reduction="none").double()
        pred = logits.argmax(dim=-1)
        sums[0].index_add_(0, ds, loss * weights)
        sums[1].index_add_(0, ds, (pred == labels).double() * weights)
        sums[2].index_add_(0, ds, weights)
        sums[3].index_add_(0, ds, (pred >= batch["num_classes"]).double() * weights)
        if top_k:
            keep = batch["weights"] > 0
            probs = logits.float().softmax(dim=-1)
            k = min(top_k, logits.shape[-1])
            # Rank by logits: probabilities can underflow to ties at 0, logits keep -inf strictly last.
            top_i = logits.topk(k, dim=-1).indices
            top_p = probs.gather(1, top_i)
            if masking:
                beyond = top_i >= batch["num_classes"][:, None]
                top_i, top_p = top_i.masked_fill(beyond, -1), top_p.masked_fill(beyond, 0.0)
            for key, value in (("sample_id", batch["sample_ids"]), ("dataset_id", ds), ("label", labels),
                               ("prediction", pred), ("confidence", top_p[:, 0]), ("loss", loss),
                               ("topk", top_i), ("topk_prob", top_p)):
                rows[key].extend(value[keep].cpu().tolist())
        bar.update(1)
    bar.close()
    all_reduce_([sums])
    model.train(was_training)
    totals = sums.cpu().numpy()
    return EvalOutput(totals[0], totals[1], totals[2], int(totals[3].sum()), int(totals[4].sum()),
                      totals[4], rows if top_k else {})
