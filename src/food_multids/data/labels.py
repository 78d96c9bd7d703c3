"""Per-dataset class names: from `label_name` fields in the rows or a `class_names` file, checked
against each other and against the labels."""

from __future__ import annotations

import json
from collections.abc import Iterable

import pandas as pd

from food_multids.config import DatasetSpec, ProjectConfig
from food_multids.config.paths import resolve_path


class LabelNameError(ValueError):
    pass


def read_class_names(spec: DatasetSpec) -> list[str]:
    """One name per line, or a JSON list; exactly num_classes of them."""
    path = resolve_path(spec.class_names)
    if not path.is_file():
        raise LabelNameError(f"params:datasets.dataset_configs.{spec.name}.class_names: file not found: {path}")
    text = path.read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    names = json.loads(text) if text.lstrip().startswith("[") else lines
    if len(names) != spec.num_classes:
        raise LabelNameError(f"{path}: dataset '{spec.name}' has num_classes {spec.num_classes} but the file lists "
                             f"{len(names)} class names")
    return [str(n) for n in names]


def _row_names(frames: Iterable[pd.DataFrame], spec: DatasetSpec) -> dict[int, str]:
    """label -> label_name from the rows, refusing a label that carries two different names."""
    found: dict[int, str] = {}
    for frame in frames:
        if "label_name" not in frame.columns:
            continue
        named = frame.loc[frame["label_name"].notna().to_numpy(dtype=bool), ["dataset_name", "label", "label_name"]]
        if named.empty:  # the common case without names: no per-row string work at all
            continue
        pairs = named.loc[named["dataset_name"].astype(str) == spec.name, ["label", "label_name"]].drop_duplicates()
        for label, group in pairs.groupby("label")["label_name"]:
            names = sorted(set(map(str, group)))
            if len(names) > 1:
                raise LabelNameError(f"dataset '{spec.name}', label {label}: rows give different label_name values "
                                     f"{names}")
            if found.get(int(label), names[0]) != names[0]:
                raise LabelNameError(f"dataset '{spec.name}', label {label}: label_name '{names[0]}' in one split, "
                                     f"'{found[int(label)]}' in another")
            found[int(label)] = names[0]
    return found


def resolve_label_names(cfg: ProjectConfig, *frames: pd.DataFrame) -> dict[str, list[str] | None]:
    """Names per dataset (None when unknown); raises LabelNameError naming the dataset and label on a mismatch."""
    out: dict[str, list[str] | None] = {}
    for spec in cfg.datasets:
        from_rows = _row_names(frames, spec)
        if spec.class_names:
            names = read_class_names(spec)
            for label, name in sorted(from_rows.items()):
                if names[label] != name:
                    raise LabelNameError(f"dataset '{spec.name}', label {label}: rows say label_name '{name}' but "
                                         f"class_names file says '{names[label]}'")
            out[spec.name] = names
        elif from_rows and len(from_rows) == spec.num_classes:
            out[spec.name] = [from_rows[i] for i in range(spec.num_classes)]
        else:
            out[spec.name] = None
    return out
