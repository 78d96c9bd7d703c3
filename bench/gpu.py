"""GPU benchmark: the project's own training and evaluation step on the Qwen2.5-VL-3B shape (random
weights, nothing downloaded) at 448x448, beside ../shared/bench/bare_loop_anchor.py in the same job.

    python bench/gpu.py                                   # on a GPU: 3B shape, conf/gpu settings
    DEV=cpu SIZE=tiny IMG=112 B=2 EB=2 STEPS=2 python bench/gpu.py   # dry run on CPU

The step is the one the train node runs (MultiDatasetClassifier + batched vision windows + the
DeepSpeed engine from training/engine.py, fed by the project's image encoder and collator); the
evaluation step is training/evaluation.py's loop. Prints TRAIN/EVAL JSON lines for both and the ratios.
Env: SIZE (tiny|3b), IMG, B, EB, STEPS, GC=1, ZERO, ANCHOR (path to bare_loop_anchor.py; "" skips it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEV = os.environ.get("DEV", "cuda")
SIZE = os.environ.get("SIZE", "3b")
IMG = int(os.environ.get("IMG", "448"))
B = int(os.environ.get("B", "16"))
EB = int(os.environ.get("EB", "64"))
STEPS = int(os.environ.get("STEPS", "10"))
ANCHOR = os.environ.get("ANCHOR", str(ROOT.parent / "shared/bench/bare_loop_anchor.py"))


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def project_config():
    from food_multids.config import ProjectConfig

    params = yaml.safe_load((ROOT / "conf/base/parameters.yml").read_text())
    params.update(yaml.safe_load((ROOT / "conf/gpu/parameters.yml").read_text()))
    params["model"].update(min_pixels=IMG * IMG, max_pixels=IMG * IMG, num_labels=2101,
                           gradient_checkpointing=os.environ.get("GC", "1") == "1",
                           torch_dtype="bfloat16" if DEV == "cuda" else "float32")
    params["training"].update(per_device_train_batch_size=B, device=DEV, max_steps=STEPS)
    params["deepspeed"]["zero_optimization"]["stage"] = int(os.environ.get("ZERO", "2"))
    return ProjectConfig.from_params(params, check_files=False)


def build_model(cfg, device):
    from transformers import Qwen2_5_VLModel

    from food_multids.model.classifier import ClassifierMeta, LabelSpace, MultiDatasetClassifier
    from food_multids.model.factory import build_tokenizer, qwen2_5_vl_3b_config, resolve_dtype, tiny_config

    tokenizer = build_tokenizer()
    config = qwen2_5_vl_3b_config() if SIZE == "3b" else tiny_config(tokenizer)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "sdpa"
    dtype = resolve_dtype(cfg.model.torch_dtype, device)
    torch.manual_seed(0)
    with torch.device(device):
        backbone = Qwen2_5_VLModel(config).to(dtype)
    meta = ClassifierMeta(num_labels=2101, pooling="last",
                          label_spaces={"food101": LabelSpace(0, 101), "food2k": LabelSpace(1, 2000)})
    model = MultiDatasetClassifier(backbone, meta, config.image_token_id).to(device)
    if cfg.model.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from food_multids.model.fast_vision import enable_batched_windows

    enable_batched_windows(backbone)
    return model, tokenizer, config, dtype


def batches(n: int, tokenizer, config):
    """Real path: random 448x448 RGB images -> ImageEncoder -> collator (prompt ids from the tokenizer)."""
    from food_multids.data.collator import ClassificationCollator, ImageEncoder, PromptTokens

    encoder = ImageEncoder(IMG * IMG, IMG * IMG)
    prompt = PromptTokens.from_tokenizer(tokenizer, "What food is shown in this image?")
    prompt = PromptTokens(prompt.prefix, prompt.suffix, config.image_token_id, prompt.pad_token_id)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        patches, grid = encoder(Image.fromarray(rng.integers(0, 255, (IMG, IMG, 3), dtype=np.uint8)))
        samples.append({"pixel_values": patches, "grid": grid, "label": i % 101, "dataset_id": i % 2,
                        "num_classes": 101 if i % 2 == 0 else 2000, "sample_id": i, "dataset_name": "ab"[i % 2]})
    return ClassificationCollator(prompt)(samples)


def main() -> None:
    from food_multids.training.engine import create_engine, init_distributed, resolve_deepspeed_config
    from food_multids.training.evaluation import MODEL_INPUTS, to_device

    device = torch.device(DEV)
    cfg = project_config()
    init_distributed(device)
    model, tokenizer, config, dtype = build_model(cfg, device)
    engine, _, _ = create_engine(model, cfg, resolve_deepspeed_config(cfg, 1, dtype), STEPS + 3, device)
    batch = to_device(batches(B, tokenizer, config), device, dtype)
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(3 + STEPS):
        if i == 3:
            sync()
            start = time.perf_counter()
        logits = engine(**inputs)
        engine.backward(F.cross_entropy(logits, batch["labels"]))
        engine.step()
    sync()
    step_s = (time.perf_counter() - start) / STEPS
    train = {"who": "project", "size": SIZE, "img": IMG, "B": B, "gc": cfg.model.gradient_checkpointing,
             "step_s": round(step_s, 4), "img_per_s": round(B / step_s, 2),
             "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEV == "cuda" else 0}
    print("TRAIN", json.dumps(train), flush=True)
    engine.eval()
    eval_batch = to_device(batches(EB, tokenizer, config), device, dtype)
    with torch.inference_mode():
        for i in range(2 + 5):
            if i == 2:
                sync()
                start = time.perf_counter()
            logits = engine.module(**{k: eval_batch[k] for k in MODEL_INPUTS})
            logits.argmax(-1)
        sync()
    eval_s = (time.perf_counter() - start) / 5
    evaluation = {"who": "project", "EB": EB, "img_per_s": round(EB / eval_s, 1)}
    print("EVAL", json.dumps(evaluation), flush=True)
    if ANCHOR and Path(ANCHOR).is_file():
        env = {**os.environ, "B": str(B), "IMG": str(IMG), "EB": str(EB), "STEPS": str(STEPS), "SIZE": SIZE,
               "VARIANT": os.environ.get("ANCHOR_VARIANT", "stock")}
        out = subprocess.run([sys.executable, ANCHOR], env=env, capture_output=True, text=True, timeout=1800)
        lines = {ln.split(" ", 1)[0]: json.loads(ln.split(" ", 1)[1]) for ln in out.stdout.splitlines()
                 if ln.startswith(("TRAIN ", "EVAL "))}
        if "TRAIN" not in lines:
            print("anchor failed:", out.stdout[-2000:], out.stderr[-2000:])
            return
        print("ANCHOR_TRAIN", json.dumps(lines["TRAIN"]))
        print("ANCHOR_EVAL", json.dumps(lines["EVAL"]))
        print(f"ratio project/anchor: train {train['img_per_s'] / lines['TRAIN']['img_per_s']:.2f}x, "
              f"eval {evaluation['img_per_s'] / lines['EVAL']['img_per_s']:.2f}x  (targets: 40 and 150 img/s on one H100/H200)")


if __name__ == "__main__":
    main()
