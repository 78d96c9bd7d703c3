"""Every backbone family through the one seam: loading, image encoder, positions, parts, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from food_multids.data.collator import ImageEncoder
from food_multids.framework.preflight import check_model_source
from food_multids.model.backbones import SUPPORTED, UnsupportedBackboneError, family, family_of, model_type_of
from food_multids.model.classifier import CLASSIFIER_FILE, MultiDatasetClassifier
from food_multids.model.loading import load_tokenizer
from tests.model.test_classifier import make_batch, make_model


@pytest.mark.parametrize(("model_type", "name", "published"), [
    ("qwen2_5_vl", "Qwen2.5-VL-3B-Instruct", 3.75e9),
    ("qwen2_5_vl", "Qwen2.5-VL-7B-Instruct", 8.29e9),
    ("qwen3_vl", "Qwen3-VL-4B-Instruct", 4.44e9),
    ("qwen3_vl", "Qwen3-VL-8B-Instruct", 8.77e9),
])
def test_real_sizes_build_on_the_meta_device_with_their_published_parameter_counts(model_type, name, published):
    kind = family(model_type)
    with torch.device("meta"):
        model = kind.lm_class()(kind.real_shapes[name]())
    n = sum(p.numel() for p in model.parameters())  # tied embeddings counted once, as model cards do
    assert abs(n - published) / published < 0.005, n
    assert all(p.device.type == "meta" for p in model.parameters())
    backbone = model.model
    assert kind.hidden_size(backbone) == backbone.config.text_config.hidden_size
    parts = {kind.part_of(n) for n, _ in backbone.named_parameters()}
    assert parts == {"vision", "merger", "language"}


def test_the_family_comes_from_config_json_and_an_unknown_one_is_named(family_model_dir, tmp_path):
    kind = family_of(family_model_dir)
    assert kind.model_type == model_type_of(family_model_dir) and kind.model_type in SUPPORTED
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedBackboneError, match=r"holds a model_type 'llama' is not supported; supported: "
                                                       r"qwen2_5_vl, qwen2_vl, qwen3_vl, qwen3_5"):
        family_of(other)
    assert check_model_source(str(family_model_dir)) == []
    assert "supported: qwen2_5_vl, qwen2_vl, qwen3_vl, qwen3_5" in check_model_source(str(other))[0]


@pytest.mark.parametrize("size", [(56, 56), (100, 60), (333, 500)])
def test_the_encoder_matches_the_familys_image_processor(family_model_dir, size):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    reference = Qwen2VLImageProcessorPil.from_pretrained(family_model_dir)
    reference.size = {"shortest_edge": 32 * 32, "longest_edge": 256 * 256}
    encoder = ImageEncoder.from_pretrained(family_model_dir, 32 * 32, 256 * 256)
    assert encoder.patch_size == family_of(family_model_dir).patch_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[0], size[1], 3), dtype=np.uint8))
    patches, grid = encoder(image)
    out = reference(images=[image], return_tensors="pt")
    assert list(out["image_grid_thw"][0]) == list(grid)
    assert torch.allclose(patches, out["pixel_values"], atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_positions_equal_each_familys_rope_index(family_model_dir, side):
    model = make_model(family_model_dir).eval()
    batch = make_batch(family_model_dir, n=3, padding_side=side, sizes=[(56, 56), (112, 56), (56, 84)])
    image = (batch["input_ids"] == model.image_token_id).to(torch.int32)
    expected, _ = model.backbone.get_rope_index(batch["input_ids"], image, image_grid_thw=batch["image_grid_thw"],
                                                attention_mask=batch["attention_mask"])
    assert torch.equal(batch["position_ids"], expected)
    assert batch["position_ids"][1].max() > batch["attention_mask"].sum(1).max() / 2  # 3-D, not 1-D positions
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "num_classes")}
    with torch.no_grad():  # the collator's positions and the family's own computation give the same logits
        assert torch.equal(model(**inputs, position_ids=batch["position_ids"]), model(**inputs))


def test_a_saved_classifier_records_its_family_and_reloads_as_it(family_model_dir, tmp_path):
    model = make_model(family_model_dir).eval()
    batch = make_batch(family_model_dir, n=2)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "num_classes",
                                    "position_ids")}
    out = tmp_path / "clf"
    model.save_pretrained(out, load_tokenizer(family_model_dir))
    kind = family_of(family_model_dir)
    assert json.loads((out / CLASSIFIER_FILE).read_text())["family"] == kind.model_type
    again = MultiDatasetClassifier.from_pretrained(out).eval()
    assert type(again.backbone) is type(model.backbone) and again.kind == kind
    with torch.no_grad():
        assert torch.equal(again(**inputs), model(**inputs))
    meta = json.loads((out / CLASSIFIER_FILE).read_text())
    meta["family"] = next(t for t in SUPPORTED if t != kind.model_type)
    (out / CLASSIFIER_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="was assembled from two models"):
        MultiDatasetClassifier.from_pretrained(out)


def test_parts_split_vision_merger_and_language_for_freezing_and_learning_rates(family_model_dir):
    model = make_model(family_model_dir)
    parts = model.parts()
    assert all(parts[p] for p in ("vision", "merger", "language", "head"))
    assert all(".visual." in f".{n}" for n, _ in parts["vision"] + parts["merger"])
    if family_of(family_model_dir).model_type == "qwen3_vl":  # DeepStack's mergers are mergers
        assert any("deepstack_merger_list" in n for n, _ in parts["merger"])
    model.freeze(vision=True, merger=False, language=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in parts["merger"] + parts["head"]}


def test_continuing_from_a_classifier_refuses_a_head_that_would_mean_something_else(tiny_model_dir, tmp_path):
    from food_multids.model.classifier import ClassifierMeta, LabelSpace, create_classifier

    saved = tmp_path / "clf"
    make_model(tiny_model_dir).save_pretrained(saved, load_tokenizer(tiny_model_dir))
    base = json.loads((saved / CLASSIFIER_FILE).read_text())
    spaces = {name: LabelSpace(**space) for name, space in base["label_spaces"].items()}
    same = ClassifierMeta(num_labels=base["num_labels"], pooling=base["pooling"], label_spaces=spaces)
    assert create_classifier(saved, same, "float32", torch.device("cpu")).meta.family == "qwen2_5_vl"
    first = next(iter(spaces))
    moved = {**spaces, first: LabelSpace(spaces[first].dataset_id + 5, spaces[first].num_classes)}
    for wanted, message in (
            (ClassifierMeta(num_labels=base["num_labels"],
                            pooling="image_mean" if base["pooling"] == "last" else "last",
                            label_spaces=spaces), "model.pooling is"),
            (ClassifierMeta(num_labels=base["num_labels"], pooling=base["pooling"], label_spaces=moved),
             f"dataset '{first}' is #"),
            (ClassifierMeta(num_labels=base["num_labels"] + 1, pooling=base["pooling"], label_spaces=spaces),
             "outputs")):
        with pytest.raises(ValueError, match=rf"cannot continue from the classifier in {saved}: .*{message}"):
            create_classifier(saved, wanted, "float32", torch.device("cpu"))


def test_a_tokenizer_from_another_checkpoint_is_named(tiny_model_dir):
    from dataclasses import replace

    from food_multids.data.collator import ClassificationCollator, PromptTokens
    from food_multids.model.classifier import check_image_token

    model = make_model(tiny_model_dir)
    prompt = PromptTokens.from_tokenizer(load_tokenizer(tiny_model_dir), "x")
    check_image_token(ClassificationCollator(prompt), model, tiny_model_dir)  # the matching pair passes
    other = ClassificationCollator(replace(prompt, image_token_id=prompt.image_token_id + 1))
    with pytest.raises(ValueError, match="come from different checkpoints"):
        check_image_token(other, model, tiny_model_dir)


def test_per_dataset_sums_refuse_a_checkpoint_of_other_datasets():
    from food_multids.runtime.scoring import PerDatasetSums

    sums = PerDatasetSums(("loss", "count"), 2, torch.device("cpu"))
    sums.add("count", torch.tensor([0, 1, 1]))
    again = PerDatasetSums(("loss", "count"), 2, torch.device("cpu"))
    again.load_state(sums.state())
    assert again.totals()["count"].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"shape \(2, 2\) but this run has \(2, 3\)"):
        PerDatasetSums(("loss", "count"), 3, torch.device("cpu")).load_state(sums.state())
