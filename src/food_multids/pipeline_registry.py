"""Pipelines: data, train (= data + training), full_eval (= evaluation + report), report, __default__."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from food_multids.pipelines import data, train


def register_pipelines() -> dict[str, Pipeline]:
    data_pipe = data.create_pipeline()
    train_pipe = data_pipe + train.create_pipeline()
    return {"data": data_pipe, "train": train_pipe, "__default__": train_pipe}
