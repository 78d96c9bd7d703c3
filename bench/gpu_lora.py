"""GPU: LoRA vs full fine-tuning on the Qwen2.5-VL-3B shape at 448x448 on one card (and LoRA on the 7B
shape), through the project's own step (training.loop.train_step on a DeepSpeed engine), plus the
predict path's single-image latency and images/s (runtime.scoring.evaluate, as run_model calls it).

    python bench/gpu_lora.py            # on a GPU: every variant, each in its own process
    DEV=cpu SIZE=tiny IMG=56 STEPS=2 python bench/gpu_lora.py     # CPU dry run

Each variant runs in a fresh process (clean GPU memory; an out-of-memory variant does not cost the
others) and prints one JSON line (also appended to $OUT/gpu_results.jsonl): mode, shape, batch,
checkpointing, img/s (mean over STEPS timed steps after 3 warm-up ones), peak GiB, trainable parameters.
"fits 80 GB" means a peak under 78 GiB (what an 80 GB card leaves to PyTorch).
Env: VARIANTS ("mode:size:B:GC,..."), STEPS, IMG, DEV, PREDICT_BATCHES ("1,64"; "" skips).
"""

from __future__ import annotations

import dataclasses
import gc as gcmod
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
DEFAULT_VARIANTS = "lora:3b:32:1,full:3b:16:1,lora:7b:16:1,lora:3b:64:1,lora:3b:32:0"


def run_variant(mode: str, size: str, batch: int, gc: bool) -> None:
    import gpu as g  # bench/gpu.py: config, model, batches and the timed train phase
    import torch

    from food_multids.config import LoraSettings
    from food_multids.model.lora import apply_lora
    from food_multids.model.speedups import prepare_model
    from food_multids.runtime.device import init_distributed
    from food_multids.training.engine import create_engine, resolve_deepspeed_config

    cfg = g.project_config()
    lora = LoraSettings(r=16, alpha=32.0, dropout=0.05, parts=("language",))
    compile_ = os.environ.get("LORA_COMPILE") == "1"
    cfg = dataclasses.replace(cfg,
                              model=dataclasses.replace(cfg.model, finetuning=mode, lora=lora, torch_compile=compile_,
                                                        gradient_checkpointing=gc),
                              training=dataclasses.replace(cfg.training, per_device_train_batch_size=batch,
                                                           learning_rate=1e-4 if mode == "lora" else 1e-5))
    device = torch.device(g.DEV)
    init_distributed(device)
    model, tokenizer, config, dtype = g.build_model(cfg, device, size)
    counts = {**model.parameter_counts(), "adapted_layers": 0}
    if mode == "lora":
        with tempfile.TemporaryDirectory() as base:  # apply_lora records the base's config.json checksum
            config.save_pretrained(base)
            counts = apply_lora(model, lora, cfg.model.freeze_merger, Path(base))
    prepare_model(model, cfg.model, training=True)
    ds_config = resolve_deepspeed_config(cfg, 1, dtype)
    engine, _, _ = create_engine(model, cfg, ds_config, 1000, device)
    host = g.make_host(engine, device, dtype)
    result = g.train_phase(host, model, batch, gc, tokenizer, config, cfg)
    line = {"mode": mode, "size": size, **result, "trainable_parameters": counts["trainable_parameters"],
            "adapted_layers": counts["adapted_layers"], "fits_80gb": bool(result["peak_gib"] < 78)}
    g.emit("LORA_TRAIN", **line)


def run_predict(batches: list[int]) -> None:
    """The predict path on the 3B shape: load-free (random weights), prepare_model for inference, evaluate."""
    import gpu as g
    import torch

    from food_multids.model.speedups import prepare_model
    from food_multids.runtime.device import init_distributed
    from food_multids.runtime.scoring import evaluate

    cfg = g.project_config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, torch_compile=False))
    device = torch.device(g.DEV)
    init_distributed(device)
    model, tokenizer, config, dtype = g.build_model(cfg, device)
    prepare_model(model, cfg.model, training=False)
    model.eval()
    for eb in batches:
        batch = g.host_batch(eb, tokenizer, config, cfg, seed=3)
        for _ in range(3):
            evaluate(model, [batch], device, 2, top_k=5, dtype=dtype, progress_mode="never", own_classes=True)
        g.sync()
        reps = 10 if eb <= 8 else 5
        t = time.perf_counter()
        for _ in range(reps):
            evaluate(model, [batch], device, 2, top_k=5, dtype=dtype, progress_mode="never", own_classes=True)
        g.sync()
        per = (time.perf_counter() - t) / reps
        g.emit("PREDICT", B=eb, batch_ms=round(per * 1000, 1), img_per_s=round(eb / per, 1),
               note="host batch already collated: image decode/encode not included")


def main() -> None:
    if len(sys.argv) > 1:  # a child: one variant
        kind, *args = sys.argv[1:]
        if kind == "train":
            run_variant(args[0], args[1], int(args[2]), args[3] == "1")
        else:
            run_predict([int(x) for x in args])
        return
    variants = [v.split(":") for v in os.environ.get("VARIANTS", DEFAULT_VARIANTS).split(",") if v]
    predict = [x for x in os.environ.get("PREDICT_BATCHES", "1,64").split(",") if x]
    trains = [["train", *v] for v in variants]
    jobs = trains[:1] + ([["predict", *predict]] if predict else []) + trains[1:]  # most wanted first
    for job in jobs:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, *job], capture_output=True, text=True, timeout=400)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("LORA_TRAIN", "PREDICT", "FAIL", "TRAIN"))]
        failed = f"FAIL {json.dumps({'job': job, 'rc': out.returncode, 'stderr': out.stderr[-1500:]})}"
        print("\n".join(lines) or failed, f"({time.perf_counter() - start:.0f} s)", flush=True)
        gcmod.collect()


if __name__ == "__main__":
    main()
