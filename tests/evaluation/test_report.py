"""The report built from a run's outputs: where it comes from, per-class tables, Markdown that renders."""

from __future__ import annotations

import math
import re

import pandas as pd

from food_multids.config import ProjectConfig
from food_multids.report.build import Provenance, build_report, git_commit, per_class_table
from food_multids.report.figures import table_markdown
from tests.conftest import with_overrides


def predictions() -> pd.DataFrame:
    rows = []
    # alpha: class 0 right 3/4 (one mistaken for 'b|c'), class 1 right 0/2 (both for 'a|x'); beta: all right
    for label, pred, n in ((0, 0, 3), (0, 1, 1), (1, 0, 2)):
        rows += [{"dataset_name": "alpha", "label": label, "prediction": pred, "loss": 1.0, "confidence": 0.5,
                  "label_name": ["a|x", "b|c"][label], "prediction_name": ["a|x", "b|c"][pred],
                  "image": "/nowhere.png"}] * n
    rows += [{"dataset_name": "beta", "label": 2, "prediction": 2, "loss": 0.1, "confidence": 0.9,
              "label_name": None, "prediction_name": None, "image": "/nowhere.png"}] * 2
    return pd.DataFrame(rows)


def cells(line: str) -> int:
    """Columns of one Markdown table row: `|` not escaped with a backslash separates cells."""
    return len(re.split(r"(?<!\\)\|", line.strip())) - 2


def test_per_class_table_has_accuracy_support_and_the_top_confusion_worst_first():
    table = per_class_table(predictions(), "alpha")
    assert table.to_dict("records") == [
        {"class": "b|c", "accuracy": 0.0, "support": 2, "top confusion": "a|x (2)"},
        {"class": "a|x", "accuracy": 0.75, "support": 4, "top confusion": "b|c (1)"},
    ]
    assert per_class_table(predictions(), "beta").to_dict("records") == [
        {"class": "2", "accuracy": 1.0, "support": 2, "top confusion": ""}]


def test_markdown_tables_keep_their_columns_and_show_nan_as_a_dash():
    frame = pd.DataFrame({"name": ["a|b", "multi\nline"], "value": [0.5, math.nan]})
    lines = table_markdown(frame).splitlines()
    assert [cells(line) for line in lines] == [2, 2, 2, 2]
    assert lines[2] == "| a\\|b | 0.5000 |" and lines[3] == "| multi line | – |"


def test_the_report_header_says_where_it_comes_from_and_every_table_renders(two_datasets, tmp_path):
    cfg = ProjectConfig.from_params(two_datasets)
    metrics = {"alpha_samples": 6, "alpha_loss": 1.0, "alpha_accuracy": 0.5, "alpha_macro_f1": 0.4,
               "beta_samples": 2, "beta_loss": 0.1, "beta_accuracy": 1.0, "beta_macro_f1": 1.0,
               "overall_samples": 8, "overall_loss": 0.8, "overall_accuracy": 0.625}
    stats = pd.DataFrame([{"split": "train", "dataset_name": "alpha", "rows": 6, "share": 0.75},
                          {"split": "train", "dataset_name": "beta", "rows": 2, "share": 0.25}])
    best = {"metric": "overall_accuracy", "value": 0.625, "step": 10, "source_path": str(tmp_path / "m")}
    where = Provenance(training_run_id="run-train", report_run_id="run-report", created=0.0,
                       git_commit="abc123", model_dir=str(tmp_path / "m"), backbone="/models/Qwen2.5-VL-3B-Instruct",
                       training_env="gpu", report_env="local")
    history = {"records": []}
    confusions = pd.DataFrame({"dataset_name": ["alpha", "alpha"], "label": [0, 1], "prediction": [1, 0],
                               "count": [1, 2]})
    trained = ProjectConfig.from_params(with_overrides(two_datasets, training={"learning_rate": 0.123}))
    import matplotlib

    matplotlib.use("svg")  # a process whose backend was something else: the report sets Agg before any figure
    report = build_report(cfg, history, metrics, predictions(), confusions, stats, best, where, trained=trained)
    assert matplotlib.get_backend().lower() == "agg"
    summary = "\n".join(report.markdown)
    for field in ("| MLflow training run | run-train |", "| MLflow run of this report | run-report |",
                  "| git commit | abc123 |", f"| evaluated model | {tmp_path / 'm'} |",
                  "| backbone (model.name_or_path) | /models/Qwen2.5-VL-3B-Instruct |", "| date | 1970-01-01 ",
                  "| Kedro env (training / this report) | gpu / local |"):
        assert field in summary, field
    tables = [block.splitlines() for block in re.split(r"\n\s*\n", summary) if block.startswith("|")]
    assert len(tables) >= 5  # header, final, dataset mix, one per-class table per dataset
    for table in tables:
        assert len({cells(line) for line in table}) == 1, table
    final = next(t for t in tables if t[0].startswith("| dataset | samples"))
    assert final[-1].startswith("| overall |") and "| – |" in final[-1]  # no macro-F1 across label spaces
    assert "– not defined: macro-F1 is computed within one label space" in summary
    assert "| b\\|c | 0.0000 | 2 | a\\|x (2) |" in summary
    page = report.html()
    assert 'id="per-class-alpha"' in page and "run-train" in page and "abc123" in page
    assert "<td>0.123 / cosine</td>" in page and "the training run (training_info.json" in page  # not today's settings
    untrained = build_report(cfg, history, metrics, predictions(), confusions, stats, best, where).html()
    assert f"<td>{cfg.training.learning_rate} / cosine</td>" in untrained and "the current parameters" in untrained


def test_the_git_commit_is_read_when_there_is_a_checkout(tmp_path):
    import subprocess

    assert git_commit(tmp_path) is None  # not a checkout
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    (repo / "a.txt").write_text("a")
    for args in (["init", "-q"], ["add", "a.txt"], ["commit", "-q", "-m", "a"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", head) and git_commit(repo) == head
    (repo / "conf_env.yml").write_text("x")  # an untracked file (a new env's parameters) makes it dirty
    assert git_commit(repo) == f"{head}-dirty"


def test_the_configuration_says_the_finetuning_mode_and_the_trained_share(two_datasets):
    from food_multids.report.build import finetuning_summary

    full = ProjectConfig.from_params(two_datasets)
    assert finetuning_summary(full, {}) == "full"
    lora = ProjectConfig.from_params(with_overrides(two_datasets, model={
        "finetuning": "lora", "lora": {"r": 8, "alpha": 16, "parts": ["language", "vision"]}}))
    assert finetuning_summary(lora, {"trainable_parameters": 1_500, "total_parameters": 60_000}) == \
        "LoRA r=8, alpha=16 on language + vision layers; 1,500 of 60,000 parameters trained (2.5%)"


def test_the_trust_section_shows_bands_candidates_and_the_winners_curse(two_datasets, tmp_path):
    cfg = ProjectConfig.from_params(two_datasets)
    evals = [(10, 0.70, 0.62, 0.78, True, "first evaluation"),
             (20, 0.74, 0.66, 0.82, False,
              "paired: +0.0400 over step 10 on the same images, not more than 1 x SE 0.0500"),
             (30, 0.80, 0.73, 0.87, True, "paired: +0.1000 over step 10 on the same images, more than 1 x SE 0.0300")]
    history = {"best_model_selection": "paired", "confidence": 0.95, "metric_for_best_model": "overall_accuracy",
               "records": [{"step": s, "kind": "eval", "improved": imp, "reason": why,
                            "metrics": {"overall_accuracy": v, "overall_accuracy_ci_low": lo,
                                        "overall_accuracy_ci_high": hi,
                                        "overall_accuracy_pooled": v + 0.01, "alpha_accuracy": v,
                                        "alpha_accuracy_ci_low": lo, "alpha_accuracy_ci_high": hi}}
                           for s, v, lo, hi, imp, why in evals]}
    candidates = [{"step": s, "value": v, "ci_low": lo, "ci_high": hi, "full_value": full}
                  for (s, v, lo, hi, _, _), full in zip(evals, (0.66, 0.72, 0.71), strict=True)]
    # The partial rule picked step 30; the full-set re-rank published step 20.
    best = {"metric": "overall_accuracy", "value": 0.74, "step": 20, "partial_best_step": 30,
            "selected_by": "full-set re-rank of 3 candidates", "candidates": candidates, "source_path": "m"}
    metrics = {"overall_accuracy": 0.72, "overall_samples": 10, "overall_loss": 1.0}
    where = Provenance(None, None, 0.0, None, "m", "b")
    stats = pd.DataFrame([{"split": "train", "dataset_name": "alpha", "rows": 6, "share": 1.0}])
    empty = pd.DataFrame({"dataset_name": ["alpha"], "label": [0], "prediction": [1], "count": [1]})
    report = build_report(cfg, history, metrics, predictions(), empty, stats, best, where)
    summary = "\n".join(report.markdown)
    assert "## How much to trust the partial numbers" in summary
    assert "chosen by full-set re-rank of 3 candidates" in summary
    assert ("Winner's curse: the partial evaluation's pick (step 30) scored 0.8000 on the partial subset and "
            "0.7100 on the full validation set (gap +0.0900: the partial number was optimistic).") in summary
    assert "falls outside the partial 95% interval [0.7300, 0.8700]" in summary
    assert "| 20 | 0.7400 | 0.6600 | 0.8200 | 0.7200 | yes |" in summary  # the published candidate
    assert "not more than 1 x SE 0.0500" in summary
    page = report.html()
    assert 'id="trust"' in page and 'id="eval-curves"' in page  # the curves carry the bands


def test_an_adaptive_run_shows_its_mix_weights_beside_the_losses(two_datasets, tmp_path):
    params = with_overrides(two_datasets, data={"mix_strategy": "adaptive", "mix_adaptive": {"signal": "train_loss"}})
    cfg = ProjectConfig.from_params(params)
    history = {"target_mix": {"alpha": 0.6, "beta": 0.4}, "records": [
        {"step": 5, "kind": "eval", "metrics": {"alpha_loss": 1.0, "beta_loss": 2.0, "overall_accuracy": 0.5}},
        {"step": 5, "kind": "mix", "signal": "train_loss", "metrics": {"alpha": 0.4, "beta": 0.6}},
        {"step": 10, "kind": "mix", "signal": "train_loss", "metrics": {"alpha": 0.3, "beta": 0.7}}]}
    stats = pd.DataFrame([{"split": "train", "dataset_name": "alpha", "rows": 6, "share": 1.0}])
    conf = pd.DataFrame({"dataset_name": ["alpha"], "label": [0], "prediction": [1], "count": [1]})
    best = {"metric": "overall_accuracy", "value": 0.5, "step": 5, "source_path": "m"}
    final = {"overall_samples": 1, "overall_loss": 1.0, "overall_accuracy": 0.5}
    page = build_report(cfg, history, final, predictions(), conf, stats, best,
                        Provenance(None, None, 0.0, None, "m", "b"), trained=cfg).html()
    assert 'id="adaptive-mix"' in page and "adaptive (train_loss, step_size 1" in page
    without = build_report(cfg, {**history, "records": history["records"][:1]}, final, predictions(),
                           conf, stats, best, Provenance(None, None, 0.0, None, "m", "b")).html()
    assert 'id="adaptive-mix"' not in without


def test_the_highest_loss_thumbnails_take_every_dataset_in_turn(tmp_path):
    from food_multids.report.figures import thumbnails_html
    from tests.conftest import write_image

    rows = [{"dataset_name": "alpha", "label": 0, "prediction": 1, "loss": 9.0 - i, "confidence": 0.9,
             "label_name": None, "prediction_name": None, "image": str(write_image(tmp_path / f"a{i}.png"))}
            for i in range(4)]
    rows += [{"dataset_name": "beta", "label": 0, "prediction": 1, "loss": 1.0 - i / 10, "confidence": 0.5,
              "label_name": None, "prediction_name": None, "image": str(write_image(tmp_path / f"b{i}.png"))}
             for i in range(2)]
    page = thumbnails_html(pd.DataFrame(rows), 4)  # alpha's four have the highest losses
    assert page.count("<figure>") == 4 and page.count("beta<br>") == 2
    assert page.index(f'alt="{tmp_path / "a0.png"}"') < page.index(f'alt="{tmp_path / "b0.png"}"')


def test_the_trust_section_of_a_loss_metric_has_no_accuracy_columns_and_says_which_way_the_gap_goes(two_datasets):
    from food_multids.report.build import trust_tables

    history = {"best_model_selection": "point", "records": [
        {"step": 10, "kind": "eval", "improved": True, "reason": "first evaluation",
         "metrics": {"overall_loss": 1.2, "overall_accuracy_pooled": 0.5}}]}
    best = {"metric": "overall_loss", "value": 1.2, "step": 10, "greater_is_better": False}
    per_eval, _, lines = trust_tables(history, {"overall_loss": 1.0}, best)
    assert list(per_eval.columns) == ["step", "overall_loss", "new best", "why"]
    assert "(gap +0.2000: the partial number was pessimistic)" in lines[1]  # a higher loss than on the full set
