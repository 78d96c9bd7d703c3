"""Temperature scaling, calibration error, selective accuracy and "none of these"."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from food_multids.evaluation.calibration import (
    GRID,
    best_temperature,
    calibration_rows,
    expected_calibration_error,
    fit,
    held_out_metrics,
    selective,
    threshold_for_precision,
)


def scored(logits: np.ndarray, labels: np.ndarray, temperatures: np.ndarray) -> tuple[list, list]:
    """What inference's temperature_grid gives each row: NLL and top-1 probability at each temperature."""
    nll, conf = [], []
    for row, label in zip(logits, labels, strict=True):
        scaled = row[None, :] / temperatures[:, None]
        top = scaled.max(1, keepdims=True)
        logp = scaled - np.log(np.exp(scaled - top).sum(1, keepdims=True)) - top
        nll.append((-logp[:, label]).tolist())
        conf.append(np.exp(logp.max(1)).tolist())
    return nll, conf


def overconfident(n: int = 4000, classes: int = 5, sharpen: float = 3.0, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) (calibrated at T = 1); the model says sharpen * z: over-confident by 3x."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, classes))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return sharpen * z, labels


def frame(logits: np.ndarray, labels: np.ndarray, temperatures: np.ndarray) -> pd.DataFrame:
    nll, conf = scored(logits, labels, temperatures)
    return pd.DataFrame({"sample_id": np.arange(len(labels), dtype=np.int64) * 7919 + 11,
                         "dataset_id": np.zeros(len(labels), dtype=np.int64), "label": labels,
                         "prediction": logits.argmax(1), "grid_nll": nll, "grid_conf": conf})


def test_the_fitted_temperature_undoes_a_known_over_confidence_and_lowers_held_out_nll_and_ece():
    logits, labels = overconfident()
    fitted = fit(frame(logits, labels, GRID), ["toy"], seed=3, fraction=0.5, precision=0.9)
    assert fitted["temperature"]["toy"] == pytest.approx(3.0, rel=0.1)
    assert 1800 < fitted["fitted_on"]["toy"] < 2200  # half of the 4,000 images, by hash
    held = frame(logits, labels, np.array([1.0, fitted["temperature"]["toy"]]))
    metrics, curves = held_out_metrics(held, ["toy"], fitted)
    assert metrics["toy_nll_calibrated"] < metrics["toy_nll"] - 0.1
    assert metrics["toy_ece_calibrated"] < 0.5 * metrics["toy_ece"]
    assert metrics["toy_calibration_held_out_images"] == 4000 - fitted["fitted_on"]["toy"]
    assert curves["toy"]["coverage"][-1] == 1.0 and len(curves["toy"]["reliability_after"]) > 3


def test_the_calibration_split_is_seeded_stable_and_about_the_fraction():
    ids = np.arange(20000, dtype=np.int64) * 104729
    first, again, other = (calibration_rows(ids, 7, 0.3), calibration_rows(ids, 7, 0.3), calibration_rows(ids, 8, 0.3))
    assert (first == again).all() and not (first == other).all()
    assert first.mean() == pytest.approx(0.3, abs=0.015)


def test_best_temperature_refines_between_grid_points():
    grid = np.array([0.5, 1.0, 2.0, 4.0])
    curve = (np.log(grid) - np.log(1.5)) ** 2  # a parabola in log T with its minimum at 1.5
    assert best_temperature(curve, grid) == pytest.approx(1.5, rel=1e-9)
    assert best_temperature(np.array([1.0, 2.0, 3.0, 4.0]), grid) == 0.5  # at the edge: the edge


def test_ece_selective_accuracy_and_threshold_by_hand():
    conf = np.array([0.95, 0.9, 0.65, 0.62])
    correct = np.array([1.0, 1.0, 0.0, 1.0])
    # 15 bins of 1/15: 0.95 and 0.9 fall in bins 14 and 13, 0.65 and 0.62 share bin 9 (0.6 to 0.667).
    want = (abs(1 - 0.95) + abs(1 - 0.9)) / 4 + 2 / 4 * abs(0.5 - 0.635)
    assert expected_calibration_error(conf, correct) == pytest.approx(want)
    coverage, accuracy, aurc = selective(conf, correct)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0] and accuracy.tolist() == pytest.approx([1, 1, 2 / 3, 0.75])
    assert aurc == pytest.approx(np.mean([0, 0, 1 / 3, 0.25]))
    assert threshold_for_precision(conf, correct, 0.9) == 0.9  # the two most confident are all right
    assert threshold_for_precision(conf, correct, 0.7) == 0.62  # 3 of 4 = 0.75 >= 0.7 with every image
    assert threshold_for_precision(conf, np.zeros(4), 0.5) == 1.0  # unreachable: reject (nearly) all


def test_a_calibrated_model_predicts_the_same_probabilities_on_every_path_and_rejects_below_the_threshold(
        classifier_dir, demo_params, tmp_path, capsys):
    import json

    import torch

    from food_multids.config import ProjectConfig
    from food_multids.console import main
    from food_multids.evaluation.calibration import calibrate_model
    from food_multids.evaluation.full import run_full_evaluation
    from food_multids.inference.inputs import records_from_files
    from food_multids.inference.model import load_model, run_model
    from food_multids.inference.predict import predict_records
    from food_multids.model.classifier import ClassifierMeta
    from food_multids.pipelines.data.nodes import run_data_nodes

    torch.set_num_threads(1)
    *_, full = run_data_nodes(demo_params)
    cfg = ProjectConfig.from_params(demo_params, check_files=False)
    fitted = calibrate_model(cfg, classifier_dir, full)
    meta = ClassifierMeta.from_json((classifier_dir / "classifier.json").read_text())
    assert meta.calibration["temperature"] == fitted["temperature"]
    assert set(fitted["temperature"]) == {"digits", "shapes"}
    temperatures = fitted["temperature"]
    assert all(t != 1.0 for t in temperatures.values())  # an untrained head is far from calibrated

    loaded = load_model(classifier_dir, torch.device("cpu"))
    images = sorted(full["image"])[:6]
    records, _ = records_from_files([], images, "digits", loaded.label_spaces)
    calibrated = predict_records(loaded, records, top_k=3, batch_size=4)
    raw = predict_records(loaded, records, top_k=3, batch_size=4, calibrated=False)
    assert calibrated["prediction"].tolist() == raw["prediction"].tolist()  # a temperature never changes the winner
    assert not np.allclose(calibrated["confidence"], raw["confidence"])
    grid = np.array([[1.0, temperatures["digits"]], [1.0, temperatures["shapes"]]])
    rows = run_model(loaded, records, batch_size=4, top_k=1, own_classes=True, temperature_grid=grid).predictions
    by_id = dict(zip(rows["sample_id"], (c[1] for c in rows["grid_conf"]), strict=True))
    np.testing.assert_allclose(calibrated["confidence"], [by_id[s] for s in records["sample_id"]], atol=1e-6)

    assert main(["predict", str(classifier_dir), *images, "--dataset", "digits", "--top-k", "3", "--json"]) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose([r["top_k_probs"] for r in cli], np.array(calibrated["top_k_probs"].tolist()), atol=1e-6)

    assert main(["predict", str(classifier_dir), *images[:2], "--dataset", "digits", "--reject-below", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 and all("unknown (below --reject-below; top: " in line for line in table)
    assert main(["predict", str(classifier_dir), *images[:2], "--dataset", "digits", "--reject-below", "auto",
                 "--uncalibrated"]) == 2  # auto's thresholds hold for calibrated confidences only
    assert "predict.calibrated is false (--uncalibrated)" in capsys.readouterr().err
    everything = predict_records(loaded, records, top_k=3, batch_size=4, reject_below=1.0)
    assert (everything["prediction"] == -1).all() and (everything["prediction_name"] == "unknown").all()
    assert everything["top_k_ids"].tolist() == calibrated["top_k_ids"].tolist()  # the top-k still given
    auto = predict_records(loaded, records, top_k=3, batch_size=4, reject_below="auto")
    below = calibrated["confidence"] < fitted["auto_reject_below"]["digits"]
    assert (auto["prediction"] == np.where(below, -1, calibrated["prediction"])).all()

    result = run_full_evaluation(cfg, classifier_dir, full)
    for name in ("digits", "shapes"):
        for key in ("ece", "ece_calibrated", "nll", "nll_calibrated", "aurc", "selective_accuracy_at_80"):
            assert np.isfinite(result.metrics[f"{name}_{key}"]), key
        assert result.metrics[f"{name}_nll_calibrated"] <= result.metrics[f"{name}_nll"] + 0.05
    assert "confidence_calibrated" in result.predictions and "grid_conf" not in result.predictions
    assert set(result.calibration_curves) == {"digits", "shapes"}


def test_reject_auto_on_an_uncalibrated_model_says_how_to_get_thresholds(classifier_dir):
    import torch

    from food_multids.inference.model import load_model
    from food_multids.inference.predict import reject_thresholds

    loaded = load_model(classifier_dir, torch.device("cpu"))
    with pytest.raises(ValueError, match="was saved without calibration"):
        reject_thresholds(loaded, "auto")
    with pytest.raises(ValueError, match=r"names \['food'\], which are not label spaces"):
        reject_thresholds(loaded, {"food": 0.5})
    assert reject_thresholds(loaded, {"digits": 0.5}) == {"digits": 0.5}


def test_a_model_trained_without_masking_is_calibrated_on_the_probabilities_it_serves(classifier_dir):
    import json

    import torch

    from food_multids.inference.inputs import records_from_files
    from food_multids.inference.model import load_model, run_model
    from food_multids.inference.predict import predict_records
    from tests.conftest import write_image

    meta = json.loads((classifier_dir / "classifier.json").read_text())
    meta["enable_logits_masking"] = False  # logits over all 40 columns for a 10-class digits row
    (classifier_dir / "classifier.json").write_text(json.dumps(meta))
    loaded = load_model(classifier_dir, torch.device("cpu"))
    images = [write_image(classifier_dir.parent / f"img{i}.png", colour=(40 * i, 90, 200 - 30 * i)) for i in range(3)]
    records, _ = records_from_files([], images, "digits", loaded.label_spaces)
    served = predict_records(loaded, records, top_k=1, batch_size=4, calibrated=False)  # own classes only
    rows = run_model(loaded, records, batch_size=4, top_k=1, temperature_grid=np.ones((2, 1))).predictions
    by_id = dict(zip(rows["sample_id"], (c[0] for c in rows["grid_conf"]), strict=True))
    np.testing.assert_allclose(served["confidence"], [by_id[s] for s in records["sample_id"]], atol=1e-6)
