"""Assemble the report from the run's catalog outputs (history, metrics, predictions, statistics)."""

from __future__ import annotations

import html
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from food_multids.config import ProjectConfig
from food_multids.report.figures import (
    NOT_DEFINED,
    Report,
    adaptive_mix_figure,
    calibration_figure,
    confusion_figure,
    curves_figure,
    figure_tag,
    has_missing,
    history_frame,
    markdown_cell,
    mix_figure,
    partial_vs_full_figure,
    table_html,
    table_markdown,
    thumbnails_html,
    use_headless_backend,
)

MISSING_NOTE = (f"{NOT_DEFINED} not defined: macro-F1 is computed within one label space, so there is no overall "
                "value across datasets; top-k accuracy is left out for datasets with k classes or fewer (it would be "
                "1.0 by construction).")


@dataclass(frozen=True)
class Provenance:
    """Where a report comes from: filled by the report node, shown in the header."""

    training_run_id: str | None
    report_run_id: str | None
    created: float
    git_commit: str | None
    model_dir: str
    backbone: str
    training_env: str | None = None
    report_env: str | None = None


def markdown_text(value: object) -> str:
    return markdown_cell(str(value))


def git_commit(folder: Path) -> str | None:
    """HEAD of the git checkout holding `folder` (with -dirty for uncommitted changes), or None."""
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        # Untracked files count: an env's parameters.yml that was never committed changes the run.
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def header_table(where: Provenance) -> pd.DataFrame:
    rows = [("MLflow training run", where.training_run_id or "(not recorded)"),
            ("MLflow run of this report", where.report_run_id or "(no active run)"),
            ("Kedro env (training / this report)", f"{where.training_env or '?'} / {where.report_env or '?'}"),
            ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(where.created))),
            ("git commit", where.git_commit or "(not a git checkout)"),
            ("evaluated model", where.model_dir),
            ("backbone (model.name_or_path)", where.backbone)]
    return pd.DataFrame(rows, columns=["", "value"])


def per_class_table(predictions: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Accuracy, support and the most frequent wrong prediction of every class of one dataset, worst first."""
    mine = predictions[predictions["dataset_name"] == dataset]
    if mine.empty:
        return pd.DataFrame(columns=["class", "accuracy", "support", "top confusion"])
    named = "label_name" in mine and "prediction_name" in mine
    label, pred = mine["label"].astype(str), mine["prediction"].astype(str)
    if named:
        label = mine["label_name"].where(mine["label_name"].notna(), label)
        pred = mine["prediction_name"].where(mine["prediction_name"].notna(), pred)
    frame = pd.DataFrame({"label": mine["label"].to_numpy(), "class": label.to_numpy(), "pred": pred.to_numpy(),
                          "correct": (mine["label"] == mine["prediction"]).to_numpy()})
    wrong = frame[~frame["correct"]].groupby(["label", "pred"]).size().rename("n").reset_index()
    wrong = wrong.sort_values(["label", "n", "pred"], ascending=[True, False, True]).drop_duplicates("label")
    top = {r.label: f"{r.pred} ({r.n})" for r in wrong.itertuples()}
    table = frame.groupby(["label", "class"], sort=True).agg(accuracy=("correct", "mean"),
                                                             support=("correct", "size")).reset_index()
    table["top confusion"] = [top.get(label, "") for label in table["label"]]
    table = table.sort_values(["accuracy", "support", "label"], ascending=[True, False, True])
    return table[["class", "accuracy", "support", "top confusion"]].reset_index(drop=True)


def configuration_table(cfg: ProjectConfig, recorded: bool, backbone: str, best: dict) -> pd.DataFrame:
    source = ("the training run (training_info.json in the model folder)" if recorded
              else "the current parameters (the model folder records no training settings)")
    zero = (cfg.deepspeed.get("zero_optimization") or {}).get("stage", 0)
    mix = cfg.data.mix_adaptive
    strategy = cfg.data.mix_strategy if cfg.data.mix_strategy != "adaptive" else (
        f"adaptive ({mix.signal}, step_size {mix.step_size:g}, smoothing {mix.smoothing:g}, reference {mix.reference}, "
        f"prior_mix {mix.prior_mix:g}, min_weight {mix.min_weight:g})")
    rows = [("settings from", source), ("model", backbone),
            ("num_labels / logits masking", f"{cfg.model.num_labels} / {cfg.model.enable_logits_masking}"),
            ("datasets",
             ", ".join(f"{d.name} ({d.num_classes} classes, eval_ratio {d.eval_ratio})" for d in cfg.datasets)),
            ("mix strategy", strategy),
            ("learning rate / schedule", f"{cfg.training.learning_rate} / {cfg.training.lr_scheduler_type}"),
            ("batch per device x accumulation",
             f"{cfg.training.per_device_train_batch_size} x {cfg.training.gradient_accumulation_steps}"),
            ("fine-tuning", finetuning_summary(cfg, best)),
            ("DeepSpeed ZeRO stage", str(zero)),
            ("best model", f"{best['metric']} = {best['value']:.4f} at step {best['step']} "
                           f"({best.get('eval_subset_strategy')} subset)"
                           + (f"; {best['full_value']:.4f} on the full validation set, chosen by "
                              f"{best.get('selected_by')}"
                              if best.get("full_value") is not None else ""))]
    return pd.DataFrame(rows, columns=["setting", "value"])


def finetuning_summary(cfg: ProjectConfig, best: dict) -> str:
    """full, or LoRA with its rank and layers; with the trained share when the model folder records it."""
    mode = "full"
    if cfg.model.finetuning == "lora":
        lora = cfg.model.lora
        where = ", ".join(lora.target_modules) if lora.target_modules else " + ".join(lora.parts) + " layers"
        mode = f"LoRA r={lora.r}, alpha={lora.alpha:g} on {where}"
    trained, total = best.get("trainable_parameters"), best.get("total_parameters")
    if trained and total:
        mode += f"; {trained:,} of {total:,} parameters trained ({100 * trained / total:.1f}%)"
    return mode


def final_table(cfg: ProjectConfig, metrics: dict) -> pd.DataFrame:
    k = cfg.evaluation.top_k
    rows = []
    for name in [*cfg.dataset_names, "overall"]:
        if f"{name}_samples" not in metrics:
            continue
        rows.append({"dataset": name, "samples": int(metrics[f"{name}_samples"]), "loss": metrics[f"{name}_loss"],
                     "top-1": metrics[f"{name}_accuracy"],
                     f"top-{k}": metrics.get(f"{name}_top{k}_accuracy", float("nan")),
                     "macro-F1": metrics.get(f"{name}_macro_f1", float("nan")),
                     # Images that could not be decoded at load time are not in `samples`: say how many.
                     "skipped at load": int(metrics.get(skipped_key(name), 0))})
    return pd.DataFrame(rows)


def skipped_key(name: str) -> str:
    return "skipped_images" if name == "overall" else f"{name}_skipped_images"


def partial_table(cfg: ProjectConfig, history: dict, best_step: int | None, metrics: dict) -> pd.DataFrame:
    evals = history_frame(history, "eval")
    rows = []
    for name in cfg.dataset_names:
        col = f"{name}_accuracy"
        if evals.empty or col not in evals or f"{name}_accuracy" not in metrics:
            continue
        at_best = evals.loc[evals["step"] == best_step, col]
        partial = float(at_best.iloc[0]) if len(at_best) else float(evals[col].iloc[-1])
        errors = (evals[col] - metrics[col]).abs()
        rows.append({"dataset": name, "partial eval (best step)": partial, "full eval": metrics[col],
                     "difference": partial - metrics[col],
                     "mean |partial - full| over all evals": float(errors.mean())})
    return pd.DataFrame(rows)


def trust_tables(history: dict, metrics: dict, best: dict) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """"How much to trust the partial numbers": every partial evaluation of the selection metric with its
    interval and the rule's verdict; the candidates with their full-set values; and sentences on the
    winner's curse (the partial estimate of the model the partial evaluation chose, minus its full value)."""
    key = best.get("metric") or history.get("metric_for_best_model") or "overall_accuracy"
    records = [r for r in history.get("records", []) if r["kind"] == "eval"]
    per_eval = pd.DataFrame([{
        "step": r["step"], key: r["metrics"].get(key, float("nan")),
        "CI low": r["metrics"].get(f"{key}_ci_low", float("nan")),
        "CI high": r["metrics"].get(f"{key}_ci_high", float("nan")),
        "pooled overall accuracy": r["metrics"].get("overall_accuracy_pooled", float("nan")),
        "new best": "yes" if r.get("improved") else "", "why": r.get("reason", "")} for r in records])
    if not per_eval.empty and key != "overall_accuracy":  # the pooled value compares with the overall accuracy only
        per_eval = per_eval.drop(columns="pooled overall accuracy")
    if not per_eval.empty and per_eval[["CI low", "CI high"]].isna().all().all():  # no interval logged (a loss)
        per_eval = per_eval.drop(columns=["CI low", "CI high"])
    candidates = best.get("candidates") or metrics.get("candidates") or []
    published = best.get("step")
    table = pd.DataFrame([{"step": c["step"], f"partial {key}": c["value"],
                           "CI low": c.get("ci_low") if c.get("ci_low") is not None else float("nan"),
                           "CI high": c.get("ci_high") if c.get("ci_high") is not None else float("nan"),
                           f"full-set {key}": c.get("full_value", float("nan")),
                           "published": "yes" if c["step"] == published else ""} for c in candidates])
    lines = [f"Selection rule: {history.get('best_model_selection', 'point')}; best model chosen by "
             f"{best.get('selected_by', 'the partial evaluation')}."]
    chosen = best.get("partial_best_step", published)
    at = next((r["metrics"] for r in records if r["step"] == chosen), None)
    full = next((c.get("full_value") for c in candidates if c["step"] == chosen), None)
    if full is None and chosen == published and key in metrics:
        full = metrics[key]
    if at is not None and full is not None and key in at:
        greater = best.get("greater_is_better", not key.endswith("loss"))
        gap = at[key] - full
        side = "optimistic" if (gap > 0) == greater and gap != 0 else "pessimistic" if gap else "exact"
        lines.append(f"Winner's curse: the partial evaluation's pick (step {chosen}) scored {at[key]:.4f} on the "
                     f"partial subset and {full:.4f} on the full validation set (gap {gap:+.4f}: the partial "
                     f"number was {side}).")
        low, high = at.get(f"{key}_ci_low"), at.get(f"{key}_ci_high")
        if low is not None and high is not None:
            level = f"{history.get('confidence', 0.95):.0%}"
            inside = "inside" if low <= full <= high else "outside"
            lines.append(f"The full-set value falls {inside} the partial {level} interval [{low:.4f}, {high:.4f}].")
    if len(candidates) > 1 and any("full_value" in c for c in candidates):
        lines.append(f"The published model's full-set value was also used to choose among {len(candidates)} "
                     "candidates, so it is itself slightly optimistic.")
    return per_eval, table, lines


CALIBRATION_NOTE = ("One temperature per dataset, fitted on a seeded share of its validation images "
                    "(evaluation.calibration_fraction); ECE (15 bins), NLL, AURC and the selective accuracy are "
                    "measured on the other images. Predictions use the calibrated probabilities (predict.calibrated); "
                    "predict.reject_below: auto answers 'unknown' below the fitted threshold.")


def calibration_table(names: list[str], metrics: dict) -> pd.DataFrame:
    """Per dataset with a fitted temperature: T, ECE and NLL before/after, AURC, selective accuracy at 80 %."""
    rows = []
    for name in names:
        if f"{name}_ece" not in metrics:
            continue
        rows.append({"dataset": name, "temperature": metrics[f"{name}_temperature"],
                     "held-out images": int(metrics[f"{name}_calibration_held_out_images"]),
                     "ECE raw": metrics[f"{name}_ece"], "ECE calibrated": metrics[f"{name}_ece_calibrated"],
                     "NLL raw": metrics[f"{name}_nll"], "NLL calibrated": metrics[f"{name}_nll_calibrated"],
                     "AURC": metrics[f"{name}_aurc"],
                     "accuracy at 80 % coverage": metrics[f"{name}_selective_accuracy_at_80"]})
    return pd.DataFrame(rows)


def build_report(cfg: ProjectConfig, history: dict, metrics: dict, predictions: pd.DataFrame,
                 confusions: pd.DataFrame, stats: pd.DataFrame, best: dict, where: Provenance,
                 trained: ProjectConfig | None = None) -> Report:
    """`cfg`: the current parameters (datasets, evaluation settings); `trained`: the settings the model
    was trained with, recorded in its folder (the Configuration section shows those when known)."""
    use_headless_backend()
    names = list(cfg.dataset_names)
    report = Report("food_multids training report")
    header = header_table(where)
    report.sections.append(("Run", table_html(header)))
    report.sections.append(("Configuration", table_html(configuration_table(trained or cfg, trained is not None,
                                                                             where.backbone, best))))
    mix = stats.assign(share=stats["share"].map("{:.1%}".format))
    report.sections.append(("Dataset mix", table_html(mix, "{:.3f}")))
    final = final_table(cfg, metrics)
    note = f"<p><small>{html.escape(MISSING_NOTE)}</small></p>" if has_missing(final) else ""
    report.sections.append(("Final evaluation (full validation sets)",
                            f'<div id="final-table">{table_html(final)}</div>{note}'))
    calibration = calibration_table(names, metrics)
    if not calibration.empty:
        curves = metrics.get("calibration_curves") or {}
        figure = figure_tag(calibration_figure(curves), "calibration",
                            "reliability diagrams and coverage curves per dataset") if curves else ""
        report.sections.append(("Calibrated confidence and \"none of these\"", f'<div id="calibration"><p>'
                                f'{html.escape(CALIBRATION_NOTE)}</p>{table_html(calibration)}{figure}</div>'))
    per_class = {name: per_class_table(predictions, name) for name in names}
    report.sections.append(("Per-class results (worst first)", "".join(
        f'<details id="per-class-{html.escape(name)}"><summary>{html.escape(name)}: {len(table)} classes</summary>'
        f"{table_html(table)}</details>" for name, table in per_class.items())))
    train, evals = history_frame(history, "train"), history_frame(history, "eval")
    best_step = best.get("step")
    if not train.empty:
        report.sections.append(("Training curves per dataset",
                                figure_tag(curves_figure(train, names, "train", best_step), "train-curves",
                                           "training loss and accuracy per dataset")))
        report.sections.append(("Batch composition",
                                figure_tag(mix_figure(train, names, history.get("target_mix", {})), "batch-mix",
                                           "dataset share per window vs target")))
    mixes = history_frame(history, "mix")
    if not mixes.empty:
        report.sections.append(("Adaptive mix", figure_tag(
            adaptive_mix_figure(mixes, evals, names, history.get("target_mix", {})), "adaptive-mix",
            "mix weights over steps and partial-evaluation loss per dataset")))
    if not evals.empty:
        report.sections.append(("Partial evaluation curves",
                                figure_tag(curves_figure(evals, names, "partial eval", best_step), "eval-curves",
                                           "partial evaluation per dataset")))
    per_eval, candidates, trust = trust_tables(history, metrics, best)
    if not per_eval.empty:
        report.sections.append(("How much to trust the partial numbers", '<div id="trust">' + "".join(
            f"<p>{html.escape(line)}</p>" for line in trust) + table_html(per_eval) +
            (table_html(candidates) if not candidates.empty else "") + "</div>"))
    partial = partial_table(cfg, history, best_step, metrics)
    if not partial.empty:
        report.sections.append(("Partial vs full evaluation",
                                table_html(partial) + figure_tag(partial_vs_full_figure(partial), "partial-vs-full",
                                                                 "partial vs full accuracy")))
    names_of = {}
    for name in names:
        mine = predictions[predictions["dataset_name"] == name]
        names_of[name] = dict(zip(mine["label"], mine["label_name"], strict=True)) if "label_name" in mine else {}
        names_of[name] = {k: v for k, v in names_of[name].items() if isinstance(v, str)}
    for name in names:
        fig = confusion_figure(confusions[confusions["dataset_name"] == name], name, cfg.evaluation.confusion_top_n,
                               names_of[name])
        if fig is not None:
            report.sections.append((f"Confusions: {name}",
                                    figure_tag(fig, f"confusion-{name}", f"confusion heatmap {name}")))
    report.sections.append(("Misclassified examples (highest loss)",
                            thumbnails_html(predictions, cfg.evaluation.report_thumbnails)))
    report.markdown = [
        "# food_multids training report", "", table_markdown(header), "",
        f"Best model: **{best['metric']} = {best['value']:.4f}** at step {best['step']} (source "
        f"{markdown_text(best.get('source_path'))}).", "",
        "## Final evaluation (full validation sets)", "", table_markdown(final), "",
        *([MISSING_NOTE, ""] if has_missing(final) else []),
        "## How much to trust the partial numbers", "", *[f"{markdown_text(line)}\n" for line in trust],
        table_markdown(per_eval) if not per_eval.empty else "(no partial evaluations)", "",
        *([table_markdown(candidates), ""] if not candidates.empty else []),
        "## Partial vs full evaluation", "",
        table_markdown(partial) if not partial.empty else "(no partial evaluations)", "",
        *(["## Calibrated confidence", "", CALIBRATION_NOTE, "", table_markdown(calibration), ""]
          if not calibration.empty else []),
        "## Dataset mix", "", table_markdown(mix, "{:.3f}"), "",
        "## Per-class results (worst first)", "",
    ]
    for name, table in per_class.items():
        report.markdown += [f"### {markdown_text(name)}", "", table_markdown(table), ""]
    return report
