"""The audit's ledger attacks (issue 14, finding 3), each now refused by the report and by resume.

A run directory holds the ledger and a summary.json that records the ledger's position (id, chain
length and head), as the trainers write it. Each attack edits the ledger the way the attack run did
(sqlite3 with the triggers dropped, a byte edit, a copied file) and the report, ``--resume``
(``PrivacyLedger.open`` + ``check_position``) and ``scripts/privacy_report.py`` must refuse it rather
than print a lower epsilon.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from privacy.accounting.user_level import epsilon_from_history
from privacy.errors import LedgerError, PrivacyError
from privacy.ledger import PrivacyLedger, ledger_path
from privacy.report.build import build_run_report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DELTA = 1e-5
STEPS = 777_777  # a distinctive 24-bit integer, so the byte edit finds exactly one place
SPEND = dict(noise_multiplier=1.1, sample_rate=0.001)
TABLES = ("meta", "client_spends", "rounds", "exclusions", "run_events", "chain")


def make_run(logdir: str, *, spends: int = 3, run_id: str | None = None) -> dict:
    os.makedirs(logdir, exist_ok=True)
    with PrivacyLedger.open(ledger_path(logdir), delta=DELTA, run_id=run_id) as ledger:
        for index in range(spends):
            ledger.record_client_spend(client="central", round=index, steps=STEPS, **SPEND)
        position = ledger.position()
    with open(os.path.join(logdir, "summary.json"), "w") as fh:
        json.dump({"privacy": {"epsilon": 1.0, "ledger_position": position}}, fh)
    return position


def true_epsilon(spends: int = 3) -> float:
    return epsilon_from_history([(1.1, 0.001, STEPS)] * spends, delta=DELTA)


def sql(logdir: str, *statements: str, drop_triggers: bool = True) -> None:
    con = sqlite3.connect(ledger_path(logdir))
    if drop_triggers:
        for table in TABLES:
            for kind in ("update", "delete"):
                con.execute(f"DROP TRIGGER IF EXISTS {table}_append_only_{kind}")
    for statement in statements:
        con.execute(statement)
    con.commit()
    con.close()


def assert_refused(logdir: str, match: str, *, position: dict | None = None) -> None:
    """The report, a resume and the report script all refuse; nothing prints a (lower) epsilon."""
    with pytest.raises(LedgerError, match=match):
        build_run_report(logdir)
    with (
        pytest.raises(LedgerError, match=match),
        PrivacyLedger.open(ledger_path(logdir), delta=DELTA) as ledger,
    ):
        if position is not None:
            ledger.check_position(position)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "privacy_report.py"), "--logdir", logdir],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "privacy ledger" in proc.stderr
    assert not os.path.exists(os.path.join(logdir, "privacy_report.json"))


def test_untampered_run_reports_and_resumes(tmp_path):
    logdir = str(tmp_path / "run")
    position = make_run(logdir)
    report = build_run_report(logdir)
    assert report["example_level"]["epsilon"]["max"] == pytest.approx(true_epsilon())
    assert report["run"]["chain_head"] == position["chain_head"]
    assert report["run"]["positions_checked"] == [os.path.join(logdir, "summary.json")]
    with PrivacyLedger.open(ledger_path(logdir), delta=DELTA) as ledger:
        ledger.check_position(position)


def test_drop_trigger_and_raise_the_noise_is_refused(tmp_path):
    logdir = str(tmp_path / "run")
    position = make_run(logdir)
    sql(logdir, "UPDATE client_spends SET noise_multiplier = 50")
    assert_refused(logdir, "tampered", position=position)


def test_binary_edit_of_steps_is_refused(tmp_path):
    logdir = str(tmp_path / "run")
    position = make_run(logdir, spends=1)
    path = ledger_path(logdir)
    with open(path, "rb") as fh:
        data = fh.read()
    needle = STEPS.to_bytes(3, "big")
    assert data.count(needle) == 1
    with open(path, "wb") as fh:
        fh.write(data.replace(needle, (7).to_bytes(3, "big")))  # 777777 steps -> 7 steps
    con = sqlite3.connect(path)
    assert con.execute("SELECT steps FROM client_spends").fetchall() == [(7,)]  # the edit took
    con.close()
    assert_refused(logdir, "tampered", position=position)


def test_deleting_and_refilling_rows_is_refused(tmp_path):
    logdir = str(tmp_path / "run")
    position = make_run(logdir)
    sql(
        logdir,
        "DELETE FROM client_spends",
        "INSERT INTO client_spends (client, round, noise_multiplier, sample_rate, steps, recorded_at, writer_pid)"
        " VALUES ('central', 0, 1.1, 0.001, 10, 0, 1)",
    )
    assert_refused(logdir, "tampered", position=position)


def test_rewriting_every_row_and_link_is_caught_by_the_recorded_head(tmp_path):
    """The chain has no secret: an attacker can recompute it. The head a checkpoint/summary recorded catches it."""
    logdir = str(tmp_path / "run")
    position = make_run(logdir)
    sql(logdir, "UPDATE client_spends SET steps = 10")
    con = sqlite3.connect(ledger_path(logdir))
    meta = sorted(con.execute("SELECT key, value FROM meta").fetchall())
    previous = hashlib.sha256(
        b"fedrec-privacy-ledger-chain-v2\0"
        + json.dumps([[k, v] for k, v in meta], separators=(",", ":")).encode()
    ).hexdigest()
    columns = {
        "client_spends": "client, round, noise_multiplier, sample_rate, steps, recorded_at, writer_pid",
        "run_events": "kind, detail, recorded_at, writer_pid",
    }
    for seq, table, row_seq in con.execute("SELECT seq, tbl, row_seq FROM chain ORDER BY seq").fetchall():
        row = con.execute(f"SELECT {columns[table]} FROM {table} WHERE seq = ?", (row_seq,)).fetchone()
        text = json.dumps([table, row_seq, list(row)], separators=(",", ":"))
        previous = hashlib.sha256(previous.encode() + b"\n" + text.encode()).hexdigest()
        con.execute("UPDATE chain SET digest = ? WHERE seq = ?", (previous, seq))
    con.commit()
    con.close()
    with PrivacyLedger.read(ledger_path(logdir)) as ledger:  # internally consistent again
        assert ledger.client_epsilon("central") < true_epsilon()
    assert_refused(logdir, "rewritten or replaced", position=position)


def test_a_ledger_copied_from_another_run_is_refused(tmp_path):
    mine, other = str(tmp_path / "mine"), str(tmp_path / "other")
    position = make_run(mine, spends=3)
    make_run(other, spends=1)  # a cheaper run's ledger, same parameters
    shutil.copyfile(ledger_path(other), ledger_path(mine))
    assert_refused(mine, "another run", position=position)


def test_deleted_tail_rows_are_refused_not_reported_lower(tmp_path):
    logdir = str(tmp_path / "run")
    position = make_run(logdir)
    sql(
        logdir,
        "DELETE FROM client_spends WHERE seq = (SELECT MAX(seq) FROM client_spends)",
        "DELETE FROM chain WHERE seq = (SELECT MAX(seq) FROM chain)",  # keep the chain itself consistent
    )
    with PrivacyLedger.read(ledger_path(logdir)) as ledger:
        assert ledger.client_epsilon("central") < true_epsilon()  # what the old report printed
    assert_refused(logdir, "lost records|rewritten", position=position)


def test_deleted_middle_row_is_refused_by_the_chain_alone(tmp_path):
    logdir = str(tmp_path / "run")
    make_run(logdir)
    os.remove(os.path.join(logdir, "summary.json"))  # no recorded position to help
    sql(logdir, "DELETE FROM client_spends WHERE seq = 2")
    with pytest.raises(LedgerError, match="missing"):
        build_run_report(logdir)


def test_tampered_delta_is_refused(tmp_path):
    logdir = str(tmp_path / "run")
    position = make_run(logdir)
    sql(logdir, "UPDATE meta SET value = '0.5' WHERE key = 'delta'")
    assert_refused(logdir, "tampered", position=position)
    # And a delta that makes the accountant's epsilon negative is an error, never a printed -0.39.
    with pytest.raises(PrivacyError, match="negative"):
        epsilon_from_history([(5.0, 0.001, 10)], delta=0.5)


@pytest.mark.parametrize(
    "column, value",
    [("noise_multiplier", -1.0), ("noise_multiplier", 0.0), ("sample_rate", 2.0), ("steps", -5)],
)
def test_impossible_values_are_refused_on_read(tmp_path, column, value):
    """Rows written around the CHECK constraints (writable_schema) and re-chained are still refused."""
    logdir = str(tmp_path / "run")
    make_run(logdir, spends=1)
    con = sqlite3.connect(ledger_path(logdir))
    con.execute("PRAGMA writable_schema = ON")
    con.execute(
        "UPDATE sqlite_master SET sql = replace(replace(replace(sql, 'CHECK (noise_multiplier > 0)', ''),"
        " 'CHECK (sample_rate > 0 AND sample_rate <= 1)', ''), 'CHECK (steps >= 1)', '')"
        " WHERE name = 'client_spends'"
    )
    con.commit()
    con.close()
    sql(logdir, f"UPDATE client_spends SET {column} = {value}")
    with pytest.raises(LedgerError, match=r"tampered|impossible"):
        build_run_report(logdir)


def test_checkpoint_position_must_match_this_ledger(tmp_path):
    logdir = str(tmp_path / "run")
    position = make_run(logdir)
    with PrivacyLedger.open(ledger_path(logdir), delta=DELTA) as ledger:
        ledger.record_client_spend(client="central", round=9, steps=1, **SPEND)
        ledger.check_position(position)  # a later ledger covers an earlier position
        for bad in (
            {**position, "chain_head": "0" * 64},
            {**position, "chain_rows": position["chain_rows"] + 5},
            {**position, "ledger_id": "f" * 32},
        ):
            with pytest.raises(LedgerError):
                ledger.check_position(bad)
