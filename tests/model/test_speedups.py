from __future__ import annotations

import torch

from food_multids.model.backbones import family_of
from food_multids.model.speedups import enable_batched_windows


def test_batched_windows_give_the_stock_outputs(tiny_model_dir):
    torch.manual_seed(0)
    stock = family_of(tiny_model_dir).load(tiny_model_dir, torch.float32).eval()
    fast = family_of(tiny_model_dir).load(tiny_model_dir, torch.float32).eval()
    assert enable_batched_windows(fast) == 2
    for grid in ([[1, 16, 16]] * 3, [[1, 8, 12], [1, 8, 12]], [[1, 6, 10]]):  # equal windows, then unequal
        grid = torch.tensor(grid)
        pixels = torch.randn(int(grid.prod(-1).sum()), 1176)
        with torch.no_grad():
            a = stock.visual(pixels, grid_thw=grid).pooler_output
            b = fast.visual(pixels, grid_thw=grid).pooler_output
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_batched_windows_train_under_gradient_checkpointing_with_the_stock_gradients(tiny_model_dir):
    # The GPU default: batched windows + non-reentrant checkpointing, whose recompute calls the
    # attention again with the same cu_seqlens tensors.
    grads = []
    for batched in (False, True):
        torch.manual_seed(0)
        backbone = family_of(tiny_model_dir).load(tiny_model_dir, torch.float32).train()
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if batched:
            assert enable_batched_windows(backbone) == 2
        grid = torch.tensor([[1, 16, 16]] * 2)
        pixels = torch.randn(int(grid.prod(-1).sum()), 1176, generator=torch.Generator().manual_seed(1))
        for _ in range(2):  # a second step reuses nothing stale from the first
            backbone.zero_grad()
            backbone.visual(pixels, grid_thw=grid).pooler_output.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in backbone.visual.named_parameters() if p.grad is not None})
    stock, fast = grads
    assert stock.keys() == fast.keys() and len(stock) > 10
    for name in stock:
        assert torch.allclose(stock[name], fast[name], atol=1e-5, rtol=1e-4), name


def test_cached_vision_indices_give_the_stock_outputs_and_gradients(tiny_model_dir):
    from food_multids.model.speedups import enable_cached_vision_indices

    torch.manual_seed(0)
    stock = family_of(tiny_model_dir).load(tiny_model_dir, torch.float32)
    fast = family_of(tiny_model_dir).load(tiny_model_dir, torch.float32)
    enable_batched_windows(fast)
    assert enable_cached_vision_indices(fast)
    cache = fast.visual._vision_index_cache
    for grid in ([[1, 16, 16]] * 3, [[1, 8, 12], [1, 16, 16]], [[1, 16, 16]] * 3):  # the third reuses the first entry
        grid = torch.tensor(grid)
        pixels = torch.randn(int(grid.prod(-1).sum()), 1176)
        with torch.inference_mode():  # evaluation first: its cached tensors must not leak into training
            assert torch.allclose(stock.visual(pixels, grid_thw=grid).pooler_output,
                                  fast.visual(pixels, grid_thw=grid).pooler_output, atol=1e-5, rtol=1e-5)
        for model in (stock, fast):
            model.zero_grad()
            model.visual(pixels, grid_thw=grid).pooler_output.square().sum().backward()
        for (name, a), (_, b) in zip(stock.visual.named_parameters(), fast.visual.named_parameters(), strict=True):
            assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    assert len(cache) == 4  # two geometries x (inference, training)
    first = next(iter(cache.values()))
    assert first["window_index"].device == pixels.device and set(first) >= {"cu_seqlens", "cu_window_seqlens"}
