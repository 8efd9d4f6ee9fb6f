"""DPTrainer resume and budgets against the ledger (issue 14, findings 5 and 6).

Finding 6: a resume without the run's ledger counted only the steps after the checkpoint (14 of 34).
Now the checkpoint records the ledger's position and its DP steps, and a resume refuses a missing,
replaced, rewound or short ledger. Finding 5: accountant gdp printed an epsilon below the tight one and
its budget was not enforced by the ledger; now it is max(GDP, PRV) and the ledger enforces it.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from privacy.accounting.accountants import epsilon_for
from privacy.accounting.user_level import gdp_approximation
from privacy.errors import LedgerError, PrivacyError
from privacy.ledger import PrivacyLedger, ledger_path
from tests.trainers.test_dp_trainer import N, config, make

RATE = 100 / N


def run(logdir, *, max_steps, resume=False, load=None, privacy=None, **kwargs):
    os.makedirs(logdir, exist_ok=True)
    cfg = config(privacy, epochs=2, max_steps=max_steps, checkpoint_every=10)
    trainer = make(cfg, logdir=str(logdir), resume=resume, **kwargs)
    try:
        if resume if load is None else load:
            trainer.load_checkpoint()
        return trainer.fit()
    finally:
        trainer.close()


def test_resume_counts_every_step_and_binds_the_checkpoint(tmp_path):
    run(tmp_path, max_steps=20)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    position = state["dp"]["ledger_position"]
    with PrivacyLedger.read(ledger_path(tmp_path)) as ledger:
        assert position["ledger_id"] == ledger.info.ledger_id
        ledger.check_position(position)
    summary = run(tmp_path, max_steps=34, resume=True)
    truth = epsilon_for(noise_multiplier=0.8, sample_rate=RATE, steps=34, delta=1e-5)
    assert summary["privacy"]["steps"] == 34
    assert summary["privacy"]["epsilon"] == pytest.approx(truth, rel=1e-9)
    assert summary["privacy"]["ledger_position"]["chain_rows"] > position["chain_rows"]


def test_resume_without_the_ledger_is_refused(tmp_path):
    run(tmp_path, max_steps=20)
    os.remove(ledger_path(tmp_path))
    with pytest.raises(PrivacyError, match=r"privacy ledger .* does not"):
        run(tmp_path, max_steps=34, resume=True)
    assert not os.path.exists(ledger_path(tmp_path))  # refused before a new, empty ledger was written


def test_resume_with_another_runs_ledger_is_refused(tmp_path):
    mine, other = tmp_path / "mine", tmp_path / "other"
    run(mine, max_steps=20)
    run(other, max_steps=3)
    shutil.copyfile(ledger_path(other), ledger_path(mine))
    with pytest.raises(Exception, match="another run"):
        run(mine, max_steps=34, resume=True)


def test_resume_with_a_rewound_ledger_is_refused(tmp_path):
    run(tmp_path, max_steps=10)
    backup = tmp_path / "ledger-at-10.sqlite"
    shutil.copyfile(ledger_path(tmp_path), backup)  # closed: the WAL is checkpointed into the file
    run(tmp_path, max_steps=20, resume=True)
    shutil.copyfile(backup, ledger_path(tmp_path))  # restore the older copy: 10 steps forgotten
    with pytest.raises(Exception, match=r"lost records|rewritten"):
        run(tmp_path, max_steps=34, resume=True)


def test_checkpoint_with_more_steps_than_the_ledger_is_refused(tmp_path):
    run(tmp_path, max_steps=20)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    # An old-style checkpoint (no recorded position) whose steps the ledger does not hold.
    state["dp"]["ledger_position"] = None
    state["dp"]["accountant"]["history"] = [[0.8, RATE, 500]]
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(Exception, match="does not cover"):
        run(tmp_path, max_steps=34, resume=True)


def test_checkpoint_written_with_a_ledger_needs_one(tmp_path):
    run(tmp_path, max_steps=10)
    cfg = config(None, epochs=2, max_steps=20, checkpoint_every=10)
    trainer = make(cfg, logdir=str(tmp_path), resume=True, ledger=False)
    with pytest.raises(Exception, match="has no ledger"):
        trainer.load_checkpoint()


def test_gdp_is_never_below_prv_and_its_budget_is_enforced_by_the_ledger(tmp_path):
    # Noise 0.7 with few steps at a high rate: the regime where GDP's approximation under-estimates.
    prv_at_15 = epsilon_for(noise_multiplier=0.7, sample_rate=RATE, steps=15, delta=1e-5, accountant="prv")
    privacy = {"noise_multiplier": 0.7, "accountant": "gdp", "epsilon_budget": prv_at_15}
    cfg = config(privacy, epochs=2, max_steps=40, checkpoint_every=100)
    with pytest.raises(PrivacyError, match="epsilon_budget"):
        make(cfg, logdir=str(tmp_path))  # the 40-step plan is over the tight budget
    # resume=True without a checkpoint: the plan is not refused, the run stops at the budget.
    summary = run(tmp_path / "stops", max_steps=40, resume=True, load=False, privacy=privacy)
    p = summary["privacy"]
    assert p["stopped_at_budget"] and p["steps"] <= 15
    tight = epsilon_for(
        noise_multiplier=0.7, sample_rate=RATE, steps=p["steps"], delta=1e-5, accountant="prv"
    )
    assert p["epsilon"] >= tight and p["epsilon"] <= prv_at_15 + 1e-9
    assert p["gdp_approximation"] == pytest.approx(
        gdp_approximation([(0.7, RATE, p["steps"])], delta=1e-5), rel=1e-12
    )
    with PrivacyLedger.read(ledger_path(tmp_path / "stops")) as ledger:
        assert ledger.info.accountant == "prv" and ledger.info.client_epsilon_budget == prv_at_15
        assert ledger.client_epsilon("central") <= prv_at_15
        with pytest.raises(LedgerError):  # the ledger itself refuses a spend past the budget
            PrivacyLedger.attach(ledger.path).record_client_spend(
                client="central", round=99, noise_multiplier=0.7, sample_rate=RATE, steps=100
            )
    json.dumps(p)


@pytest.mark.parametrize("sigma", [1e-300, 1e-320])
def test_unaccountable_noise_is_refused_before_the_ledger_is_written(tmp_path, sigma):
    """privacy.noise_multiplier=1e-300 gave a ZeroDivisionError traceback after the ledger and checkpoint."""
    cfg = config({"noise_multiplier": sigma}, max_steps=5)
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        make(cfg, logdir=str(tmp_path))
    assert not os.path.exists(ledger_path(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoint.pt")
