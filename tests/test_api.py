"""fedrec.api: central, DP and federated jobs from a config object or mapping, no argparse."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

from fedrec import api
from fedrec.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent / "federated"))
from fl_helpers import TINY_DLRM, data_cache, tiny_config  # noqa: F401


def central(data_cache, **train) -> dict:  # noqa: F811
    config = copy.deepcopy(TINY_DLRM)
    config["model"]["preproc"]["cache_dir"] = str(data_cache)
    config.pop("fl")
    config["train"].update(max_steps=5, **train)
    return config


def test_train_and_train_dp_from_a_mapping(tmp_path, data_cache):  # noqa: F811
    config = central(data_cache)
    privacy = config.pop("privacy")
    result = api.train(config, logdir=str(tmp_path / "c"), overrides=["train.lr=0.05"])
    assert 0.0 <= result.test["auc"] <= 1.0
    summary = json.loads(Path(result.summary_path).read_text())
    assert summary["config"]["train"]["lr"] == 0.05 and summary["test"] == result.test
    with pytest.raises(ConfigError, match="holds a run already"):
        api.train(config, logdir=str(tmp_path / "c"))

    config["privacy"] = privacy
    dp = api.train_dp(api.load_config(config), logdir=str(tmp_path / "dp"))
    assert dp.privacy["epsilon"] > 0 and dp.privacy["noise_multiplier"] == 1.0


def test_seeded_central_dp_warns_on_stdout_like_train_fl(tmp_path, data_cache, capsys):  # noqa: F811
    """issue 14: a central DP run with noise from the config seed prints the WARNING line the federated
    engine prints; privacy.secure_mode (and non-private training) print none."""
    from fedrec.noise_source import CENTRAL_PARTY, SEEDED_SOURCE, seeded_warning

    config = central(data_cache)
    config["privacy"]["secure_mode"] = False
    api.train_dp(config, logdir=str(tmp_path / "seeded"))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING:")]
    assert warnings == [seeded_warning(CENTRAL_PARTY, SEEDED_SOURCE)]
    assert "privacy noise from the config seed" in warnings[0]
    config["privacy"]["secure_mode"] = True
    api.train_dp(config, logdir=str(tmp_path / "csprng"))
    config.pop("privacy")
    api.train(config, logdir=str(tmp_path / "plain"))
    assert "WARNING:" not in capsys.readouterr().out


def test_train_fl_returns_a_per_round_history(tmp_path, tiny_config):  # noqa: F811
    config = tiny_config(rounds=2, eval_every=1)
    result = api.train_fl(config, logdir=str(tmp_path / "fl"))
    assert result.final["rounds_completed"] == 2 and len(result.history) == 2
    aucs = result.history.metric("auc")
    assert [r for r, _ in aucs] == [1, 2] and all(0.0 <= v <= 1.0 for _, v in aucs)
    assert [r for r, _ in result.history.losses()] == [1, 2]
    assert result.history.epsilons() == []  # plain mode spends no privacy budget
    assert Path(result.summary_path).exists()
    with pytest.raises(ConfigError, match="'example' or 'user'"):
        result.history.epsilons("client")
