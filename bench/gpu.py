"""GPU benchmark: the project's own training and evaluation step on the Qwen2.5-VL-3B shape (random
weights, nothing downloaded) at 448x448 with conf/gpu's settings, beside ../shared/bench/bare_loop_anchor.py
in the same job.

    python bench/gpu.py                                   # on a GPU: 3B shape, conf/gpu settings
    DEV=cpu SIZE=tiny IMG=56 B=4 EVAL_BATCHES=4 COMPILE=0 python bench/gpu.py   # CPU dry run

What runs, in order (each phase prints one JSON line and appends it to $OUT/gpu_results.jsonl; a phase
that fails prints FAIL and the next one still runs; optional phases are skipped past BUDGET_S seconds):
  ENV      card and versions
  ANCHOR   bare_loop_anchor.py as a subprocess (its own process, so its memory is gone before ours)
  CHECK    logits of the stock path (per-window attention, transformers' get_rope_index) against the
           project's (model.speedups.prepare_model as the train node applies it: batched vision
           windows, torch.compile when on; M-RoPE ids from the collator) on the same weights
  TRAIN    training.loop.train_step -- the train node's step: host batch from the project's image
           encoder + collator, pinned, to_device, DeepSpeed forward/backward/step -- for the configured
           (batch, checkpointing), then each of TRAIN_VARIANTS
  SPLIT    forward+backward vs optimizer step time of the configured variant
  EVAL     runtime.scoring.evaluate -- the full_eval node's loop (top-5 rows) -- per batch size
  PROFILE  the heaviest GPU kernels of one training step -> $OUT/profile_train.txt
Env: SIZE (tiny|3b), IMG, B, GC (0 off, 1 every layer, n every n-th layer), COMPILE (0/1), COMPILE_MODE override
conf/gpu; TRAIN_VARIANTS ("B:GC,..."); EVAL_BATCHES; STEPS; ZERO; ANCHOR (path; "" skips); ANCHOR_ARGS
("VARIANT:B:GC,..."); BUDGET_S; MEM_GIB (cap GPU memory, e.g. 79 for an 80 GB card); RUN (label, append).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DEV = os.environ.get("DEV", "cuda")
SIZE = os.environ.get("SIZE", "3b")
IMG = int(os.environ.get("IMG", "448"))
STEPS = int(os.environ.get("STEPS", "10"))
TRAIN_VARIANTS = [tuple(int(x) for x in v.split(":")) for v in os.environ.get("TRAIN_VARIANTS", "").split(",") if v]
EVAL_BATCHES = [int(x) for x in os.environ.get("EVAL_BATCHES", "128,64").split(",")]
ANCHOR = os.environ.get("ANCHOR", str(ROOT.parent / "shared/bench/bare_loop_anchor.py"))
ANCHOR_ARGS = [v.split(":") for v in os.environ.get("ANCHOR_ARGS", "stock:8:0").split(",") if v]
BUDGET_S = float(os.environ.get("BUDGET_S", "300"))
MEM_GIB = float(os.environ.get("MEM_GIB") or 0)  # cap this process's GPU memory (80: an H100-sized card)
RUN = os.environ.get("RUN", "")  # a label on every line (bench/gpu_round2.sh runs several configurations)
OUT = Path(os.environ.get("OUT") or ROOT / "bench/out")
T0 = time.perf_counter()
NUM_LABELS = 2101


def emit(tag: str, **fields) -> None:
    fields = {"t": round(time.perf_counter() - T0, 1), **({"run": RUN} if RUN else {}), **fields}
    print(tag, json.dumps(fields), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "gpu_results.jsonl").open("a") as f:
        f.write(json.dumps({"tag": tag, **fields}) + "\n")


def phase(name: str, fn, *args, optional: bool = False):
    if optional and time.perf_counter() - T0 > BUDGET_S:
        emit("SKIP", phase=name, reason=f"past BUDGET_S={BUDGET_S}")
        return None
    try:
        return fn(*args)
    except Exception as exc:  # one failed phase must not cost the others (device time is scarce)
        emit("FAIL", phase=name, error=f"{type(exc).__name__}: {exc}"[:1500])
        traceback.print_exc()
        if DEV == "cuda":
            torch.cuda.empty_cache()
        return None


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEV == "cuda" else 0.0


# -- setup -----------------------------------------------------------------------------------------
def project_config():
    """conf/gpu's settings (as `kedro run --env gpu` resolves them), with B, GC, COMPILE overriding them."""
    from food_multids.config import ProjectConfig

    params = yaml.safe_load((ROOT / "conf/base/parameters.yml").read_text())
    params.update(yaml.safe_load((ROOT / "conf/gpu/parameters.yml").read_text()))
    model, training = params["model"], params["training"]
    if os.environ.get("COMPILE"):
        model["torch_compile"] = os.environ["COMPILE"] == "1"
    if os.environ.get("COMPILE_MODE"):
        model["torch_compile_mode"] = os.environ["COMPILE_MODE"]
    if os.environ.get("GC"):  # 0 off, 1 every layer, n every n-th layer
        model["gradient_checkpointing"] = int(os.environ["GC"]) > 0
        model["gradient_checkpointing_every_n_layers"] = max(1, int(os.environ["GC"]))
    if os.environ.get("B"):
        training["per_device_train_batch_size"] = int(os.environ["B"])
    model.update(min_pixels=IMG * IMG, max_pixels=IMG * IMG, num_labels=NUM_LABELS,
                 torch_dtype="bfloat16" if DEV == "cuda" else "float32")
    training.update(device=DEV, max_steps=1000)
    params["tracking"]["report_to"] = []  # nothing is logged here (and mlflow need not be installed there)
    params["deepspeed"]["zero_optimization"]["stage"] = int(os.environ.get("ZERO", "2"))
    return ProjectConfig.from_params(params, check_files=False)


def build_model(cfg, device, size: str = SIZE):
    """A random-weight classifier of the Qwen2.5-VL shape `size` (3b, 7b, or the tiny one)."""
    from food_multids.model.backbones import family
    from food_multids.model.backbones.qwen2_5_vl import config_3b, config_7b
    from food_multids.model.classifier import ClassifierMeta, LabelSpace, MultiDatasetClassifier
    from food_multids.model.loading import resolve_dtype
    from food_multids.model.tiny import build_tokenizer

    kind = family("qwen2_5_vl")
    tokenizer = build_tokenizer()
    config = {"3b": config_3b, "7b": config_7b}.get(size, lambda: kind.tiny_config(tokenizer))()
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = cfg.model.attn_implementation
    dtype = resolve_dtype(cfg.model.torch_dtype, device)
    torch.manual_seed(0)
    with torch.device(device):
        backbone = kind.model_class()(config).to(dtype)
    meta = ClassifierMeta(num_labels=NUM_LABELS, pooling=cfg.model.pooling,
                          label_spaces={"food101": LabelSpace(0, 101), "food2k": LabelSpace(1, 2000)})
    model = MultiDatasetClassifier(backbone, meta, kind).to(device)
    return model, tokenizer, config, dtype


def host_batch(n: int, tokenizer, config, cfg, seed: int = 0) -> dict:
    """What the train/eval loader yields: random RGB images through the image encoder and collator, pinned."""
    from food_multids.data.collator import ClassificationCollator, ImageEncoder, PromptTokens

    encoder = ImageEncoder(IMG * IMG, IMG * IMG)
    tokens = PromptTokens.from_tokenizer(tokenizer, cfg.model.prompt)
    tokens = PromptTokens(tokens.prefix, tokens.suffix, config.image_token_id, tokens.pad_token_id)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        patches, grid = encoder(Image.fromarray(rng.integers(0, 255, (IMG, IMG, 3), dtype=np.uint8)))
        samples.append({"pixel_values": patches, "grid": grid, "label": i % 101, "dataset_id": i % 2,
                        "num_classes": 101 if i % 2 == 0 else 2000, "sample_id": i,
                        "dataset_name": ("food101", "food2k")[i % 2]})
    batch = ClassificationCollator(tokens, encoder.merge_size, cfg.model.padding_side)(samples)
    if DEV == "cuda":
        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


# -- phases ----------------------------------------------------------------------------------------
def env_phase() -> None:
    import deepspeed
    import transformers

    card = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    mem = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if DEV == "cuda" else 0
    emit("ENV", card=card, mem_gib=mem, torch=torch.__version__, cuda=torch.version.cuda,
         transformers=transformers.__version__,
         deepspeed=deepspeed.__version__, python=sys.version.split()[0], size=SIZE, img=IMG)


def anchor_phase(variant: str, batch: str, gc: str) -> None:
    env = {**os.environ, "B": batch, "GC": gc, "IMG": str(IMG), "EB": "32", "STEPS": str(STEPS), "SIZE": SIZE,
           "VARIANT": variant, "DEV": DEV}
    out = subprocess.run([sys.executable, ANCHOR], env=env, capture_output=True, text=True, timeout=400)
    lines = {ln.split(" ", 1)[0]: json.loads(ln.split(" ", 1)[1]) for ln in out.stdout.splitlines()
             if ln.startswith(("TRAIN ", "EVAL "))}
    if "TRAIN" not in lines:
        raise RuntimeError(f"anchor printed no TRAIN line (rc {out.returncode}): {out.stderr[-1200:]}")
    emit("ANCHOR", train=lines["TRAIN"], eval=lines.get("EVAL"))
    return lines


def check_phase(model, tokenizer, config, cfg, dtype, device) -> dict:
    """Stock path vs the project's path (prepare_model: batched vision windows, torch.compile when on,
    M-RoPE ids from the collator) on the same weights and images, eval mode, the run's dtype."""
    from food_multids.model.speedups import prepare_model
    from food_multids.runtime.scoring import MODEL_INPUTS, to_device

    batch = to_device(host_batch(4, tokenizer, config, cfg, seed=1), device, dtype)
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    model.eval()
    with torch.inference_mode():
        stock = model(**{**inputs, "position_ids": None})  # per-window SDPA, get_rope_index's host loop
        speedups = prepare_model(model, cfg.model, training=True)  # what training/setup.py's build_run does
        fast = model(**inputs)
    model.train()
    finite = torch.isfinite(stock)
    same_mask = bool((finite == torch.isfinite(fast)).all())
    a, b = fast[finite].double(), stock[finite].double()
    rel = float((a - b).norm() / b.norm())
    agree = float((fast.argmax(-1) == stock.argmax(-1)).float().mean())
    emit("CHECK", dtype=str(dtype), speedups=speedups, rel_err=rel, same_mask=same_mask, argmax_agree=agree,
         seq_len=int(batch["input_ids"].shape[1]), ok=same_mask and rel <= 1e-2)
    return speedups


class StepHost(types.SimpleNamespace):
    """The engine and the per-dataset sums that training.loop.train_step works on (the trainer's own step)."""


def make_host(engine, device, dtype) -> StepHost:
    from food_multids.runtime.scoring import PerDatasetSums
    from food_multids.training.loop import TRAIN_SUMS

    return StepHost(engine=engine, device=device, dtype=dtype, window=PerDatasetSums(TRAIN_SUMS, 2, device))


def set_checkpointing(model, every: int) -> None:
    """0: no checkpointing; n: every n-th layer recomputes (model.gradient_checkpointing_every_n_layers)."""
    model.backbone.activation_checkpointing_disable()
    if every:
        model.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                                       every_n_layers=every)


def reset_after_failure(engine) -> None:
    """Best effort after e.g. an out-of-memory step, so the next variant starts from a clean ZeRO state."""
    opt = engine.optimizer
    opt.zero_grad(set_to_none=True)
    if hasattr(opt, "params_already_reduced"):
        opt.params_already_reduced = [False] * len(opt.params_already_reduced)
    if DEV == "cuda":
        torch.cuda.empty_cache()


def train_phase(host, model, batch_size: int, gc: int, tokenizer, config, cfg, split: bool = False) -> dict:
    from food_multids.runtime.scoring import MODEL_INPUTS, to_device
    from food_multids.training.loop import train_step

    set_checkpointing(model, gc)
    batch = host_batch(batch_size, tokenizer, config, cfg)
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = STEPS if batch_size <= 16 else max(4, STEPS // 2)
    try:
        for i in range(3 + steps):
            if i == 3:
                sync()
                start = time.perf_counter()
            train_step(host.engine, batch, host.device, host.dtype, host.window)
        sync()
    except Exception:
        reset_after_failure(host.engine)
        raise
    step_s = (time.perf_counter() - start) / steps
    totals = host.window.totals()
    loss = float(totals["loss"].sum() / totals["count"].sum())
    # Model FLOPs as the anchor counts them: 6 x params x tokens (vision patches, language sequence); no recompute.
    n_vis = sum(p.numel() for p in model.backbone.visual.parameters())
    n_llm = sum(p.numel() for n, p in model.backbone.language_model.named_parameters() if "embed_tokens" not in n)
    n_patch = int(batch["image_grid_thw"][0].prod())
    flop_img = 6 * (n_vis * n_patch + n_llm * batch["input_ids"].shape[1])
    result = {"B": batch_size, "gc": gc, "step_s": round(step_s, 4), "img_per_s": round(batch_size / step_s, 2),
              "tflops": round(flop_img * batch_size / step_s / 1e12, 1), "peak_gib": peak_gib(),
              "mean_loss": round(loss, 3)}
    emit("TRAIN", compiled=getattr(model.backbone.language_model.layers[0], "_compiled_call_impl", None) is not None,
         **result)
    if split:  # where the step goes: forward+backward vs the optimizer step (synchronised, so a little slower)
        fb = opt = 0.0
        for _ in range(3):
            b = to_device(batch, host.device, host.dtype)
            sync()
            t = time.perf_counter()
            logits = host.engine(**{k: b[k] for k in MODEL_INPUTS})
            host.engine.backward(torch.nn.functional.cross_entropy(logits, b["labels"]))
            sync()
            t2 = time.perf_counter()
            host.engine.step()
            sync()
            fb, opt = fb + t2 - t, opt + time.perf_counter() - t2
        emit("SPLIT", B=batch_size, gc=gc, fwd_bwd_s=round(fb / 3, 4), optimizer_step_s=round(opt / 3, 4))
    return result


def eval_phase(model, eval_batch: int, tokenizer, config, cfg, dtype, device) -> dict:
    from food_multids.runtime.scoring import evaluate

    batch = host_batch(eval_batch, tokenizer, config, cfg, seed=2)
    t = time.perf_counter()
    evaluate(model, [batch], device, 2, top_k=5, dtype=dtype, progress_mode="never")  # warm-up (and compile)
    sync()
    first_s = time.perf_counter() - t
    reps = 5
    t = time.perf_counter()
    out = evaluate(model, [batch] * reps, device, 2, top_k=5, dtype=dtype, progress_mode="never")
    sync()
    per_batch = (time.perf_counter() - t) / reps
    result = {"EB": eval_batch, "img_per_s": round(eval_batch / per_batch, 1), "batch_s": round(per_batch, 4),
              "first_call_s": round(first_s, 1), "rows": int(out.count.sum())}
    emit("EVAL", **result)
    return result


def profile_phase(host, model, batch_size: int, gc: int, tokenizer, config, cfg) -> None:
    from torch.profiler import ProfilerActivity, profile

    from food_multids.training.loop import train_step

    set_checkpointing(model, gc)
    batch = host_batch(batch_size, tokenizer, config, cfg)
    train_step(host.engine, batch, host.device, host.dtype, host.window)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(host.engine, batch, host.device, host.dtype, host.window)
        sync()
    key = "self_device_time_total" if DEV == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90)
    (OUT / "profile_train.txt").write_text(table)
    print(table[:6000], flush=True)
    emit("PROFILE", file="profile_train.txt", B=batch_size, gc=gc)


def main() -> None:
    from food_multids.model.speedups import prepare_model
    from food_multids.runtime.device import init_distributed
    from food_multids.training.engine import create_engine, resolve_deepspeed_config

    if not RUN:  # a labelled run appends to the results of the runs before it
        (OUT / "gpu_results.jsonl").unlink(missing_ok=True)
    phase("ENV", env_phase)
    if ANCHOR and Path(ANCHOR).is_file():
        anchors = [phase("ANCHOR", anchor_phase, *args) for args in ANCHOR_ARGS]
    else:
        anchors = []
        emit("SKIP", phase="ANCHOR", reason=f"no anchor script at {ANCHOR!r}")
    device = torch.device(DEV)
    cfg = project_config()
    default_b = cfg.training.per_device_train_batch_size
    default_gc = cfg.model.gradient_checkpointing_every_n_layers if cfg.model.gradient_checkpointing else 0
    init_distributed(device)
    if DEV == "cuda" and MEM_GIB:  # a smaller card on this one (same compute, less memory)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, MEM_GIB * 2**30 / total))
        emit("MEMCAP", gib=MEM_GIB)
    model, tokenizer, config, dtype = build_model(cfg, device)
    if phase("CHECK", check_phase, model, tokenizer, config, cfg, dtype, device) is None:
        prepare_model(model, cfg.model, training=True)
    ds_config = resolve_deepspeed_config(cfg, 1, dtype)
    emit("CONFIG", B=default_b, gc=default_gc, torch_compile=cfg.model.torch_compile,
         compile_mode=cfg.model.torch_compile_mode, mem_gib=MEM_GIB or None, bf16=ds_config["bf16"],
         zero=ds_config["zero_optimization"])
    engine, _, _ = create_engine(model, cfg, ds_config, 1000, device)
    host = make_host(engine, device, dtype)
    # Most wanted first: the configured variant, evaluation, then other variants (the last may run out of memory).
    trains = [phase(f"TRAIN {default_b}:{default_gc}", train_phase, host, model, default_b, default_gc, tokenizer,
                    config, cfg, True)]
    evals = [phase(f"EVAL {eb}", eval_phase, model, eb, tokenizer, config, cfg, dtype, device) for eb in EVAL_BATCHES]
    for b, gc in TRAIN_VARIANTS:
        trains.append(phase(f"TRAIN {b}:{gc}", train_phase, host, model, b, gc, tokenizer, config, cfg, optional=True))
    phase("PROFILE", profile_phase, host, model, default_b, default_gc, tokenizer, config, cfg, optional=True)
    anchor = next((a for a in anchors if a), None)
    summary = {"train": trains[0]["img_per_s"] if trains[0] else None,
               "eval": evals[0]["img_per_s"] if evals[0] else None,
               "train_best": max((t["img_per_s"] for t in trains if t), default=None),
               "eval_best": max((e["img_per_s"] for e in evals if e), default=None),
               "targets": {"train": 40, "eval": 150}}
    if anchor and summary["train"] and summary["eval"]:
        summary.update(anchor_train=anchor["TRAIN"]["img_per_s"], anchor_eval=anchor["EVAL"]["img_per_s"],
                       ratio_train=round(summary["train"] / anchor["TRAIN"]["img_per_s"], 2),
                       ratio_eval=round(summary["eval"] / anchor["EVAL"]["img_per_s"], 2))
    emit("SUMMARY", **summary)


if __name__ == "__main__":
    main()
