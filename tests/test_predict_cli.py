"""`food-multids predict`: a model folder or `best`, images, folders and JSONL files; a table or JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from food_multids.inference.predict import predict_images
from tests.conftest import write_image, write_jsonl

CLI = str(Path(sys.executable).with_name("food-multids"))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "predict", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
def test_the_cli_predicts_a_folder_as_the_library_does(classifier_dir, tmp_path):
    images = [write_image(tmp_path / f"photos/{i}.png", colour=(60 * i, 20, 200 - 50 * i)) for i in range(3)]
    proc = cli(str(classifier_dir), "photos", "--dataset", "digits", "--top-k", "3", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = predict_images(classifier_dir, images, dataset="digits", top_k=3)
    assert [r["image"] for r in rows] == [str(p) for p in images]
    assert [r["top_k_ids"] for r in rows] == [list(i) for i in expected["top_k_ids"]]
    np.testing.assert_allclose([r["top_k_probs"] for r in rows], np.array(expected["top_k_probs"].tolist()), atol=1e-6)

    table = cli(str(classifier_dir), "photos/0.png", cwd=tmp_path)  # no dataset: each label space, one line each
    assert table.returncode == 0, table.stderr[-2000:]
    lines = table.stdout.splitlines()
    assert len(lines) == 2 and "digits" in lines[0] and "shapes" in lines[1]
    assert f"{expected['top_k_names'][0][0]} (" in lines[0]


@pytest.mark.e2e
def test_the_cli_reads_jsonl_and_names_bad_input(classifier_dir, tmp_path):
    write_image(tmp_path / "a.png")
    write_jsonl(tmp_path / "rows.jsonl", [{"image": "a.png", "dataset_name": "shapes"}, {"image": "gone.png"}])
    proc = cli(str(classifier_dir), "rows.jsonl", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'rows.jsonl'}:2: bad image file: image file not found" in proc.stderr
    assert "--skip-bad" in proc.stderr
    skipped = cli(str(classifier_dir), "rows.jsonl", "--skip-bad", "--json", cwd=tmp_path)
    assert skipped.returncode == 0 and len(skipped.stdout.splitlines()) == 1
    assert "skipped" in skipped.stderr and "gone.png" in skipped.stderr
    zero = cli(str(classifier_dir), "a.png", "--top-k", "0", cwd=tmp_path)
    assert zero.returncode == 2 and "--top-k: must be >= 1, got 0" in zero.stderr
    nobest = cli("best", "a.png", cwd=tmp_path)
    assert nobest.returncode == 2 and "train one with `kedro run --pipelines train`" in nobest.stderr


def test_a_damaged_mlflow_store_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    from food_multids.console import main
    from tests.test_hooks import make_store

    (tmp_path / "pyproject.toml").write_text("[tool.kedro]\npackage_name = 'x'\n")  # the project root
    store = tmp_path / "mlflow.db"
    make_store(store)
    store.write_bytes(store.read_bytes()[:5000])
    write_image(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    capsys.readouterr()  # MLflow's own lines while the store was made
    assert main(["predict", "models:/food_multids/1", "a.png"]) == 2
    err = capsys.readouterr().err
    assert f"food-multids predict: the MLflow store {store} is truncated" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
