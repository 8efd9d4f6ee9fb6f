"""BaseTrainer on in-memory planted data: it learns, checkpoints atomically and resumes exactly."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fedrec.config.loader import build_experiment
from fedrec.data.base import ArraySplit, ProcessedData
from fedrec.errors import ConfigError, FedrecError
from fedrec.experiment import build_model
from fedrec.trainers.base_trainer import BaseTrainer

TABLES = [50] * 26


def planted_ctr(n, seed):
    rng = np.random.default_rng(seed)
    dense = rng.random((n, 13), dtype=np.float32)
    sparse = rng.integers(0, 50, size=(n, 26)).astype(np.int32)
    weights = np.random.default_rng(99).normal(size=50)
    logit = 3 * (dense[:, 0] - 0.5) + weights[sparse[:, 0]] + weights[sparse[:, 1]]
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return ArraySplit({"dense": dense, "sparse": sparse, "label": label})


def ctr_data():
    return ProcessedData(
        {"train": planted_ctr(6000, 0), "val": planted_ctr(1000, 1), "test": planted_ctr(1000, 2)},
        {"table_sizes": TABLES},
    )


def config(**train):
    return build_experiment(
        {
            "seed": 3,
            "model": {
                "name": "dlrm",
                "arch_sparse_feature_size": 8,
                "arch_mlp_bot": [13, 16, 8],
                "arch_mlp_top": [8 + 27 * 26 // 2, 16, 1],
                "preproc": {"dataset": "criteo"},
            },
            "train": {"batch_size": 64, "lr": 0.1, "progress": False, "checkpoint_every": 20, **train},
        }
    )


def test_dlrm_learns_planted_signal():
    cfg = config(epochs=3, lr=0.5)
    data = ctr_data()
    trainer = BaseTrainer(build_model(cfg, data.meta, sparse=True), data, cfg)
    summary = trainer.fit()
    assert summary["test"]["auc"] > 0.7
    assert summary["steps"] == 3 * trainer.steps_per_epoch()
    assert summary["train_samples_per_second"] > 0


def test_resume_mid_epoch_matches_uninterrupted(tmp_path):
    data = ctr_data()
    full_cfg = config(max_steps=60)
    full = BaseTrainer(build_model(full_cfg, data.meta), data, full_cfg, logdir=str(tmp_path / "a"))
    os.makedirs(full.logdir)
    full.fit()

    half_cfg = config(max_steps=35)
    first = BaseTrainer(build_model(half_cfg, data.meta), data, half_cfg, logdir=str(tmp_path / "b"))
    os.makedirs(first.logdir)
    first.fit()
    second = BaseTrainer(build_model(full_cfg, data.meta), data, full_cfg, logdir=str(tmp_path / "b"))
    second.load_checkpoint()
    assert second.step == 35
    second.fit()
    for (name, a), (_, b) in zip(full.model.state_dict().items(), second.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_no_temporary_checkpoint_left(tmp_path):
    data = ctr_data()
    cfg = config(max_steps=5)
    trainer = BaseTrainer(build_model(cfg, data.meta), data, cfg, logdir=str(tmp_path))
    trainer.fit()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_resume_without_checkpoint_is_an_error(tmp_path):
    data = ctr_data()
    cfg = config()
    trainer = BaseTrainer(build_model(cfg, data.meta), data, cfg, logdir=str(tmp_path))
    with pytest.raises(FedrecError, match="no checkpoint"):
        trainer.load_checkpoint()


def test_corrupt_checkpoint_is_an_error(tmp_path):
    data = ctr_data()
    cfg = config()
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    trainer = BaseTrainer(build_model(cfg, data.meta), data, cfg, logdir=str(tmp_path))
    with pytest.raises(FedrecError, match="cannot resume"):
        trainer.load_checkpoint()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_matches_cpu_closely():
    data = ctr_data()
    cfg = config(max_steps=30)
    cpu = BaseTrainer(build_model(cfg, data.meta), data, cfg)
    cpu.fit()
    gpu = BaseTrainer(build_model(cfg, data.meta), data, cfg, device="cuda:0")
    summary = gpu.fit()
    assert next(gpu.model.parameters()).is_cuda
    assert summary["test"]["auc"] > 0.5
    for (name, a), (_, b) in zip(cpu.model.state_dict().items(), gpu.model.state_dict().items()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-3, atol=1e-4, msg=name)


def noisy_ratings(n, seed, users=40, items=60):
    """Ratings with no structure beyond a mean: a large model overfits them within a few epochs."""
    rng = np.random.default_rng(seed)
    return ArraySplit(
        {
            "user": rng.integers(0, users, n).astype(np.int32),
            "item": rng.integers(0, items, n).astype(np.int32),
            "label": rng.integers(1, 6, n).astype(np.float32),
        }
    )


def mf_config(**train):
    return build_experiment(
        {
            "seed": 0,
            "model": {
                "name": "mf",
                "embedding_dim": 32,
                "init_std": 0.1,
                "preproc": {"dataset": "movielens"},
            },
            "train": {
                "batch_size": 32,
                "optimizer": "adam",
                "lr": 0.05,
                "epochs": 30,
                "progress": False,
                **train,
            },
        }
    )


def rating_data(val_rows=400):
    meta = {"num_users": 40, "num_items": 60, "global_mean": 3.0, "rating_min": 1.0, "rating_max": 5.0}
    return ProcessedData(
        {"train": noisy_ratings(600, 0), "val": noisy_ratings(val_rows, 1), "test": noisy_ratings(400, 2)},
        meta,
    )


def test_early_stopping_restores_the_best_model():
    cfg = mf_config(early_stopping={"metric": "rmse", "patience": 2})
    data = rating_data()
    trainer = BaseTrainer(build_model(cfg, data.meta), data, cfg)
    summary = trainer.fit()
    stats = summary["early_stopping"]
    assert stats["stopped_early"] and stats["restored_best"]
    # Stopped `patience` validations after the best one, long before the 30 planned epochs.
    assert summary["epochs_completed"] == stats["best_epoch"] + 2 < 30
    last_model_rmse = trainer.last_val_metrics["rmse"]  # the last validation saw the last model
    assert last_model_rmse > stats["best_value"] + 0.01
    # The model the run ends with is the best one, not the last one.
    assert summary["val"]["rmse"] == pytest.approx(stats["best_value"], abs=1e-6)
    assert trainer.evaluate("val")["rmse"] == pytest.approx(stats["best_value"], abs=1e-6)


def test_without_early_stopping_the_last_model_is_kept():
    cfg = mf_config(epochs=6)
    data = rating_data()
    trainer = BaseTrainer(build_model(cfg, data.meta), data, cfg)
    summary = trainer.fit()
    assert "early_stopping" not in summary and summary["epochs_completed"] == 6
    assert summary["val"]["rmse"] == pytest.approx(trainer.last_val_metrics["rmse"], abs=1e-6)


def test_early_stopping_without_validation_split_is_an_error_before_training():
    cfg = mf_config(early_stopping={"metric": "rmse", "patience": 2})
    data = rating_data(val_rows=0)
    model = build_model(cfg, data.meta)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"train\.early_stopping.*no validation split"):
        BaseTrainer(model, data, cfg)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, before[name])  # nothing trained


def test_early_stopping_null_means_off():
    # A config written back out (config_to_dict) says early_stopping: null; it must stay off.
    assert mf_config(early_stopping=None).train.early_stopping is None
    assert mf_config().train.early_stopping is None
    with pytest.raises(ConfigError, match=r"train\.early_stopping\.metric' is required"):
        mf_config(early_stopping={"patience": 2})


def test_early_stopping_metric_must_be_one_the_task_reports():
    cfg = mf_config(early_stopping={"metric": "auc"})
    data = rating_data()
    with pytest.raises(ConfigError, match=r"train\.early_stopping\.metric.*rmse"):
        BaseTrainer(build_model(cfg, data.meta), data, cfg)
    with pytest.raises(ConfigError, match=r"train\.early_stopping\.metric"):
        mf_config(early_stopping={"metric": "f1"})


def test_early_stopping_state_survives_a_checkpoint(tmp_path):
    cfg = mf_config(early_stopping={"metric": "rmse", "patience": 2})
    data = rating_data()
    full = BaseTrainer(build_model(cfg, data.meta), data, cfg)
    full_summary = full.fit()
    # Interrupted one epoch after the best: the checkpoint's last model differs from the best one.
    stop = (full_summary["early_stopping"]["best_epoch"] + 1) * full.steps_per_epoch()
    part_cfg = mf_config(early_stopping={"metric": "rmse", "patience": 2}, max_steps=stop)
    first = BaseTrainer(build_model(part_cfg, data.meta), data, part_cfg, logdir=str(tmp_path))
    first.fit()
    second = BaseTrainer(build_model(cfg, data.meta), data, cfg, logdir=str(tmp_path))
    second.load_checkpoint()
    summary = second.fit()
    assert summary["early_stopping"] == full_summary["early_stopping"]
    assert summary["val"]["rmse"] == pytest.approx(full_summary["val"]["rmse"], abs=1e-6)


def test_embedding_lr_steps_the_tables_at_their_own_rate():
    """train.embedding_lr: one SGD step moves the embedding rows by embedding_lr x grad and every other
    parameter by lr x grad (hand-computed from the same gradients)."""
    data = ctr_data()
    cfg = config(lr=0.1, embedding_lr=2.5)
    model = build_model(cfg, data.meta)
    trainer = BaseTrainer(model, data, cfg)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.1, 2.5]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = {k: torch.from_numpy(np.asarray(v[:64])) for k, v in data.split("train").arrays.items()}
    loss = model.loss(model({"dense": batch["dense"], "sparse": batch["sparse"]}), batch["label"])
    grads = dict(zip(before, torch.autograd.grad(loss, list(model.parameters()))))
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    trainer.optimizer.step()
    for name, p in model.named_parameters():
        rate = 2.5 if name == "sparse_arch.embedding.weight" else 0.1
        torch.testing.assert_close(p.detach(), before[name] - rate * grads[name])
    assert grads["sparse_arch.embedding.weight"].abs().sum() > 0


def test_embedding_lr_null_is_one_group_and_bad_values_are_errors():
    data = ctr_data()
    cfg = config(lr=0.1)
    trainer = BaseTrainer(build_model(cfg, data.meta), data, cfg)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.1]
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match=r"train\.embedding_lr"):
            config(embedding_lr=bad)
