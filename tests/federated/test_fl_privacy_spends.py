"""Secure federated runs through the public Simulation API: every update that leaves a client has a
ledger spend recorded first, the spend holds the steps the client really took, the client budget is
enforced, and the reported epsilon is an independent accountant's epsilon of the ledger's spends.

The references are independent of the code under test: the per-round step counts the trainers
report (summary.json ``local_steps``), the Poisson-epoch rule ``local_epochs * ceil(1 / q)``, and
epsilon from Opacus's RDP analysis functions called directly (tests/reference_accounting.py).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest
from reference_accounting import integer_order_rdp_epsilon, opacus_rdp_epsilon

from fedrec.config.loader import build_experiment
from fedrec.federated.simulation import Simulation, SimulationError
from privacy.ledger import PrivacyLedger, ledger_path

LOCAL_EPOCHS = 2


def secure_config(tiny_config, **privacy):
    config = tiny_config(secure=True, rounds=2, local_epochs=LOCAL_EPOCHS)
    config["privacy"] = {"noise_multiplier": 1.3, "max_grad_norm": 0.7, **privacy}
    return config


def run(config, logdir):
    return Simulation(build_experiment(config), str(logdir), log=lambda message: None).run()


def spends_by_round(logdir):
    with PrivacyLedger.read(ledger_path(str(logdir))) as ledger:
        spends = ledger.client_spends()
        histories = {c: ledger.client_history(c) for c in ledger.clients()}
        delta = ledger.info.delta
    by_round = defaultdict(list)
    for spend in spends:
        by_round[spend.round].append(spend)
    return by_round, histories, delta


def test_spends_hold_the_steps_taken_and_epsilon_is_the_independent_accountants(tiny_config, tmp_path):
    final = run(secure_config(tiny_config), tmp_path)
    rounds = json.loads((tmp_path / "summary.json").read_text())["rounds"]
    by_round, histories, delta = spends_by_round(tmp_path)
    assert sorted(by_round) == [r["round"] for r in rounds] == [0, 1]
    for record in rounds:
        spends = by_round[record["round"]]
        # one spend per update that reached the aggregator, no more (no faults in this run)
        assert not record["failed_attempts"] and len(spends) == record["completed"] == 8
        # the steps recorded are the steps the local trainers report taking ...
        assert sum(s.steps for s in spends) == record["local_steps"]
        for s in spends:
            # ... and the Poisson-epoch rule: local_epochs epochs of ceil(1/q) steps
            assert s.steps == LOCAL_EPOCHS * math.ceil(1.0 / s.sample_rate) > LOCAL_EPOCHS
            assert s.noise_multiplier == 1.3
    independent = {c: opacus_rdp_epsilon(h, delta) for c, h in histories.items()}
    assert final["epsilon"] == pytest.approx(max(independent.values()), rel=1e-9)
    for record in rounds:  # epsilon after each round: the most exposed client so far
        upto = {
            c: opacus_rdp_epsilon([(s.noise_multiplier, s.sample_rate, s.steps) for r in range(record["round"] + 1)
                                   for s in by_round[r] if s.client == c], delta)
            for c in histories
        }  # fmt: skip
        assert record["epsilon"] == pytest.approx(max(upto.values()), rel=1e-9)
    # a from-scratch integer-order RDP bound sits at or just above it (same inputs, fewer orders)
    worst = max(histories, key=independent.get)
    assert final["epsilon"] <= integer_order_rdp_epsilon(histories[worst], delta) <= 1.05 * final["epsilon"]


def test_a_budget_below_one_round_sends_nothing(tiny_config, tmp_path):
    with pytest.raises(SimulationError, match="BudgetExceededError"):
        run(secure_config(tiny_config, epsilon_budget=0.05), tmp_path)
    by_round, _, _ = spends_by_round(tmp_path)
    assert not by_round
    assert not (tmp_path / "fl" / "clients" / "global" / "round_000001.npy").exists()


def test_a_budget_of_one_round_refuses_second_spends(tiny_config, tmp_path):
    """Budget between one and two rounds: clients sampled twice are refused, and send nothing."""
    config = secure_config(tiny_config)
    config["fl"].update(num_workers=12, client_num_per_round=8, min_completion_rate=0.25)
    one_round = run(config, tmp_path / "free")
    _, free_histories, delta = spends_by_round(tmp_path / "free")
    twice = {c for c, h in free_histories.items() if len(h) == 2}
    assert twice  # 8 of 12 per round: some clients take part in both rounds
    budget = max(opacus_rdp_epsilon(h[:1], delta) for h in free_histories.values()) * 1.01
    assert one_round["epsilon"] > budget
    config["privacy"]["epsilon_budget"] = budget
    final = run(config, tmp_path / "budget")
    rounds = json.loads((tmp_path / "budget" / "summary.json").read_text())["rounds"]
    by_round, histories, delta = spends_by_round(tmp_path / "budget")
    assert [len(by_round[r["round"]]) for r in rounds] == [r["completed"] for r in rounds]
    # fl.on_budget_exhausted=stop (the default): round 1 would need clients that cannot pay; the run
    # ends cleanly after round 0, before any of round 1's clients trains or spends
    assert len(rounds) == 1 and not by_round[1] and final["stopped_at_budget"]
    assert final["budget_exhausted"]["clients"] == len(twice)
    assert all(len(h) == 1 for h in histories.values())
    assert final["epsilon"] == pytest.approx(max(opacus_rdp_epsilon(h, delta) for h in histories.values()))
    assert final["epsilon"] <= budget
