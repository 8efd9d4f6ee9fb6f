"""User-level DP-FedAvg in the simulation (fl.user_dp): accounting, mpirun, unreleased rounds, budget, errors."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from fl_helpers import round_noise, train_fl, write_config
from reference_accounting import opacus_rdp_epsilon

from fedrec import registry
from fedrec.config.loader import build_experiment
from fedrec.errors import ConfigError, FedrecError
from fedrec.federated.algorithms.fed_avg import FedAvgWorker
from fedrec.federated.simulation import Simulation, SimulationError
from fedrec.federated.user_dp import RoundNoise, poisson_sample, privatize, released_mean
from privacy.accounting.user_level import user_level_epsilon
from privacy.dp.dp_fedavg import min_survivors_for
from privacy.errors import PrivacyError
from privacy.ledger import PrivacyLedger, ledger_path

USER_DP = {"noise_multiplier": 1.0, "clip_norm": 0.5}
# The tiny config: 40 clients, 8 per round in expectation (q = 0.2), min completion rate 0.75.
Q, CLIENTS, DELTA = 0.2, 40, 0.1 / 40


def run(config: dict, logdir, **kwargs):
    simulation = Simulation(build_experiment(config), str(logdir), log=lambda message: None, **kwargs)
    return simulation, simulation.run()


def summary(logdir) -> dict:
    return json.loads((logdir / "summary.json").read_text())


def model_file(logdir, rounds: int):
    return logdir / "fl" / "clients" / "global" / f"round_{rounds:06d}.npy"


def test_privatize_clips_the_whole_update_adds_the_share_and_divides_by_q_n():
    noise = round_noise(noise_multiplier=2.0)
    update = np.full(200_000, 1.0, dtype=np.float32)  # norm 447: clipped to 3
    noised, clipped = privatize(update, noise, seed=0, client_id=7)
    assert clipped and update[0] == 1.0  # the input is not modified
    clipped_value = 3.0 / math.sqrt(update.size)
    assert np.mean(noised) == pytest.approx(clipped_value, abs=5e-3)
    assert np.std(noised) == pytest.approx(2.0 * 3.0 / math.sqrt(4), rel=0.01)  # sigma S / sqrt(k)
    again, _ = privatize(update, noise, seed=0, client_id=7)
    assert np.array_equal(noised, again)  # reproducible per (seed, round, attempt, client)
    other, _ = privatize(update, noise, seed=0, client_id=8)
    assert not np.array_equal(noised, other)
    _, was_clipped = privatize(np.zeros(10, dtype=np.float32), noise, seed=0, client_id=7)
    assert not was_clipped
    # Every client weighs 1: the decoded mean times the total weight is the sum, divided by q N.
    assert np.allclose(released_mean(np.array([2.0, -4.0]), 5.0, noise), [10.0 / 50, -20.0 / 50])
    # Poisson sampling at rate q: every client independently, a count that varies by round.
    counts = [len(poisson_sample(0, r, 0, num_clients=1000, rate=0.1)) for r in range(50)]
    assert 90 < np.mean(counts) < 110 and len(set(counts)) > 5


def test_released_model_is_the_sum_of_privatized_updates_over_q_n(tiny_config, tmp_path, monkeypatch):
    """End to end: the new global model is old + server_lr * (sum of what privatize returned) / (q N).

    Catches an aggregate over unclipped or un-noised updates, clients weighted by their example counts,
    and a division by the realised number of clients instead of the expected q N.
    """
    import fedrec.federated.clients as clients

    sent: dict[tuple[int, int], list[np.ndarray]] = {}
    real = clients.privatize

    def recording(update, noise, *, seed, client_id, weight=1.0):
        assert weight == 1.0  # fl.user_dp.weight_cap null: every user weighs 1
        noised, clipped = real(update, noise, seed=seed, client_id=client_id, weight=weight)
        sent.setdefault((noise.round_idx, noise.attempt), []).append(noised.astype(np.float32))
        return noised, clipped

    monkeypatch.setattr(clients, "privatize", recording)
    config = tiny_config(user_dp={"noise_multiplier": 0.5, "clip_norm": 0.05}, rounds=1)
    run(config, tmp_path)
    record = summary(tmp_path)["rounds"][0]
    updates = sent[(0, record["attempts"] - 1)]
    assert len(updates) == record["completed"] != Q * CLIENTS  # realised count differs from q N here
    before, after = np.load(model_file(tmp_path, 0)), np.load(model_file(tmp_path, 1))
    server_lr = build_experiment(config).fl.server_lr  # type: ignore[union-attr]
    expected = before + server_lr * np.sum(updates, axis=0, dtype=np.float64) / (Q * CLIENTS)
    np.testing.assert_allclose(after, expected, rtol=0, atol=1e-5)
    assert np.abs(after - before).max() > 1e-3  # the round moved the model


def test_privatize_scales_the_clipped_update_by_the_user_weight_before_the_noise():
    noise = round_noise(clip_norm=2.0)
    update = np.linspace(-1.0, 1.0, 1000, dtype=np.float32)  # norm ~18: clipped to 2
    full, clipped = privatize(update, noise, seed=0, client_id=3)
    quarter, clipped_too = privatize(update, noise, seed=0, client_id=3, weight=0.25)
    assert clipped and clipped_too
    # The same noise share; only the clipped update is scaled: full - quarter = 0.75 x clip(update).
    clipped_update = update.astype(np.float64) * (2.0 / np.linalg.norm(update.astype(np.float64)))
    np.testing.assert_allclose(full - quarter, 0.75 * clipped_update, rtol=0, atol=1e-12)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(PrivacyError, match="user weight"):
            privatize(update, noise, seed=0, client_id=3, weight=bad)


def test_weight_cap_weighs_each_user_by_its_capped_example_count(tiny_config, tmp_path, monkeypatch):
    """fl.user_dp.weight_cap: client c adds min(n_c / cap, 1) x its clipped update (McMahan et al.'s
    w-hat), the aggregate is still the plain sum of what privatize returned over q N."""
    import fedrec.federated.clients as clients

    weights: dict[int, float] = {}
    sent: dict[tuple[int, int], list[np.ndarray]] = {}
    real = clients.privatize

    def recording(update, noise, *, seed, client_id, weight=1.0):
        weights[client_id] = weight
        noised, clipped = real(update, noise, seed=seed, client_id=client_id, weight=weight)
        sent.setdefault((noise.round_idx, noise.attempt), []).append(noised.astype(np.float32))
        return noised, clipped

    monkeypatch.setattr(clients, "privatize", recording)
    cap = 128.0
    config = tiny_config(user_dp={"noise_multiplier": 0.5, "clip_norm": 0.05, "weight_cap": cap}, rounds=1)
    simulation, _ = run(config, tmp_path)
    sizes = simulation.partition.sizes()
    assert weights and all(w < 1.0 for w in weights.values())  # clients of 64-65 rows, cap 128
    for client, weight in weights.items():
        assert weight == pytest.approx(min(sizes[client] / cap, 1.0), abs=1e-12)
    record = summary(tmp_path)["rounds"][0]
    updates = sent[(0, record["attempts"] - 1)]
    before, after = np.load(model_file(tmp_path, 0)), np.load(model_file(tmp_path, 1))
    server_lr = build_experiment(config).fl.server_lr  # type: ignore[union-attr]
    expected = before + server_lr * np.sum(updates, axis=0, dtype=np.float64) / (Q * CLIENTS)
    np.testing.assert_allclose(after, expected, rtol=0, atol=1e-5)


def test_secure_mode_samples_clients_with_a_secret_key_and_shares_are_keyed_to_the_run():
    """fl.user_dp.secure_mode: the sample cannot be recomputed from the seed; seeded noise shares differ
    between runs whose configs differ (a sigma sweep must not release noise that cancels)."""
    seeded = poisson_sample(0, 3, 0, num_clients=2000, rate=0.1)
    first = poisson_sample(0, 3, 0, num_clients=2000, rate=0.1, key=os.urandom(32))
    second = poisson_sample(0, 3, 0, num_clients=2000, rate=0.1, key=os.urandom(32))
    assert first != seeded and first != second and 150 < len(first) < 250
    key = os.urandom(32)
    assert poisson_sample(0, 3, 0, num_clients=2000, rate=0.1, key=key) == poisson_sample(
        0, 3, 0, num_clients=2000, rate=0.1, key=key
    )
    counts = [len(poisson_sample(0, r, 0, num_clients=1000, rate=0.1, key=key)) for r in range(40)]
    assert 90 < np.mean(counts) < 110 and len(set(counts)) > 5
    common = dict(
        round_idx=0, attempt=0, clip_norm=1.0, client_sampling_rate=0.1, num_sampled=9, min_survivors=4
    )
    common.update(expected_clients=50.0, secure_mode=False)
    update = np.zeros(1000, dtype=np.float32)
    a, _ = privatize(update, RoundNoise(noise_multiplier=1.0, run_key=11, **common), seed=0, client_id=1)
    b, _ = privatize(update, RoundNoise(noise_multiplier=0.5, run_key=12, **common), seed=0, client_id=1)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.15  # independent shares, not one share scaled


def test_clients_refuse_a_round_without_noise_when_their_config_asks_for_user_dp(tiny_config, tmp_path):
    """A client (and the key holder) follows its own fl.user_dp, not the aggregator's word."""
    from fedrec.federated import clients

    simulation = Simulation(
        build_experiment(tiny_config(user_dp=USER_DP, rounds=1)), str(tmp_path), log=lambda message: None
    )
    simulation.run()
    with pytest.raises(FedrecError, match="without its noise parameters"):
        clients.client_task(simulation.spec, 1, 0, 0, "any-digest", noise=None)


def test_user_level_epsilon_in_summary_matches_the_accountant(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, final = run(tiny_config(user_dp=USER_DP, rounds=3), tmp_path)
    rounds = summary(tmp_path)["rounds"]
    with PrivacyLedger.read(ledger_path(str(tmp_path))) as ledger:
        records = ledger.rounds()
        assert ledger.info.delta == pytest.approx(DELTA) and ledger.info.accountant == "rdp"
        assert ledger.client_spends() == []  # plaintext mode: no example-level DP-SGD
        position = ledger.position()
    assert len(records) == sum(r["attempts"] for r in rounds) >= 3
    for record in records:
        assert (record.noise_multiplier, record.clip_norm, record.client_sampling_rate) == (1.0, 0.5, Q)
        assert record.sampling == "poisson"
        assert record.min_survivors == max(
            1, min_survivors_for(num_sampled=max(1, record.num_sampled), min_completion_rate=0.75)
        )
    # Poisson sampling: the sample sizes are the ledger's, and they vary (8 in expectation).
    last_record = {rec.round: rec for rec in records}
    assert [r["sampled"] for r in rounds] == [last_record[r].num_sampled for r in range(3)]
    assert len({r["sampled"] for r in rounds}) > 1
    expected = user_level_epsilon([(1.0, Q)] * len(records), delta=DELTA, accountant="rdp")
    assert final["user_epsilon"] == pytest.approx(expected, rel=1e-9)
    assert rounds[-1]["user_epsilon"] == pytest.approx(expected, rel=1e-9)
    privacy = summary(tmp_path)["federated"]["privacy"]["user_level"]
    assert privacy["epsilon"] == pytest.approx(expected) and privacy["delta"] == pytest.approx(DELTA)
    assert privacy["expected_clients_per_round"] == pytest.approx(8.0)
    for record in rounds:
        user = record["user_dp"]
        assert user["survivors"] == record["completed"] >= user["min_survivors"]
        assert 0.0 <= user["clipped_fraction"] <= 1.0
        assert user["noise_std_on_mean"] == pytest.approx(
            1.0 * 0.5 * math.sqrt(user["survivors"] / user["min_survivors"]) / 8.0
        )
    assert json.loads((tmp_path / "fl" / "checkpoint.json").read_text())["ledger_position"] == position
    from privacy.report.build import build_run_report

    report = build_run_report(str(tmp_path))  # scripts/privacy_report.py: user level only, said in full
    assert report["user_level"]["epsilon"] == pytest.approx(expected) and report["example_level"] is None
    assert "did this client take part?" in report["statement"]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    logged = [e.value for e in events.Scalars("privacy/user_level_epsilon")]
    assert logged[-1] == pytest.approx(expected, rel=1e-6)
    assert logged == sorted(logged)


@pytest.mark.slow
def test_secure_user_dp_under_mpirun_gives_the_model_of_one_process(tiny_config, tmp_path):
    from privacy.report.build import build_run_report

    config = tiny_config(secure=True, rounds=2, user_dp=USER_DP, encryption={"clip": 4.0})
    path = write_config(tmp_path, config)
    done = train_fl("--config", str(path), "--logdir", str(tmp_path / "mpi"), ranks=2)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["mode"] == "secure" and out["rounds"] == 2 and out["stopped_at_budget"] is False
    run(config, tmp_path / "one")
    assert np.array_equal(np.load(model_file(tmp_path / "mpi", 2)), np.load(model_file(tmp_path / "one", 2)))
    privacy = summary(tmp_path / "mpi")["federated"]["privacy"]
    assert summary(tmp_path / "mpi")["federated"]["executor"] == "mpi"
    with PrivacyLedger.read(ledger_path(str(tmp_path / "mpi"))) as ledger:
        # DP-SGD on each client and DP-FedAvg in one ledger, at one delta.
        assert ledger.client_spends() and len(ledger.rounds()) >= 2
        assert out["user_epsilon"] == pytest.approx(ledger.user_level_epsilon())
        # example-level: an independent accountant (Opacus's RDP analysis) over each client's spends
        histories = [ledger.client_history(c) for c in ledger.clients()]
        independent = max(opacus_rdp_epsilon(h, ledger.info.delta) for h in histories)
        assert out["epsilon"] == pytest.approx(independent, rel=1e-9)
        assert privacy["delta"] == ledger.info.delta == privacy["user_level"]["delta"]
    report = build_run_report(str(tmp_path / "mpi"))
    assert report["user_level"]["epsilon"] == pytest.approx(out["user_epsilon"])
    assert report["headline"]["kind"] == "user-level"


@registry.load("fl_algo", "_test_accept_any_round")
class AcceptAnyRound(FedAvgWorker):
    """A careless algorithm: releases whatever arrived, however few clients returned."""

    def aggregate(self, round_idx, results, failures):
        return results.aggregate


@pytest.mark.parametrize(
    ("algorithm", "message"),
    [("fed_avg", "too few clients returned in 1 attempts"), ("_test_accept_any_round", "not released")],
)
def test_a_round_with_too_few_survivors_is_not_released(tiny_config, tmp_path, algorithm, message):
    config = tiny_config(
        user_dp=USER_DP, algorithm=algorithm, max_round_retries=0, faults={"raise_clients": list(range(40))}
    )
    with pytest.raises(SimulationError, match=message):
        run(config, tmp_path)
    assert json.loads((tmp_path / "fl" / "checkpoint.json").read_text())["round_idx"] == 0
    assert not model_file(tmp_path, 1).exists()  # nothing was decrypted or applied
    with PrivacyLedger.read(ledger_path(str(tmp_path))) as ledger:
        assert len(ledger.rounds()) == 1  # recorded before the clients trained: counted, not released
    assert message in summary(tmp_path)["error"]


def test_budget_refuses_a_plan_above_it_and_stops_at_the_last_affordable_round(tiny_config, tmp_path):
    budget = user_level_epsilon([(1.0, Q)] * 3, delta=DELTA) + 1e-6  # affords exactly 3 rounds
    user_dp = {**USER_DP, "epsilon_budget": budget}
    with pytest.raises(ConfigError, match=r"fl\.user_dp\.epsilon_budget.*reaches user-level epsilon"):
        run(tiny_config(user_dp=user_dp, rounds=4), tmp_path / "refused")
    assert not (tmp_path / "refused" / "fl" / "checkpoint.json").exists()
    logdir = tmp_path / "run"
    run(tiny_config(user_dp=user_dp, rounds=2), logdir)
    # Extended on --resume: the run stops cleanly after the third round, which evaluated the test split.
    _, final = run(tiny_config(user_dp=user_dp, rounds=5), logdir, resume=True)
    assert final["rounds_completed"] == 3 and final["stopped_at_budget"] is True
    assert final["test"] is not None and final["user_epsilon"] <= budget
    with PrivacyLedger.read(ledger_path(str(logdir))) as ledger:
        assert len(ledger.rounds()) == 3 and ledger.info.user_epsilon_budget == budget
        assert (
            json.loads((logdir / "fl" / "checkpoint.json").read_text())["ledger_position"]
            == ledger.position()
        )
    assert summary(logdir)["federated"]["privacy"]["user_level"]["stopped_at_budget"] is True
    # Resuming again spends nothing: no round is affordable.
    _, again = run(tiny_config(user_dp=user_dp, rounds=5), logdir, resume=True)
    assert again["rounds_completed"] == 3
    with PrivacyLedger.read(ledger_path(str(logdir))) as ledger:
        assert len(ledger.rounds()) == 3


@registry.load("fl_algo", "_test_own_sampling")
class OwnSampling(FedAvgWorker):
    def sample_neighbours(self, round_idx, client_num_per_round):
        return list(range(client_num_per_round))


@pytest.mark.parametrize(
    ("fl", "message"),
    [
        ({"user_dp": {"clip_norm": 1.0}}, "exactly one of them"),
        ({"user_dp": {**USER_DP, "target_epsilon": 3.0}}, "exactly one of them"),
        ({"user_dp": {"noise_multiplier": 1.0}}, "'fl.user_dp.clip_norm' is required"),
        ({"user_dp": {**USER_DP, "noise": 1.0}}, "unknown config key 'fl.user_dp.noise'"),
        ({"user_dp": {**USER_DP, "clip_norm": -1.0}}, "'fl.user_dp.clip_norm' = -1.0"),
        (
            {"user_dp": {**USER_DP, "delta": 0.05}},
            "'fl.user_dp.delta' = 0.05: expected below 1/number of clients",
        ),
        ({"user_dp": {**USER_DP, "accountant": "gdp"}}, "'fl.user_dp.accountant' = 'gdp'"),
        ({"user_dp": {**USER_DP, "weight_cap": 0}}, "'fl.user_dp.weight_cap' = 0"),
        ({"user_dp": {**USER_DP, "epsilon_budget": 0.01}}, "below the cost of one round"),
        ({"user_dp": {**USER_DP, "target_epsilon": 1e-9, "noise_multiplier": None}}, "target_epsilon"),
        ({"user_dp": USER_DP, "algorithm": "_test_own_sampling"}, "needs the built-in Poisson sampling"),
        ({"user_dp": USER_DP, "secure": True}, "'fl.encryption.clip' = 1.0: below"),
        ({"user_dp": {**USER_DP, "clip_norm": 2.0}, "secure": True}, "above fl.encryption.clip"),
    ],
)
def test_bad_user_dp_config_is_a_one_line_error_before_the_first_round(tiny_config, tmp_path, fl, message):
    with pytest.raises(ConfigError) as err:
        run(tiny_config(**fl), tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "fl" / "checkpoint.json").exists()


def test_deployment_refuses_user_dp(tiny_config, tmp_path):
    import runpy

    config = tiny_config(secure=True, user_dp=USER_DP)
    path = write_config(tmp_path, config)
    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "deploy_syft.py")
    main = runpy.run_path(script)["main"]
    with pytest.raises(
        ConfigError, match=r"'fl\.user_dp': user-level DP-FedAvg is not supported in deployment"
    ):
        main(["--config", str(path), "--logdir", str(tmp_path / "deploy")])
    assert not (tmp_path / "deploy").exists()  # refused before any datasite or logdir
    from fedrec.deploy.coordinator import Coordinator

    with pytest.raises(ConfigError, match=r"fl\.user_dp"):
        Coordinator(build_experiment(config), str(tmp_path / "c"), [], public_context=b"")
