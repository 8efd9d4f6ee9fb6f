"""fl.user_dp.adaptive_clip in the simulation: the clip moves, the ledger accounts sigma, resume is exact."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from fl_helpers import round_noise

from fedrec.config.loader import build_experiment
from fedrec.errors import ConfigError
from fedrec.federated.simulation import Simulation
from fedrec.federated.user_dp import count_share, privatize
from privacy.accounting.user_level import user_level_epsilon
from privacy.ledger import PrivacyLedger, ledger_path

# The tiny config: 40 clients, 8 per round in expectation (q = 0.2).
Q, CLIENTS, DELTA = 0.2, 40, 0.1 / 40
ADAPTIVE = {"target_quantile": 0.5, "clip_lr": 0.5, "count_noise_multiplier": 2.0, "initial_clip": 5.0}
USER_DP = {"noise_multiplier": 1.0, "clip_norm": 0.5, "adaptive_clip": ADAPTIVE}
SIGMA_DELTA = 1.0 / math.sqrt(1.0 - 1.0 / 16.0)  # (1 - (2 x 2)^-2)^(-1/2)


def run(config: dict, logdir, **kwargs):
    simulation = Simulation(build_experiment(config), str(logdir), log=lambda message: None, **kwargs)
    return simulation, simulation.run()


def rounds_of(logdir) -> list[dict]:
    return json.loads((logdir / "summary.json").read_text())["rounds"]


def test_clients_noise_updates_at_sigma_delta_and_report_a_noised_centred_bit():
    noise = round_noise(update_noise_multiplier=SIGMA_DELTA, count_noise_multiplier=2.0)
    noised, clipped = privatize(np.zeros(200_000, dtype=np.float32), noise, seed=0, client_id=7)
    assert not clipped
    assert np.std(noised) == pytest.approx(SIGMA_DELTA * 3.0 / math.sqrt(4), rel=0.01)  # not sigma's 1.5
    shares = np.array([count_share(noise, clipped=True, seed=0, client_id=c) for c in range(4000)])
    assert np.mean(shares) == pytest.approx(-0.5, abs=0.05) and np.std(shares) == pytest.approx(1.0, rel=0.05)
    unclipped = np.array([count_share(noise, clipped=False, seed=0, client_id=c) for c in range(4000)])
    assert np.allclose(unclipped - shares, 1.0)  # the same share, the bit +1/2 instead of -1/2
    assert count_share(noise, clipped=True, seed=0, client_id=1) == count_share(
        noise, clipped=True, seed=0, client_id=1
    )


def test_clip_moves_each_round_and_the_ledger_accounts_the_effective_sigma(tiny_config, tmp_path):
    _, final = run(tiny_config(user_dp=USER_DP, rounds=4), tmp_path)
    rounds = rounds_of(tmp_path)
    clips = [r["user_dp"]["clip_norm"] for r in rounds]
    assert clips[0] == 5.0  # initial_clip, not clip_norm
    for before, after in itertools.pairwise(rounds):
        assert after["user_dp"]["clip_norm"] == before["user_dp"]["adaptive_clip"]["next_clip_norm"]
    for record in rounds:
        user = record["user_dp"]
        adaptive = user["adaptive_clip"]
        # The geometric update from the released noised fraction.
        assert adaptive["next_clip_norm"] == pytest.approx(
            user["clip_norm"] * math.exp(-0.5 * (adaptive["unclipped_fraction"] - 0.5))
        )
        assert user["noise_multiplier"] == 1.0 and user["update_noise_multiplier"] == pytest.approx(
            SIGMA_DELTA
        )
        # The update's noise is sigma_delta x the round's clip.
        assert user["noise_std_on_mean"] == pytest.approx(
            SIGMA_DELTA * user["clip_norm"] * math.sqrt(user["survivors"] / user["min_survivors"]) / 8.0
        )
    # The clip moves every round (it may come back to an earlier value: a clamped noised fraction of
    # 1 then 0 multiplies it by exp(-0.25) then exp(0.25)).
    assert all(before != after for before, after in itertools.pairwise(clips))
    with PrivacyLedger.read(ledger_path(str(tmp_path))) as ledger:
        records = ledger.rounds()
    last = {rec.round: rec for rec in records}
    assert [last[i].clip_norm for i in range(4)] == clips
    assert all(rec.noise_multiplier == 1.0 for rec in records)  # one Gaussian mechanism at sigma
    expected = user_level_epsilon([(1.0, Q)] * len(records), delta=DELTA, accountant="rdp")
    assert final["user_epsilon"] == pytest.approx(expected, rel=1e-9)


def test_resume_restores_the_clip(tiny_config, tmp_path):
    whole = tmp_path / "whole"
    run(tiny_config(user_dp=USER_DP, rounds=4), whole)
    split = tmp_path / "split"
    run(tiny_config(user_dp=USER_DP, rounds=2), split)
    saved = json.loads((split / "fl" / "checkpoint.json").read_text())["server_state"]["user_dp"]
    assert saved["clip_norm"] == rounds_of(split)[-1]["user_dp"]["adaptive_clip"]["next_clip_norm"]
    run(tiny_config(user_dp=USER_DP, rounds=4), split, resume=True)
    assert [r["user_dp"]["clip_norm"] for r in rounds_of(split)] == [
        r["user_dp"]["clip_norm"] for r in rounds_of(whole)
    ]
    model = "fl/clients/global/round_000004.npy"
    np.testing.assert_array_equal(np.load(split / model), np.load(whole / model))


@pytest.mark.parametrize(
    ("fl", "message"),
    [
        (
            {"user_dp": {**USER_DP, "adaptive_clip": {**ADAPTIVE, "target_quantile": 1.0}}},
            "target_quantile' = 1.0",
        ),
        ({"user_dp": {**USER_DP, "adaptive_clip": {**ADAPTIVE, "clip_lr": 0.0}}}, "clip_lr' = 0.0"),
        (
            {"user_dp": {**USER_DP, "adaptive_clip": {**ADAPTIVE, "initial_clip": -1.0}}},
            "initial_clip' = -1.0",
        ),
        (
            {"user_dp": {**USER_DP, "adaptive_clip": {**ADAPTIVE, "count_noise_multiplier": 0.5}}},
            "2 sigma_b > sigma",
        ),
        # null count noise = expected clients / 20 = 0.4 here: 2 x 0.4 <= sigma = 1
        (
            {"user_dp": {**USER_DP, "adaptive_clip": {"count_noise_multiplier": None}}},
            "expected clients / 20",
        ),
        ({"user_dp": {**USER_DP, "adaptive_clip": {**ADAPTIVE, "quantile": 0.5}}}, "adaptive_clip.quantile"),
        ({"user_dp": USER_DP, "secure": True, "encryption": {"clip": 8.0}}, "adaptive_clip': not supported"),
        ({"user_dp": None, "adaptive_clip": ADAPTIVE}, "unknown config key 'fl.adaptive_clip'"),
    ],
)
def test_bad_adaptive_clip_config_is_a_one_line_error_before_training(tiny_config, tmp_path, fl, message):
    with pytest.raises(ConfigError) as err:
        run(tiny_config(**fl), tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "fl" / "checkpoint.json").exists()
