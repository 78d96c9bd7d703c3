"""Entry point of each predict process started by a launcher (several GPUs): each rank
predicts its shard of the records, rank 0 gathers the rows and writes the predictions table."""

from __future__ import annotations

from pathlib import Path

from food_multids.config import PredictConfig, TrainConfig
from food_multids.inference.model import load_model, run_model
from food_multids.inference.predict import prediction_table, reject_thresholds
from food_multids.runtime.device import finish_distributed, init_distributed, resolve_device_name
from food_multids.runtime.launch import worker_context, write_result
from food_multids.runtime.scoring import gather_rows


def main(argv: list[str] | None = None) -> None:
    ctx = worker_context(argv)
    settings = PredictConfig.from_section(ctx.params["predict"])
    training = TrainConfig.from_section(ctx.params["training"])
    device = resolve_device_name(settings.device)
    rank, world = init_distributed(device, training.master_port)
    loaded = load_model(Path(ctx.spec["model_dir"]), device)
    records = ctx.frame("predict")
    thresholds = reject_thresholds(loaded, settings.reject_below, settings.calibrated, set(records["dataset_name"]))
    out = run_model(loaded, records, batch_size=settings.batch_size, top_k=settings.top_k, rank=rank, world=world,
                    workers=settings.dataloader_num_workers, progress_mode=training.progress_bar,
                    own_classes=True, calibrated=settings.calibrated)
    rows = gather_rows(out.predictions, world)
    if rank == 0:
        table = prediction_table(loaded, records, rows, thresholds)
        write_result(ctx.launch, {"rows": len(table)}, {"predictions": table})
    finish_distributed()


if __name__ == "__main__":
    main()
