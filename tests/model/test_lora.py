"""LoRA via peft: what trains, small saves that load back bit for bit, merged exports, the base-model
record, and the module names a user may give."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from food_multids.config import LoraSettings
from food_multids.inference.inputs import records_from_files
from food_multids.inference.model import load_model, records_loader
from food_multids.model.classifier import (
    ClassifierMeta,
    LabelSpace,
    MultiDatasetClassifier,
    create_classifier,
)
from food_multids.model.export import export_merged
from food_multids.model.loading import load_tokenizer
from food_multids.model.lora import BaseModelMismatch, apply_lora
from food_multids.runtime.scoring import MODEL_INPUTS
from tests.conftest import write_image

META = dict(num_labels=40, pooling="image_mean",
            label_spaces={"digits": LabelSpace(0, 10), "shapes": LabelSpace(1, 40)})


def lora_model(base: Path, settings: LoraSettings = LoraSettings(r=4, alpha=8.0, parts=("language", "vision")),
               freeze_merger: bool = False) -> MultiDatasetClassifier:
    torch.manual_seed(0)
    model = create_classifier(base, ClassifierMeta(**META), "float32", torch.device("cpu"))
    apply_lora(model, settings, freeze_merger, base)
    with torch.no_grad():  # as after training: B is no longer zero, so the adapters change the logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def save(model: MultiDatasetClassifier, base: Path, out: Path) -> Path:
    model.save_pretrained(out, load_tokenizer(base), json.loads((base / "preprocessor_config.json").read_text()))
    return out


@pytest.fixture
def images(tmp_path) -> list[Path]:
    return [write_image(tmp_path / f"img/{i}.png", colour=(40 * i, 250 - 30 * i, 60)) for i in range(4)]


def logits(model_dir: Path, images: list[Path]) -> torch.Tensor:
    loaded = load_model(model_dir, torch.device("cpu"))
    records, _ = records_from_files([], images, "shapes", loaded.label_spaces)
    batch = next(iter(records_loader(loaded, records, batch_size=len(records))))
    with torch.inference_mode():
        return loaded.model(**{k: batch[k] for k in MODEL_INPUTS})


def test_only_the_adapters_the_head_and_an_unfrozen_merger_train(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") or ".merger." in n for n in trainable)
    assert any("visual.blocks" in n for n in trainable) and any("language_model.layers" in n for n in trainable)
    assert not any("patch_embed" in n or "embed_tokens" in n for n in trainable)
    groups = model.param_groups(1e-3, 5e-4, None, 0.0)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for n, p in model.named_parameters() if n in trainable}
    vision = next(g for g in groups if g["name"] == "vision")
    assert vision["lr"] == 5e-4 and any(p is dict(model.named_parameters())[n] for p in vision["params"]
                                        for n in trainable if "visual.blocks" in n and "lora_A" in n)
    frozen_merger = lora_model(tiny_model_dir, freeze_merger=True)
    assert not any(".merger." in n for n, p in frozen_merger.named_parameters() if p.requires_grad)


def test_a_gradient_step_changes_only_what_trains(tiny_model_dir, images, tmp_path):
    model = lora_model(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.param_groups(1e-2, None, None, 0.0))
    folder = save(model, tiny_model_dir, tmp_path / "m")
    loaded = load_model(folder, torch.device("cpu"))
    records, _ = records_from_files([], images, "shapes", loaded.label_spaces)
    batch = next(iter(records_loader(loaded, records, batch_size=4)))
    model.train()
    out = model(**{k: batch[k] for k in MODEL_INPUTS})
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 2, 3, 4])).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert {n for n in trainable if "lora_B" in n} <= changed
    assert set(optimizer.state) == {p for p in model.parameters() if p.requires_grad}


def test_a_saved_lora_model_is_small_and_loads_back_to_identical_logits(tiny_model_dir, images, tmp_path):
    model = lora_model(tiny_model_dir)
    folder = save(model, tiny_model_dir, tmp_path / "lora")
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    meta = json.loads((folder / "classifier.json").read_text())
    assert meta["finetuning"] == "lora" and meta["base_model"]["path"] == str(tiny_model_dir.resolve())
    loaded = MultiDatasetClassifier.from_pretrained(folder)
    reference = model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in loaded.state_dict().items())
    first, second = logits(folder, images), logits(folder, images)
    assert torch.equal(first, second)
    assert first.shape == (4, 40)


def test_the_merged_export_equals_the_adapter_model_and_needs_no_adapters(tiny_model_dir, images, tmp_path):
    folder = save(lora_model(tiny_model_dir), tiny_model_dir, tmp_path / "lora")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))  # as after bf16 training
    assert export_merged(folder, tmp_path / "merged") == 24  # 10 vision + 14 language Linear layers
    with safe_open(str(tmp_path / "merged/model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float32}  # float32 unless asked
    merged_meta = json.loads((tmp_path / "merged/classifier.json").read_text())
    assert merged_meta["finetuning"] == "full" and merged_meta["lora"] is None
    plain = MultiDatasetClassifier.from_pretrained(tmp_path / "merged")
    assert not any("lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())
    a, b = logits(folder, images), logits(tmp_path / "merged", images)
    finite = torch.isfinite(a)
    assert torch.equal(finite, torch.isfinite(b))
    np.testing.assert_allclose(a[finite].numpy(), b[finite].numpy(), atol=1e-5, rtol=0)
    assert (a[finite] - logits_without_adapters(tiny_model_dir, images)[finite]).abs().max() > 1e-3  # they mattered
    with pytest.raises(FileExistsError):
        export_merged(folder, tmp_path / "merged")
    with pytest.raises(ValueError, match="already an ordinary classifier"):
        export_merged(tmp_path / "merged", tmp_path / "again")


def logits_without_adapters(base: Path, images: list[Path]) -> torch.Tensor:
    torch.manual_seed(0)
    model = create_classifier(base, ClassifierMeta(**META), "float32", torch.device("cpu"))
    folder = base.parent / "no_adapters"
    if not folder.exists():
        save(model, base, folder)
    return logits(folder, images)


def test_a_base_model_that_is_missing_or_changed_is_a_clear_error(tiny_model_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    folder = save(lora_model(base), base, tmp_path / "lora")
    config = json.loads((base / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-5
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelMismatch, match=r"holds LoRA adapters trained on .*base with config.json sha256"):
        MultiDatasetClassifier.from_pretrained(folder)
    shutil.rmtree(base)
    with pytest.raises(BaseModelMismatch, match=r"for the base model .*base, which is not there"):
        MultiDatasetClassifier.from_pretrained(folder)


def test_target_modules_pick_layers_and_unknown_names_list_the_valid_ones(tiny_model_dir):
    model = lora_model(tiny_model_dir, LoraSettings(r=2, target_modules=("q_proj", "v_proj")))
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted and all(n.endswith(("q_proj", "v_proj")) for n in adapted)
    assert len(model.meta.lora["targets"]) == 4  # 2 language layers x (q, v)
    language_only = lora_model(tiny_model_dir, LoraSettings(r=2, target_modules=("gate_proj",)))
    assert language_only.meta.lora["targets"] == ["language_model.layers.0.mlp.gate_proj",
                                                  "language_model.layers.1.mlp.gate_proj"]  # not the vision MLPs'
    both = lora_model(tiny_model_dir, LoraSettings(r=2, parts=("language", "vision"), target_modules=("gate_proj",)))
    assert len(both.meta.lora["targets"]) == 4
    with pytest.raises(ValueError) as err:
        lora_model(tiny_model_dir, LoraSettings(target_modules=("q_proj", "qkv", "patch_embed.proj")))
    text = str(err.value)
    assert "['qkv', 'patch_embed.proj'] match no Linear layer of model.lora.parts ['language']" in text
    assert "valid names: language: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in text
    assert "add vision to parts for the vision blocks" in text


def test_continuing_training_from_adapters_is_refused_with_the_way_out(tiny_model_dir, tmp_path):
    folder = save(lora_model(tiny_model_dir), tiny_model_dir, tmp_path / "lora")
    with pytest.raises(ValueError, match="holds LoRA adapters: continue from a merged export"):
        create_classifier(folder, ClassifierMeta(**META), "float32", torch.device("cpu"))


def test_an_export_onto_a_full_disk_is_named_and_leaves_nothing_behind(tiny_model_dir, tmp_path, small_mount):
    folder = save(lora_model(tiny_model_dir), tiny_model_dir, tmp_path / "lora")
    full = small_mount("size=256k")
    with pytest.raises(OSError, match=rf"cannot write the merged model to {full / 'merged'} \(.*\): free space"):
        export_merged(folder, full / "merged")
    assert list(full.iterdir()) == []  # no half-written folder: a retry elsewhere or after freeing space works
    read_only = small_mount("size=16m,ro")
    with pytest.raises(OSError, match=rf"cannot write the merged model to {read_only / 'merged'} .*Read-only"):
        export_merged(folder, read_only / "merged")
    assert export_merged(folder, tmp_path / "merged") == 24


def test_export_takes_best_and_best_version_as_predict_does(tiny_model_dir, tmp_path, monkeypatch):
    from food_multids.console import main

    folder = save(lora_model(tiny_model_dir), tiny_model_dir, tmp_path / "lora")
    (tmp_path / "project/pyproject.toml").parent.mkdir()
    (tmp_path / "project/pyproject.toml").write_text("[tool.kedro]\npackage_name = 'x'\n")
    for version in ("2026-01-01T00.00.00.000Z", "2026-02-01T00.00.00.000Z"):
        shutil.copytree(folder, tmp_path / f"project/data/06_models/best_model/{version}/best_model")
    monkeypatch.chdir(tmp_path / "project")
    assert main(["export", "best", str(tmp_path / "newest"), "--merge"]) == 0
    assert main(["export", "best:2026-01-01T00.00.00.000Z", str(tmp_path / "first"), "--merge"]) == 0
    for out in ("newest", "first"):
        assert json.loads((tmp_path / out / "classifier.json").read_text())["finetuning"] == "full"
    with pytest.raises(SystemExit):  # argparse's error: an unknown version is named with the ones there are
        main(["export", "best:nope", str(tmp_path / "none"), "--merge"])
