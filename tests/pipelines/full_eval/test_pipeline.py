from __future__ import annotations

import copy
import json
import subprocess

import mlflow
import numpy as np
import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from food_multids.pipelines import node_sections
from food_multids.pipelines.data.nodes import run_data_nodes
from food_multids.pipelines.full_eval import create_pipeline
from tests.conftest import BIN, KEDRO, latest, parameter_feeds


def test_full_evaluate_on_the_tiny_model(base_params, demo_root, tiny_model_dir, classifier_dir, tmp_path):
    params = copy.deepcopy(base_params)
    params["data"]["train_jsonl_list"] = [str(demo_root / f"{d}/train.jsonl") for d in ("digits", "shapes")]
    params["data"]["val_jsonl_list"] = [str(demo_root / f"{d}/val.jsonl") for d in ("digits", "shapes")]
    *_, full = run_data_nodes(params)
    catalog = DataCatalog({**parameter_feeds(params), "best_model": MemoryDataset(classifier_dir),
                           "full_eval_set": MemoryDataset(full),
                           # as select_best describes this model (the test model records no run or step)
                           "best_model_info": MemoryDataset({"candidates": [{"step": 8, "full_value": 0.5}]})})
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    with mlflow.start_run() as run:
        SequentialRunner().run(create_pipeline(), catalog)
    metrics, preds, conf = catalog.load("eval_metrics"), catalog.load("predictions"), catalog.load("confusions")
    assert metrics["digits_samples"] == 100 and metrics["shapes_samples"] == 160 and metrics["overall_samples"] == 260
    assert len(preds) == 260 and preds["sample_id"].is_unique and set(preds["sample_id"]) == set(full["sample_id"])
    for name, n_classes in (("digits", 10), ("shapes", 40)):
        mine = preds[preds["dataset_name"] == name]
        assert metrics[f"{name}_accuracy"] == pytest.approx((mine["label"] == mine["prediction"]).mean())
        assert (mine["prediction"] < n_classes).all()
        topk = np.array(mine["topk"].tolist())
        assert topk.shape[1] == 5 and (topk < n_classes).all()
        assert metrics[f"{name}_top5_accuracy"] >= metrics[f"{name}_accuracy"]
    assert preds.loc[preds["dataset_name"] == "digits", "label_name"].notna().all()
    assert conf["count"].sum() == 260
    logged = mlflow.get_run(run.info.run_id).data.metrics
    for key in ("final_eval_digits_accuracy", "final_eval_overall_accuracy", "final_eval_overall_samples",
                "final_eval_shapes_macro_f1", "final_eval_digits_top5_accuracy", "final_eval_shapes_loss"):
        assert key in logged, key
    assert logged["final_eval_overall_accuracy"] == pytest.approx(metrics["overall_accuracy"])
    for name in ("digits", "shapes", "overall"):  # Wilson intervals of the population accuracy
        low, high = logged[f"final_eval_{name}_accuracy_ci_low"], logged[f"final_eval_{name}_accuracy_ci_high"]
        assert low <= metrics[f"{name}_accuracy"] <= high and 0 < high - low < 0.3
    assert metrics["candidates"] == [{"step": 8, "full_value": 0.5}]  # the re-rank's scores travel with it


@pytest.mark.slow
def test_full_evaluate_shards_across_two_processes(base_params, demo_root, classifier_dir, tmp_path):
    params = copy.deepcopy(base_params)
    params["data"]["train_jsonl_list"] = [str(demo_root / f"{d}/train.jsonl") for d in ("digits", "shapes")]
    params["data"]["val_jsonl_list"] = [str(demo_root / f"{d}/val.jsonl") for d in ("digits", "shapes")]
    params["training"].update(output_dir=str(tmp_path / "out"), device="cpu")
    *_, full = run_data_nodes(params)
    from food_multids.evaluation.calibration import write_calibration
    from food_multids.pipelines.full_eval.nodes import full_evaluate

    write_calibration(classifier_dir, {"temperature": {"digits": 2.0, "shapes": 0.5}, "seed": 0, "fraction": 0.3,
                                       "auto_reject_below": {"digits": 0.5, "shapes": 0.5}})
    single, single_preds, _ = full_evaluate(classifier_dir, full, **node_sections(full_evaluate, params))
    params["training"]["num_processes"] = 2
    sharded, sharded_preds, conf = full_evaluate(classifier_dir, full, **node_sections(full_evaluate, params))
    assert sharded["overall_samples"] == 260 and len(sharded_preds) == 260 and sharded_preds["sample_id"].is_unique
    for key in ("digits_accuracy", "shapes_loss", "overall_accuracy", "shapes_macro_f1", "digits_top5_accuracy",
                "digits_ece", "shapes_ece_calibrated", "digits_nll_calibrated", "shapes_aurc"):
        assert sharded[key] == pytest.approx(single[key], abs=1e-6), key
    assert sharded["calibration_curves"] == single["calibration_curves"]  # through the launcher's result file
    merged = single_preds.merge(sharded_preds, on="sample_id", suffixes=("_1", "_2"))
    assert (merged["prediction_1"] == merged["prediction_2"]).all()
    assert conf["count"].sum() == 260


@pytest.mark.e2e
def test_kedro_run_writes_a_report_whose_numbers_match_the_saved_metrics(trained_demo):
    root, _, log = trained_demo
    metrics = json.loads(latest(root, "data/07_model_output/eval_metrics.json").read_text())
    page = latest(root, "data/08_reporting/report.html").read_text()
    summary = latest(root, "data/08_reporting/report.md").read_text()
    for figure in ("train-curves", "batch-mix", "eval-curves", "partial-vs-full", "confusion-digits",
                   "confusion-shapes", "misclassified", "final-table", "calibration"):
        assert f'id="{figure}"' in page, figure
    assert page.count("data:image/png;base64,") >= 8
    # select_best calibrated the model; the full evaluation measured it on the images the fit did not use.
    model = json.loads((latest(root, "data/06_models/best_model") / "classifier.json").read_text())
    assert set(model["calibration"]["temperature"]) == {"digits", "shapes"}
    for name in ("digits", "shapes"):
        assert metrics[f"{name}_temperature"] == pytest.approx(model["calibration"]["temperature"][name])
        assert f"{metrics[f'{name}_ece_calibrated']:.4f}" in summary and f"{metrics[f'{name}_aurc']:.4f}" in page
    final = page[page.index('id="final-table"'):]
    final = final[:final.index("</table>")]
    for key in ("digits_accuracy", "shapes_accuracy", "overall_accuracy", "digits_loss", "shapes_macro_f1",
                "digits_top5_accuracy"):
        assert f"{metrics[key]:.4f}" in final, key
        assert f"{metrics[key]:.4f}" in summary, key
    best = json.loads(latest(root, "data/06_models/best_model_info.json").read_text())
    assert f"step {best['step']}" in page and f"{best['value']:.4f}" in summary
    assert "📈 Overall:" in log and "🏆 New best model!" in log and "📊 TRAIN step " in log
    assert "📊 TRAIN - OVERALL" not in log  # training.log_format: compact (one line per logging step)
    for noise in ("Add type hints", "Downloading artifacts", "Created version", "Registering new custom resolver",
                  "Loading data from", "Completed 1 out of"):  # the default logging.yml's quiet run
        assert noise not in log, noise
    # The run ends on where its results are, and latest/ links the newest report.
    summary_block = log[log.index("Results of this run:"):]
    newest = latest(root, "data/08_reporting/report.html")
    assert str(newest.relative_to(root)) in summary_block and "models:/food_multids/1" in summary_block
    assert "http://127.0.0.1:5000/#/experiments/" in summary_block
    assert (root / "data/08_reporting/latest/report.html").resolve() == newest.resolve()

    # The top-3 candidates were scored on the full set and the full-set winner is the published best_model.
    reranked = json.loads(latest(root, "data/06_models/candidate_evals.json").read_text())
    assert reranked["reranked"] and len(reranked["candidates"]) == 3
    winner = max(reranked["candidates"],
                 key=lambda c: (c["full_value"], c["step"] == best["partial_best_step"], -c["step"]))
    assert best["step"] == winner["step"] and best["selected_by"] == "full-set re-rank of 3 candidates"
    assert metrics["model_info"]["step"] == winner["step"]  # full_evaluate evaluated the published model ...
    assert metrics["overall_accuracy"] == pytest.approx(winner["full_value"], abs=1e-6)  # ... with the same result
    assert [c["step"] for c in metrics["candidates"]] == [c["step"] for c in reranked["candidates"]]
    assert "How much to trust the partial numbers" in page and "Winner's curse" in summary
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    logged = client.get_run(best["mlflow_run_id"]).data.metrics
    for candidate in reranked["candidates"]:
        key = f"final_eval_candidate_{candidate['step']}_overall_accuracy"
        assert logged[key] == pytest.approx(candidate["full_value"])
    for key in ("eval_overall_accuracy_ci_low", "eval_overall_accuracy_ci_high", "eval_overall_accuracy_pooled",
                "eval_digits_accuracy_ci_low", "final_eval_overall_accuracy_ci_high"):
        assert key in logged, key


@pytest.mark.e2e
def test_the_inspection_notebook_runs_top_to_bottom(trained_demo):
    import nbclient
    import nbformat

    root, env, _ = trained_demo
    nb = nbformat.read(root / "notebooks/inspect_outputs.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(root / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    texts = " ".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "digits" in texts and "shapes" in texts and "overall_accuracy" in texts
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert "top_k_names" in texts  # the cell that predicts a new image
    assert not (root / "notebooks/mlflow.db").exists()


@pytest.mark.e2e
def test_the_training_run_registered_its_served_model(trained_demo):
    from mlflow.tracking import MlflowClient

    root, env, _ = trained_demo
    registered = json.loads(latest(root, "data/06_models/registered_model.json").read_text())
    assert registered["registry_uri"] == "models:/food_multids/1" and registered["logged"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [version] = client.search_model_versions("name='food_multids'")
    assert version.run_id == registered["run_id"]
    assert registered["best_model"] == str(latest(root, "data/06_models/best_model").resolve())
    # The version says what it is (env, label spaces, how good the full evaluation found it).
    metrics = json.loads(latest(root, "data/07_model_output/eval_metrics.json").read_text())
    assert version.tags["food_multids.env"] == "local"
    assert version.tags["food_multids.datasets"] == "digits:10,shapes:40"
    assert version.tags["food_multids.final_overall_accuracy"] == f"{metrics['overall_accuracy']:.4f}"
    info = json.loads((latest(root, "data/06_models/best_model") / "training_info.json").read_text())
    assert info["kedro_env"] == "local"
    described = subprocess.run([str(BIN / "food-multids"), "describe", "models:/food_multids/latest"], cwd=root,
                               env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"},
                               capture_output=True, text=True, timeout=120)
    assert described.returncode == 0, described.stderr[-2000:]
    # No log line first:
    assert described.stdout.startswith("Model models:/food_multids/latest: "), described.stdout[:300]
    assert "label spaces: digits (10 classes), shapes (40 classes)" in described.stdout
    assert "trained in the Kedro env 'local'" in described.stdout and "version 1 of 1" in described.stdout


@pytest.mark.e2e
def test_kedro_viz_build_shows_the_nine_nodes_and_their_edges(trained_demo):
    root, env, _ = trained_demo
    proc = subprocess.run([KEDRO, "viz", "build"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Add type hints" not in proc.stdout + proc.stderr  # MLflow's warning, silenced before the plugins load
    graph = json.loads((root / "build/api/main").read_text())
    name = {n["id"]: n["name"] for n in graph["nodes"]}
    tasks = {n["name"] for n in graph["nodes"] if n["type"] == "task"}
    assert tasks == {"ingest_jsonl", "merge_and_tag", "split_eval_subsets", "train_deepspeed", "rerank_candidates",
                     "select_best", "log_served_model", "full_evaluate", "report"}
    edges = {(name[e["source"]], name[e["target"]]) for e in graph["edges"]}
    chain = [("ingest_jsonl", "train_records"), ("train_records", "merge_and_tag"), ("merge_and_tag", "val_set"),
             ("val_set", "split_eval_subsets"), ("split_eval_subsets", "eval_subset"),
             ("eval_subset", "train_deepspeed"),
             ("train_deepspeed", "checkpoint_manifest"), ("checkpoint_manifest", "rerank_candidates"),
             ("rerank_candidates", "candidate_evals"), ("candidate_evals", "select_best"),
             ("checkpoint_manifest", "select_best"),
             ("select_best", "best_model"), ("best_model", "full_evaluate"), ("full_evaluate", "predictions"),
             ("predictions", "report"), ("best_model", "log_served_model"), ("log_served_model", "registered_model")]
    for edge in chain:
        assert edge in edges, edge
    assert any(n["type"] == "parameters" for n in graph["nodes"])


def test_a_model_whose_label_spaces_differ_from_the_config_is_refused_before_evaluating(base_params, classifier_dir):
    from food_multids.evaluation.full import ModelMismatchError
    from food_multids.pipelines.full_eval.nodes import full_evaluate

    params = copy.deepcopy(base_params)
    params["datasets"]["dataset_configs"] = {"digits": {"num_classes": 10}, "letters": {"num_classes": 26}}
    with pytest.raises(ModelMismatchError, match=rf"the model {classifier_dir} was trained on the label spaces digits "
                                                 r"\(#0, 10 classes\), shapes \(#1, 40 classes\), but .* letters "
                                                 r"\(#1, 26 classes\).*--load-versions best_model:<version>"):
        full_evaluate(classifier_dir, pd.DataFrame(), **node_sections(full_evaluate, params))


def test_the_report_names_the_model_that_was_evaluated_not_the_newest_info(classifier_dir, caplog):
    from food_multids.model.classifier import TRAINING_INFO
    from food_multids.pipelines.report.nodes import evaluated_model_info

    (classifier_dir / TRAINING_INFO).write_text(json.dumps({"metric": "overall_accuracy", "value": 0.5, "step": 40,
                                                            "greater_is_better": True, "subset": "fixed",
                                                            "mlflow_run_id": "older"}))
    from food_multids.evaluation.full import read_model_info

    newest = {"metric": "overall_accuracy", "value": 0.9, "step": 120, "mlflow_run_id": "newer", "source_path": "/gone"}
    info = evaluated_model_info({"model_info": read_model_info(classifier_dir)}, newest)
    assert (info["step"], info["value"], info["mlflow_run_id"]) == (40, 0.5, "older")
    assert info["source_path"] == str(classifier_dir.resolve())
    assert "comes from run older step 40, not from best_model_info's run newer step 120" in caplog.text


def test_images_failing_at_load_are_counted_per_dataset_and_top_k_skips_small_label_spaces(
        base_params, demo_root, classifier_dir, tmp_path, caplog):
    from food_multids.pipelines.full_eval.nodes import full_evaluate

    params = copy.deepcopy(base_params)
    params["data"]["train_jsonl_list"] = [str(demo_root / f"{d}/train.jsonl") for d in ("digits", "shapes")]
    params["data"]["val_jsonl_list"] = [str(demo_root / f"{d}/val.jsonl") for d in ("digits", "shapes")]
    params["evaluation"]["top_k"] = 10  # digits has 10 classes: its top-10 accuracy would be 1.0 by construction
    *_, full = run_data_nodes(params)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # passed ingest once, damaged since
    full = full.copy()
    full["image"] = full["image"].astype(object)
    full.loc[full.index[full["dataset_name"] == "digits"][:2], "image"] = str(bad)
    metrics, preds, _ = full_evaluate(classifier_dir, full, **node_sections(full_evaluate, params))
    assert metrics["digits_skipped_images"] == 2 and metrics["shapes_skipped_images"] == 0
    assert metrics["skipped_images"] == 2 and metrics["digits_samples"] == 98 and len(preds) == 258
    assert "shapes_top10_accuracy" in metrics and "digits_top10_accuracy" not in metrics
    mine = preds[preds["dataset_name"] == "shapes"]
    expected = np.mean([label in row for label, row in zip(mine["label"], mine["topk"], strict=True)])
    assert metrics["overall_top10_accuracy"] == pytest.approx(expected)  # over the datasets where it means something
    assert "No top-10 accuracy for ['digits']" in caplog.text
