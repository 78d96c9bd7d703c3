"""How honest the partial evaluation is, and how well each best-model rule picks (issue 26).

Partial evaluation scores a subset; a model's prediction for one image does not depend on which other
images are scored with it. So once every evaluated checkpoint has been scored on the *whole* validation
set, any partial evaluation of it is a subset of those rows: this bench replays thousands of subset
draws (`stratified_subset` / `partial_eval_subset`, fixed and fresh, unequal eval ratios) through the
code the trainer runs (`stratified_summary`, `BestModelSelector`) and measures, against the full-set truth:

  (a) coverage: share of evaluations whose overall interval contains that checkpoint's full-set accuracy
  (b) bias of the overall estimate, stratified vs pooled (mean signed error against the full set)
  (c) selection regret: full-set accuracy of the best checkpoint minus that of the one selected, for
      point / paired / lower_bound, and with the top-3 candidates re-ranked on the full set
  (d) cost (demo only): training with 3 candidates kept vs 1, and re-scoring 3 candidates vs 1 full evaluation

Two sets: the demo (tiny Qwen2.5-VL trained on CPU, every evaluated checkpoint kept and fully evaluated)
and a generated one (2 datasets, 2,000 and 20,000 validation images, 30 checkpoints on a noisy plateau).

  .venv/bin/python bench/selection.py                     # after `make setup` (about 4 minutes)
  SEEDS=400 GEN_SEEDS=200 .venv/bin/python bench/selection.py
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from food_multids.config import ProjectConfig
from food_multids.data.tables import partial_eval_subset, stratified_subset
from food_multids.helpers.metrics import stratified_summary
from food_multids.training.selection import BestModelSelector, metric_rows

ROOT = Path(__file__).resolve().parents[1]
SEEDS = int(os.environ.get("SEEDS", "200"))
GEN_SEEDS = int(os.environ.get("GEN_SEEDS", "100"))
RULES = ("point", "paired", "lower_bound")
K = 3


def demo_params(out: Path) -> dict:
    params = yaml.safe_load((ROOT / "conf/base/parameters.yml").read_text())
    for key in ("train_jsonl_list", "val_jsonl_list"):
        params["data"][key] = [str(ROOT / p) for p in params["data"][key]]
    params["model"]["name_or_path"] = str(ROOT / params["model"]["name_or_path"])
    params["datasets"]["dataset_configs"]["digits"]["eval_ratio"] = 0.5  # unequal: the pooled value is biased
    params["datasets"]["dataset_configs"]["shapes"]["eval_ratio"] = 0.2
    params["training"].update(output_dir=str(out), progress_bar="never", num_train_epochs=6, eval_steps=12,
                              save_steps=1000, logging_steps=12)
    params["tracking"]["report_to"] = []
    return params


def demo_truth(tmp: Path) -> tuple[pd.DataFrame, dict[int, np.ndarray], tuple, dict]:
    """Train the demo keeping every evaluated checkpoint, score each on the full validation set."""
    from food_multids.evaluation.full import run_full_evaluation
    from food_multids.pipelines import node_sections
    from food_multids.pipelines.data.nodes import run_data_nodes
    from food_multids.pipelines.train.nodes import rerank_candidates, train_deepspeed

    costs = {}
    params = demo_params(tmp / "all")
    train_set, _, subset, full = run_data_nodes(params)
    for k in (1, K, 1, K):  # (d) the price of keeping candidates (twice each: the first run also warms up)
        p = copy.deepcopy(params)
        p["training"].update(output_dir=str(tmp / f"k{k}"), keep_top_k_checkpoints=k, overwrite_output_dir=True)
        start = time.perf_counter()
        _, manifest = train_deepspeed(train_set, subset, full, **node_sections(train_deepspeed, p))
        costs[f"train_k{k}_s"] = min(costs.get(f"train_k{k}_s", np.inf), time.perf_counter() - start)
        if k == K:
            start = time.perf_counter()
            rerank_candidates(manifest, full, **node_sections(rerank_candidates, p))
            costs["rerank_s"] = min(costs.get("rerank_s", np.inf), time.perf_counter() - start)
    params["training"]["keep_top_k_checkpoints"] = 10_000  # every evaluated model stays
    _, manifest = train_deepspeed(train_set, subset, full, **node_sections(train_deepspeed, params))
    cfg = ProjectConfig.from_params(params, check_files=False)
    correct, one = {}, []
    for candidate in manifest["best"]["candidates"]:
        start = time.perf_counter()
        preds = run_full_evaluation(cfg, Path(candidate["path"]), full).predictions.set_index("sample_id")
        one.append(time.perf_counter() - start)
        rows = preds.loc[full["sample_id"]]
        correct[candidate["step"]] = (rows["label"] == rows["prediction"]).to_numpy(dtype=np.float64)
    costs["full_eval_s"] = float(np.mean(one))
    return full.reset_index(drop=True), correct, cfg.datasets, costs


def generated_truth(seed: int = 0) -> tuple[pd.DataFrame, dict[int, np.ndarray], tuple]:
    """Two datasets (2,000 val images at ~0.90, 20,000 at ~0.70), 30 checkpoints rising to a plateau with
    small real differences; an image's correctness is shared across checkpoints (difficulty) with noise."""
    from food_multids.config import DatasetSpec

    rng = np.random.default_rng(seed)
    sizes, plateau, classes = (2_000, 20_000), (0.90, 0.70), (101, 200)
    specs = (DatasetSpec(name="a", index=0, num_classes=101, eval_ratio=0.25),
             DatasetSpec(name="b", index=1, num_classes=200, eval_ratio=0.02))
    frame = pd.concat([pd.DataFrame({"dataset_name": spec.name, "dataset_id": spec.index,
                                     "label": rng.integers(0, classes[spec.index], sizes[spec.index])})
                       for spec in specs], ignore_index=True)
    frame["sample_id"] = np.arange(len(frame))
    difficulty = rng.random(len(frame))
    correct = {}
    for t in range(1, 31):
        row = np.empty(len(frame))
        for spec in specs:
            mine = (frame["dataset_id"] == spec.index).to_numpy()
            target = plateau[spec.index] - 0.15 * np.exp(-t / 4) + rng.normal(0, 0.004)
            noisy = difficulty[mine] + rng.normal(0, 0.15, mine.sum())
            row[mine] = noisy < np.quantile(noisy, target)
        correct[10 * t] = row
    return frame, correct, specs


def replay(full: pd.DataFrame, correct: dict[int, np.ndarray], specs: tuple, strategy: str, seeds: int) -> dict:
    names = [s.name for s in specs]
    ids = full["dataset_id"].to_numpy(dtype=np.int64)
    population = np.bincount(ids, minlength=len(specs)).astype(float)
    truth = {step: c.mean() for step, c in correct.items()}  # the full set's pooled accuracy
    best_truth = max(truth.values())
    position = pd.Series(np.arange(len(full)), index=full["sample_id"].to_numpy())
    covered, bias_strat, bias_pooled = [], [], []
    optimism = {rule: [] for rule in RULES}  # the best's partial estimate minus its full-set value
    switches = {rule: [] for rule in RULES}  # how often the best changed in one run
    regret = {name: [] for name in [*RULES, *(f"{r}+rerank" for r in RULES)]}
    for seed in range(seeds):
        fixed = stratified_subset(full, specs, seed)
        fixed_at = position.loc[fixed["sample_id"]].to_numpy()
        pickers = {rule: BestModelSelector("overall_accuracy", rule, True, keep_top_k=K, num_datasets=len(specs),
                                           population=population) for rule in RULES}
        for number, (step, right) in enumerate(sorted(correct.items())):
            rows_at = fixed_at if strategy == "fixed" else position.loc[
                partial_eval_subset(number, "fresh", fixed, full, specs, seed)["sample_id"]].to_numpy()
            count = np.bincount(ids[rows_at], minlength=len(specs)).astype(float)
            hits = np.bincount(ids[rows_at], weights=right[rows_at], minlength=len(specs))
            metrics = stratified_summary(count - hits, hits, count, names, population)
            covered.append(metrics["overall_accuracy_ci_low"] <= truth[step] <= metrics["overall_accuracy_ci_high"])
            bias_strat.append(metrics["overall_accuracy"] - truth[step])
            bias_pooled.append(metrics["overall_accuracy_pooled"] - truth[step])
            compare_at = fixed_at  # the trainer's paired rule compares on the fixed subset, also with `fresh`
            rows = metric_rows("overall_accuracy", names, {
                "sample_id": full["sample_id"].to_numpy()[compare_at], "dataset_id": ids[compare_at],
                "correct": right[compare_at], "loss": 1.0 - right[compare_at]})
            for picker in pickers.values():
                switched = picker.observe(step, metrics, rows if picker.rule == "paired" or strategy == "fixed" else
                               metric_rows("overall_accuracy", names, {
                                   "sample_id": full["sample_id"].to_numpy()[rows_at], "dataset_id": ids[rows_at],
                                   "correct": right[rows_at], "loss": 1.0 - right[rows_at]})).improved
                switches[picker.rule].append(switched)
        for rule, picker in pickers.items():
            regret[rule].append(best_truth - truth[picker.best["step"]])
            optimism[rule].append(picker.best["value"] - truth[picker.best["step"]])
            regret[f"{rule}+rerank"].append(best_truth - max(truth[c["step"]] for c in picker.candidates))
    return {"coverage": float(np.mean(covered)), "bias_stratified": float(np.mean(bias_strat)),
            "bias_pooled": float(np.mean(bias_pooled)), "abs_err_stratified": float(np.mean(np.abs(bias_strat))),
            "abs_err_pooled": float(np.mean(np.abs(bias_pooled))), "evaluations": len(covered),
            **{f"regret_{k}": (float(np.mean(v)), float(np.std(v) / np.sqrt(len(v)))) for k, v in regret.items()},
            **{f"optimism_{k}": float(np.mean(v)) for k, v in optimism.items()},
            **{f"switches_{k}": float(np.sum(v)) / seeds for k, v in switches.items()}}


def show(name: str, strategy: str, got: dict) -> None:
    print(f"\n== {name}, {strategy} subsets: {got['evaluations']} evaluations")
    print(f"(a) coverage of the 95% overall interval: {got['coverage']:.3f} (target >= 0.90)")
    print(f"(b) mean signed error vs full set: stratified {got['bias_stratified']:+.4f}, pooled "
          f"{got['bias_pooled']:+.4f}; mean |error|: stratified {got['abs_err_stratified']:.4f}, pooled "
          f"{got['abs_err_pooled']:.4f}")
    print("(c) selection regret (full-set accuracy points lost, mean +- s.e. over seeds):")
    for key in [k for k in got if k.startswith("regret_")]:
        mean, se = got[key]
        print(f"    {key[7:]:<20} {mean * 100:6.3f} +- {se * 100:.3f}")
    print("(e) the selected best's partial estimate minus its full-set value (winner's curse), and how often "
          "the best changed per run:")
    for rule in RULES:
        print(f"    {rule:<12} {got[f'optimism_{rule}'] * 100:+6.3f} points, {got[f'switches_{rule}']:.1f} new bests")
    point, rerank = got["regret_point"][0], got["regret_paired+rerank"][0]
    verdict = "meets" if rerank <= point / 2 else "misses"
    print(f"    paired + top-{K} re-rank {rerank * 100:.3f} vs point {point * 100:.3f}: {verdict} the target (<= half)")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        full, correct, specs, costs = demo_truth(Path(tmp))
        print(f"demo: {len(correct)} checkpoints, each scored on the {len(full)} validation images "
              f"({time.perf_counter() - start:.0f} s); full-set accuracy "
              f"{min(c.mean() for c in correct.values()):.3f} .. {max(c.mean() for c in correct.values()):.3f}")
        print(f"(d) cost: training with {K} candidates kept {costs[f'train_k{K}_s']:.1f} s vs 1 kept "
              f"{costs['train_k1_s']:.1f} s; re-ranking {K} candidates {costs['rerank_s']:.1f} s vs one full "
              f"evaluation {costs['full_eval_s']:.1f} s")
        for strategy in ("fixed", "fresh"):
            show("demo (eval ratios 0.5 / 0.2)", strategy, replay(full, correct, specs, strategy, SEEDS))
    full, correct, specs = generated_truth()
    for strategy in ("fixed", "fresh"):
        show("generated (2,000 + 20,000 images, eval ratios 0.25 / 0.02)", strategy,
             replay(full, correct, specs, strategy, GEN_SEEDS))


if __name__ == "__main__":
    main()
