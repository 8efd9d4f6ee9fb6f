"""Budget exhaustion ends a private federated run cleanly (issue 15 item 5).

A secure run whose ``privacy.epsilon_budget`` pays for about one round per client: with
``fl.on_budget_exhausted=stop`` it ends after the last round that completed, exit 0, keeps the model
(summary, checkpoint), and the privacy report lists who ran out and from which round; with
``continue`` it samples among the clients that can still pay. No client ever spends past its budget
and nothing is recorded for an update that was not sent.
"""

from __future__ import annotations

import json
import os

import pytest
from fl_helpers import train_fl, write_config
from reference_accounting import opacus_rdp_epsilon

from fedrec.config.loader import build_experiment
from fedrec.federated.run import RunPaths
from fedrec.federated.simulation import Simulation
from privacy.ledger import PrivacyLedger, ledger_path
from privacy.report.build import build_run_report
from privacy.report.render import run_markdown


def secure(tiny_config, **fl):
    config = tiny_config(secure=True, local_epochs=1, num_workers=12, **fl)
    config["privacy"] = {"noise_multiplier": 1.3, "max_grad_norm": 0.7}
    return config


def run(config, logdir):
    return Simulation(build_experiment(config), str(logdir), log=lambda message: None).run()


@pytest.fixture(scope="module")
def one_round_budget(tmp_path_factory, data_cache):
    """A budget just above every client's one-round epsilon (and below two rounds')."""
    from fl_helpers import TINY_DLRM, _with_cache

    config = _with_cache(TINY_DLRM, data_cache)
    config["fl"].update(secure=True, local_epochs=1, num_workers=12, client_num_per_round=12, rounds=1)
    config["privacy"] = {"noise_multiplier": 1.3, "max_grad_norm": 0.7}
    logdir = tmp_path_factory.mktemp("free")
    run(config, logdir)
    with PrivacyLedger.read(ledger_path(str(logdir))) as ledger:
        delta = ledger.info.delta
        histories = [ledger.client_history(c) for c in ledger.clients()]
    one = max(opacus_rdp_epsilon(h, delta) for h in histories)
    two = min(opacus_rdp_epsilon(h * 2, delta) for h in histories)
    assert one * 1.01 < two
    return one * 1.01


def ledger_facts(logdir):
    with PrivacyLedger.read(ledger_path(str(logdir))) as ledger:
        spends = ledger.client_spends()
        return spends, ledger.exclusions(), ledger.epsilons(), ledger.info.client_epsilon_budget


def test_stop_ends_cleanly_keeps_the_model_and_the_report_names_who_ran_out(
    tiny_config, tmp_path, one_round_budget
):
    config = secure(tiny_config, client_num_per_round=8, rounds=3, min_completion_rate=0.75)
    config["privacy"]["epsilon_budget"] = one_round_budget
    path = write_config(tmp_path, config)
    logdir = tmp_path / "run"
    done = train_fl("--config", str(path), "--logdir", str(logdir), "fl.on_budget_exhausted=stop")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "privacy.epsilon_budget (fl.on_budget_exhausted=stop); stopping after 1 rounds" in done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["rounds"] == 1 and out["stopped_at_budget"] is True
    summary = json.loads((logdir / "summary.json").read_text())
    final = summary["final"]
    assert final["rounds_completed"] == 1 and final["final_model_digest"]
    assert final["budget_exhausted"]["policy"] == "stop" and final["budget_exhausted"]["clients"] >= 1
    assert os.path.exists(RunPaths(str(logdir)).global_model(1))  # the model is kept
    spends, exclusions, epsilons, budget = ledger_facts(logdir)
    # round 0's 8 clients paid; in the abandoned round 1 only clients new to the run paid (sent), and
    # nothing is recorded for the refused ones
    assert len([s for s in spends if s.round == 0]) == 8
    assert len({s.client for s in spends}) == len(spends)
    assert max(epsilons.values()) <= budget
    refused = {e.client for e in exclusions}
    assert refused and all(e.round == 1 and e.reason.startswith("budget") for e in exclusions)
    assert set(final["budget_exhausted"]["first_refused_round"]) == refused
    report = build_run_report(str(logdir))
    text = run_markdown(report, {})
    assert f"clients with no budget left | {len(refused)}" in text
    for client in refused:
        assert f"| {client} | 1 | budget" in text


def test_continue_samples_among_clients_that_can_pay(tiny_config, tmp_path, one_round_budget):
    config = secure(
        tiny_config, client_num_per_round=4, rounds=3, min_completion_rate=1.0, max_round_retries=6
    )
    config["fl"]["on_budget_exhausted"] = "continue"
    config["privacy"]["epsilon_budget"] = one_round_budget
    final = run(config, tmp_path)
    assert final["rounds_completed"] == 3 and not final["stopped_at_budget"]
    spends, exclusions, epsilons, budget = ledger_facts(tmp_path)
    assert len(spends) == 12 and len({s.client for s in spends}) == 12  # each of the 12 paid exactly once
    assert max(epsilons.values()) <= budget
    rounds = json.loads((tmp_path / "summary.json").read_text())["rounds"]
    # the ledger excluded the clients that could not pay before they trained: no attempt was wasted
    assert all(r["attempts"] == 1 and not r["failures"] for r in rounds)
    assert exclusions and len({e.client for e in exclusions}) == final["budget_exhausted"]["clients"]
    assert all(e.reason.startswith("budget") and e.epsilon > budget for e in exclusions)


def test_continue_stops_cleanly_when_too_few_clients_can_pay(tiny_config, tmp_path, one_round_budget):
    config = secure(
        tiny_config, client_num_per_round=4, rounds=5, min_completion_rate=1.0, max_round_retries=6
    )
    config["fl"]["on_budget_exhausted"] = "continue"
    config["privacy"]["epsilon_budget"] = one_round_budget
    final = run(config, tmp_path)
    assert 1 <= final["rounds_completed"] < 5 and final["stopped_at_budget"]
    assert "can still pay" in final["budget_exhausted"]["stopped"]
    spends, _, epsilons, budget = ledger_facts(tmp_path)
    assert max(epsilons.values()) <= budget and len({s.client for s in spends}) == len(spends)
