"""LoRA (peft) on a classifier's backbone: which layers get an adapter, training only the adapters (with
the head, and the merger unless frozen), saving them small beside a record of their base model, loading
them back onto that base, and merging them into an ordinary classifier.

Adapters go on the Linear layers of the vision blocks and the language layers. Never on the patch
embedding (a Conv3d that turns pixels into patch vectors: peft's Conv3d adapter would add a second,
low-rank pixel path for no gain at this size) nor on the merger (the projection from vision to language
width, small and new for every task: it is trained whole unless model.freeze_merger).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_PARTS = ("language", "vision")


class BaseModelMismatch(ValueError):
    """The recorded base model of saved adapters is missing or is another model."""


def config_sha256(model_dir: Path) -> str:
    return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()


def adapter_candidates(model) -> dict[str, str]:
    """{module name in the backbone: part} of every Linear layer that may take an adapter."""
    found = {}
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.Linear):
            part = model.kind.part_of(f"{name}.weight")
            if part in ADAPTER_PARTS:
                found[name] = part
    return found


def lora_targets(model, parts: tuple[str, ...], target_modules: tuple[str, ...] | None) -> list[str]:
    """Full module names that get an adapter: every candidate of `parts`, or, within `parts`, those that
    `target_modules` name (a full name or a name ending such as q_proj: the vision blocks and the language
    layers share endings like gate_proj). Names that match nothing are an error listing the valid ones."""
    candidates = {name: part for name, part in adapter_candidates(model).items() if part in parts}
    if not target_modules:
        return list(candidates)

    def matches(name: str, wanted: str) -> bool:
        return name == wanted or name.endswith(f".{wanted}")

    unknown = [t for t in target_modules if not any(matches(n, t) for n in candidates)]
    if unknown:
        by_part = {part: sorted({n.rsplit(".", 1)[-1] for n, p in candidates.items() if p == part}) for part in parts}
        valid = "; ".join(f"{part}: {', '.join(names)}" for part, names in by_part.items())
        raise ValueError(f"params:model.lora.target_modules {unknown} match no Linear layer of model.lora.parts "
                         f"{list(parts)}; valid names: {valid} (or a full name such as {next(iter(candidates), '-')}); "
                         "add vision to parts for the vision blocks; the patch embedding and the merger never take "
                         "an adapter")
    return [n for n in candidates if any(matches(n, t) for t in target_modules)]


def inject_adapters(model, r: int, alpha: float, dropout: float, targets: list[str]) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    inject_adapter_in_model(config, model.backbone)


def apply_lora(model, settings, freeze_merger: bool, base_model: Path) -> dict[str, int]:
    """Add the adapters of `settings` (config.LoraSettings) and make them, the head, and the merger unless
    frozen, the only trainable parameters. Records what load_adapters needs in the model's meta."""
    targets = lora_targets(model, tuple(settings.parts), settings.target_modules)
    dtype = next(model.backbone.parameters()).dtype
    inject_adapters(model, settings.r, settings.alpha, settings.dropout, targets)
    for name, p in model.backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    if not freeze_merger:
        for _, p in model.parts()["merger"]:
            p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)
    for name, p in model.backbone.named_parameters():  # peft creates fp32 adapters on a bf16 base
        if "lora_" in name and p.dtype != dtype:
            p.data = p.data.to(dtype)
    model.meta.finetuning = "lora"
    model.meta.lora = {"r": settings.r, "alpha": settings.alpha, "dropout": settings.dropout, "targets": targets,
                       "merger_trained": not freeze_merger}
    model.meta.base_model = {"path": str(Path(base_model).resolve()), "config_sha256": config_sha256(base_model)}
    return {"adapted_layers": len(targets), **model.parameter_counts()}


def adapter_state(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of a full state dict that a LoRA model saves: adapters, and the merger if it was trained."""
    merger = {name for name, _ in model.parts()["merger"]} if model.meta.lora.get("merger_trained") else set()
    return {k[len("backbone."):]: v.detach().cpu().contiguous() for k, v in state.items()
            if k.startswith("backbone.") and ("lora_" in k or k in merger)}


def check_base_model(directory: Path, base: dict) -> Path:
    path = Path(base["path"])
    if not (path / "config.json").is_file():
        raise BaseModelMismatch(f"{directory} holds LoRA adapters for the base model {path}, which is not there "
                                "(no config.json): put the base checkpoint back at that path, or load a merged "
                                "export (food-multids export --merge)")
    if config_sha256(path) != base["config_sha256"]:
        raise BaseModelMismatch(f"{directory} holds LoRA adapters trained on {path} with config.json sha256 "
                                f"{base['config_sha256'][:12]}..., but that folder's config.json now has "
                                f"{config_sha256(path)[:12]}...: it is another model; restore the original base")
    return path


def load_adapters(model, directory: Path) -> None:
    """Add the recorded adapters to a freshly loaded base and fill them (and a trained merger) from the folder."""
    from safetensors.torch import load_file

    lora = model.meta.lora
    inject_adapters(model, lora["r"], lora["alpha"], lora["dropout"], lora["targets"])
    dtype = next(model.head.parameters()).dtype
    saved = {k: v.to(dtype) for k, v in load_file(str(Path(directory) / ADAPTER_FILE)).items()}
    missing = [k for k in model.backbone.state_dict() if "lora_" in k and k not in saved]
    if missing:
        raise ValueError(f"{directory / ADAPTER_FILE} lacks {len(missing)} adapter tensor(s), e.g. {missing[0]}")
    unexpected = model.backbone.load_state_dict(saved, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{directory / ADAPTER_FILE} holds tensors this model does not have: {unexpected[:3]}")


def merge_adapters(model) -> int:
    """Fold every adapter into its layer (W + scale * B A) and put the plain layer back: an ordinary
    classifier that loads without peft. Returns how many layers were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.backbone.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.backbone.get_submodule(parent_name) if parent_name else model.backbone
            setattr(parent, child, module.get_base_layer())
            merged += 1
    model.meta.finetuning, model.meta.lora, model.meta.base_model = "full", None, None
    return merged
