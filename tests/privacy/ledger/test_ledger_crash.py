"""Crash safety and multi-process use of the privacy ledger, with real processes and ``kill -9``.

The crash test runs a client loop that records a spend, then "sends" (appends a line to a shadow
file and fsyncs it), kills it with SIGKILL at random moments several times, resumes it, and checks
that for every client the ledger counts at least as many spends as updates that left, and at most
one more per crash (the one in flight).
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from privacy.ledger import PrivacyLedger, ledger_path

ROOT = Path(__file__).resolve().parents[3]
CLIENTS = 5

_CLIENT_LOOP = f"""
import os, sys
from privacy.ledger import PrivacyLedger
path, shadow = sys.argv[1], sys.argv[2]
ledger = PrivacyLedger.open(path, delta=1e-5, config={{"test": "crash"}})
i = len(ledger.client_spends())
fd = os.open(shadow, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
print("ready", flush=True)
while True:
    client = i % {CLIENTS}
    ledger.record_client_spend(client=client, round=i, noise_multiplier=1.0, sample_rate=0.01, steps=1)
    os.write(fd, str(client).encode() + b"\\n")  # the update leaves only after the spend is committed
    os.fsync(fd)
    i += 1
"""

_WRITER = """
import sys, time
from privacy.ledger import PrivacyLedger
path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
ledger = PrivacyLedger.attach(path)
print("ready", flush=True)
sys.stdin.readline()  # start together
start = time.time()
for i in range(count):
    ledger.record_client_spend(client=f"{name}-{i % 3}", round=i, noise_multiplier=1.0, sample_rate=0.01, steps=1)
print(start, time.time(), flush=True)
ledger.close()
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _shadow_counts(shadow: Path) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    if shadow.exists():
        for line in shadow.read_bytes().split(b"\n"):
            if line.strip():
                counts[line.decode()] += 1
    return counts


def test_kill_9_never_leaves_the_ledger_under_counting(tmp_path):
    path, shadow = ledger_path(tmp_path), tmp_path / "sent.txt"
    rng = random.Random(1234)
    kills = 6
    for _ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CLIENT_LOOP, path, str(shadow)],
            stdout=subprocess.PIPE,
            env=_env(),
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL

    with PrivacyLedger.read(path, full_check=True) as ledger:
        recorded = collections.Counter(spend.client for spend in ledger.client_spends())
        assert [e.kind for e in ledger.events()] == ["start"] + ["resume"] * (kills - 1)
    sent = _shadow_counts(shadow)
    assert sum(sent.values()) > 20, "the loop should have sent something between kills"
    for client in map(str, range(CLIENTS)):
        assert recorded[client] >= sent[client], (
            f"client {client}: ledger {recorded[client]} < sent {sent[client]}"
        )
    # Each crash can leave at most one spend recorded whose update never left.
    assert 0 <= sum(recorded.values()) - sum(sent.values()) <= kills


def test_two_processes_write_one_ledger(tmp_path):
    path = ledger_path(tmp_path)
    PrivacyLedger.open(path, delta=1e-5).close()
    count = 150
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, path, name, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_env(),
            text=True,
        )
        for name in ("w1", "w2")
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    windows = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        windows.append([float(x) for x in out.split()])
    # Both processes were writing at the same time (SQLite serialises their transactions).
    assert max(w[0] for w in windows) < min(w[1] for w in windows)
    with PrivacyLedger.read(path, full_check=True) as ledger:
        spends = ledger.client_spends()
        assert len(spends) == 2 * count
        assert len({s.seq for s in spends}) == 2 * count
        by_writer = collections.Counter(s.client.split("-")[0] for s in spends)
        assert by_writer == {"w1": count, "w2": count}


def test_concurrent_creators_share_one_ledger(tmp_path):
    """Two processes opening a new ledger at once: one creates it, the other resumes it."""
    path = ledger_path(tmp_path)
    code = (
        "import sys\nfrom privacy.ledger import PrivacyLedger\n"
        "l = PrivacyLedger.open(sys.argv[1], delta=1e-5)\n"
        "l.record_client_spend(client=sys.argv[2], round=0, noise_multiplier=1.0, sample_rate=0.1, steps=1)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, path, name], env=_env()) for name in ("p", "q")]
    assert [proc.wait(timeout=60) for proc in procs] == [0, 0]
    with PrivacyLedger.read(path) as ledger:
        assert sorted(s.client for s in ledger.client_spends()) == ["p", "q"]
        assert sorted(e.kind for e in ledger.events()) == ["resume", "start"]
