from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from food_multids.data.collator import ClassificationCollator, ImageEncoder, PromptTokens
from food_multids.model.backbones import family_of
from food_multids.model.classifier import (
    ClassifierMeta,
    LabelSpace,
    MultiDatasetClassifier,
    create_classifier,
    mask_logits,
    pool_hidden,
)
from food_multids.model.loading import load_tokenizer

SPACES = {"a": LabelSpace(0, 3), "b": LabelSpace(1, 7)}


def make_model(path, pooling="last", masking=True, num_labels=7) -> MultiDatasetClassifier:
    torch.manual_seed(0)
    meta = ClassifierMeta(num_labels=num_labels, pooling=pooling, enable_logits_masking=masking, label_spaces=SPACES)
    return create_classifier(path, meta, "float32", torch.device("cpu"))


def make_batch(path, n=4, padding_side="left", sizes=None, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    from PIL import Image

    encoder = ImageEncoder.from_pretrained(path, 56 * 56, 112 * 112)
    prompt = PromptTokens.from_tokenizer(load_tokenizer(path), "What food is shown in this image?")
    samples = []
    for i in range(n):
        h, w = (sizes or [(56, 56)])[i % len(sizes or [(56, 56)])]
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        patches, grid = encoder(img)
        samples.append({"pixel_values": patches, "grid": grid, "label": i % 3, "dataset_id": i % 2,
                        "num_classes": 3 if i % 2 == 0 else 7, "sample_id": i, "dataset_name": "ab"[i % 2]})
    return ClassificationCollator(prompt, 2, padding_side)(samples)


def forward(model, batch):
    return model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"],
                 batch["num_classes"], batch["position_ids"])


def test_masked_logits_are_minus_inf_beyond_each_datasets_classes():
    logits = torch.randn(3, 6)
    masked = mask_logits(logits, torch.tensor([2, 6, 4]))
    assert masked.dtype == torch.float32
    assert torch.isinf(masked[0, 2:]).all() and torch.isfinite(masked[0, :2]).all()
    assert torch.isfinite(masked[1]).all()
    assert torch.equal(masked[2, :4], logits[2, :4]) and (masked[2, 4:] == float("-inf")).all()


def test_invalid_classes_get_exactly_zero_gradient():
    logits = torch.randn(4, 10, requires_grad=True)
    num_classes = torch.tensor([3, 10, 5, 1])
    loss = F.cross_entropy(mask_logits(logits, num_classes), torch.tensor([2, 9, 0, 0]))
    loss.backward()
    invalid = torch.arange(10)[None, :] >= num_classes[:, None]
    assert (logits.grad[invalid] == 0).all()
    assert (logits.grad[~invalid].abs() > 0).any()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=16), st.integers(0, 2**31 - 1))
def test_argmax_and_topk_never_leave_the_dataset_range(num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(num_classes), 50, generator=g) * 100
    nc = torch.tensor(num_classes)
    masked = mask_logits(logits, nc)
    assert (masked.argmax(-1) < nc).all()
    k = 5
    _, top_i = masked.topk(k, dim=-1)
    valid_slots = torch.arange(k)[None, :] < nc[:, None]
    assert (top_i[valid_slots] < nc.repeat_interleave(valid_slots.sum(1))).all()


def test_model_logits_are_masked_per_sample(tiny_model_dir):
    model = make_model(tiny_model_dir)
    logits = forward(model, make_batch(tiny_model_dir))
    assert logits.shape == (4, 7)
    assert torch.isinf(logits[0, 3:]).all() and torch.isfinite(logits[1]).all()


def test_without_masking_the_plain_head_is_used(tiny_model_dir):
    logits = forward(make_model(tiny_model_dir, masking=False), make_batch(tiny_model_dir))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("pooling", ["last", "image_mean"])
def test_pooling_is_the_same_under_left_and_right_padding(tiny_model_dir, pooling):
    model = make_model(tiny_model_dir, pooling=pooling).eval()
    sizes = [(56, 56), (112, 56), (56, 84)]  # different image token counts force padding
    with torch.no_grad():
        left = forward(model, make_batch(tiny_model_dir, n=3, padding_side="left", sizes=sizes))
        right = forward(model, make_batch(tiny_model_dir, n=3, padding_side="right", sizes=sizes))
        alone = torch.cat([forward(model, make_batch(tiny_model_dir, n=1, sizes=[s])) for s in sizes[:1]])
    finite = torch.isfinite(left)
    assert torch.allclose(left[finite], right[finite], atol=1e-4)
    assert torch.allclose(left[0][finite[0]], alone[0][finite[0]], atol=1e-4)


def test_last_pooling_picks_the_last_attended_token_and_image_mean_averages_the_image_tokens():
    hidden = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    ids = torch.tensor([[0, 9, 9, 1], [9, 1, 0, 0]])
    assert pool_hidden(hidden, ids, mask, "last", image_token_id=9).flatten().tolist() == [3.0, 5.0]
    assert pool_hidden(hidden, ids, mask, "image_mean", image_token_id=9).flatten().tolist() == [1.5, 4.0]


def test_save_and_load_round_trip_gives_identical_logits(tiny_model_dir, tmp_path):
    model = make_model(tiny_model_dir).eval()
    model.meta.label_spaces["a"].id2label = ["x", "y", "z"]
    batch = make_batch(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    preproc = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    model.save_pretrained(tmp_path / "clf", tokenizer, preproc)
    loaded = MultiDatasetClassifier.from_pretrained(tmp_path / "clf").eval()
    with torch.no_grad():
        assert torch.equal(forward(model, batch), forward(loaded, batch))
    assert loaded.meta.label_spaces["a"].id2label == ["x", "y", "z"]
    assert loaded.meta.num_labels == 7 and loaded.meta.pooling == "last"
    assert (tmp_path / "clf/tokenizer.json").is_file() and (tmp_path / "clf/preprocessor_config.json").is_file()
    assert load_tokenizer(tmp_path / "clf").chat_template


def test_hub_layout_checkpoint_loads_through_the_same_path(tiny_model_dir, tmp_path):
    """Released Qwen2.5-VL checkpoints store `model.layers.*`, `visual.*` and `lm_head.*` keys."""
    import shutil

    hub = tmp_path / "hub"
    shutil.copytree(tiny_model_dir, hub)
    weights = load_file(str(hub / "model.safetensors"))
    legacy = {}
    for key, value in weights.items():
        if key.startswith("model.visual."):
            legacy["visual." + key[len("model.visual."):]] = value
        elif key.startswith("model.language_model."):
            legacy["model." + key[len("model.language_model."):]] = value
        else:
            legacy[key] = value
    assert any(k.startswith("visual.") for k in legacy) and any(k.startswith("model.layers.") for k in legacy)
    save_file(legacy, str(hub / "model.safetensors"), metadata={"format": "pt"})
    a = family_of(tiny_model_dir).load(tiny_model_dir, torch.float32).state_dict()
    b = family_of(hub).load(hub, torch.float32).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_steps_on_the_head_lower_the_loss_at_every_step(tiny_model_dir):
    # Backbone frozen: the masked cross-entropy is convex and L-smooth in the head's weights, with
    # L <= 0.5 * largest eigenvalue of the features' (with bias) second-moment matrix. Plain gradient
    # descent with lr = 1/L must then lower the loss at every step, on any machine's float rounding.
    model = make_model(tiny_model_dir)
    model.freeze(vision=True, merger=True, language=True)
    batch = make_batch(tiny_model_dir, n=8)
    features = []
    model.head.register_forward_hook(lambda _m, args, _out: features.append(args[0].detach()))
    with torch.no_grad():
        forward(model, batch)
    phi = torch.cat([features[0].double(), torch.ones(len(features[0]), 1, dtype=torch.float64)], dim=1)
    smoothness = 0.5 * torch.linalg.eigvalsh(phi.T @ phi / len(phi)).max().item()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0 / smoothness)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(forward(model, batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_freezing_and_param_groups(tiny_model_dir):
    model = make_model(tiny_model_dir)
    model.freeze(vision=True, merger=False, language=True)
    parts = model.parts()
    assert not any(p.requires_grad for _, p in parts["vision"]) and all(p.requires_grad for _, p in parts["merger"])
    assert not any(p.requires_grad for _, p in parts["language"])
    groups = {g["name"]: g for g in model.param_groups(1e-4, 1e-5, 1e-3, 0.0)}
    assert set(groups) == {"vision", "head"}
    assert groups["vision"]["lr"] == 1e-5 and groups["head"]["lr"] == 1e-3
    assert len(groups["vision"]["params"]) == len(parts["merger"])


@pytest.mark.slow  # CPU inductor compiles
def test_prepare_model_applies_the_speed_settings_with_the_same_logits_and_gradients(tiny_model_dir):
    # The GPU defaults' path (batched windows + regional torch.compile, here with checkpointing too)
    # against the plain model: same function, same gradients, in float32.
    import torch._dynamo

    from food_multids.config import ModelConfig
    from food_multids.model.speedups import prepare_model

    plain, fast = make_model(tiny_model_dir), make_model(tiny_model_dir)
    done = prepare_model(fast, ModelConfig(num_labels=7, gradient_checkpointing=True, torch_compile=True),
                         training=True)
    assert done == {"gradient_checkpointing": 4, "batched_windows": 2, "cached_vision_indices": True,
                    "compiled_blocks": 4}
    blocks = list(fast.backbone.visual.blocks) + list(fast.backbone.language_model.layers)
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert fast.state_dict().keys() == plain.state_dict().keys()  # checkpoints and save_pretrained unchanged
    assert torch._dynamo.config.recompile_limit >= 64  # past the limit dynamo silently runs blocks eagerly
    batch = make_batch(tiny_model_dir, n=4, seed=3)
    torch._dynamo.utils.counters.clear()
    for model in (plain, fast):
        model.train()
        F.cross_entropy(forward(model, batch), batch["labels"]).backward()
    assert not torch._dynamo.utils.counters["graph_break"]  # each block compiles whole (window width read outside)
    for (name, a), (_, b) in zip(plain.named_parameters(), fast.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-3), name
    with torch.no_grad():
        assert torch.allclose(forward(plain.eval(), batch), forward(fast.eval(), batch), atol=1e-5, rtol=1e-4)
    untouched = prepare_model(make_model(tiny_model_dir), ModelConfig(num_labels=7, batched_vision_windows=False),
                              training=False)
    assert untouched == {"gradient_checkpointing": 0, "batched_windows": 0, "cached_vision_indices": False,
                         "compiled_blocks": 0}


def test_checkpointing_every_other_layer_recomputes_half_the_layers_with_the_same_gradients(tiny_model_dir):
    from food_multids.config import ModelConfig
    from food_multids.model.speedups import checkpointed_layers, prepare_model

    batch = make_batch(tiny_model_dir, n=4, seed=5)
    grads, counts = [], []
    for chosen in ({}, {"gradient_checkpointing": True}, {"gradient_checkpointing": True,
                                                            "gradient_checkpointing_every_n_layers": 2}):
        model = make_model(tiny_model_dir)
        done = prepare_model(model, ModelConfig(num_labels=7, **chosen), training=True)
        counts.append((done["gradient_checkpointing"], checkpointed_layers(model.backbone)))
        model.train()
        F.cross_entropy(forward(model, batch), batch["labels"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert counts == [(0, 0), (4, 4), (2, 2)]  # 2 vision blocks + 2 decoder layers; every other one
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name, grad in grads[0].items():
            assert torch.allclose(grad, other[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.slow  # CPU inductor compiles
def test_a_torch_compile_mode_reaches_every_block_and_keeps_the_logits_and_gradients(tiny_model_dir):
    from food_multids.config import ModelConfig
    from food_multids.model.speedups import prepare_model

    modes = []
    plain, fast = make_model(tiny_model_dir), make_model(tiny_model_dir)
    blocks = list(fast.backbone.visual.blocks) + list(fast.backbone.language_model.layers)
    def recording(original):  # what each block's compile is asked for; the real compile still runs
        def compile_block(*args, **kwargs):
            modes.append(kwargs.get("mode"))
            return original(*args, **kwargs)
        return compile_block

    for block in blocks:
        block.compile = recording(block.compile)
    mode = "max-autotune-no-cudagraphs"  # inductor's GEMM autotuning (on CPU it falls back to the default kernels)
    done = prepare_model(fast, ModelConfig(num_labels=7, torch_compile=True, torch_compile_mode=mode), training=True)
    assert done["compiled_blocks"] == len(blocks) == 4 and modes == [mode] * 4
    batch = make_batch(tiny_model_dir, n=4, seed=4)
    for model in (plain, fast):
        model.train()
        F.cross_entropy(forward(model, batch), batch["labels"]).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), fast.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-3), name
    with torch.no_grad():
        assert torch.allclose(forward(plain.eval(), batch), forward(fast.eval(), batch), atol=1e-5, rtol=1e-4)
