"""Secure mode (DP-SGD on every client + BFV-encrypted FedAvg) under ``mpirun``, killed with SIGKILL in
the middle of a round, then resumed with ``--resume``: the same model as an uninterrupted run, every
update that reached the aggregator has its spend in the ledger (spends recorded by clients whose
round was lost stay: a crash never lowers the count), and the reported epsilon is an independent
accountant's epsilon of everything the ledger holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fl_helpers import MPIRUN, ROOT, script_env, train_fl, write_config
from reference_accounting import opacus_rdp_epsilon

from privacy.errors import LedgerError
from privacy.ledger import PrivacyLedger, ledger_path

pytestmark = pytest.mark.slow

ROUNDS = 3
SLOW_CLIENTS = {"hang_clients": list(range(1, 40, 3)), "hang_seconds": 0.2}


def final_model(logdir: Path) -> np.ndarray:
    return np.load(logdir / "fl" / "clients" / "global" / f"round_{ROUNDS:06d}.npy")


def ledger_state(logdir: Path):
    with PrivacyLedger.read(ledger_path(str(logdir))) as ledger:
        spends = ledger.client_spends()
        histories = [ledger.client_history(c) for c in ledger.clients()]
        return spends, histories, ledger.info.delta


def spends_of_round(logdir: Path, round_idx: int) -> int:
    try:
        spends, _, _ = ledger_state(logdir)
    except (LedgerError, OSError):  # not created yet
        return 0
    return sum(s.round == round_idx for s in spends)


def test_secure_run_killed_mid_round_resumes_to_the_same_model_with_every_spend(tiny_config, tmp_path):
    config = tiny_config(secure=True, rounds=ROUNDS, faults=SLOW_CLIENTS)
    config["privacy"] = {"noise_multiplier": 1.3, "max_grad_norm": 0.7}
    path = write_config(tmp_path, config)
    reference = train_fl("--config", str(path), "--logdir", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    ref_spends, _, _ = ledger_state(tmp_path / "reference")

    logdir = tmp_path / "killed"
    command = [str(MPIRUN), "-np", "2", sys.executable, "-m", "mpi4py.futures"]
    command += [str(ROOT / "scripts" / "train_fl.py"), "--config", str(path), "--logdir", str(logdir)]
    job = subprocess.Popen(
        command, cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    try:
        # Kill once a client of round 1 has recorded its spend: the round is in flight.
        while spends_of_round(logdir, 1) == 0:
            assert job.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "no spend of round 1 within 180 s"
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
    checkpoint = json.loads((logdir / "fl" / "checkpoint.json").read_text())
    assert checkpoint["round_idx"] == 1, "killed outside round 1"
    before_resume = Counter(s.round for s in ledger_state(logdir)[0])

    resumed = train_fl("--config", str(path), "--logdir", str(logdir), "--resume", ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    out = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert out["mode"] == "secure" and out["rounds"] == ROUNDS
    np.testing.assert_array_equal(final_model(logdir), final_model(tmp_path / "reference"))

    spends, histories, delta = ledger_state(logdir)
    per_round = Counter(s.round for s in spends)
    rounds = json.loads((logdir / "summary.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    for record in rounds:
        assert per_round[record["round"]] >= record["completed"]
    # the spends recorded in the killed attempt of round 1 are kept, on top of the resumed attempt's
    assert per_round[1] >= before_resume[1] + rounds[1]["completed"]
    assert len(spends) > len(ref_spends)
    assert out["epsilon"] == pytest.approx(max(opacus_rdp_epsilon(h, delta) for h in histories), rel=1e-9)
