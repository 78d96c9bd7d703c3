from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from kedro.io import DataCatalog
from kedro.runner import SequentialRunner

from food_multids.pipelines.data import create_pipeline
from tests.conftest import parameter_feeds


def test_data_pipeline_slice_runs_on_an_in_memory_catalog(two_datasets):
    catalog = DataCatalog(parameter_feeds(two_datasets))
    SequentialRunner().run(create_pipeline(), catalog)
    subset, full = catalog.load("eval_subset"), catalog.load("full_eval_set")
    stats = catalog.load("dataset_stats")
    assert len(full) == 32
    assert (subset["dataset_name"] == "alpha").sum() == 6 and (subset["dataset_name"] == "beta").sum() == 5
    assert stats.set_index(["split", "dataset_name"]).loc[("train", "beta"), "rows"] == 20
    assert catalog.load("rejected_rows").empty
    assert {"dataset_id", "num_classes", "sample_id"} <= set(catalog.load("train_set").columns)


@pytest.mark.e2e
def test_kedro_run_data_pipeline_writes_versioned_parquet(project_copy):
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    kedro = os.path.join(os.path.dirname(sys.executable), "kedro")
    proc = subprocess.run([kedro, "run", "--pipelines", "data"], cwd=project_copy, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    versions = list((project_copy / "data/05_model_input/eval_subset.parquet").iterdir())
    assert len(versions) == 1
    subset = pd.read_parquet(versions[0] / "eval_subset.parquet")
    assert subset.groupby("dataset_name", observed=True).size().to_dict() == {"digits": 50, "shapes": 80}
    assert (project_copy / "mlflow.db").is_file()
    assert "Dataset mix:" in proc.stdout + proc.stderr


def test_every_node_takes_its_own_parameter_sections_not_the_whole_config():
    # kedro-viz then draws each node's real parameters; preflight checks the whole config before any node.
    from food_multids.pipeline_registry import register_pipelines
    from food_multids.pipelines.predict import create_serving_pipeline

    every = [*[n for p in register_pipelines().values() for n in p.nodes], *create_serving_pipeline().nodes]
    everywhere = {n.name: set(n.inputs) for n in every}
    assert len(everywhere) == 13 and all("parameters" not in names for names in everywhere.values()), everywhere
    assert "params:predict" not in everywhere["train_deepspeed"] and "params:model" not in everywhere["predict"]
    inputs = {n.name: set(n.inputs) for n in create_pipeline().nodes}
    assert inputs["ingest_jsonl"] == {"params:data", "params:datasets", "params:model.num_labels"}
    assert inputs["merge_and_tag"] >= {"params:training.seed", "params:training.shuffle"}
