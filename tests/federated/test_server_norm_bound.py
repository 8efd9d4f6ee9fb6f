"""Server-side checks where the server can see (issue 14 item 4): plaintext updates above the norm
bound are rejected as 'rejected' failures, logged and counted in the round record, and the model
stays where honest clients take it.

The malicious client is ``fl.faults.scale_clients``: it multiplies what it sends by
``fl.faults.scale_factor`` after any clipping (a client that skips clipping, or boosts its update).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrec.config.loader import build_experiment
from fedrec.errors import ConfigError
from fedrec.federated.simulation import Simulation, SimulationError

BAD = 3


def run(config, logdir):
    lines: list[str] = []
    final = Simulation(build_experiment(config), str(logdir), log=lines.append).run()
    rounds = json.loads((logdir / "summary.json").read_text())["rounds"]
    return final, rounds, lines


def rejected(rounds):
    return [(r["round"], f) for r in rounds for f in r["failures"] if f["reason"] == "rejected"]


def plain(tiny_config, **fl):
    return tiny_config(
        num_workers=10, client_num_per_round=10, rounds=2, min_completion_rate=0.8,
        faults={"scale_clients": [BAD], "scale_factor": 1000.0}, **fl,
    )  # fmt: skip


def test_plaintext_updates_above_max_update_norm_are_rejected_logged_and_counted(tiny_config, tmp_path):
    final, rounds, lines = run(plain(tiny_config, max_update_norm=20.0), tmp_path)
    assert final["rounds_completed"] == 2
    found = rejected(rounds)
    assert [(r, f["client"]) for r, f in found] == [(0, BAD), (1, BAD)]
    assert all("above the server's bound 20" in f["message"] for _, f in found)
    assert [r["rejected"] for r in rounds] == [1, 1] and [r["completed"] for r in rounds] == [9, 9]
    assert sum(f"client {BAD}: update rejected" in line for line in lines) == 2
    # without the bound the boosted update is accepted and wrecks the model (or makes it diverge)
    try:
        _, unbounded, _ = run(plain(tiny_config), tmp_path / "unbounded")
    except SimulationError as err:
        assert "diverged" in str(err)
    else:
        assert rejected(unbounded) == [] and unbounded[0]["completed"] == 10  # the boosted update is in
        assert unbounded[-1]["val"]["logloss"] > 3 * rounds[-1]["val"]["logloss"]


def test_user_dp_in_plaintext_bounds_updates_by_clip_norm_with_room_for_noise(tiny_config, tmp_path):
    config = plain(tiny_config, user_dp={"noise_multiplier": 0.5, "clip_norm": 0.5})
    config["fl"]["min_completion_rate"] = 0.5
    final, rounds, lines = run(config, tmp_path)
    assert final["rounds_completed"] == 2
    assert any(f"client {BAD}: update rejected" in line for line in lines)
    found = rejected(rounds)
    assert found and {f["client"] for _, f in found} == {BAD}
    assert sum(r["rejected"] for r in rounds) == len(found)
    assert all("above the server's bound" in f["message"] for _, f in found)
    # honest clients (clipped to 0.5, plus their noise share) all pass the bound
    assert all(f["client"] == BAD for r in rounds for f in r["failures"])


def test_max_update_norm_in_secure_mode_is_a_config_error(tiny_config):
    config = tiny_config(secure=True, max_update_norm=5.0)
    with pytest.raises(ConfigError, match=r"'fl.max_update_norm' = 5.0: the server cannot see encrypted"):
        build_experiment(config)
    with pytest.raises(ConfigError, match="max_update_norm"):
        build_experiment(tiny_config(max_update_norm=float(np.inf)))
