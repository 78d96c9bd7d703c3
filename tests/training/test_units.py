from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from food_multids.config import ProjectConfig
from food_multids.data.sampler import MixingSampler, ShardedEvalSampler, mix_proportions
from food_multids.helpers.metrics import format_eval_lines, format_train_lines, is_improvement, summarize
from food_multids.training import checkpoint as ckpt
from food_multids.training.engine import lr_lambda, resolve_deepspeed_config
from tests.conftest import with_overrides


def test_per_dataset_metrics_and_overall_over_all_samples():
    m = summarize(loss_sum=[2.0, 9.0], correct=[3, 1], count=[4, 6], names=["food101", "food2k"])
    assert m["food101_loss"] == 0.5 and m["food101_accuracy"] == 0.75 and m["food101_samples"] == 4
    assert m["food2k_loss"] == 1.5 and m["food2k_accuracy"] == pytest.approx(1 / 6)
    assert m["overall_loss"] == 1.1 and m["overall_accuracy"] == 0.4 and m["overall_samples"] == 10
    assert m["overall_accuracy"] != (m["food101_accuracy"] + m["food2k_accuracy"]) / 2


def test_a_dataset_absent_from_the_window_is_not_reported_as_zero():
    m = summarize([1.0, 0.0], [1, 0], [2, 0], ["a", "b"])
    assert "b_accuracy" not in m and m["overall_samples"] == 2


def test_the_compact_train_line_holds_every_dataset_in_one_line():
    from food_multids.helpers.metrics import format_train_line

    m = summarize([0.5234 * 1024, 0], [0.8567 * 1024, 0], [1024, 0], ["food101", "food2k"])  # food2k not in the window
    m.update(learning_rate=2e-5, images_per_second=123.45, food101_share=1.0)
    assert format_train_line(m, ["food101", "food2k"], 10, 264) == (
        "📊 TRAIN step 10/264 · food101 loss 0.5234 acc 85.67% · OVERALL acc 85.67% · lr 2e-05 · 123.5 img/s · "
        "mix food101 1.00")


def test_log_lines_use_the_seed_format():
    m = summarize([0.5234 * 1024, 0], [0.8567 * 1024, 0], [1024, 0], ["food101", "food2k"])
    assert format_train_lines(m,
                              ["food101",
                               "food2k"])[0] == "📊 TRAIN - food101: Loss=0.5234, Acc=0.8567 (85.67%), Samples=1024"
    m = summarize([0.5234 * 5050], [0.8567 * 5050], [5050], ["food101"])
    lines = format_eval_lines(m, ["food101"])
    assert lines[0] == "📂 food101:   Loss: 0.5234, Accuracy: 0.8567 (85.67%), Samples: 5,050"
    assert lines[1].startswith("📈 Overall:") and "Samples: 5,050" in lines[1]


@pytest.mark.parametrize("values,greater,best_index",
                         [([0.1, 0.5, 0.3, 0.5], True, 1), ([2.0, 1.0, 1.5, 0.7], False, 3)])
def test_best_tracking_for_max_and_min_metrics(values, greater, best_index):
    best, best_i = None, None
    for i, v in enumerate(values):
        if is_improvement(v, best, greater):
            best, best_i = v, i
    assert best_i == best_index


def fake_checkpoint(root, step, complete=True):
    path = root / "checkpoints" / ckpt.step_tag(step)
    path.mkdir(parents=True)
    (path / "weights").write_text("x")
    if complete:
        ckpt.mark_complete(path, step, {})
    return path


def test_save_total_limit_never_deletes_the_best(tmp_path):
    for step in (10, 20, 30, 40):
        fake_checkpoint(tmp_path, step)
    removed = ckpt.prune_checkpoints(tmp_path, limit=2, keep_step=10)
    assert [p.name for p in removed] == ["step-00000020", "step-00000030"]
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [10, 40]


def test_half_written_checkpoints_are_never_picked(tmp_path):
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20, complete=False)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000010"


def test_best_pointer_moves_atomically(tmp_path):
    for step in (5, 9):
        staged = tmp_path / f".staging-{step}"
        staged.mkdir()
        (staged / "config.json").write_text("{}")
        best = {"step": step, "metric": "m", "value": step}
        final = ckpt.publish_best(tmp_path, staged, step, best, [best])
    assert json.loads((tmp_path / "best.json").read_text())["path"] == str(final)
    assert [p.name for p in (tmp_path / "best").iterdir()] == ["step-00000009"]


def test_the_pointer_lists_the_candidates_and_only_their_folders_remain(tmp_path):
    def publish(step, best, candidates):
        staged = tmp_path / f".staging-{step}"
        staged.mkdir()
        (staged / "config.json").write_text("{}")
        return ckpt.publish_best(tmp_path, staged, step, best, candidates)

    first = {"step": 10, "metric": "m", "value": 0.5}
    publish(10, first, [first])
    second = {"step": 20, "value": 0.6}  # kept beside the best, not the best (within noise)
    publish(20, first, [first, second])
    third = {"step": 30, "value": 0.7}  # pushes step 20 out of a top 2
    publish(30, first, [first, third])
    pointer = json.loads((tmp_path / "best.json").read_text())
    assert pointer["step"] == 10 and pointer["path"].endswith("best/step-00000010")
    assert [(c["step"], Path(c["path"]).name) for c in pointer["candidates"]] == \
        [(10, "step-00000010"), (30, "step-00000030")]
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["step-00000010", "step-00000030"]


def test_warmup_then_cosine_and_linear_decay():
    cos = lr_lambda("cosine", warmup=10, total=110)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0, abs=1e-12)
    lin = lr_lambda("linear", warmup=0, total=100)
    assert lin(25) == pytest.approx(0.75)


def test_deepspeed_config_is_filled_from_training_settings(two_datasets, caplog):
    params = with_overrides(two_datasets, training={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3,
                                                    "max_grad_norm": 0.5})
    params["deepspeed"] = {"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}, "train_batch_size": 7}
    ds = resolve_deepspeed_config(ProjectConfig.from_params(params), world_size=2, dtype=torch.bfloat16)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 24
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "optimizer" not in ds and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert "deepspeed.optimizer is ignored" in caplog.text
    assert ds["bf16"]["check_grad_overflow"] is False  # no per-tensor scan + host sync per bf16 step
    params["deepspeed"]["bf16"] = {"check_grad_overflow": True}
    kept = resolve_deepspeed_config(ProjectConfig.from_params(params), world_size=2, dtype=torch.bfloat16)
    assert kept["bf16"] == {"check_grad_overflow": True, "enabled": True}
    fp32 = resolve_deepspeed_config(ProjectConfig.from_params(params), world_size=2, dtype=torch.float32)
    assert not fp32["bf16"]["enabled"]


def test_a_single_process_run_uses_its_own_zero_stage_and_several_keep_the_configured_one(two_datasets):
    params = with_overrides(two_datasets, training={"single_process_zero_stage": 0})
    params["deepspeed"] = {"zero_optimization": {"stage": 2, "overlap_comm": True}}
    cfg = ProjectConfig.from_params(params)
    assert resolve_deepspeed_config(cfg, world_size=1, dtype=torch.bfloat16)["zero_optimization"] == \
        {"stage": 0, "overlap_comm": True}
    assert resolve_deepspeed_config(cfg, world_size=2, dtype=torch.bfloat16)["zero_optimization"]["stage"] == 2
    params["training"]["single_process_zero_stage"] = None
    ds_config = resolve_deepspeed_config(ProjectConfig.from_params(params), 1, torch.bfloat16)
    assert ds_config["zero_optimization"]["stage"] == 2
    params["training"]["single_process_zero_stage"] = 4
    with pytest.raises(ValueError, match="training.single_process_zero_stage must be 0, 1, 2, 3 or null, got 4"):
        ProjectConfig.from_params(params)


def test_sharded_concat_sampling_covers_each_sample_once_per_epoch():
    ids = np.repeat([0, 1], [37, 64])
    seen = []
    for rank in range(3):
        sampler = MixingSampler(ids, batch_size=4, world_size=3, rank=rank, seed=1)
        seen += [i for batch in sampler for i in batch]
    assert set(seen) == set(range(101))
    assert len(seen) - 101 < 3 * 4  # padding of the last global batch only


def test_resumed_sampler_continues_the_same_sequence():
    ids = np.repeat([0, 1], [50, 30])
    full = MixingSampler(ids, 4, seed=3, strategy="weighted", proportions=np.array([0.5, 0.5]))
    first_epochs = [b for _ in range(2) for b in full]
    resumed = MixingSampler(ids, 4, seed=3, strategy="weighted", proportions=np.array([0.5, 0.5]))
    resumed.set_position(1, 7)
    assert list(resumed) == first_epochs[len(full) + 7:]


@pytest.mark.parametrize("strategy,weights,temperature", [("weighted", [1.0, 3.0], 1.0), ("temperature", None, 2.0)])
def test_mixing_proportions_hold_over_many_batches(strategy, weights, temperature):
    sizes = [4000, 400]
    target = mix_proportions(sizes, strategy, weights, temperature)
    if strategy == "temperature":
        assert target[1] == pytest.approx(np.sqrt(400) / (np.sqrt(4000) + np.sqrt(400)))
    ids = np.repeat([0, 1], sizes)
    sampler = MixingSampler(ids, 16, seed=0, strategy=strategy, proportions=target)
    counts = np.zeros(2)
    for _ in range(3):
        for batch in sampler:
            counts += np.bincount(ids[batch], minlength=2)
    assert counts[1] / counts.sum() == pytest.approx(target[1], abs=0.01)


def test_sharded_eval_gives_equal_batches_and_marks_padding():
    parts = [ShardedEvalSampler(10, 3, world_size=4, rank=r) for r in range(4)]
    assert len({len(p) for p in parts}) == 1
    real = sorted(i for p in parts for b in p for i in b if i >= 0)
    assert real == list(range(10))


def test_fresh_eval_subsets_differ_between_evaluations_and_stay_stratified(two_datasets):
    from food_multids.data.ingest import ingest
    from food_multids.data.tables import partial_eval_subset, stratified_subset, tag_records

    cfg = ProjectConfig.from_params(two_datasets)
    result = ingest(cfg)
    full = tag_records(result.val, cfg.datasets, "val", 0, shuffle=False)
    fixed = stratified_subset(full, cfg.datasets, cfg.training.seed)
    draws = [partial_eval_subset(k, "fresh", fixed, full, cfg.datasets, cfg.training.seed) for k in range(3)]
    assert partial_eval_subset(5, "fixed", fixed, full, cfg.datasets, cfg.training.seed) is fixed
    ids = [sorted(d["sample_id"]) for d in draws]
    assert ids[0] != ids[1] != ids[2]
    for d in draws:
        assert d.groupby("dataset_name", observed=True).size().to_dict() == {"alpha": 6, "beta": 5}
        assert d.loc[d["dataset_name"] == "alpha", "label"].nunique() == 3


def test_a_training_batch_whose_every_image_failed_stops_with_the_way_out():
    from food_multids.training.loop import train_step

    with pytest.raises(RuntimeError, match=r"all 8 images of a training batch failed to load .*resume_from_checkpoint"):
        train_step(None, {"all_failed": True, "skipped": 8}, None, None, None)


def test_a_trainer_takes_its_place_from_the_caller_and_declares_its_parts(two_datasets):
    # Joining the process group is the entry point's (training/run.py, training/worker.py); a Trainer built
    # for rank 1 of 2 is rank 1 of 2 without any group, and its parts exist (empty) before build_run fills them.
    import torch.distributed as dist

    from food_multids.pipelines.data.nodes import run_data_nodes
    from food_multids.runtime.device import Placement
    from food_multids.training.loop import Trainer

    cfg = ProjectConfig.from_params(two_datasets)
    train, _, subset, full = run_data_nodes(two_datasets)
    joined = dist.is_initialized()  # an earlier test of this process may have started one
    trainer = Trainer(cfg, Placement(torch.device("cpu"), 1, 2), train, subset, full)
    assert dist.is_initialized() == joined
    assert (trainer.rank, trainer.world, trainer.is_main) == (1, 2, False)
    assert trainer.engine is None and trainer.train_loader is None and trainer.total_steps == 0
