"""The federated simulation in one process: outputs, faults as data, retries, input errors, algorithms."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from reference_accounting import opacus_rdp_epsilon

from fedrec import registry
from fedrec.config.loader import build_experiment
from fedrec.errors import ConfigError
from fedrec.federated.algorithms.fed_avg import FedAvgWorker
from fedrec.federated.simulation import Simulation, SimulationError


def run(config: dict, logdir, **kwargs):
    simulation = Simulation(build_experiment(config), str(logdir), log=lambda message: None, **kwargs)
    return simulation, simulation.run()


def final_model(logdir, rounds: int) -> np.ndarray:
    return np.load(os.path.join(logdir, "fl", "clients", "global", f"round_{rounds:06d}.npy"))


def test_plain_run_writes_summary_checkpoint_and_tensorboard(tiny_config, tmp_path):
    _, final = run(tiny_config(), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds:
        assert record["sampled"] == 8 and record["completed"] == 8 and record["dropped"] == 0
        assert record["round_seconds"] > 0 and record["bytes_sent"] > 0 and record["bytes_received"] > 0
        assert np.isfinite(record["train_loss"])
        assert set(record["val"]) >= {"auc", "logloss"}
        assert record["epsilon"] is None
    assert set(rounds[-1]["test"]) >= {"auc", "logloss"} and final["test"] == rounds[-1]["test"]
    federated = summary["federated"]
    assert federated["num_clients"] == 40 and federated["executor"] == "in-process"
    assert federated["partition"]["kind"] == "dirichlet" and federated["partition"]["rows"] > 0
    checkpoint = json.loads((tmp_path / "fl" / "checkpoint.json").read_text())
    assert checkpoint["round_idx"] == 3
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
    # The global model moved, and each round's update came from the clients' training.
    assert not np.array_equal(
        final_model(tmp_path, 3), np.load(str(tmp_path / "fl/clients/global/round_000002.npy"))
    )


def test_failures_are_data_and_short_rounds_are_retried(tiny_config, tmp_path):
    # Of 16 clients, 0..2 raise and 9 sleeps past the timeout. A round needs 6 of its 8 sampled clients;
    # predict from the sampling rule which attempts fail, and check the run did exactly that.
    raising, hanging = {0, 1, 2}, {9}
    config = tiny_config(
        num_workers=16,
        client_timeout=1.0,
        max_round_retries=5,
        faults={"raise_clients": sorted(raising), "hang_clients": sorted(hanging), "hang_seconds": 1.6},
    )
    experiment = build_experiment(config)
    predictor = FedAvgWorker(
        "aggregator", ("aggregator",), config=experiment, in_neighbours=dict.fromkeys(range(16))
    )
    expected = []
    for round_idx in range(3):
        predictor.attempt = 0
        while True:
            sample = set(predictor.sample_neighbours(round_idx, 8))
            if len(sample - raising - hanging) >= 6:
                break
            predictor.attempt += 1
        expected.append((predictor.attempt + 1, sorted(sample & (raising | hanging))))
    assert any(attempts > 1 for attempts, _ in expected), "the seed should exercise a retry"
    assert all(attempts <= 6 for attempts, _ in expected)
    _, final = run(config, tmp_path)
    rounds = json.loads((tmp_path / "summary.json").read_text())["rounds"]
    assert [(r["attempts"], r["dropped_clients"]) for r in rounds] == expected
    for record in rounds:
        for failure in record["failures"]:
            assert (failure["reason"], failure["client"] in raising) in {("error", True), ("timeout", False)}
            if failure["reason"] == "error":
                assert "fault injection" in failure["message"]
        assert len(record["failed_attempts"]) == record["attempts"] - 1
    assert final["rounds_completed"] == 3


def test_a_round_that_never_completes_stops_with_a_clear_error(tiny_config, tmp_path):
    config = tiny_config(max_round_retries=1, faults={"raise_clients": list(range(40))})
    with pytest.raises(SimulationError, match="round 0: too few clients returned in 2 attempts"):
        run(config, tmp_path)
    # The global model was never touched.
    checkpoint = json.loads((tmp_path / "fl" / "checkpoint.json").read_text())
    assert checkpoint["round_idx"] == 0


@pytest.mark.parametrize(
    ("fl", "extra", "message"),
    [
        ({"num_workers": 5000}, {}, "--num_workers 5000: the training split has only"),
        (
            {"num_workers": 4, "client_num_per_round": 6},
            {},
            "client_num_per_round' = 6: above the number of clients",
        ),
        (
            {},
            {"communications": {"gpu_map": {"localhost": [0, 2]}}},
            "asks for 2 processes but the job has one process",
        ),
        ({}, {"communications": {"gpu_map": {"localhost": [0, 0, 0, 1]}}}, "GPU 3 does not exist"),
        ({"algorithm": "fed_avgg"}, {}, "did you mean 'fed_avg'"),
        (
            {"algorithm": "fed_prox", "algorithm_params": {"muu": 1}},
            {},
            "unknown config key 'fl.algorithm_params.muu'",
        ),
    ],
)
def test_bad_input_is_a_one_line_error_before_the_first_round(tiny_config, tmp_path, fl, extra, message):
    config = {**tiny_config(**fl), **extra}
    with pytest.raises(ConfigError) as err:
        run(config, tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "fl" / "checkpoint.json").exists()


def test_resume_checks(tiny_config, tmp_path):
    run(tiny_config(rounds=1), tmp_path)
    with pytest.raises(ConfigError, match="already holds a federated run"):
        run(tiny_config(rounds=1), tmp_path)
    with pytest.raises(ConfigError, match="another config"):
        run(tiny_config(rounds=1, server_lr=0.5), tmp_path, resume=True)
    with pytest.raises(Exception, match="no federated checkpoint"):
        run(tiny_config(), tmp_path / "empty", resume=True)
    # fl.rounds may grow on --resume: the extended run equals a run planned that long from the start.
    run(tiny_config(rounds=2), tmp_path, resume=True)
    run(tiny_config(rounds=2), tmp_path / "fresh")
    assert np.array_equal(final_model(tmp_path, 2), final_model(tmp_path / "fresh", 2))


@registry.load("fl_algo", "_test_uniform_avg")
class UniformAverage(FedAvgWorker):
    """The docs' example: every client counts the same, whatever its size."""

    @dataclass
    class Config:
        weight: float = 1.0

    def client_weight(self, num_examples: int) -> float:
        return float(self.params.weight)


def test_custom_algorithm_and_fedprox_change_the_model(tiny_config, tmp_path):
    for name, fl in (
        ("avg", {}),
        ("uniform", {"algorithm": "_test_uniform_avg"}),
        ("prox", {"algorithm": "fed_prox", "algorithm_params": {"mu": 5.0}}),
    ):
        run(tiny_config(rounds=1, **fl), tmp_path / name)
    start = final_model(tmp_path / "avg", 0)
    avg, uni, prx = (final_model(tmp_path / name, 1) for name in ("avg", "uniform", "prox"))
    assert np.array_equal(start, final_model(tmp_path / "prox", 0))
    assert not np.array_equal(avg, uni) and not np.array_equal(avg, prx)
    # FedProx pulls each client towards the global model: the round moves the model less.
    assert np.linalg.norm(prx - start) < 0.7 * np.linalg.norm(avg - start)
    summary = json.loads((tmp_path / "uniform" / "summary.json").read_text())
    assert summary["config"]["fl"]["algorithm"] == "_test_uniform_avg"


def test_same_seed_same_model_in_one_process(tiny_config, tmp_path):
    run(tiny_config(rounds=2), tmp_path / "a")
    run(tiny_config(rounds=2), tmp_path / "b")
    assert np.array_equal(final_model(tmp_path / "a", 2), final_model(tmp_path / "b", 2))


def test_secure_run_records_spends_and_keeps_the_secret_key_from_the_aggregator(tiny_config, tmp_path):
    from privacy.encryption.context import load_context
    from privacy.ledger import PrivacyLedger, ledger_path

    simulation, final = run(tiny_config(secure=True, rounds=2), tmp_path)
    assert simulation.codec._secret_context is None
    public = (tmp_path / "fl" / "aggregator" / "public.ctx").read_bytes()
    assert not load_context(public, role="public").is_secret
    assert (os.stat(tmp_path / "fl" / "clients" / "keys" / "secret.ctx").st_mode & 0o777) == 0o600
    rounds = json.loads((tmp_path / "summary.json").read_text())["rounds"]
    with PrivacyLedger.read(ledger_path(str(tmp_path))) as ledger:
        spends = ledger.client_spends()
        assert len(spends) == sum(r["completed"] for r in rounds)  # no faults: one spend per update
        assert {s.round for s in spends} == {0, 1}
        histories = [ledger.client_history(c) for c in ledger.clients()]
        delta = ledger.info.delta
    # Independent accountant (Opacus's RDP analysis called directly) over the ledger's spends.
    assert final["epsilon"] == pytest.approx(max(opacus_rdp_epsilon(h, delta) for h in histories), rel=1e-9)
    assert rounds[-1]["aggregate_error_bound"] > 0  # released on the BFV quantum grid


def test_the_docs_write_your_own_algorithm_example_runs(tiny_config, tmp_path, monkeypatch):
    docs = (Path(__file__).resolve().parents[2] / "docs" / "federated.md").read_text()
    start = docs.index("# my_algorithms.py")
    code = docs[start : docs.index("```", start)]
    (tmp_path / "my_algorithms.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tiny_config(
        rounds=1,
        algorithm="fed_avg_uniform",
        import_modules=["my_algorithms"],
        algorithm_params={"size_biased_sampling": True},
    )
    _, final = run(config, tmp_path / "run")
    assert final["rounds_completed"] == 1
    rounds = json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"]
    assert rounds[0]["completed"] == 8
