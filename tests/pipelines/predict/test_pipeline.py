from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from food_multids.data.records import RecordError
from food_multids.pipelines import node_sections
from food_multids.pipelines.data.nodes import run_data_nodes
from food_multids.pipelines.full_eval.nodes import full_evaluate
from food_multids.pipelines.predict import create_pipeline
from tests.conftest import parameter_feeds, write_image, write_jsonl

PREDICT = {"jsonl_list": [], "image_dir": None, "dataset_name": None, "model": None, "top_k": 5, "batch_size": 64,
           "dataloader_num_workers": 0, "device": "cpu", "num_processes": None, "on_bad_rows": "error",
           "max_image_pixels": 64_000_000, "log_model": True, "registered_model_name": "food_multids"}
BASE = yaml.safe_load((Path(__file__).resolve().parents[3] / "conf/base/parameters.yml").read_text())


def run_predict(model_dir, predict: dict, output_dir: Path | None = None) -> DataCatalog:
    parameters = {**copy.deepcopy(BASE), "predict": predict}
    parameters["training"].update(progress_bar="never", output_dir=str(output_dir or model_dir.parent / "out"))
    catalog = DataCatalog({"best_model": MemoryDataset(model_dir), **parameter_feeds(parameters)})
    SequentialRunner().run(create_pipeline(), catalog)
    return catalog


def test_predict_gives_the_full_evaluations_top1_and_probabilities(base_params, demo_root, classifier_dir,
                                                                   tmp_path):
    params = copy.deepcopy(base_params)
    params["data"]["train_jsonl_list"] = [str(demo_root / f"{d}/train.jsonl") for d in ("digits", "shapes")]
    params["data"]["val_jsonl_list"] = [str(demo_root / f"{d}/val.jsonl") for d in ("digits", "shapes")]
    params["training"]["device"] = "cpu"
    *_, full = run_data_nodes(params)
    _, evaluated, _ = full_evaluate(classifier_dir, full, **node_sections(full_evaluate, params))
    # The same images, unlabelled, in the same order, as a user's JSONL file.
    rows = [{"image": str(r.image), "dataset_name": str(r.dataset_name)} for r in full.itertuples()]
    jsonl = write_jsonl(tmp_path / "new" / "images.jsonl", rows)
    catalog = run_predict(classifier_dir, {**PREDICT, "jsonl_list": [str(jsonl)]})
    predicted = catalog.load("image_predictions")
    assert len(predicted) == len(full) and predicted["error"].isna().all()
    evaluated = evaluated.set_index("image").loc[predicted["image"]]
    assert (predicted["prediction"].to_numpy() == evaluated["prediction"].to_numpy()).all()
    np.testing.assert_allclose(predicted["confidence"], evaluated["confidence"], atol=1e-6)
    for got, want, ids, want_ids in zip(predicted["top_k_probs"], evaluated["topk_prob"], predicted["top_k_ids"],
                                        evaluated["topk"], strict=True):
        assert list(ids) == [i for i in want_ids if i >= 0]
        np.testing.assert_allclose(got, [p for p, i in zip(want, want_ids, strict=True) if i >= 0], atol=1e-6)
    # Probabilities are a softmax over the image's own dataset: digits' 10 classes hold all the mass.
    digits = predicted[predicted["dataset_name"] == "digits"]
    assert (digits["top_k_ids"].map(max) < 10).all()
    assert digits["top_k_names"].map(lambda names: all(n in [str(i) for i in range(10)] for n in names)).all()
    shapes = predicted[predicted["dataset_name"] == "shapes"]  # no class names: the ids as text, never null
    assert [list(n) for n in shapes["top_k_names"]] == [[str(i) for i in ids] for ids in shapes["top_k_ids"]]
    assert (shapes["prediction_name"] == shapes["prediction"].astype(str)).all()


def test_rows_without_a_dataset_are_predicted_in_every_space_and_unknown_names_are_errors(classifier_dir,
                                                                                          tmp_path):
    image = write_image(tmp_path / "img" / "a.png")
    jsonl = write_jsonl(tmp_path / "rows.jsonl", [
        {"image": "img/a.png", "dataset_name": "digits", "label": 3},   # label ignored
        {"image": "img/gone.png", "dataset_name": "digits"},             # rejected: row numbers stay contiguous
        {"image_path": str(image)},
        {"image": "img/a.png", "dataset_name": "digitz"},
    ])
    with pytest.raises(RecordError) as err:
        run_predict(classifier_dir, {**PREDICT, "jsonl_list": [str(jsonl)]})
    assert (f"{jsonl}:4: unknown dataset_name: 'digitz' is not a label space of the model (did you mean 'digits'?), "
            "which knows digits, shapes") in str(err.value)
    assert f"{jsonl}:2: bad image file: image file not found" in str(err.value)
    catalog = run_predict(classifier_dir, {**PREDICT, "jsonl_list": [str(jsonl)], "on_bad_rows": "skip"})
    predicted, rejected = catalog.load("image_predictions"), catalog.load("predict_rejected_rows")
    assert list(zip(predicted["row"], predicted["dataset_name"], strict=True)) == [
        (0, "digits"), (1, "digits"), (1, "shapes")]
    assert predicted.loc[0, "confidence"] == pytest.approx(predicted.loc[1, "confidence"], abs=1e-6)  # same image
    assert sorted(rejected["line"]) == [2, 4]


def test_a_folder_of_images_is_predicted_and_bad_files_are_named(classifier_dir, tmp_path):
    folder = tmp_path / "photos"
    for i in range(3):
        write_image(folder / f"sub/{i}.png", colour=(40 * i, 90, 200))
    (folder / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(RecordError, match=r"broken.jpg: bad image file: truncated JPEG"):
        run_predict(classifier_dir, {**PREDICT, "image_dir": str(folder), "dataset_name": "shapes"})
    catalog = run_predict(classifier_dir, {**PREDICT, "image_dir": str(folder), "dataset_name": "shapes",
                                           "on_bad_rows": "skip", "top_k": 3})
    predicted = catalog.load("image_predictions")
    assert sorted(predicted["image"].map(lambda p: p.rsplit("/", 1)[-1])) == ["0.png", "1.png", "2.png"]
    assert (predicted["dataset_name"] == "shapes").all() and predicted["top_k_ids"].map(len).eq(3).all()
    probs = np.array(predicted["top_k_probs"].tolist())
    assert (np.diff(probs, axis=1) <= 0).all() and (probs.sum(axis=1) <= 1 + 1e-6).all()
    as_json = json.loads(json.dumps(predicted.drop(columns=["top_k_ids", "top_k_names", "top_k_probs"])
                                    .to_dict(orient="records")))  # plain values, as the CLI's --json writes them
    assert [r["dataset_name"] for r in as_json] == ["shapes"] * 3


def test_an_unknown_dataset_for_a_folder_is_an_error_naming_the_setting(classifier_dir, tmp_path):
    write_image(tmp_path / "photos/a.png")
    with pytest.raises(RecordError, match=r"params:predict.dataset_name \(or --dataset\): 'food101' is not a label "
                                          r"space of the model, which knows digits, shapes"):
        run_predict(classifier_dir, {**PREDICT, "image_dir": str(tmp_path / "photos"), "dataset_name": "food101"})


def test_predict_output_round_trips_through_parquet(classifier_dir, tmp_path):
    write_image(tmp_path / "photos/a.png")
    predicted = run_predict(classifier_dir,
                            {**PREDICT, "image_dir": str(tmp_path / "photos")}).load("image_predictions")
    predicted.to_parquet(tmp_path / "p.parquet")
    back = pd.read_parquet(tmp_path / "p.parquet")
    assert list(back["top_k_ids"].iloc[0]) == list(predicted["top_k_ids"].iloc[0])
    assert list(back.columns) == list(predicted.columns)


@pytest.mark.slow
def test_predict_shards_across_two_processes_and_gathers_the_same_rows(classifier_dir, demo_root, tmp_path):
    jsonl = [str(demo_root / "shapes/val.jsonl")]
    single = run_predict(classifier_dir, {**PREDICT, "jsonl_list": jsonl, "batch_size": 16}).load("image_predictions")
    sharded = run_predict(classifier_dir, {**PREDICT, "jsonl_list": jsonl, "batch_size": 16, "num_processes": 2},
                          output_dir=tmp_path / "out").load("image_predictions")
    assert len(sharded) == len(single) == 160
    sharded = sharded.sort_values("row").reset_index(drop=True)
    assert (sharded["row"] == single["row"]).all() and (sharded["image"] == single["image"]).all()
    assert (sharded["prediction"] == single["prediction"]).all()
    np.testing.assert_allclose(np.array(sharded["top_k_probs"].tolist()), np.array(single["top_k_probs"].tolist()),
                               atol=1e-6)


def test_a_model_trained_without_masking_still_ranks_within_the_images_dataset(tiny_model_dir, tmp_path):
    import torch

    from food_multids.model.classifier import ClassifierMeta, LabelSpace, create_classifier
    from food_multids.model.loading import load_tokenizer

    torch.manual_seed(1)
    meta = ClassifierMeta(num_labels=40, pooling="image_mean", enable_logits_masking=False,
                          label_spaces={"digits": LabelSpace(0, 10), "shapes": LabelSpace(1, 40)})
    model = create_classifier(tiny_model_dir, meta, "float32", torch.device("cpu"))
    with torch.no_grad():
        model.head.bias[10:] = 50.0  # the unmasked head prefers classes no digit has
    out = tmp_path / "unmasked"
    model.save_pretrained(out, load_tokenizer(tiny_model_dir),
                          json.loads((tiny_model_dir / "preprocessor_config.json").read_text()))
    write_image(tmp_path / "photos/a.png")
    predicted = run_predict(out, {**PREDICT, "image_dir": str(tmp_path / "photos"), "dataset_name": "digits",
                                  "top_k": 10}).load("image_predictions")
    [ids] = predicted["top_k_ids"]
    assert sorted(ids) == list(range(10))  # all ten digit classes, none of the 30 beyond
    assert sum(predicted["top_k_probs"].iloc[0]) == pytest.approx(1.0, abs=1e-5)  # a softmax over the ten


def test_a_saved_model_is_loaded_with_its_training_image_settings_and_todays_speed_settings(classifier_dir,
                                                                                            tmp_path):
    import shutil

    import torch

    from food_multids.config import ModelConfig
    from food_multids.inference.model import load_model

    folder = tmp_path / "with_info"
    shutil.copytree(classifier_dir, folder)
    trained = {**BASE, "model": {**BASE["model"], "min_pixels": 784, "max_pixels": 6272, "padding_side": "right"}}
    (folder / "training_info.json").write_text(json.dumps({"parameters": trained}))
    today = ModelConfig(num_labels=40, min_pixels=3136, max_pixels=3136, batched_vision_windows=False)
    loaded = load_model(folder, torch.device("cpu"), today)
    settings = loaded.settings
    assert (settings.min_pixels, settings.max_pixels, settings.padding_side) == (784, 6272, "right")
    assert loaded.settings.batched_vision_windows is False
    assert (loaded.encoder.min_pixels, loaded.encoder.max_pixels) == (784, 6272)


def corrupt_png(path: Path, colour: tuple[int, int, int]) -> Path:
    """A PNG whose header and length are intact but whose pixel data is garbage: it passes the ingest
    checks and fails only when decoded."""
    write_image(path, colour=colour, size=(64, 64))
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start:start + 40] = bytes(range(40))
    path.write_bytes(bytes(data))
    return path


def test_a_batch_whose_every_image_fails_to_decode_leaves_the_good_rows_predicted(classifier_dir, tmp_path):
    from food_multids.console.predict import format_table

    folder = tmp_path / "photos"
    for i in range(8):  # sorted first: exactly one batch of 8 corrupt images
        corrupt_png(folder / f"a_bad_{i}.png", colour=(10 * i, 50, 90))
    for i in range(3):
        write_image(folder / f"b_good_{i}.png", colour=(40 * i, 90, 200))
    catalog = run_predict(classifier_dir,
                          {**PREDICT, "image_dir": str(folder), "dataset_name": "shapes", "batch_size": 8})
    table = catalog.load("image_predictions")
    bad = table["image"].str.contains("a_bad_")
    assert bad.sum() == 8 and (~bad).sum() == 3
    assert (table.loc[bad, "prediction"] == -1).all() and table.loc[bad, "error"].notna().all()
    assert (table.loc[~bad, "prediction"] >= 0).all() and table.loc[~bad, "error"].isna().all()
    table.to_parquet(tmp_path / "p.parquet")
    back = pd.read_parquet(tmp_path / "p.parquet")
    assert list(back["prediction"]) == list(table["prediction"])
    lines = format_table(back).splitlines()  # as the CLI prints it, from what pandas reads back
    assert sum("ERROR:" in line for line in lines) == 8
    assert all("ERROR" not in line and "(" in line for line in lines if "b_good_" in line)
    as_json = [json.loads(json.dumps({k: (None if isinstance(v, float) and np.isnan(v) else v)
                                      for k, v in r.items() if k in ("image", "prediction", "error")}))
               for r in table.to_dict(orient="records")]
    assert sum(r["error"] is not None for r in as_json) == 8
