"""train.early_stopping in federated runs: validation per round, stop on patience, the best round's model restored."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import yaml
from fl_helpers import ROOT

from fedrec.config.loader import build_experiment
from fedrec.config.schema import EarlyStoppingConfig
from fedrec.errors import ConfigError
from fedrec.federated.early_stop import check_federated_early_stopping, track
from fedrec.federated.simulation import Simulation


@pytest.fixture(scope="module")
def mf_recon(tmp_path_factory) -> dict:
    """configs/mf_movielens_fl.yml, plain, no user-level DP, Federated Reconstruction, on a small set."""
    data = yaml.safe_load((ROOT / "configs" / "mf_movielens_fl.yml").read_text())
    data["model"]["preproc"]["synthetic"].update({"rows": 4000, "users": 80, "items": 150})
    data["model"]["preproc"]["cache_dir"] = str(tmp_path_factory.mktemp("mf-data"))
    data["train"]["progress"] = False
    data["fl"].update(
        {
            "secure": False,
            "user_dp": None,
            "client_num_per_round": 20,
            "rounds": 6,
            "local_epochs": 1,
            "eval_every": 1,
            "reconstruction": {"method": "ridge", "ridge": 1.0},
        }
    )
    return data


def run(data: dict, logdir) -> dict:
    return Simulation(build_experiment(copy.deepcopy(data)), str(logdir), log=lambda message: None).run()


def with_early_stopping(data: dict, **section) -> dict:
    data = copy.deepcopy(data)
    data["train"]["early_stopping"] = {"metric": "rmse", **section}
    return data


def test_track_finds_the_best_round_and_counts_patience():
    cfg = EarlyStoppingConfig(metric="rmse", patience=2, min_delta=0.01)
    history = [
        {"round": 0, "val": {"rmse": 1.0}, "global_digest": "a"},
        {"round": 1, "val": None, "global_digest": "b"},  # not validated
        {"round": 2, "val": {"rmse": 0.9}, "global_digest": "c"},
        {"round": 3, "val": {"rmse": 0.895}, "global_digest": "d"},  # below min_delta: no improvement
    ]
    tracking = track(cfg, history)
    assert (tracking.best_round, tracking.best_value, tracking.best_digest) == (2, 0.9, "c")
    assert (tracking.validations, tracking.since_best) == (3, 1) and not tracking.should_stop(cfg)
    history.append({"round": 4, "val": {"rmse": float("nan")}, "global_digest": "e"})
    assert track(cfg, history).should_stop(cfg)
    higher = EarlyStoppingConfig(metric="hr@10", patience=1)
    assert track(higher, [{"round": 0, "val": {"hr@10": 0.1}, "global_digest": "a"},
                          {"round": 1, "val": {"hr@10": 0.2}, "global_digest": "b"}]).best_round == 1  # fmt: skip


def test_the_run_stops_on_patience_and_ends_with_the_best_rounds_model(mf_recon, tmp_path):
    # min_delta 10: only the first validation counts as an improvement, so round 0's model is the best
    # and the run stops after `patience` more validations, well before fl.rounds.
    data = with_early_stopping(mf_recon, patience=2, min_delta=10.0)
    final = run(data, tmp_path / "es")
    summary = yaml.safe_load((tmp_path / "es" / "summary.json").read_text())
    history = summary["rounds"]
    assert final["rounds_completed"] == 3 == len(history) < data["fl"]["rounds"]
    es = final["early_stopping"]
    assert es["stopped_early"] and es["restored_best"] and es["best_round"] == 0
    # the final model is round 0's: same digest, same file contents, same validation metrics
    assert final["final_model_digest"] == history[0]["global_digest"] != history[-1]["global_digest"]
    params = np.load(final["final_model"], allow_pickle=False)
    assert hashlib.sha256(params.astype(np.float32).tobytes()).hexdigest() == history[0]["global_digest"]
    assert final["val"] == history[0]["val"] != history[-1]["val"]
    assert np.isfinite(final["test"]["rmse"]) and history[0]["test"] is None  # tested after the restore


def test_without_restore_best_the_last_model_is_tested(mf_recon, tmp_path):
    data = with_early_stopping(mf_recon, patience=1, min_delta=10.0, restore_best=False)
    final = run(data, tmp_path / "last")
    summary = yaml.safe_load((tmp_path / "last" / "summary.json").read_text())
    assert final["rounds_completed"] == 2 and not final["early_stopping"]["restored_best"]
    assert final["final_model_digest"] == summary["rounds"][-1]["global_digest"]
    assert np.isfinite(final["test"]["rmse"])


def test_a_run_that_keeps_improving_runs_every_round(mf_recon, tmp_path):
    data = with_early_stopping(mf_recon, patience=6)
    data["fl"]["rounds"] = 3
    final = run(data, tmp_path / "all")
    assert final["rounds_completed"] == 3 and not final["early_stopping"]["stopped_early"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train": {"early_stopping": {"metric": "auc"}}}, "train.early_stopping.metric"),
        ({"fl": {"reconstruction": None}}, "train.early_stopping.restore_best"),
    ],
)
def test_bad_early_stopping_fails_before_round_0(mf_recon, tmp_path, change, message):
    data = with_early_stopping(mf_recon, patience=2)
    for section, values in change.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(data[section].get(key), dict):
                data[section][key].update(value)
            else:
                data[section][key] = value
    with pytest.raises(ConfigError, match=message):
        run(data, tmp_path / "bad")
    assert not (tmp_path / "bad" / "fl" / "checkpoint.json").exists()


def test_early_stopping_needs_a_validation_split():
    cfg = EarlyStoppingConfig(metric="rmse")
    with pytest.raises(ConfigError, match="no validation split"):
        check_federated_early_stopping(cfg, task="rating", val_rows=0, stored_private_rows=False)
    check_federated_early_stopping(cfg, task="rating", val_rows=10, stored_private_rows=False)
    check_federated_early_stopping(None, task="rating", val_rows=0, stored_private_rows=True)


def test_a_resumed_run_continues_the_patience_count_and_restores_the_same_best(mf_recon, tmp_path):
    data = with_early_stopping(mf_recon, patience=2, min_delta=10.0)
    data["fl"]["rounds"] = 2
    first = run(data, tmp_path / "r")  # 2 validations: best round 0, one without improvement
    assert first["rounds_completed"] == 2 and not first["early_stopping"]["stopped_early"]
    data["fl"]["rounds"] = 6
    final = Simulation(build_experiment(copy.deepcopy(data)), str(tmp_path / "r"), resume=True,
                       log=lambda message: None).run()  # fmt: skip
    assert final["rounds_completed"] == 3 and final["early_stopping"]["stopped_early"]
    assert final["final_model_digest"] == first["final_model_digest"]  # round 0's model both times
    assert final["val"] == first["val"]
