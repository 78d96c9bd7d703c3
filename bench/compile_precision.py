"""How far each bf16 path's logits are from a float32 reference, on the same random weights and images.

On one H200 (bench/RESULTS.md) the compiled project path differed from the stock bf16 path by a
relative error of 4e-2 while the eager project path matched it exactly. This script asks which of the
two bf16 paths is closer to the float32 truth, on CPU (no GPU needed):

    .venv/bin/python bench/compile_precision.py                       # tiny model, 56x56, a minute
    SIZE=3b IMG=224 N=1 .venv/bin/python bench/compile_precision.py   # the 3B shape (~16 GB RAM)

Prints the relative error ||a - ref|| / ||ref|| over the unmasked logits for: stock bf16 (per-window
attention, transformers' rope index), project eager bf16 (batched windows, collator M-RoPE ids) and
project compiled bf16 (the same plus regional torch.compile), and stock vs compiled.
Measured 2026-11-27, 3B shape, 224x224, 2 images: stock 4.88e-2, eager project 4.88e-2 (identical),
compiled 4.05e-2, compiled vs stock 5.40e-2 (bench/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DEV", "cpu")
os.environ.setdefault("SIZE", "tiny")
os.environ.setdefault("IMG", "56")
os.environ.setdefault("ANCHOR", "")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu  # noqa: E402  (bench/gpu.py: the same model, config and batch recipe as the GPU benchmark)
import torch  # noqa: E402


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    finite = torch.isfinite(ref)
    return float((a[finite].double() - ref[finite].double()).norm() / ref[finite].double().norm())


def main() -> None:
    from food_multids.model.speedups import compile_blocks, enable_batched_windows
    from food_multids.runtime.scoring import MODEL_INPUTS, to_device

    t0 = time.perf_counter()
    device = torch.device(gpu.DEV)
    cfg = gpu.project_config()  # float32 on CPU
    model, tokenizer, config, _ = gpu.build_model(cfg, device)
    model.eval()
    host = gpu.host_batch(int(os.environ.get("N", "4")), tokenizer, config, cfg, seed=1)

    def logits(dtype: torch.dtype, stock: bool) -> torch.Tensor:
        batch = to_device(host, device, dtype)
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        if stock:
            inputs["position_ids"] = None
        with torch.inference_mode():
            return model(**inputs).float()

    out = {}
    ref = logits(torch.float32, stock=True)
    out["t_reference_s"] = round(time.perf_counter() - t0, 1)
    model.backbone.to(torch.bfloat16)
    stock = logits(torch.bfloat16, stock=True)
    out["stock_bf16_vs_fp32"] = rel(stock, ref)
    enable_batched_windows(model.backbone)
    eager = logits(torch.bfloat16, stock=False)
    out["project_eager_bf16_vs_fp32"] = rel(eager, ref)
    out["project_eager_vs_stock_bf16"] = rel(eager, stock)
    compile_blocks(model.backbone)
    compiled = logits(torch.bfloat16, stock=False)
    out["project_compiled_bf16_vs_fp32"] = rel(compiled, ref)
    out["project_compiled_vs_stock_bf16"] = rel(compiled, stock)
    out["argmax_agree_compiled_vs_stock"] = float((compiled.argmax(-1) == stock.argmax(-1)).float().mean())
    out.update(size=gpu.SIZE, img=gpu.IMG, n=int(host["input_ids"].shape[0]), torch=torch.__version__,
               total_s=round(time.perf_counter() - t0, 1))
    print("PRECISION", json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
