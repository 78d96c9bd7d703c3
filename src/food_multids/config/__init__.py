"""Frozen, self-validating configuration parsed from Kedro parameters.

`ProjectConfig.from_params(parameters)` turns the whole `parameters` dict into dataclasses and raises one
`ConfigError` listing every problem with its YAML path and what to change. It accepts the seed
project's YAML as-is (list form and the older single-file form). No torch import here.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from food_multids.config.paths import find_project_root, resolve_path

DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
PILLOW_BOMB_LIMIT = 2 * (1024 * 1024 * 1024 // 4 // 3)  # Pillow's Image.MAX_IMAGE_PIXELS x 2: it raises past that
TOP_LEVEL_KEYS = ("model", "data", "datasets", "training", "deepspeed", "evaluation", "tracking", "predict")
# tracking.report_to values (Hugging Face's names) and the package each needs
TRACKERS = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard"}
DEMO_ENVS = ("base", "local")  # the Kedro envs that mean the demo: the default registered name, no model warning


class ConfigError(ValueError):
    """Every problem found in the parameters, one per line."""

    def __init__(self, problems: list[str], env: str | None = None):
        self.problems = problems
        head = f"{len(problems)} problem(s) in the parameters ({parameters_source(env)}):"
        super().__init__("\n  - ".join([head, *problems]))


def env_parameters_files(env: str, conf_source: str | Path | None = None) -> list[str]:
    """The env's parameters files as a user knows them: conf/<env>/..., or the real path of a linked
    file (food-multids --config)."""
    folder = (Path(conf_source) if conf_source else find_project_root() / "conf") / env
    files = sorted(p for p in folder.iterdir() if p.name.startswith("parameters")) if folder.is_dir() else []
    return [str(p.resolve()) if p.is_symlink() else f"conf/{env}/{p.name}" for p in files]


def parameters_source(env: str | None, conf_source: str | Path | None = None) -> str:
    """Where a run's parameters come from, for messages: base, then the run environment on top."""
    if env is None:
        return "conf/base/parameters.yml, then the run environment's parameters.yml and --params"
    if env == "base":
        return "conf/base/parameters.yml and --params"
    files = env_parameters_files(env, conf_source)
    if not files:
        return f"conf/base/parameters.yml (conf/{env} has no parameters file) and --params"
    return f"conf/base/parameters.yml, then {', '.join(files)} and --params"


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"params:{path} {message}")

    def unknown_keys(self, section: dict, allowed: typing.Iterable[str], path: str) -> None:
        allowed = list(allowed)
        for key in section:
            if key not in allowed:
                self.add(f"{path}.{key}" if path else str(key),
                         f"is not a known setting{_key_hint(str(key), allowed, path)}")


def _key_hint(key: str, allowed: list[str], path: str) -> str:
    """Where an unknown key probably belongs: the same name in another section (training.report_to ->
    tracking.report_to, as Hugging Face users write it), a close name here, or a close name anywhere."""
    sections = _known_sections()
    elsewhere = [f"{other}.{key}" for other, names in sections.items() if other != path and key in names]
    if elsewhere:
        return f" here; it is a setting of {' / '.join(elsewhere)}: move it there"
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    everywhere = {f"{other}.{name}": name for other, names in sections.items() if other != path for name in names}
    near = difflib.get_close_matches(key, list(everywhere.values()), n=1, cutoff=0.8)
    if near:
        where = next(full for full, name in everywhere.items() if name == near[0])
        return f" here (did you mean '{where}'?)"
    return f" (allowed: {', '.join(allowed)})"


def _known_sections() -> dict[str, list[str]]:
    """Every settings section's keys by its YAML path."""
    found = {}
    for path, cls in (("model", ModelConfig), ("model.lora", LoraSettings), ("data", DataConfig),
                      ("data.mix_adaptive", MixAdaptiveSettings), ("training", TrainConfig),
                      ("training.nodes", NodeSettings), ("evaluation", EvalConfig), ("tracking", TrackingConfig),
                      ("predict", PredictConfig)):
        found[path] = [f.name for f in dataclasses.fields(cls) if f.init]
    return found


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, path: str, problems: _Problems) -> Any:
    """Check `value` against a simple type hint; YAML gives 1e-3 as a string, so numbers are parsed."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and dataclasses.is_dataclass(rest[0]) and isinstance(value, dict):
            return _build(rest[0], value, path, problems)  # a nested section or null: its own messages
        for candidate in rest:
            trial = _Problems()
            out = _coerce(value, candidate, path, trial)
            if not trial.items:
                return out
        problems.add(path, f"must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in args:
            problems.add(path, f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            problems.add(path, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(path, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            problems.add(path, f"must be a number, got {value!r}")
            return value
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            problems.add(path, f"must be a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            problems.add(path, f"must be a list, got {value!r}")
            return ()
        return tuple(_coerce(v, args[0], f"{path}[{i}]", problems) for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            problems.add(path, f"must be a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):  # a nested section (model.lora)
        return _build(hint, value, path, problems)
    raise AssertionError(f"unsupported type hint {hint!r}")


def _build(cls: type, section: Any, path: str, problems: _Problems, skip: tuple[str, ...] = ()) -> Any:
    """Fill dataclass `cls` from a YAML mapping: unknown keys, types and defaults."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        problems.add(path, f"must be a mapping, got {section!r}")
        section = {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in skip]
    problems.unknown_keys(section, [*names, *skip], path)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        if f.name in section:
            before = len(problems.items)
            value = _coerce(section[f.name], hints[f.name], f"{path}.{f.name}", problems)
            if len(problems.items) == before or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
                kwargs[f.name] = value  # a nested section keeps its good keys (its bad ones are defaults)
            elif f.default is not dataclasses.MISSING:
                # Already reported; the default keeps the range checks in validate() well-typed.
                kwargs[f.name] = f.default
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.add(f"{path}.{f.name}", "is required")
    try:
        return cls(**kwargs)
    except TypeError:  # a required field missing: already reported
        return None


def _parse_alone(cls: type, section: Any, path: str, env: str | None) -> Any:
    """One section parsed and validated on its own; ConfigError listing every problem."""
    problems = _Problems()
    out = _build(cls, section if section is not None else {}, path, problems)
    if out is not None:
        out.validate(problems)
    if problems.items:
        raise ConfigError(problems.items, env)
    return out


@dataclass(frozen=True)
class LoraSettings:
    """`model.lora:` low-rank adapters (peft) on the Linear layers of the chosen backbone parts."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    parts: tuple[Literal["language", "vision"], ...] = ("language",)
    target_modules: tuple[str, ...] | None = None   # module names (or name endings) instead of `parts`

    def validate(self, problems: _Problems, path: str = "model.lora") -> None:
        if isinstance(self.r, int) and self.r < 1:
            problems.add(f"{path}.r", f"must be >= 1, got {self.r}")
        if isinstance(self.alpha, float) and self.alpha <= 0:
            problems.add(f"{path}.alpha", f"must be > 0, got {self.alpha}")
        if isinstance(self.dropout, float) and not 0 <= self.dropout < 1:
            problems.add(f"{path}.dropout", f"must be in [0, 1), got {self.dropout}")
        if not self.parts and not self.target_modules:
            problems.add(f"{path}.parts", "is empty and no target_modules are given: nothing would get an adapter")


@dataclass(frozen=True)
class MixAdaptiveSettings:
    """`data.mix_adaptive:` the mix steered by each dataset's loss (data.mix_strategy: adaptive; see
    data/adaptive_mix.py)."""

    signal: Literal["eval_loss", "train_loss"] = "eval_loss"
    step_size: float = 1.0        # eta of the exponentiated-gradient step on the log-weights
    smoothing: float = 0.5        # EMA of the signal (0: the newest value only)
    reference: Literal["none", "first_eval"] = "none"   # excess loss over the first update's, or the loss itself
    prior_mix: float = 0.2        # share of the temperature mix kept in every update
    min_weight: float = 0.02      # no dataset's share below this

    def validate(self, problems: _Problems, num_datasets: int, path: str = "data.mix_adaptive") -> None:
        if isinstance(self.step_size, float) and self.step_size < 0:
            problems.add(f"{path}.step_size", f"must be >= 0, got {self.step_size}")
        for name in ("smoothing", "prior_mix"):
            value = getattr(self, name)
            if isinstance(value, float) and not 0 <= value < 1 and not (name == "prior_mix" and value == 1):
                problems.add(f"{path}.{name}", f"must be in [0, 1{']' if name == 'prior_mix' else ')'}, got {value}")
        if isinstance(self.min_weight, float) and not 0 <= self.min_weight * max(num_datasets, 1) <= 1:
            problems.add(f"{path}.min_weight", f"must be in [0, 1/number of datasets], got {self.min_weight}")


@dataclass(frozen=True)
class LossSettings:
    """`training.loss:` the objective training optimises, per dataset and inside its own classes (see
    training/losses.py). The logged `*_loss` stays the plain masked cross-entropy; `*_objective` is this."""

    type: Literal["ce", "focal", "class_balanced"] = "ce"
    focal_gamma: float = 2.0             # focal: (1 - p_true)^gamma down-weights the easy images
    class_balanced_beta: float = 0.999   # class_balanced: Cui et al.'s effective number (1 - beta^n) / (1 - beta)
    class_weights: Literal["auto"] | dict | None = None   # auto: inverse class frequency; {dataset: [w, ...]}
    label_smoothing: float = 0.0         # mass spread over the dataset's own classes only

    def differs_from_ce(self) -> bool:
        return self.type != "ce" or self.class_weights is not None or self.label_smoothing > 0

    def validate(self, problems: _Problems, datasets: tuple = (), path: str = "training.loss") -> None:
        if isinstance(self.focal_gamma, float) and self.focal_gamma < 0:
            problems.add(f"{path}.focal_gamma", f"must be >= 0, got {self.focal_gamma}")
        if isinstance(self.class_balanced_beta, float) and not 0 <= self.class_balanced_beta < 1:
            problems.add(f"{path}.class_balanced_beta", f"must be in [0, 1), got {self.class_balanced_beta}")
        if isinstance(self.label_smoothing, float) and not 0 <= self.label_smoothing < 1:
            problems.add(f"{path}.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        if self.type == "class_balanced" and self.class_weights is not None:
            problems.add(f"{path}.class_weights", "must be null with type: class_balanced (its weights come from "
                                                  "class_balanced_beta and the training counts)")
        if isinstance(self.class_weights, dict) and datasets:
            sizes = {d.name: d.num_classes for d in datasets}
            for name, weights in self.class_weights.items():
                where = f"{path}.class_weights.{name}"
                if name not in sizes:
                    close = difflib.get_close_matches(str(name), list(sizes), n=1)
                    problems.add(where, "is not a dataset of datasets.dataset_configs"
                                        + (f" (did you mean '{close[0]}'?)" if close else f": {', '.join(sizes)}"))
                elif not isinstance(weights, list | tuple) or len(weights) != sizes[name]:
                    got = len(weights) if isinstance(weights, list | tuple) else repr(weights)
                    problems.add(where, f"must list {sizes[name]} weights (one per class of '{name}'), got {got}")
                elif not all(isinstance(w, int | float) and not isinstance(w, bool) and w > 0 and math.isfinite(w)
                             for w in weights):
                    problems.add(where, "must be positive numbers")


@dataclass(frozen=True)
class EmaSettings:
    """`training.ema:` an exponential moving average of the weights that train (training/ema.py): the partial
    evaluations score it, the best-model rule compares it, the best model saved is it."""

    decay: float = 0.999
    start_step: int = 0        # the average follows the weights until this optimizer step

    def validate(self, problems: _Problems, path: str = "training.ema") -> None:
        if isinstance(self.decay, float) and not 0 < self.decay < 1:
            problems.add(f"{path}.decay", f"must be in (0, 1), e.g. 0.999, got {self.decay}")
        if isinstance(self.start_step, int) and self.start_step < 0:
            problems.add(f"{path}.start_step", f"must be >= 0, got {self.start_step}")


@dataclass(frozen=True)
class NodeSettings:
    """`training.nodes:` how the processes of several machines are started (see runtime/cluster.py)."""

    launch: Literal["auto", "ssh", "slurm", "torchrun", "per_node"] = "auto"  # slurm: each step an srun job step;
    # torchrun: node 0's kedro + `food-multids node-worker` elsewhere; per_node: torchrun's old name (one release)
    num_nodes: int | None = None        # slurm/torchrun: else PET_NNODES, NNODES or SLURM_NNODES
    master_addr: str | None = None      # else PET_MASTER_ADDR, MASTER_ADDR, SLURM's first node, this machine's name
    join_timeout_s: float = 600.0       # torchrun: a node that has not joined by then fails the run
    lost_after_s: float = 120.0         # torchrun: a node whose heartbeat in node 0's store stops this long is lost

    def validate(self, problems: _Problems, hostfile: str | None, path: str = "training.nodes") -> None:
        if isinstance(self.num_nodes, int) and self.num_nodes < 1:
            problems.add(f"{path}.num_nodes", f"must be >= 1 or null (from the environment), got {self.num_nodes}")
        for name in ("join_timeout_s", "lost_after_s"):
            value = getattr(self, name)
            if isinstance(value, float) and value <= 0:
                problems.add(f"{path}.{name}", f"must be > 0, got {value}")
        if self.launch == "ssh" and not hostfile:
            problems.add(f"{path}.launch", "is ssh but training.hostfile is not set: name the DeepSpeed hostfile "
                                           "(one `host slots=N` line per machine)")
        if self.launch in ("torchrun", "per_node", "slurm") and hostfile:
            problems.add("training.hostfile", f"must be null with training.nodes.launch: {self.launch} (each node "
                                              "starts its own processes; the node list comes from training.nodes)")

    def mode(self, hostfile: str | None) -> Literal["single", "ssh", "slurm", "torchrun"]:
        """single (this machine), ssh (DeepSpeed's hostfile + pdsh), slurm (job steps of the allocation that runs
        Kedro) or torchrun (every node starts its own torchrun per step; per_node is its old name)."""
        if self.launch == "per_node":
            return "torchrun"
        if self.launch in ("torchrun", "slurm"):
            return self.launch
        return "ssh" if self.launch == "ssh" or hostfile else "single"


@dataclass(frozen=True)
class ModelConfig:
    """`model:` backbone location, head size, masking, pooling, image sizes and freezing."""

    num_labels: int
    name_or_path: str = "data/06_models/tiny_qwen2_5_vl"
    enable_logits_masking: bool = True
    pooling: Literal["last", "image_mean"] = "last"
    prompt: str = "What food is shown in this image?"
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448
    padding_side: Literal["left", "right"] = "left"
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    batched_vision_windows: bool = True
    freeze_vision_tower: bool = False
    freeze_merger: bool = False
    freeze_language_model: bool = False
    gradient_checkpointing: bool = False
    gradient_checkpointing_every_n_layers: int = 1
    torch_compile: bool = False
    torch_compile_mode: Literal["default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"] = "default"
    finetuning: Literal["full", "lora"] = "full"
    lora: LoraSettings = LoraSettings()

    def validate(self, problems: _Problems) -> None:
        if isinstance(self.lora, LoraSettings):
            self.lora.validate(problems)
        if isinstance(self.num_labels, int) and self.num_labels < 1:
            problems.add("model.num_labels", f"must be >= 1, got {self.num_labels}")
        every = self.gradient_checkpointing_every_n_layers
        if isinstance(every, int) and every < 1:
            problems.add("model.gradient_checkpointing_every_n_layers",
                         f"must be >= 1 (1: every layer), got {self.gradient_checkpointing_every_n_layers}")
        if isinstance(self.min_pixels, int) and self.min_pixels < 28 * 28:
            problems.add("model.min_pixels", f"must be >= 784 (one 28x28 patch group), got {self.min_pixels}")
        if isinstance(self.max_pixels, int) and isinstance(self.min_pixels, int) and self.max_pixels < self.min_pixels:
            problems.add("model.max_pixels", f"must be >= model.min_pixels ({self.min_pixels}), got {self.max_pixels}")


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of `datasets.dataset_configs`."""

    num_classes: int
    name: str = ""
    eval_ratio: float = 0.1
    weight: float = 1.0
    class_names: str | None = None
    index: int = 0

    def validate(self, problems: _Problems, path: str) -> None:
        if isinstance(self.num_classes, int) and self.num_classes < 1:
            problems.add(f"{path}.num_classes", f"must be >= 1, got {self.num_classes}")
        if isinstance(self.eval_ratio, float) and not 0 < self.eval_ratio <= 1:
            problems.add(f"{path}.eval_ratio", f"must be in (0, 1], got {self.eval_ratio}")
        if isinstance(self.weight, float) and self.weight <= 0:
            problems.add(f"{path}.weight", f"must be > 0, got {self.weight}")


@dataclass(frozen=True)
class DataConfig:
    """`data:` where the JSONL files are and how strictly rows are checked."""

    train_jsonl_list: tuple[str, ...] = ()
    val_jsonl_list: tuple[str, ...] = ()
    train_jsonl: str | None = None
    val_jsonl: str | None = None
    on_bad_rows: Literal["error", "skip"] = "error"
    check_images: bool = True
    image_check_workers: int = 8
    mix_strategy: Literal["concat", "weighted", "temperature", "adaptive"] = "concat"
    mix_temperature: float = 2.0
    resample_each_epoch: bool = False
    mix_adaptive: MixAdaptiveSettings = MixAdaptiveSettings()
    # Images with more pixels are rejected at ingest (decoding them costs seconds per load; past
    # Pillow's bomb limit they fail at every load).
    max_image_pixels: int = 64_000_000
    # Filled by from_params: absolute paths, single-file mode flag.
    train_files: tuple[Path, ...] = field(default=(), init=False)
    val_files: tuple[Path, ...] = field(default=(), init=False)

    @property
    def single_file(self) -> bool:
        return not self.train_jsonl_list

    def validate(self, problems: _Problems) -> None:
        if self.mix_temperature <= 0:
            problems.add("data.mix_temperature", f"must be > 0 (1 = proportional to size), got {self.mix_temperature}")
        if self.image_check_workers < 1:
            problems.add("data.image_check_workers", f"must be >= 1, got {self.image_check_workers}")
        if not 28 * 28 <= self.max_image_pixels <= PILLOW_BOMB_LIMIT:
            problems.add("data.max_image_pixels", f"must be between 784 and {PILLOW_BOMB_LIMIT} (past that Pillow "
                                                  "refuses to decode: DecompressionBombError), got "
                                                  f"{self.max_image_pixels}")


@dataclass(frozen=True)
class TrainConfig:
    """`training:` Hugging Face TrainingArguments names plus launcher settings."""

    output_dir: str = "data/06_models/train_output"
    learning_rate: float = 1e-5
    vision_lr: float | None = None
    head_lr: float | None = None
    weight_decay: float = 0.0
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 1.0
    logging_steps: int = 10
    eval_steps: int = 100
    save_steps: int = 500
    save_total_limit: int | None = 2
    seed: int = 42
    shuffle: bool = True
    metric_for_best_model: str = "overall_accuracy"
    greater_is_better: bool | None = None
    resume_from_checkpoint: bool | str = False
    overwrite_output_dir: bool = False
    early_stopping_patience: int | None = None
    eval_subset_strategy: Literal["fixed", "fresh"] = "fixed"
    best_model_selection: Literal["point", "paired", "lower_bound"] = "point"
    selection_z: float = 1.0
    keep_top_k_checkpoints: int = 3
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    max_consecutive_bad_images: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_processes: int | None = None
    hostfile: str | None = None
    master_port: int | None = None
    single_process_zero_stage: int | None = None
    nodes: NodeSettings = NodeSettings()
    progress_bar: Literal["auto", "always", "never"] = "auto"
    log_format: Literal["compact", "seed"] = "compact"   # seed: the original trainer's lines per dataset
    loss: LossSettings = LossSettings()
    ema: EmaSettings | None = None   # null: no weight average

    def validate(self, problems: _Problems) -> None:
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "eval_steps", "save_steps", "max_consecutive_bad_images")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, int) and value <= 0:
                problems.add(f"training.{name}", f"must be > 0, got {value}")
        for name in ("learning_rate", "vision_lr", "head_lr", "weight_decay", "max_grad_norm", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.add(f"training.{name}", f"must be >= 0, got {value}")
        if isinstance(self.warmup_ratio, float) and not 0 <= self.warmup_ratio < 1:
            problems.add("training.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps == 0 or (isinstance(self.max_steps, int) and self.max_steps < -1):
            problems.add("training.max_steps", f"must be > 0, or -1 to use num_train_epochs, got {self.max_steps}")
        if self.max_steps == -1 and isinstance(self.num_train_epochs, float) and self.num_train_epochs <= 0:
            problems.add("training.num_train_epochs", f"must be > 0 when max_steps is -1, got {self.num_train_epochs}")
        if isinstance(self.save_total_limit, int) and self.save_total_limit < 1:
            problems.add("training.save_total_limit", f"must be >= 1 or null, got {self.save_total_limit}")
        if isinstance(self.early_stopping_patience, int) and self.early_stopping_patience < 1:
            problems.add("training.early_stopping_patience",
                         f"must be >= 1 or null, got {self.early_stopping_patience}")
        if isinstance(self.selection_z, float) and self.selection_z < 0:
            problems.add("training.selection_z",
                         f"must be >= 0 (standard errors a gain must exceed), got {self.selection_z}")
        if isinstance(self.keep_top_k_checkpoints, int) and self.keep_top_k_checkpoints < 1:
            problems.add("training.keep_top_k_checkpoints",
                         f"must be >= 1 (1: only the best), got {self.keep_top_k_checkpoints}")
        if self.resume_from_checkpoint is True:
            problems.add("training.resume_from_checkpoint",
                         "must be auto, a checkpoint path, or false (true is ambiguous: use auto)")
        if self.dataloader_num_workers < 0:
            problems.add("training.dataloader_num_workers", f"must be >= 0, got {self.dataloader_num_workers}")
        if isinstance(self.num_processes, int) and self.num_processes < 1:
            problems.add("training.num_processes", f"must be >= 1 or null (auto), got {self.num_processes}")
        if self.single_process_zero_stage not in (None, 0, 1, 2, 3):
            problems.add("training.single_process_zero_stage",
                         f"must be 0, 1, 2, 3 or null, got {self.single_process_zero_stage}")
        if isinstance(self.nodes, NodeSettings):
            self.nodes.validate(problems, self.hostfile)

    @classmethod
    def from_section(cls, section: Any, env: str | None = None) -> TrainConfig:
        """Parse `params:training` alone: what the launch of several processes (runtime/) and the predict node
        read. The checks against other sections (metric names, loss weights) are from_params's."""
        return _parse_alone(cls, section, "training", env)

    def launch_mode(self) -> Literal["single", "ssh", "slurm", "torchrun"]:
        return self.nodes.mode(self.hostfile)

    def best_metric_greater_is_better(self) -> bool:
        """Explicit setting wins; otherwise losses and out-of-range prediction counts are minimised,
        everything else (accuracies) maximised."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        metric = self.metric_for_best_model
        return not (metric.endswith("loss") or metric == "out_of_range_predictions")

    def resolved_output_dir(self) -> Path:
        return resolve_path(self.output_dir)

    def optimizer_steps(self, batches_per_epoch: int) -> int:
        """Total optimizer steps: max_steps, or epochs x optimizer steps per epoch."""
        if self.max_steps > 0:
            return self.max_steps
        per_epoch = max(1, batches_per_epoch // self.gradient_accumulation_steps)
        return max(1, math.ceil(self.num_train_epochs * per_epoch))

    def warmup(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else int(self.warmup_ratio * total_steps)


@dataclass(frozen=True)
class EvalConfig:
    """`evaluation:` the final full evaluation and the report."""

    batch_size: int | None = None
    top_k: int = 5
    dataloader_num_workers: int | None = None
    confusion_top_n: int = 20
    report_thumbnails: int = 8
    confidence: float = 0.95
    calibrate: bool = True              # fit a temperature per dataset on the calibration split (select_best)
    calibration_fraction: float = 0.3   # share of each dataset's validation images used to fit it (seeded)
    reject_precision: float = 0.9       # predict.reject_below: auto keeps this accuracy on the calibration split

    def validate(self, problems: _Problems) -> None:
        if self.top_k < 1:
            problems.add("evaluation.top_k", f"must be >= 1, got {self.top_k}")
        for name in ("calibration_fraction", "reject_precision"):
            value = getattr(self, name)
            if isinstance(value, float) and not 0 < value < 1:
                problems.add(f"evaluation.{name}", f"must be in (0, 1), got {value}")
        if isinstance(self.confidence, float) and not 0 < self.confidence < 1:
            problems.add("evaluation.confidence", f"must be in (0, 1), e.g. 0.95, got {self.confidence}")
        for name in ("confusion_top_n", "report_thumbnails"):
            if getattr(self, name) < 0:
                problems.add(f"evaluation.{name}", f"must be >= 0, got {getattr(self, name)}")
        if isinstance(self.dataloader_num_workers, int) and self.dataloader_num_workers < 0:
            problems.add("evaluation.dataloader_num_workers",
                         f"must be >= 0 or null, got {self.dataloader_num_workers}")
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            problems.add("evaluation.batch_size", f"must be >= 1 or null, got {self.batch_size}")


@dataclass(frozen=True)
class TrackingConfig:
    """`tracking:` where metrics go besides the training history (Hugging Face's report_to)."""

    report_to: tuple[str, ...] = ("mlflow",)
    wandb_project: str = "food_multids"
    wandb_mode: Literal["auto", "offline", "online"] = "auto"   # auto: online only with an API key

    def validate(self, problems: _Problems) -> None:
        import importlib.util

        for i, name in enumerate(self.report_to):
            if name not in TRACKERS:
                close = difflib.get_close_matches(str(name), list(TRACKERS), n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                problems.add(f"tracking.report_to[{i}]", f"is {name!r}: {hint}supported: {', '.join(TRACKERS)}")
            elif importlib.util.find_spec(TRACKERS[name]) is None:
                problems.add(f"tracking.report_to[{i}]", f"is {name!r}, but the {TRACKERS[name]} package is not "
                                                         f"installed: pip install -e '.[{name}]' (or make setup "
                                                         f"EXTRAS={name})")


@dataclass(frozen=True)
class PredictConfig:
    """`predict:` new images through a trained model: `kedro run --pipelines predict`, the MLflow model
    every training run registers (and `mlflow models serve`), and `food-multids predict`."""

    jsonl_list: tuple[str, ...] = ()
    image_dir: str | None = None
    dataset_name: str | None = None
    model: str | None = None
    top_k: int = 5
    batch_size: int = 8
    dataloader_num_workers: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_processes: int | None = None
    on_bad_rows: Literal["error", "skip"] = "error"
    max_image_pixels: int = 64_000_000
    max_request_pixels: int = 200_000_000
    log_model: bool = True
    registered_model_name: str | None = None   # None: food_multids (base/local) or food_multids-<env>
    serve_batching: bool = True
    serve_max_batch: int = 16
    serve_max_wait_ms: float = 5.0
    serve_max_queue: int = 256
    calibrated: bool = True             # probabilities with the model's fitted temperatures (when it has them)
    reject_below: float | Literal["auto"] | dict | None = None   # "none of these" below this confidence

    def validate(self, problems: _Problems) -> None:
        reject = self.reject_below
        values = reject.items() if isinstance(reject, dict) else [("", reject)] if isinstance(reject, float) else []
        for name, value in values:
            where = f"predict.reject_below{'.' + str(name) if name else ''}"
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
                problems.add(where, f"must be a confidence in [0, 1], got {value!r}")
        for name in ("top_k", "batch_size", "serve_max_batch"):
            if isinstance(getattr(self, name), int) and getattr(self, name) < 1:
                problems.add(f"predict.{name}", f"must be >= 1, got {getattr(self, name)}")
        if isinstance(self.dataloader_num_workers, int) and self.dataloader_num_workers < 0:
            problems.add("predict.dataloader_num_workers", f"must be >= 0, got {self.dataloader_num_workers}")
        if isinstance(self.num_processes, int) and self.num_processes < 1:
            problems.add("predict.num_processes", f"must be >= 1 or null, got {self.num_processes}")
        if isinstance(self.max_image_pixels, int) and not 28 * 28 <= self.max_image_pixels <= PILLOW_BOMB_LIMIT:
            problems.add("predict.max_image_pixels", f"must be between 784 and {PILLOW_BOMB_LIMIT}, got "
                                                     f"{self.max_image_pixels}")
        if isinstance(self.max_request_pixels, int) and isinstance(self.max_image_pixels, int) \
                and self.max_request_pixels < self.max_image_pixels:
            problems.add("predict.max_request_pixels",
                         f"must be >= predict.max_image_pixels ({self.max_image_pixels}), "
                         f"got {self.max_request_pixels}")
        if isinstance(self.serve_max_wait_ms, float) and self.serve_max_wait_ms < 0:
            problems.add("predict.serve_max_wait_ms", f"must be >= 0, got {self.serve_max_wait_ms}")
        if isinstance(self.serve_max_queue, int) and isinstance(self.serve_max_batch, int) \
                and self.serve_max_queue < self.serve_max_batch:
            problems.add("predict.serve_max_queue", f"must be >= predict.serve_max_batch ({self.serve_max_batch}), "
                                                    f"got {self.serve_max_queue}")
        if self.registered_model_name is not None and not str(self.registered_model_name).strip():
            problems.add("predict.registered_model_name",
                         "must name the registered model, or be null (food_multids for "
                         "base/local, food_multids-<env> for any other env)")

    @classmethod
    def from_section(cls, section: Any, env: str | None = None) -> PredictConfig:
        """Parse `params:predict` alone (the predict nodes and the served model get only this section).
        A served model parses the same section on every request: a valid one is parsed once."""
        key = json.dumps(section, sort_keys=True, default=str)
        if key not in _PARSED_PREDICT:
            _PARSED_PREDICT[key] = cls._parse_section(section, env)
            while len(_PARSED_PREDICT) > 64:
                _PARSED_PREDICT.pop(next(iter(_PARSED_PREDICT)))
        return _PARSED_PREDICT[key]

    @classmethod
    def _parse_section(cls, section: Any, env: str | None) -> PredictConfig:
        return _parse_alone(cls, section, "predict", env)


_PARSED_PREDICT: dict[str, PredictConfig] = {}  # JSON of a predict section -> its (frozen) parse


@dataclass(frozen=True)
class ProjectConfig:
    model: ModelConfig
    data: DataConfig
    datasets: tuple[DatasetSpec, ...]
    training: TrainConfig
    evaluation: EvalConfig
    deepspeed: dict
    tracking: TrackingConfig = TrackingConfig()
    predict: PredictConfig = PredictConfig()
    # The top-level sections the parameters gave (a node parses only the sections it takes): to_params
    # records those, not defaults standing in for sections the node never saw.
    given: tuple[str, ...] = field(default=TOP_LEVEL_KEYS, compare=False)

    # -- derived values -------------------------------------------------------------------------
    @property
    def dataset_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.datasets)

    def dataset(self, name: str) -> DatasetSpec:
        for spec in self.datasets:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def num_classes(self) -> dict[str, int]:
        return {d.name: d.num_classes for d in self.datasets}

    def best_model_metrics(self) -> list[str]:
        """What training.metric_for_best_model can name: the partial evaluation's keys (samples aside)."""
        return best_model_metrics(self.dataset_names, self.model.enable_logits_masking)

    def topk_datasets(self) -> tuple[DatasetSpec, ...]:
        """Datasets with more classes than evaluation.top_k: elsewhere top-k accuracy is 1.0 by construction."""
        return tuple(d for d in self.datasets if d.num_classes > self.evaluation.top_k)

    def to_params(self) -> dict:
        """The parameters dict this config parses from (JSON-safe), the sections it was given (datasets
        whenever data was: the single-file form derives it): recorded with each saved model and in the
        trackers' run configuration."""
        def section(part: Any, skip: tuple[str, ...] = ()) -> dict:
            fields = [f.name for f in dataclasses.fields(part) if f.init and f.name not in skip]
            return {name: _plain(getattr(part, name)) for name in fields}

        every = {"model": lambda: section(self.model), "data": lambda: section(self.data),
                 "training": lambda: section(self.training), "evaluation": lambda: section(self.evaluation),
                 "deepspeed": lambda: _plain(self.deepspeed), "tracking": lambda: section(self.tracking),
                 "predict": lambda: section(self.predict),
                 "datasets": lambda: {"dataset_configs": {d.name: section(d, ("name", "index"))
                                                          for d in self.datasets}}}
        wanted = set(self.given) | ({"datasets"} if "data" in self.given else set())
        return {name: make() for name, make in every.items() if name in wanted}

    # -- parsing --------------------------------------------------------------------------------
    @classmethod
    def from_params(cls, params: dict, *, check_files: bool = True, env: str | None = None) -> ProjectConfig:
        """Parse and validate the whole `parameters` dict; raise ConfigError listing every problem.

        `env` (the Kedro run environment) only names the files in the error message.
        """
        problems = _Problems()
        if not isinstance(params, dict):
            raise ConfigError([f"parameters must be a mapping, got {type(params).__name__}"], env)
        problems.unknown_keys(params, TOP_LEVEL_KEYS, "")
        model = _build(ModelConfig, params.get("model"), "model", problems)
        data = _build(DataConfig, params.get("data"), "data", problems)
        training = _build(TrainConfig, params.get("training"), "training", problems)
        evaluation = _build(EvalConfig, params.get("evaluation"), "evaluation", problems)
        tracking = _build(TrackingConfig, params.get("tracking"), "tracking", problems)
        predict = _build(PredictConfig, params.get("predict"), "predict", problems)
        for part in (model, data, training, evaluation, tracking, predict):
            if part is not None:
                part.validate(problems)
        deepspeed = _resolve_deepspeed(params.get("deepspeed"), problems)
        datasets: tuple[DatasetSpec, ...] = ()
        if data is not None:
            data = _resolve_files(data, problems, check_files)
            datasets = _resolve_datasets(params.get("datasets"), data, model, problems)
        if training is not None and model is not None and datasets:
            allowed = best_model_metrics([d.name for d in datasets], model.enable_logits_masking)
            if training.metric_for_best_model not in allowed:
                close = difflib.get_close_matches(training.metric_for_best_model, allowed, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                problems.add("training.metric_for_best_model",
                             f"is {training.metric_for_best_model!r}, which the partial evaluation does not "
                             f"produce: {hint}choose one of {', '.join(allowed)}")
        if training is not None and isinstance(training.loss, LossSettings):
            training.loss.validate(problems, datasets)
        if training is not None and isinstance(training.ema, EmaSettings):
            training.ema.validate(problems)
            stage = (deepspeed.get("zero_optimization") or {}).get("stage") if isinstance(deepspeed, dict) else None
            if stage == 3:
                problems.add("training.ema", "is not supported with ZeRO-3: the parameters are partitioned across "
                                             "ranks, so no rank holds the weights to average; use ZeRO-2 or set "
                                             "training.ema: null")
        if data is not None and isinstance(data.mix_adaptive, MixAdaptiveSettings):
            data.mix_adaptive.validate(problems, len(datasets))
            if data.mix_strategy == "adaptive" and data.mix_adaptive.signal == "eval_loss" and training is not None \
                    and isinstance(training.max_steps, int) and isinstance(training.eval_steps, int) \
                    and 0 < training.max_steps <= training.eval_steps:
                problems.add("data.mix_adaptive.signal",
                             f"is eval_loss, which steers the mix at each partial evaluation, but training.eval_steps "
                             f"({training.eval_steps}) >= training.max_steps ({training.max_steps}): nothing is "
                             "evaluated before the last step, so the mix would never change; lower "
                             "training.eval_steps or use signal: train_loss (the logging window's loss)")
        if problems.items:
            raise ConfigError(problems.items, env)
        return cls(model=model, data=data, datasets=datasets, training=training, evaluation=evaluation,
                   deepspeed=deepspeed, tracking=tracking, predict=predict,
                   given=tuple(key for key in TOP_LEVEL_KEYS if key in params))


def recorded_config(info: dict, otherwise: str) -> ProjectConfig | None:
    """The settings a saved model was trained with (its training_info.json's `parameters`), or None when it
    records none or they no longer parse (written by another version of the project: a warning says so,
    and `otherwise`, what is used instead)."""
    recorded = info.get("parameters")
    if not recorded:
        return None
    try:
        return ProjectConfig.from_params(recorded, check_files=False)
    except ValueError as exc:  # ConfigError, or a value an older version wrote differently
        logging.getLogger(__name__).warning("The model's recorded training settings no longer parse (%s): %s",
                                            exc, otherwise)
        return None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def best_model_metrics(names: typing.Sequence[str], masking: bool) -> list[str]:
    """The partial evaluation's metric keys (see metrics.summarize), without the sample counts."""
    keys = [f"{name}_{metric}" for name in [*names, "overall"] for metric in ("accuracy", "loss")]
    return keys if masking else [*keys, "out_of_range_predictions"]


def _resolve_files(data: DataConfig, problems: _Problems, check_files: bool) -> DataConfig:
    root = find_project_root()
    if data.train_jsonl_list or data.val_jsonl_list:
        for key in ("train_jsonl", "val_jsonl"):
            if getattr(data, key) is not None:
                problems.add(f"data.{key}", f"cannot be combined with data.{key}_list: use one form")
        train, val = list(data.train_jsonl_list), list(data.val_jsonl_list)
        train_key, val_key = "data.train_jsonl_list", "data.val_jsonl_list"
        if len(train) != len(val):
            problems.add(val_key,
                         f"has {len(val)} file(s) but {train_key} has {len(train)}: give one validation file per "
                         "training file")
    else:
        train = [data.train_jsonl] if data.train_jsonl else []
        val = [data.val_jsonl] if data.val_jsonl else []
        train_key, val_key = "data.train_jsonl", "data.val_jsonl"
        if not train:
            problems.add("data.train_jsonl_list", "is required (or the single-file form data.train_jsonl)")
        if not val:
            problems.add("data.val_jsonl_list", "is required (or the single-file form data.val_jsonl)")
    train_files = tuple(resolve_path(p, root) for p in train if isinstance(p, str))
    val_files = tuple(resolve_path(p, root) for p in val if isinstance(p, str))
    if check_files:
        for key, files in ((train_key, train_files), (val_key, val_files)):
            for i, path in enumerate(files):
                if not path.is_file():
                    where = f"{key}[{i}]" if key.endswith("_list") else key
                    problems.add(where, f"file not found: {path}")
    object.__setattr__(data, "train_files", train_files)
    object.__setattr__(data, "val_files", val_files)
    return data


def _resolve_datasets(section: Any, data: DataConfig, model: ModelConfig | None,
                      problems: _Problems) -> tuple[DatasetSpec, ...]:
    if section is None:
        section = {}
    if not isinstance(section, dict):
        problems.add("datasets", f"must be a mapping, got {section!r}")
        return ()
    problems.unknown_keys(section, ["dataset_configs"], "datasets")
    configs = section.get("dataset_configs") or {}
    if not isinstance(configs, dict):
        problems.add("datasets.dataset_configs", f"must be a mapping of dataset name to settings, got {configs!r}")
        return ()
    specs = []
    for index, (name, entry) in enumerate(configs.items()):
        path = f"datasets.dataset_configs.{name}"
        if not isinstance(name, str) or not DATASET_NAME.fullmatch(name) or name == "overall":
            problems.add(path, "is not a usable dataset name: it becomes part of MLflow metric names "
                               "(<name>_accuracy), so use letters, digits, '_', '-' and '.', starting with a "
                               "letter or digit, and not 'overall'")
        spec = _build(DatasetSpec, entry, path, problems, skip=("name", "index"))
        if spec is not None:
            spec = dataclasses.replace(spec, name=str(name), index=index)
            spec.validate(problems, path)
            specs.append(spec)
    if not configs:
        if not data.single_file:
            problems.add("datasets.dataset_configs",
                         "is required with data.train_jsonl_list: give num_classes and eval_ratio per dataset")
        elif model is not None and data.train_files:
            # Single-file form: one dataset named after the file's folder, num_classes = num_labels.
            specs.append(DatasetSpec(name=derive_dataset_name(data.train_files[0]), num_classes=model.num_labels))
    elif not data.single_file:
        _check_file_names_against_configs(data, [s.name for s in specs], problems)
    if model is not None and specs and isinstance(model.num_labels, int):
        largest = max(specs, key=lambda s: s.num_classes if isinstance(s.num_classes, int) else 0)
        if isinstance(largest.num_classes, int) and model.num_labels < largest.num_classes:
            problems.add("model.num_labels",
                         f"must be >= the largest num_classes ({largest.num_classes}, dataset '{largest.name}'), got "
                         f"{model.num_labels}")
    return tuple(specs)


def _check_file_names_against_configs(data: DataConfig, names: list[str], problems: _Problems) -> None:
    """A folder named like a dataset that is not configured is almost always a typo: report it.

    Rows still carry their own dataset_name; unknown names there are reported per row at ingest.
    """
    for key, files in (("data.train_jsonl_list", data.train_files), ("data.val_jsonl_list", data.val_files)):
        for i, path in enumerate(files):
            folder = path.parent.name
            if folder not in names and len(names) > 1:
                close = difflib.get_close_matches(folder, names, n=1, cutoff=0.75)
                if close:
                    problems.add(f"{key}[{i}]",
                                 f"lives in folder '{folder}', which is not in datasets.dataset_configs (did you "
                                 f"mean '{close[0]}'?)")


def derive_dataset_name(path: Path) -> str:
    """Single-file mode: '/data/food101/train.jsonl' -> 'food101'."""
    return path.parent.name or path.stem


def default_dataset_for_file(path: Path, names: typing.Sequence[str]) -> str | None:
    """Name used for rows of `path` that carry no dataset_name, or None when it is ambiguous."""
    if len(names) == 1:
        return names[0]
    for candidate in (path.parent.name, path.stem):
        if candidate in names:
            return candidate
    return None


def _resolve_deepspeed(value: Any, problems: _Problems) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        path = resolve_path(value)
        if not path.is_file():
            problems.add("deepspeed", f"file not found: {path}")
            return {}
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            problems.add("deepspeed", f"is not valid JSON: {path}:{exc.lineno}: {exc.msg}")
            return {}
        if not isinstance(loaded, dict):
            problems.add("deepspeed", f"{path} must hold a JSON object")
            return {}
        return loaded
    problems.add("deepspeed", f"must be a mapping (inline DeepSpeed config) or a path to a JSON file, got {value!r}")
    return {}
