"""Speed-ups of the backbone's forward, applied by `prepare_model` from the `model:` settings.

The first two are written for Qwen2.5-VL's windowed vision attention and apply where the family says
so (`BackboneFamily.batched_vision_windows`); regional compilation and checkpointing apply to every family.

- Batched vision-window attention: the stock SDPA path splits the sequence into windows on the host
  (`lengths.tolist()`) and runs one attention call per window: 16 per 448-px image per layer. When
  every window has the same length (fixed-resolution batches, the usual case for classification)
  one batched call computes the same thing (tested: equal outputs in float32). Unequal windows fall
  back to the stock code.
- Cached vision indices: the tower's per-image loops (window order, rotary positions, boundaries)
  run once per batch geometry.
- Regional torch.compile of the vision blocks and decoder layers.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

# Every layer of one forward receives the same two cu_seqlens tensors (window and full attention), so
# the width is read on the host twice per forward instead of once per layer. It is kept on the tensor
# itself, so it lives and dies with it. (A WeakKeyDictionary keyed by the tensors failed under gradient
# checkpointing's recompute: its key comparison ends in Tensor.__eq__, "Boolean value ... ambiguous".)
_ATTR = "_food_multids_window_width"


def _equal_width(cu_seqlens: torch.Tensor) -> int:
    width = getattr(cu_seqlens, _ATTR, None)
    if width is None:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        first = int(lengths[0])
        width = first if bool((lengths == first).all()) else 0
        setattr(cu_seqlens, _ATTR, width)
    return width


def _batched_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                     max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
    width = _equal_width(cu_seqlens)
    seq = hidden_states.shape[0]
    if position_embeddings is None or width == 0 or seq % width:
        return self._stock_forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = qwen.apply_rotary_pos_emb_vision(q, k, cos, sin)
    n = seq // width
    q, k, v = (t.reshape(n, width, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(seq, -1))


def enable_batched_windows(backbone: torch.nn.Module) -> int:
    """Switch every vision attention module of an SDPA backbone to the batched path; returns how many."""
    if getattr(backbone.config.vision_config, "_attn_implementation", "sdpa") != "sdpa":
        return 0
    count = 0
    for module in backbone.modules():
        if isinstance(module, qwen.Qwen2_5_VLVisionAttention) and not hasattr(module, "_stock_forward"):
            module._stock_forward = module.forward
            module.forward = types.MethodType(_batched_forward, module)
            count += 1
    return count


_INDEX_CACHE_SIZE = 8


def _cached_indices_forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs):
    """The vision tower's forward with its per-image index loops (rotary positions, window order,
    sequence boundaries) run once per batch geometry instead of every forward; the tensors are the
    ones transformers' own vision_utils compute, handed back through the kwargs it accepts for them."""
    if any(k in kwargs for k in ("position_ids", "cu_seqlens", "window_index", "cu_window_seqlens")):
        return self._stock_visual_forward(hidden_states, grid_thw, **kwargs)
    # Tensors made under inference_mode cannot be saved for backward: separate entries for eval and training.
    key = (hidden_states.device, torch.is_inference_mode_enabled(), tuple(map(tuple, grid_thw.tolist())))
    cache = self._vision_index_cache
    indices = cache.get(key)
    if indices is None:
        from transformers.utils.generic import get_max_seqlen
        from transformers.vision_utils import (
            get_vision_attention_seqlens,
            get_vision_position_ids,
            get_vision_window_index,
        )

        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, self.config)
        window_index, cu_window_seqlens = get_vision_window_index(
            grid_thw, spatial_merge_size=self.spatial_merge_size, window_size=self.window_size,
            patch_size=self.patch_size)
        # transformers builds window_index on the CPU and indexes device tensors with it: keep it on the device.
        indices = {"position_ids": get_vision_position_ids(grid_thw, self.spatial_merge_size),
                   "cu_seqlens": cu_seqlens, "window_index": window_index.to(hidden_states.device),
                   "cu_window_seqlens": cu_window_seqlens}
        max_window_seqlen = get_max_seqlen(cu_window_seqlens, self.config)
        indices.update({k: v for k, v in (("max_seqlen", max_seqlen), ("max_window_seqlen", max_window_seqlen))
                        if v is not None})
        # Read the window widths here, outside any compiled block: inside one the read is a graph break.
        _equal_width(cu_seqlens)
        _equal_width(cu_window_seqlens)
        if len(cache) >= _INDEX_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = indices
    return self._stock_visual_forward(hidden_states, grid_thw, **indices, **kwargs)


def enable_cached_vision_indices(backbone: torch.nn.Module) -> bool:
    """Cache the vision tower's index tensors per batch geometry (a few entries). Besides the Python
    loops over images, this hands every forward the same cu_seqlens tensors, so the batched attention
    reads the window width on the host once per geometry instead of twice per forward."""
    visual = backbone.visual
    if hasattr(visual, "_stock_visual_forward"):
        return True
    visual._stock_visual_forward = visual.forward
    visual._vision_index_cache = {}
    visual.forward = types.MethodType(_cached_indices_forward, visual)
    return True


def compile_blocks(blocks: list[torch.nn.Module], recompile_limit: int = 64, mode: str = "default") -> int:
    """Regional torch.compile: each vision block and language decoder layer compiled in place.

    Identical blocks share one compiled graph (the parameters are graph inputs), so compiling costs
    about one block of each kind rather than the whole model, and the hooks DeepSpeed puts on
    parameters and the checkpointing wrapper around each layer stay outside the graphs. Guard variants (window vs
    full attention, train vs eval, another batch size) each count as a recompilation of the shared
    code, so dynamo's recompile limit (8 by default) is raised to `recompile_limit`: past it dynamo
    silently runs the block uncompiled. With the cached vision indices the window width is read before
    the blocks run, so each block compiles without a graph break (tested). Returns the number of
    blocks compiled. `mode` is torch.compile's (max-autotune: inductor benchmarks GEMM choices at compile
    time; reduce-overhead: CUDA graphs).
    """
    import torch._dynamo

    limit = max(int(torch._dynamo.config.recompile_limit), recompile_limit)
    torch._dynamo.config.recompile_limit = limit
    for block in blocks:
        block.compile(mode=None if mode == "default" else mode)
    return len(blocks)


def checkpointed_layers(backbone) -> int:
    """How many of the backbone's repeated layers (vision blocks, decoder layers) recompute in backward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(1 for m in backbone.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing)


def prepare_model(model, model_cfg, training: bool) -> dict[str, int | bool]:
    """The `model:` speed settings, applied the same way by training, full evaluation and bench/gpu.py:
    gradient checkpointing (training only; every n-th layer), batched vision windows with cached vision indices, then
    regional torch.compile. Returns what was applied (logged by the trainer)."""
    backbone = model.backbone
    done: dict[str, int | bool] = {"gradient_checkpointing": 0, "batched_windows": 0, "cached_vision_indices": False,
                                   "compiled_blocks": 0}
    if training and model_cfg.gradient_checkpointing:
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                                 every_n_layers=model_cfg.gradient_checkpointing_every_n_layers)
        done["gradient_checkpointing"] = checkpointed_layers(backbone)
    if model_cfg.batched_vision_windows and model.kind.batched_vision_windows:
        done["batched_windows"] = enable_batched_windows(backbone)
        done["cached_vision_indices"] = enable_cached_vision_indices(backbone)
    if model_cfg.torch_compile:
        done["compiled_blocks"] = compile_blocks(model.kind.blocks(backbone), mode=model_cfg.torch_compile_mode)
    return done
