"""Shared fixtures: real JSONL files with real images, the tiny Qwen2.5-VL, parameter dicts."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KEDRO = str(BIN / "kedro")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(autouse=True)
def _no_project_root_left_behind():
    """A test that ran a Kedro session in this process (its hook sets the project root) leaves none to the next."""
    yield
    from food_multids.config.paths import use_project_root

    use_project_root(None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kedro_env() -> dict:
    """This process's environment without what would tie a child `kedro` to this test's MLflow run or project."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env.update(KEDRO_DISABLE_TELEMETRY="true", FOOD_MULTIDS_PROGRESS="never")
    return env


def kedro(root: Path, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`kedro run ARGS` in the project copy ROOT."""
    return subprocess.run([KEDRO, "run", *args], cwd=root, env=env or kedro_env(), capture_output=True, text=True,
                          timeout=timeout)


def write_image(path: Path, colour=(200, 30, 30), size=(56, 56), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    img = img.convert(mode) if mode != "RGB" else img
    img.save(path, format=fmt)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_dataset(root: Path, name: str, num_classes: int, per_class: int, split: str = "train") -> Path:
    """A folder root/name with images and split.jsonl; colours differ by class."""
    rows = []
    rng = np.random.default_rng(zlib.crc32(f"{name}/{split}".encode()))
    for label in range(num_classes):
        for k in range(per_class):
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            rel = f"img/{split}/{label}_{k}.png"
            write_image(root / name / rel, colour)
            rows.append({"image": rel, "label": label, "dataset_name": name})
    return write_jsonl(root / name / f"{split}.jsonl", rows)


SEPARABLE_COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20), (20, 230, 230), (230, 20, 230)]


def make_separable_dataset(root: Path, name: str, num_classes: int, per_class: int, split: str) -> Path:
    """Like make_dataset, but every class has its own saturated colour (small per-image jitter): a set
    that any working classifier separates, so a learning test does not hang on one CPU's trajectory."""
    rows = []
    rng = np.random.default_rng(zlib.crc32(f"sep/{name}/{split}".encode()))
    for label in range(num_classes):
        for k in range(per_class):
            colour = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in SEPARABLE_COLOURS[label])
            rel = f"img/{split}/{label}_{k}.png"
            write_image(root / name / rel, colour)
            rows.append({"image": rel, "label": label, "dataset_name": name})
    return write_jsonl(root / name / f"{split}.jsonl", rows)


@pytest.fixture(scope="session")
def base_params() -> dict:
    return yaml.safe_load((REPO / "conf/base/parameters.yml").read_text())


@pytest.fixture
def two_datasets(tmp_path) -> dict:
    """Parameters for two small real datasets (3 and 5 classes) written under tmp_path."""
    for name, n in (("alpha", 3), ("beta", 5)):
        make_dataset(tmp_path, name, n, per_class=4, split="train")
        make_dataset(tmp_path, name, n, per_class=4, split="val")
    return {
        "model": {"num_labels": 5},
        "data": {"train_jsonl_list": [str(tmp_path / "alpha/train.jsonl"), str(tmp_path / "beta/train.jsonl")],
                 "val_jsonl_list": [str(tmp_path / "alpha/val.jsonl"), str(tmp_path / "beta/val.jsonl")]},
        "datasets": {"dataset_configs": {"alpha": {"num_classes": 3, "eval_ratio": 0.5},
                                         "beta": {"num_classes": 5, "eval_ratio": 0.25}}},
        "training": {"seed": 7, "shuffle": True},
    }


def with_overrides(params: dict, **sections) -> dict:
    out = copy.deepcopy(params)
    for section, values in sections.items():
        out.setdefault(section, {}).update(values)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from food_multids.model.tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny_qwen2_5_vl")


@pytest.fixture(scope="session", params=["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5"])
def family_model_dir(request, tmp_path_factory) -> Path:
    """A tiny random-weight checkpoint of each backbone family (tests using it run once per family)."""
    from food_multids.model.tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / f"tiny_{request.param}", family_name=request.param)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    from food_multids.data.demo import write_demo

    return write_demo(tmp_path_factory.mktemp("demo") / "demo")


def copy_project(root: Path, demo_root: Path, tiny_model_dir: Path) -> Path:
    """A copy of the Kedro project (conf, notebooks, pyproject) at ROOT with the demo data and tiny model."""
    root.mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", root)
    (root / "src").mkdir()  # the package itself comes from the installed (editable) project
    shutil.copytree(REPO / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf/local").mkdir()
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    shutil.copytree(demo_root, root / "data/01_raw/demo")
    shutil.copytree(tiny_model_dir, root / "data/06_models/tiny_qwen2_5_vl")
    return root


@pytest.fixture
def project_copy(tmp_path, demo_root, tiny_model_dir) -> Path:
    """A throwaway copy of the Kedro project with the demo data and tiny model."""
    return copy_project(tmp_path / "project", demo_root, tiny_model_dir)


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory, demo_root, tiny_model_dir):
    """One `kedro run` (train + full_eval + report) of the demo in a project copy, shared by every test
    that reads what a finished run leaves behind (report, notebook, viz, registry). Tests must not
    change it: one that writes to a project uses its own `project_copy`."""
    root = copy_project(tmp_path_factory.mktemp("trained_demo") / "project", demo_root, tiny_model_dir)
    env = kedro_env()
    proc = kedro(root, "--params", "training.num_train_epochs=2,training.eval_steps=20", env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root, env, proc.stdout + proc.stderr


def latest(root: Path, relative: str) -> Path:
    """The newest version of a versioned catalog file under ROOT (folder RELATIVE/<version>/<name>)."""
    folder = root / relative
    return sorted(folder.iterdir())[-1] / folder.name


@pytest.fixture
def classifier_dir(tiny_model_dir, tmp_path) -> Path:
    """An untrained classifier (digits 10 classes + shapes 40) saved as a training run saves its best model."""
    import torch

    from food_multids.model.classifier import ClassifierMeta, LabelSpace, create_classifier
    from food_multids.model.loading import load_tokenizer

    torch.manual_seed(0)
    meta = ClassifierMeta(num_labels=40, pooling="image_mean",
                          label_spaces={"digits": LabelSpace(0, 10, [str(i) for i in range(10)]),
                                        "shapes": LabelSpace(1, 40)})
    model = create_classifier(tiny_model_dir, meta, "float32", torch.device("cpu"))
    out = tmp_path / "clf"
    model.save_pretrained(out, load_tokenizer(tiny_model_dir),
                          json.loads((tiny_model_dir / "preprocessor_config.json").read_text()))
    return out


@pytest.fixture
def demo_params(base_params, demo_root, tiny_model_dir, tmp_path) -> dict:
    """base parameters on the demo data and the tiny model, writing under tmp_path/out."""
    params = copy.deepcopy(base_params)
    params["model"]["name_or_path"] = str(tiny_model_dir)
    params["data"]["train_jsonl_list"] = [str(demo_root / f"{d}/train.jsonl") for d in ("digits", "shapes")]
    params["data"]["val_jsonl_list"] = [str(demo_root / f"{d}/val.jsonl") for d in ("digits", "shapes")]
    params["training"].update(output_dir=str(tmp_path / "out"), progress_bar="never")
    return params


@pytest.fixture
def small_mount(tmp_path):
    """A real 1 MiB tmpfs (root can mount one); yields a function to mount it with options."""
    mounts = []

    def mount(options: str) -> Path:
        target = tmp_path / f"mnt{len(mounts)}"
        target.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): needs root")
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        subprocess.run(["umount", "-l", str(target)], check=False)


def parameter_feeds(parameters: dict) -> dict:
    """What Kedro's context feeds a run's catalog from the parameters: `parameters` and a `params:a.b` entry
    for every key at every depth, as MemoryDatasets (for pipelines run on an in-memory catalog)."""
    from kedro.io import MemoryDataset

    feeds = {"parameters": MemoryDataset(parameters)}

    def add(prefix: str, value) -> None:
        feeds[f"params:{prefix}"] = MemoryDataset(value)
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{prefix}.{key}", inner)

    for key, value in parameters.items():
        add(key, value)
    return feeds
