"""Checks a `kedro run` passes before its first node (and before an MLflow run is opened).

Everything a node would otherwise find minutes in (a missing JSONL file after the image check, a
model folder without config.json when training starts, an unknown best-model metric at the first
evaluation, no trained model for `full_eval`) is found here, all at once. `check_run` returns the
problems and warnings; the hook in hooks.py raises `PreflightError` with them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import click

from food_multids.config import (
    DEMO_ENVS,
    ConfigError,
    ModelConfig,
    ProjectConfig,
    TrainConfig,
    env_parameters_files,
    parameters_source,
)
from food_multids.config.paths import resolve_path
from food_multids.model.backbones import SUPPORTED as SUPPORTED_MODEL_TYPES

DEMO_MODEL = ModelConfig.__dataclass_fields__["name_or_path"].default
# Which pipeline to suggest for a catalog dataset a run reads: train before data (it runs the data
# nodes too, and what needs data outputs needs a trained model as well), then full_eval.
MAKERS = ("train", "full_eval", "data")


class PreflightError(click.ClickException):
    """The run cannot start: every problem found, one per line. Click prints it without a traceback."""

    def __init__(self, problems: list[str], env: str | None, conf_source: str | None = None):
        self.problems = problems
        head = f"{len(problems)} problem(s) before the first node (parameters: {parameters_source(env, conf_source)}):"
        super().__init__("\n  - ".join([head, *problems]))


@dataclass
class RunPlan:
    """What a run will do: its nodes, the catalog datasets it reads first and the files it writes."""

    env: str
    node_names: set[str]
    free_inputs: list[str]
    output_paths: dict[str, Path] = field(default_factory=dict)
    conf_source: str | None = None


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_run(plan: RunPlan, params: dict, exists: Callable[[str], bool], makers: dict[str, str],
              load: Callable[[str], object]) -> Findings:
    """Every problem that would stop `plan` later; `exists`/`load` read the catalog."""
    found = Findings()
    cfg = None
    try:
        cfg = ProjectConfig.from_params(params, check_files="ingest_jsonl" in plan.node_names, env=plan.env)
    except ConfigError as exc:
        found.problems.extend(exc.problems)
    missing = [name for name in plan.free_inputs if not exists(name)]
    for name in missing:
        how = makers.get(name)
        found.problems.append(f"the catalog dataset '{name}' has no saved version yet"
                              + (f": make it with `{how}` first" if how else ""))
    # Read from the raw parameters too, so that these are reported beside any parameter problem.
    # Only training reads model.name_or_path: full_eval loads the saved best model.
    name_or_path = setting(params, "model", "name_or_path", DEMO_MODEL)
    if "train_deepspeed" in plan.node_names and isinstance(name_or_path, str):
        found.problems.extend(check_model_source(name_or_path, setting(params, "model", "min_pixels", None)))
        warning = demo_model_warning(plan.env, name_or_path, plan.conf_source)
        if warning:
            found.warnings.append(warning)
    output_dir = setting(params, "training", "output_dir", TrainConfig.output_dir)
    if "train_deepspeed" in plan.node_names and isinstance(output_dir, str):
        found.problems.extend(check_writable_dir(resolve_path(output_dir), "params:training.output_dir"))
    if cfg is not None and "full_evaluate" in plan.node_names and "train_deepspeed" not in plan.node_names \
            and "best_model" not in missing:
        problems = check_evaluated_model(cfg, load, plan.env)
        found.problems.extend(problems)
        trained_in = None if problems else training_env(Path(str(load("best_model"))))
        if trained_in is not None and trained_in != plan.env:
            found.warnings.append(f"full_eval reads the newest best_model, trained in the '{trained_in}' environment "
                                  f"(this run: '{plan.env}'): its label spaces fit, but if you meant this env's model, "
                                  "pick it with --load-versions best_model:<version>")
    if cfg is not None and "ingest_images" in plan.node_names and "best_model" in plan.free_inputs \
            and "best_model" not in missing:
        problems, warnings = check_predicted_model(cfg.predict, load, plan.env)
        found.problems.extend(problems)
        found.warnings.extend(warnings)
    if cfg is not None and "train_deepspeed" in plan.node_names:
        found.problems.extend(check_lora_targets(cfg.model))
    if cfg is not None and "ingest_images" in plan.node_names:
        found.problems.extend(check_predict_inputs(cfg.predict))
    if cfg is not None and cfg.training.launch_mode() in ("torchrun", "slurm"):
        found.problems.extend(check_node_plan(cfg))
    if cfg is not None and cfg.training.nodes.launch == "per_node":
        found.warnings.append("params:training.nodes.launch: per_node is now called torchrun (the same node workers, "
                              "now started per step through torchrun and node 0's store, not files); per_node goes "
                              "in the next release")
    for name, path in plan.output_paths.items():
        found.problems.extend(check_writable_dir(path, f"the catalog dataset '{name}' ({path})"))
    return found


def check_node_plan(cfg: ProjectConfig) -> list[str]:
    """A multi-node run knows its node count and runs on node 0 (cluster.resolve_plan's own checks)."""
    from food_multids.runtime.cluster import NodeFailure, resolve_plan

    try:
        resolve_plan(cfg.training, 1)
    except NodeFailure as exc:
        return [f"params:training.nodes: {exc}"]
    if cfg.training.launch_mode() == "slurm" and shutil.which("srun") is None:
        return ["params:training.nodes.launch is slurm but `srun` is not on PATH: run `kedro run` inside the "
                "allocation (the sbatch script; README 'Several machines'), or use launch: torchrun"]
    return []


def check_predict_inputs(predict) -> list[str]:
    """predict.jsonl_list files and predict.image_dir exist, and at least one is set."""
    if not predict.jsonl_list and not predict.image_dir:
        return ["params:predict: nothing to predict: set predict.jsonl_list (records) or predict.image_dir (a folder)"]
    problems = [f"params:predict.jsonl_list[{i}] file not found: {resolve_path(f)}"
                for i, f in enumerate(predict.jsonl_list) if not resolve_path(f).is_file()]
    if predict.image_dir and not resolve_path(predict.image_dir).is_dir():
        problems.append(f"params:predict.image_dir folder not found: {resolve_path(predict.image_dir)}")
    return problems


def setting(params: dict, section: str, key: str, default: object) -> object:
    part = params.get(section) if isinstance(params, dict) else None
    return part.get(key, default) if isinstance(part, dict) else default


def check_model_source(name_or_path: str, min_pixels: object = None) -> list[str]:
    """model.name_or_path must be a local folder with a config.json of a supported family; with
    `min_pixels`, that setting must hold one group of merged patches of that family."""
    path = resolve_path(name_or_path)
    where = f"params:model.name_or_path {path}"
    if not path.is_dir():
        return [f"{where} does not exist: point it at a local checkpoint folder of a supported family (weights are "
                "never downloaded; fetch e.g. Qwen2.5-VL-3B-Instruct beforehand) or a saved classifier"]
    config = path / "config.json"
    if not config.is_file():
        return [f"{where} has no config.json: it must be a Hugging Face model folder (config.json, weights, "
                "tokenizer files), e.g. a downloaded Qwen2.5-VL-3B-Instruct"]
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        return [f"{where}: {config} is not a readable JSON object ({exc})"]
    if model_type not in SUPPORTED_MODEL_TYPES:
        return [f"{where} holds a '{model_type}' model (config.json model_type); supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"]
    if min_pixels is None:
        return []
    from food_multids.model.backbones import family

    kind = family(model_type)
    side = kind.patch_size * 2  # 28x28 px for 14-px patches
    if isinstance(min_pixels, int) and min_pixels < side * side:
        return [f"params:model.min_pixels must be >= {side * side} for {kind.display_name} (one {side}x{side} group of "
                f"merged {kind.patch_size}-px patches), got {min_pixels}"]
    return []


def check_lora_targets(model_cfg) -> list[str]:
    """model.lora.target_modules name Linear layers of the chosen parts: checked on the backbone built
    on the meta device from its config.json (no weights read), before the data nodes, not 90 s into
    training. A folder without a readable config is check_model_source's to name."""
    if model_cfg.finetuning != "lora" or not model_cfg.lora.target_modules:
        return []
    path = resolve_path(model_cfg.name_or_path)
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return []
    if model_type not in SUPPORTED_MODEL_TYPES:
        return []
    import types

    import torch
    import transformers

    from food_multids.model.backbones import family
    from food_multids.model.lora import lora_targets

    kind = family(model_type)
    with torch.device("meta"):
        backbone = kind.model_class()(transformers.AutoConfig.from_pretrained(path, local_files_only=True))
    try:
        lora_targets(types.SimpleNamespace(backbone=backbone, kind=kind), tuple(model_cfg.lora.parts),
                     model_cfg.lora.target_modules)
    except ValueError as exc:
        return [str(exc)]
    return []


def check_writable_dir(folder: Path, what: str) -> list[str]:
    """The nearest existing folder at or above `folder` must be writable (nothing is created here)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"{what}: {existing} is a file, not a folder"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{what}: the folder {existing} is not writable"]
    return []


def check_evaluated_model(cfg: ProjectConfig, load: Callable[[str], object], env: str = "local") -> list[str]:
    """`full_eval` alone: the saved best model must have the configured label spaces."""
    from food_multids.evaluation.full import ModelMismatchError, check_model_dir

    try:
        model_dir = Path(str(load("best_model")))
        check_model_dir(cfg, model_dir)
    except ModelMismatchError as exc:
        return [str(exc) + other_env_hint(model_dir, env, "full_eval")]
    except Exception as exc:  # an unreadable model directory: say which
        return [f"the catalog dataset 'best_model' cannot be read: {exc}"]
    return []


def training_env(model_dir: Path) -> str | None:
    """The Kedro env whose training run made a saved model (training_info.json's `kedro_env`), if recorded."""
    from food_multids.model.classifier import TRAINING_INFO

    try:
        env = json.loads((Path(model_dir) / TRAINING_INFO).read_text(encoding="utf-8")).get("kedro_env")
    except (OSError, ValueError, AttributeError):
        return None
    return env if isinstance(env, str) else None


def other_env_hint(model_dir: Path, env: str, pipeline: str) -> str:
    """': it was trained in `kedro run --env mine`: run ...' when the model comes from another env."""
    trained_in = training_env(model_dir)
    if trained_in is None or trained_in == env:
        return ""
    flag = "" if trained_in == "local" else f" --env {trained_in}"
    inputs = " (with that env's predict.jsonl_list / predict.dataset_name naming its datasets)" \
        if pipeline == "predict" else ""
    return (f". The newest best_model was trained in the '{trained_in}' environment (this run: '{env}'; the catalog's "
            f"newest version is shared by every env): run `kedro run{flag} --pipelines {pipeline}`{inputs}, or pick "
            "a model of this env with --load-versions best_model:<version>")


def check_reject_setting(predict, model_dir: Path, spaces: dict, wanted: set[str] | None) -> list[str]:
    """predict.reject_below against the model: `auto` needs its fitted thresholds (and calibrated
    probabilities), a mapping names its label spaces. The same check predict runs, before any image."""
    import types

    from food_multids.inference.predict import PredictSettingError, reject_thresholds
    from food_multids.model.classifier import CLASSIFIER_FILE, ClassifierMeta

    if predict.reject_below is None:
        return []
    meta = ClassifierMeta.from_json((Path(model_dir) / CLASSIFIER_FILE).read_text())
    model = types.SimpleNamespace(label_spaces=spaces, model=types.SimpleNamespace(meta=meta))
    try:
        reject_thresholds(model, predict.reject_below, predict.calibrated, wanted)
    except PredictSettingError as exc:
        return [f"params:{exc}"]
    return []


def check_predicted_model(predict, load: Callable[[str], object], env: str) -> tuple[list[str], list[str]]:
    """predict: the model must know every dataset_name the inputs ask for (predict.jsonl_list rows,
    predict.dataset_name), said once before any image is read; a model from another env is named."""
    from food_multids.data.records import read_jsonl
    from food_multids.model.classifier import label_spaces_of

    try:
        model_dir = Path(str(load("best_model")))
        spaces = label_spaces_of(model_dir)
    except Exception as exc:  # an unreadable model directory: say which
        return [f"the catalog dataset 'best_model' cannot be read: {exc}"], []
    asked: dict[str, str] = {}  # dataset name -> where it is asked for
    if isinstance(predict.dataset_name, str) and predict.dataset_name:
        asked[predict.dataset_name] = "params:predict.dataset_name"
    for i, name in enumerate(predict.jsonl_list):
        path = resolve_path(name)
        if not path.is_file():
            continue  # check_predict_inputs names it
        try:
            names = read_jsonl(path).dataset_name.to_pylist()
        except Exception:  # noqa: BLE001 - the ingest node reports unreadable rows, line by line
            continue
        for value in names:
            if isinstance(value, str) and value:
                asked.setdefault(value, f"params:predict.jsonl_list[{i}] ({path})")
    unknown = {name: where for name, where in asked.items() if name not in spaces}
    hint = other_env_hint(model_dir, env, "predict")
    if unknown:
        listed = "; ".join(f"'{name}' in {where}" for name, where in list(unknown.items())[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        return [f"the best_model {model_dir} knows the label spaces {', '.join(spaces)}, but the predict inputs ask "
                f"for {listed}{more}" + (hint or ": set predict.jsonl_list / predict.dataset_name to this model's "
                                     "datasets, or pick another model with predict.model")], []
    problems = check_reject_setting(predict, model_dir, spaces, set(asked) or None)
    if problems:
        return problems, []
    trained_in = training_env(model_dir)
    if trained_in is not None and trained_in != env:
        return [], [f"predict reads the newest best_model {model_dir}, trained in the '{trained_in}' environment "
                    f"(this run: '{env}'): its label spaces fit the inputs, but if you meant this env's model, pick it "
                    "with --load-versions best_model:<version>"]
    return [], []


def demo_model_warning(env: str, name_or_path: str, conf_source: str | None = None) -> str | None:
    """Outside base/local, training the demo's random tiny model inherited from conf/base is almost surely a
    mistake; an env whose own parameters file names it (a test or CI env) chose it on purpose."""
    path = resolve_path(name_or_path).resolve()  # '..', '.' and symlinks too
    if env in DEMO_ENVS or path != resolve_path(DEMO_MODEL).resolve() or env_model_setting(env, conf_source) == path:
        return None
    where = " or ".join(env_parameters_files(env, conf_source)) or f"conf/{env}/parameters.yml"
    return (f"the '{env}' environment runs with model.name_or_path = {path}, the demo's "
            f"random tiny model: set model.name_or_path in {where} to your checkpoint")


def env_model_setting(env: str, conf_source: str | None = None) -> Path | None:
    """The model.name_or_path the env's own parameters files set (resolved), or None."""
    import yaml

    from food_multids.config.paths import find_project_root

    folder = (Path(conf_source) if conf_source else find_project_root() / "conf") / env
    for path in sorted(folder.glob("parameters*")) if folder.is_dir() else []:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            continue
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
            return resolve_path(model["name_or_path"]).resolve()
    return None


def makers_of(pipelines: dict, wanted: Iterable[str], env: str = "local") -> dict[str, str]:
    """For each wanted dataset, the command (train, full_eval, data: the first that writes it) that makes it."""
    env_flag = "" if env == "local" else f" --env {env}"
    makers: dict[str, str] = {}
    for name in wanted:
        for pipeline_name in MAKERS:
            pipeline = pipelines.get(pipeline_name)
            if pipeline is not None and name in pipeline.all_outputs():
                makers[name] = f"kedro run{env_flag} --pipelines {pipeline_name}"
                break
    return makers
