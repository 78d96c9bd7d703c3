from __future__ import annotations

import torch

from food_multids.model.factory import load_backbone
from food_multids.model.fast_vision import enable_batched_windows


def test_batched_windows_give_the_stock_outputs(tiny_model_dir):
    torch.manual_seed(0)
    stock = load_backbone(tiny_model_dir, torch.float32).eval()
    fast = load_backbone(tiny_model_dir, torch.float32).eval()
    assert enable_batched_windows(fast) == 2
    for grid in ([[1, 16, 16]] * 3, [[1, 8, 12], [1, 8, 12]], [[1, 6, 10]]):  # equal windows, then unequal
        grid = torch.tensor(grid)
        pixels = torch.randn(int(grid.prod(-1).sum()), 1176)
        with torch.no_grad():
            a = stock.visual(pixels, grid_thw=grid).pooler_output
            b = fast.visual(pixels, grid_thw=grid).pooler_output
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
