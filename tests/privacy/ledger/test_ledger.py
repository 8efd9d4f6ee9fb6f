"""Privacy ledger: create/resume, append-only, budgets and exclusions, corrupted and truncated files."""

from __future__ import annotations

import os
import random
import sqlite3

import pytest

from privacy.accounting.user_level import epsilon_from_history
from privacy.errors import LedgerError, PrivacyError
from privacy.ledger import (
    LEDGER_FILENAME,
    SCHEMA_VERSION,
    BudgetExceededError,
    ClientSpend,
    PrivacyLedger,
    ledger_path,
)

SPEND = dict(noise_multiplier=1.1, sample_rate=0.05, steps=40)


@pytest.fixture
def path(tmp_path):
    return ledger_path(tmp_path)


def test_create_sets_wal_full_sync_and_schema(path):
    with PrivacyLedger.open(path, delta=1e-5, accountant="rdp", config={"lr": 0.1}) as ledger:
        assert ledger._con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert ledger._con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert ledger.info.delta == 1e-5 and ledger.info.accountant == "rdp"
        assert ledger.info.config == {"lr": 0.1}
        assert ledger.info.schema_version == SCHEMA_VERSION
        assert [e.kind for e in ledger.events()] == ["start"]
    assert os.path.basename(path) == LEDGER_FILENAME
    leftovers = [name for name in os.listdir(os.path.dirname(path)) if ".creating-" in name]
    assert leftovers == []


def test_spends_are_recorded_and_resume_continues(path):
    with PrivacyLedger.open(path, delta=1e-5) as ledger:
        ledger.record_client_spend(client=3, round=0, **SPEND)
        ledger.record_client_spend(client="b", round=0, **SPEND)
    with PrivacyLedger.open(path, delta=1e-5, config={"resumed": True}) as ledger:
        ledger.record_client_spend(client=3, round=1, **SPEND)
        spends = ledger.client_spends(3)
        assert [(s.client, s.round, s.steps) for s in spends] == [("3", 0, 40), ("3", 1, 40)]
        assert ledger.clients() == ["3", "b"]
        assert [e.kind for e in ledger.events()] == ["start", "resume"]
        assert ledger.events()[1].detail == {"config": {"resumed": True}}
        expected = epsilon_from_history([(1.1, 0.05, 40), (1.1, 0.05, 40)], delta=1e-5)
        assert ledger.client_epsilon(3) == pytest.approx(expected)
        assert ledger.epsilons()["3"] == pytest.approx(expected)
        assert ledger.client_history(3) == [(1.1, 0.05, 40), (1.1, 0.05, 40)]


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(delta=1e-6), "delta"),
        (dict(accountant="prv"), "accountant"),
        (dict(client_epsilon_budget=9.0), "client_epsilon_budget"),
        (dict(run_id="other"), "run_id"),
    ],
)
def test_resume_with_other_run_parameters_is_refused(path, change, key):
    PrivacyLedger.open(path, delta=1e-5, client_epsilon_budget=8.0, run_id="run-1").close()
    params = dict(delta=1e-5, client_epsilon_budget=8.0, run_id="run-1")
    params.update(change)
    with pytest.raises(LedgerError, match=key) as err:
        PrivacyLedger.open(path, **params)
    assert "\n" not in str(err.value) and path in str(err.value)


def test_ledger_is_append_only_even_through_sql(path):
    with PrivacyLedger.open(path, delta=1e-5) as ledger:
        ledger.record_client_spend(client=1, round=0, **SPEND)
    con = sqlite3.connect(path)
    for statement in (
        "UPDATE client_spends SET steps = 1",
        "DELETE FROM client_spends",
        "UPDATE meta SET value = '0.5' WHERE key = 'delta'",
        "DELETE FROM run_events",
    ):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute(statement)
    con.close()
    with PrivacyLedger.read(path) as ledger:
        assert ledger.client_spends()[0].steps == 40


def test_read_only_handle_refuses_writes(path):
    PrivacyLedger.open(path, delta=1e-5).close()
    with PrivacyLedger.read(path) as ledger, pytest.raises(LedgerError, match="read-only"):
        ledger.record_client_spend(client=1, round=0, **SPEND)


@pytest.mark.parametrize(
    "bad",
    [
        dict(noise_multiplier=-1.0),
        dict(sample_rate=0.0),
        dict(sample_rate=1.5),
        dict(steps=0),
        dict(steps=2.5),
        dict(noise_multiplier=float("nan")),
    ],
)
def test_bad_spend_parameters_are_errors(path, bad):
    with PrivacyLedger.open(path, delta=1e-5) as ledger:
        with pytest.raises(PrivacyError):
            ledger.record_client_spend(client=1, round=0, **{**SPEND, **bad})
        assert ledger.client_spends() == []


@pytest.mark.parametrize(
    "bad", [dict(delta=0.0), dict(delta=1.0), dict(accountant="gdp"), dict(accountant="x")]
)
def test_bad_run_parameters_are_errors(path, bad):
    with pytest.raises(PrivacyError):
        PrivacyLedger.open(path, **{"delta": 1e-5, **bad})
    assert not os.path.exists(path)


def test_budget_exclusion_is_recorded_and_enforced(path):
    budget = epsilon_from_history([(1.1, 0.05, 40)] * 3, delta=1e-5) + 1e-9  # exactly three rounds fit
    with PrivacyLedger.open(path, delta=1e-5, client_epsilon_budget=budget) as ledger:
        schedule = []
        for round_index in range(6):
            admitted = ledger.admit_clients(["a", "b"], round=round_index, **SPEND)
            schedule.append(admitted)
            for client in admitted:
                ledger.record_client_spend(client=client, round=round_index, **SPEND)
        assert schedule == [["a", "b"]] * 3 + [[]] * 3
        exclusions = ledger.exclusions()
        assert [(e.client, e.round) for e in exclusions] == [("a", 3), ("b", 3)]  # once each, at round 3
        assert "budget" in exclusions[0].reason and exclusions[0].epsilon > budget
        assert not ledger.can_afford("a", **SPEND)
        assert ledger.remaining_budget("a") == pytest.approx(0.0, abs=1e-6)
        with pytest.raises(BudgetExceededError, match="excluded"):
            ledger.record_client_spend(client="a", round=6, **SPEND)
        # A fresh client that spends past its budget in one go is refused, and nothing is recorded.
        with pytest.raises(BudgetExceededError, match="must not be sent"):
            ledger.record_client_spend(client="c", round=6, noise_multiplier=0.5, sample_rate=0.5, steps=100)
        assert ledger.client_spends("c") == []
        assert ledger.can_afford("d", **SPEND)


def test_batch_record_is_all_or_nothing(path):
    budget = epsilon_from_history([(1.1, 0.05, 40)], delta=1e-5) + 1e-9
    with PrivacyLedger.open(path, delta=1e-5, client_epsilon_budget=budget) as ledger:
        ledger.record_client_spends([ClientSpend("x", 0, 1.1, 0.05, 40)])
        with pytest.raises(BudgetExceededError):
            ledger.record_client_spends(
                [ClientSpend("y", 1, 1.1, 0.05, 40), ClientSpend("x", 1, 1.1, 0.05, 40)]
            )
        assert ledger.client_spends("y") == []


def test_user_level_budget_stops_rounds(path):
    with PrivacyLedger.open(path, delta=1e-5, user_epsilon_budget=2.0) as ledger:
        rounds = 0
        while ledger.can_afford_round(noise_multiplier=2.0, client_sampling_rate=0.1):
            ledger.record_round(
                round=rounds,
                noise_multiplier=2.0,
                clip_norm=1.0,
                client_sampling_rate=0.1,
                num_sampled=10,
                min_survivors=8,
            )
            rounds += 1
        assert 0 < rounds < 1000
        assert ledger.user_level_epsilon() <= 2.0
        with pytest.raises(BudgetExceededError, match="user-level"):
            ledger.record_round(
                round=rounds,
                noise_multiplier=2.0,
                clip_norm=1.0,
                client_sampling_rate=0.1,
                num_sampled=10,
                min_survivors=8,
            )
        assert len(ledger.rounds()) == rounds


def test_missing_ledger_is_an_error(tmp_path):
    with pytest.raises(LedgerError, match="no privacy ledger"):
        PrivacyLedger.read(tmp_path / LEDGER_FILENAME)
    with pytest.raises(LedgerError, match="no privacy ledger"):
        PrivacyLedger.attach(tmp_path / LEDGER_FILENAME)


def _filled(path):
    with PrivacyLedger.open(path, delta=1e-5) as ledger:
        for i in range(300):
            ledger.record_client_spend(client=i % 7, round=i, **SPEND)
    return os.path.getsize(path)


@pytest.mark.parametrize("keep", [0, 50, 100, 0.5])
def test_truncated_ledger_is_one_line_error(path, keep):
    size = _filled(path)
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep) if isinstance(keep, float) else keep)
    for opener in (PrivacyLedger.read, PrivacyLedger.attach, lambda p: PrivacyLedger.open(p, delta=1e-5)):
        with pytest.raises(LedgerError) as err:
            opener(path).close()
        message = str(err.value)
        assert path in message and "\n" not in message


def test_corrupted_pages_are_detected(path):
    size = _filled(path)
    with open(path, "r+b") as fh:  # scribble over the middle of the file, past the header page
        fh.seek(size // 2)
        fh.write(random.Random(0).randbytes(4096))
    with pytest.raises(LedgerError) as err, PrivacyLedger.read(path, full_check=True) as ledger:
        ledger.epsilons()
    assert path in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"not a database at all\n" * 10, b""])
def test_other_files_are_not_ledgers(path, content):
    with open(path, "wb") as fh:
        fh.write(content)
    with pytest.raises(LedgerError, match="privacy ledger"):
        PrivacyLedger.read(path)


def test_plain_sqlite_file_is_not_a_ledger(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match="not a privacy ledger"):
        PrivacyLedger.open(path, delta=1e-5)


def test_newer_schema_is_refused(path):
    PrivacyLedger.open(path, delta=1e-5).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(LedgerError, match="schema version"):
        PrivacyLedger.read(path)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("inf"), float("nan")])
def test_impossible_noise_multiplier_is_refused_on_write(path, sigma):
    with PrivacyLedger.open(path, delta=1e-5) as ledger:
        with pytest.raises(PrivacyError, match="noise_multiplier"):
            ledger.record_client_spend(client=1, round=0, noise_multiplier=sigma, sample_rate=0.1, steps=1)
        assert ledger.client_spends() == []


def test_prv_ledger_matches_prv_accountant(path):
    with PrivacyLedger.open(path, delta=1e-5, accountant="prv") as ledger:
        ledger.record_client_spend(client=1, round=0, noise_multiplier=1.0, sample_rate=0.1, steps=50)
        ledger.record_client_spend(client=1, round=1, noise_multiplier=1.0, sample_rate=0.1, steps=50)
        from opacus.accountants import PRVAccountant

        reference = PRVAccountant()
        reference.history = [(1.0, 0.1, 100)]
        assert ledger.client_epsilon(1) == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)


def test_checkpoint_position_detects_a_ledger_that_lost_rows(path, tmp_path):
    with PrivacyLedger.open(path, delta=1e-5) as ledger:
        ledger.record_client_spend(client=1, round=0, **SPEND)
        early = ledger.position()
        # An older copy of the file, as a careless restore would bring back.
        ledger._con.execute("PRAGMA wal_checkpoint(FULL)")
        backup = tmp_path / "old.sqlite"
        with open(path, "rb") as src, open(backup, "wb") as dst:
            dst.write(src.read())
        ledger.record_client_spend(client=1, round=1, **SPEND)
        later = ledger.position()
        assert {k: later[k] for k in ("client_spends", "rounds", "exclusions")} == {
            "client_spends": 2,
            "rounds": 0,
            "exclusions": 0,
        }
        assert later["ledger_id"] == ledger.info.ledger_id and later["chain_rows"] == 3  # start + 2 spends
        ledger.check_position(early)
        ledger.check_position(later)
    with PrivacyLedger.read(backup) as old, pytest.raises(LedgerError, match="lost records"):
        old.check_position(later)
