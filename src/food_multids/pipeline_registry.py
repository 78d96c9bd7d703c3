"""Pipelines: data, train (= data + training + register: the served model logged and registered), full_eval
(= evaluation + report), report, predict (new images through a trained model), __default__ (train + full_eval)."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from food_multids.pipelines import data, full_eval, predict, register, report, train


def register_pipelines() -> dict[str, Pipeline]:
    data_pipe = data.create_pipeline()
    train_pipe = data_pipe + train.create_pipeline() + register.create_pipeline()
    eval_pipe = full_eval.create_pipeline()
    report_pipe = report.create_pipeline()
    return {
        "data": data_pipe,
        "train": train_pipe,
        "full_eval": eval_pipe + report_pipe,
        "report": report_pipe,
        "predict": predict.create_pipeline(),
        "__default__": train_pipe + eval_pipe + report_pipe,
    }
