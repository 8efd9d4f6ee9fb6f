"""fedrec.progress.RoundProgress: one line per round when stderr is not a terminal, a bar with
epsilon on a terminal; and a real federated run under mpirun printing those lines."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedrec.progress import RoundProgress

sys.path.insert(0, str(Path(__file__).resolve().parent / "federated"))
from fl_helpers import MPIRUN, ROOT, data_cache, script_env, tiny_config, write_config  # noqa: F401

RECORD = {
    "round": 2,
    "sampled": 10,
    "completed": 9,
    "train_loss": 0.45213,
    "val": {"auc": 0.70123, "rows": 100},
    "epsilon": 2.3141,
    "round_seconds": 4.21,
}


def test_one_line_per_round_when_not_a_terminal():
    stream = io.StringIO()
    progress = RoundProgress(total=10, initial=2, stream=stream, terminal=False)
    progress.update(RECORD)
    progress.update({**RECORD, "round": 3, "epsilon": None, "user_epsilon": 1.5, "val": None})
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("rounds: round 3/10: clients 9/10, loss 0.4521, val auc 0.7012")
    assert "epsilon 2.31 (example-level, max over clients)" in lines[0] and lines[0].endswith("time 4.2 s")
    assert "round 4/10" in lines[1] and "user epsilon 1.5 (user-level)" in lines[1]
    assert "val auc" not in lines[1]


def test_the_bar_on_a_terminal_shows_epsilon():
    stream = io.StringIO()
    progress = RoundProgress(total=10, stream=stream, terminal=True)
    progress.update(RECORD)
    progress.close()
    text = stream.getvalue()
    assert "3/10" in text and "epsilon=2.31 (example-level" in text and "val auc=0.7012" in text


def test_nothing_when_disabled():
    stream = io.StringIO()
    progress = RoundProgress(total=3, stream=stream, terminal=False, enabled=False)
    progress.update(RECORD)
    progress.close()
    assert stream.getvalue() == ""


@pytest.mark.slow
def test_a_run_under_mpirun_prints_a_line_per_round_and_the_epsilon_spread(tmp_path, tiny_config):  # noqa: F811
    config = tiny_config(rounds=2, secure=True, num_workers=8, client_num_per_round=4, local_steps=2)
    config["train"]["progress"] = True
    path = write_config(tmp_path, config)
    logdir = tmp_path / "run"
    command = [
        str(MPIRUN),
        "-np",
        "2",
        sys.executable,
        "-m",
        "mpi4py.futures",
        str(ROOT / "scripts" / "train_fl.py"),
    ]
    command += ["--config", str(path), "--logdir", str(logdir)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=script_env())
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("rounds: round ")]
    assert [line.split(":")[1].strip() for line in lines] == ["round 1/2", "round 2/2"], done.stderr[-2000:]
    assert all("(example-level, max over clients)" in line and "loss " in line for line in lines)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert f"epsilon {out['epsilon']:.3g} (example-level" in lines[-1]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    spread = {f"privacy/example_epsilon_{s}" for s in ("min", "median", "max")}
    assert spread <= tags
    maxima = [e.value for e in events.Scalars("privacy/example_epsilon_max")]
    minima = [e.value for e in events.Scalars("privacy/example_epsilon_min")]
    assert len(maxima) == 2 and all(lo <= hi for lo, hi in zip(minima, maxima))
