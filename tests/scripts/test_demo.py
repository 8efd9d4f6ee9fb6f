"""``make demo``'s command (scripts/demo.sh) at tiny size: secure federated DLRM under mpirun -np 2,
then the privacy report and the printed summary.

demo.sh passes extra ``key=value`` arguments after its own, so only sizes are overridden here (data
rows, clients, rounds, local steps, where the synthetic data is cached); the config, secure mode, DP-SGD
and encryption are the demo's own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from privacy.ledger import PrivacyLedger, ledger_path

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_demo_runs_at_tiny_size(tmp_path):
    logdir = tmp_path / "demo"
    tiny = [
        f"model.preproc.cache_dir={tmp_path / 'data'}",
        "model.preproc.synthetic.rows=3000",
        "model.preproc.synthetic.vocab_size=20",
        "fl.num_workers=6",
        "fl.client_num_per_round=3",
        "fl.rounds=2",
        "fl.local_steps=2",
        # the silo config's batch (1024) would sample most of a tiny silo each step and overrun the
        # config's own epsilon budget: a tiny batch keeps the sampling rate of the real run
        "train.batch_size=16",
    ]
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh"), str(logdir), *tiny],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    auc = float(re.search(r"final test AUC\s*:\s*([0-9.]+)", text).group(1))
    eps = float(re.search(r"epsilon spent\s*:\s*([0-9.]+)", text).group(1))
    assert 0.0 <= auc <= 1.0 and re.search(r"privacy unit\s*:\s*example-level", text)
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["federated"]["executor"] == "mpi" and summary["federated"]["mode"] == "secure"
    assert len(summary["rounds"]) == 2 and summary["federated"]["num_clients"] == 6
    with PrivacyLedger.read(ledger_path(str(logdir))) as ledger:
        assert eps == pytest.approx(max(ledger.epsilons().values()), abs=5e-4)  # printed with 3 decimals
        assert len(ledger.client_spends()) >= sum(r["completed"] for r in summary["rounds"])
    for name in ("privacy_report.html", "privacy_report.md", "privacy_report.json"):
        assert (logdir / name).stat().st_size > 0
