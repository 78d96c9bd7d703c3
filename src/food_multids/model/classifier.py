"""A Qwen VL backbone (any family of model/backbones) + pooling + linear head, with per-dataset logits masking.

A model directory written by `save_pretrained` is itself a checkpoint of its family (config.json,
safetensors, tokenizer, preprocessor_config.json) plus `classifier.json` (which records the family) and
`classifier_head.safetensors`, so the backbone part loads through the same code as a Hub download.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from food_multids.model.backbones import DEFAULT, family_of
from food_multids.model.backbones.base import BackboneFamily
from food_multids.model.loading import resolve_dtype
from food_multids.model.lora import ADAPTER_FILE, adapter_state, check_base_model, load_adapters

CLASSIFIER_FILE = "classifier.json"
HEAD_FILE = "classifier_head.safetensors"
TRAINING_INFO = "training_info.json"  # written beside a best model by training: its run, step, settings


@dataclass
class LabelSpace:
    """One dataset's slice of the shared head: classes [0, num_classes) and optional names."""

    dataset_id: int
    num_classes: int
    id2label: list[str] | None = None


@dataclass
class ClassifierMeta:
    num_labels: int
    pooling: str = "last"
    enable_logits_masking: bool = True
    label_spaces: dict[str, LabelSpace] = field(default_factory=dict)
    prompt: str = "What food is shown in this image?"
    family: str = DEFAULT          # the backbone family (config.json model_type) it was trained on
    finetuning: str = "full"        # full | lora
    lora: dict | None = None        # with lora: r, alpha, dropout, the adapted layers, merger_trained
    base_model: dict | None = None  # with lora: the base checkpoint's path and config.json sha256
    # Temperature per dataset and the auto rejection thresholds (evaluation/calibration.py).
    calibration: dict | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def spaces(self) -> dict[str, tuple[int, int]]:
        """{dataset name: (head position, number of classes)} in head order."""
        ordered = sorted(self.label_spaces.items(), key=lambda kv: kv[1].dataset_id)
        return {name: (space.dataset_id, space.num_classes) for name, space in ordered}

    @classmethod
    def from_json(cls, text: str) -> ClassifierMeta:
        raw = json.loads(text)
        raw["label_spaces"] = {k: LabelSpace(**v) for k, v in raw.get("label_spaces", {}).items()}
        return cls(**raw)


def mask_logits(logits: torch.Tensor, num_classes: torch.Tensor) -> torch.Tensor:
    """float32 logits with every class index >= the sample's num_classes set to -inf.

    -inf (not a large negative) makes softmax exactly 0 there, so those classes get exactly zero
    gradient and can never win argmax or top-k.
    """
    logits = logits.float()
    invalid = torch.arange(logits.shape[-1], device=logits.device)[None, :] >= num_classes[:, None]
    return logits.masked_fill(invalid, float("-inf"))


def pool_hidden(hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
                image_token_id: int) -> torch.Tensor:
    """(batch, length, hidden) -> (batch, hidden): the mean over image tokens (`image_mean`) or the last
    attended position (`last`, right for left and right padding alike)."""
    if pooling == "image_mean":
        weights = (input_ids == image_token_id).to(hidden.dtype)
        return (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class MultiDatasetClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, meta: ClassifierMeta, kind: BackboneFamily):
        super().__init__()
        self.backbone = backbone
        self.kind = kind  # the family: everything specific to it is asked of this
        self.meta = meta
        self.meta.family = kind.model_type
        self.image_token_id = kind.image_token_id(backbone)
        hidden = kind.hidden_size(backbone)
        self.head = nn.Linear(hidden, meta.num_labels, dtype=next(backbone.parameters()).dtype)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    # -- forward ---------------------------------------------------------------------------------
    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pool_hidden(hidden, input_ids, attention_mask, self.meta.pooling, self.image_token_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                image_grid_thw: torch.Tensor, num_classes: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, num_labels) in float32; masked per sample when masking is on.

        position_ids: (3, batch, length) M-RoPE ids from the collator. Without them the image tokens'
        3-D positions are rebuilt from input_ids here (transformers' per-sample host loop).
        """
        if position_ids is None:
            image = (input_ids == self.image_token_id).to(torch.int32)
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                image_grid_thw=image_grid_thw, mm_token_type_ids=image, use_cache=False)
        else:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                image_grid_thw=image_grid_thw, position_ids=position_ids, use_cache=False)
        pooled = self.pool(out.last_hidden_state, input_ids, attention_mask)
        logits = self.head(pooled.to(self.head.weight.dtype))
        if self.meta.enable_logits_masking and num_classes is not None:
            return mask_logits(logits, num_classes)
        return logits.float()

    # -- parts, freezing and optimizer groups ----------------------------------------------------
    def parts(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups: dict[str, list] = {"vision": [], "merger": [], "language": [], "head": []}
        for name, p in self.named_parameters():
            part = "head" if name.startswith("head.") else self.kind.part_of(name.removeprefix("backbone."))
            groups[part].append((name, p))
        return groups

    def parameter_counts(self) -> dict[str, int]:
        """How many parameters train and how many there are (recorded with a saved model, shown in the report)."""
        return {"trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
                "total_parameters": sum(p.numel() for p in self.parameters())}

    def freeze(self, vision: bool, merger: bool, language: bool) -> None:
        parts = self.parts()
        for part, frozen in (("vision", vision), ("merger", merger), ("language", language)):
            for _, p in parts[part]:
                p.requires_grad_(not frozen)

    def param_groups(self, lr: float, vision_lr: float | None, head_lr: float | None,
                     weight_decay: float) -> list[dict]:
        """Optimizer groups: vision tower + merger at vision_lr, head at head_lr, the rest at lr."""
        parts = self.parts()
        spec = (("vision", parts["vision"] + parts["merger"], vision_lr), ("language", parts["language"], None),
                ("head", parts["head"], head_lr))
        groups = []
        for name, params, part_lr in spec:
            trainable = [p for _, p in params if p.requires_grad]
            if trainable:
                groups.append({"name": name, "params": trainable, "lr": lr if part_lr is None else part_lr,
                               "weight_decay": weight_decay})
        return groups

    # -- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, directory: Path, tokenizer=None, preprocessor_config: dict | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the model directory; `state_dict` overrides the module's (e.g. gathered ZeRO-3 weights)."""
        directory.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        head_state = {k.removeprefix("head."): v.detach().cpu().contiguous()
                      for k, v in state.items() if k.startswith("head.")}
        if self.meta.finetuning == "lora":  # small: adapters (+ a trained merger) and the base's config
            save_file(adapter_state(self, state), str(directory / ADAPTER_FILE))
            self.backbone.config.save_pretrained(directory)
        else:
            backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            self.backbone.save_pretrained(directory, state_dict=backbone_state, safe_serialization=True)
        save_file(head_state, str(directory / HEAD_FILE))
        (directory / CLASSIFIER_FILE).write_text(self.meta.to_json())
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        if preprocessor_config is not None:
            (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor_config, indent=2))

    @classmethod
    def from_pretrained(cls, directory: Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
                        ) -> MultiDatasetClassifier:
        """Restore a directory written by save_pretrained: identical logits on the same input."""
        meta_file = directory / CLASSIFIER_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{directory} is not a classifier directory (no {CLASSIFIER_FILE})")
        meta = ClassifierMeta.from_json(meta_file.read_text())
        kind = family_of(directory)
        if kind.model_type != meta.family:
            raise ValueError(f"{directory}: {CLASSIFIER_FILE} records the {meta.family} family but config.json holds "
                             f"a {kind.model_type} model: the folder was assembled from two models")
        if meta.finetuning == "lora":  # adapters on their recorded base checkpoint
            base = check_base_model(directory, meta.base_model)
            model = cls(kind.load(base, dtype, attn_implementation), meta, kind)
            load_adapters(model, directory)
        else:
            model = cls(kind.load(directory, dtype, attn_implementation), meta, kind)
        head = load_file(str(directory / HEAD_FILE))
        model.head.load_state_dict({k: v.to(dtype) for k, v in head.items()})
        return model


def label_spaces_of(directory: Path) -> dict[str, tuple[int, int]]:
    """{dataset name: (head position, number of classes)} of a saved classifier, from its classifier.json."""
    meta_file = Path(directory) / CLASSIFIER_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{directory} is not a classifier directory (no {CLASSIFIER_FILE})")
    return ClassifierMeta.from_json(meta_file.read_text()).spaces()


def check_image_token(collator, model: MultiDatasetClassifier, path: Path) -> None:
    """The tokenizer's <|image_pad|> must be the token the backbone replaces with image features."""
    if collator.prompt.image_token_id != model.image_token_id:
        raise ValueError(f"{path}: the tokenizer's <|image_pad|> is token {collator.prompt.image_token_id} but "
                         f"config.json's image_token_id is {model.image_token_id}: the tokenizer and the model "
                         "come from different checkpoints")


def check_continuation(path: Path, saved: ClassifierMeta, wanted: ClassifierMeta) -> None:
    """Continuing from a saved classifier: the head's slices and its pooling must mean the same thing."""
    problems = []
    if saved.num_labels != wanted.num_labels:
        problems.append(f"model.num_labels is {wanted.num_labels} but the classifier has {saved.num_labels} outputs")
    if saved.pooling != wanted.pooling:
        problems.append(f"model.pooling is {wanted.pooling!r} but the head was trained on {saved.pooling!r} features")
    for name, space in wanted.label_spaces.items():
        old = saved.label_spaces.get(name)
        if old is not None and (old.dataset_id, old.num_classes) != (space.dataset_id, space.num_classes):
            problems.append(f"dataset '{name}' is #{space.dataset_id} with {space.num_classes} classes here but "
                            f"#{old.dataset_id} with {old.num_classes} in the classifier")
    if problems:
        raise ValueError(f"cannot continue from the classifier in {path}: " + "; ".join(problems) + ": keep its "
                         "settings (see its classifier.json) or start from the base checkpoint")


def create_classifier(path: Path, meta: ClassifierMeta, dtype_name: str, device: torch.device,
                      attn_implementation: str = "sdpa") -> MultiDatasetClassifier:
    """Continue from a saved classifier directory, or put a fresh head on a backbone checkpoint of any family."""
    dtype = resolve_dtype(dtype_name, device)
    if (path / CLASSIFIER_FILE).is_file():
        if ClassifierMeta.from_json((path / CLASSIFIER_FILE).read_text()).finetuning == "lora":
            raise ValueError(f"{path} holds LoRA adapters: continue from a merged export instead (`food-multids "
                             f"export {path} OUT --merge`, then model.name_or_path: OUT)")
        model = MultiDatasetClassifier.from_pretrained(path, dtype, attn_implementation)
        check_continuation(path, model.meta, meta)
        model.meta = meta
        model.meta.family = model.kind.model_type
        return model
    kind = family_of(path)
    return MultiDatasetClassifier(kind.load(path, dtype, attn_implementation), meta, kind)
