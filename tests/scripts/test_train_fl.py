"""scripts/train_fl.py as users run it: one process, and for real under ``mpirun -np N -m mpi4py.futures``.

Covers: the same final model with 1 and 2 worker ranks; kill -9 of the whole job, then --resume reaches
the model of an uninterrupted run; a rank that dies or hangs does not leave the job hanging; bad input
stops before the first round with one line and exit status 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "federated"))
from fl_helpers import MPIRUN, ROOT, data_cache, script_env, tiny_config, train_fl, write_config  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

SLOW_CLIENTS = {"hang_clients": [1, 5, 9, 13, 17, 21, 25, 29, 33, 37], "hang_seconds": 0.2}


def final_model(logdir: Path, rounds: int) -> np.ndarray:
    return np.load(logdir / "fl" / "clients" / "global" / f"round_{rounds:06d}.npy")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):  # noqa: F811
    """One uninterrupted in-process run (4 rounds), the model every other run must reproduce."""
    from fl_helpers import TINY_DLRM, _with_cache

    directory = tmp_path_factory.mktemp("reference")
    config = _with_cache(TINY_DLRM, data_cache)
    config["fl"].update(rounds=4, faults=SLOW_CLIENTS)
    path = write_config(directory, config)
    logdir = directory / "run"
    done = train_fl("--config", str(path), "--logdir", str(logdir))
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["rounds"] == 4 and out["mode"] == "plain"
    return path, final_model(logdir, 4)


def test_two_worker_ranks_give_the_same_model_as_one_process(reference, tmp_path):
    path, expected = reference
    done = train_fl("--config", str(path), "--logdir", str(tmp_path / "mpi"), ranks=3)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "mpi" / "summary.json").read_text())
    assert summary["federated"]["executor"] == "mpi" and summary["federated"]["pool_workers"] == 2
    ranks = {record_rank for record_rank in summary["federated"]["rank_peak_rss_mb"]}
    assert ranks == {"1", "2"}  # both worker ranks trained clients
    assert np.array_equal(final_model(tmp_path / "mpi", 4), expected)


def test_kill_9_of_the_whole_job_then_resume_reaches_the_same_model(reference, tmp_path):
    path, expected = reference
    logdir = tmp_path / "killed"
    command = [str(MPIRUN), "-np", "3", sys.executable, "-m", "mpi4py.futures"]
    command += [str(ROOT / "scripts" / "train_fl.py"), "--config", str(path), "--logdir", str(logdir)]
    job = subprocess.Popen(
        command,
        cwd=ROOT,
        env=script_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoint = logdir / "fl" / "checkpoint.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if checkpoint.exists() and json.loads(checkpoint.read_text() or "{}").get("round_idx", 0) >= 2:
                break
            assert job.poll() is None, "the job ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint of round 2 within 120 s")
        time.sleep(0.3)  # into round 2 (clients are slowed down by the fault injection)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
    killed_at = json.loads(checkpoint.read_text())["round_idx"]
    assert killed_at < 4, "killed too late to test a resume"
    resumed = train_fl("--config", str(path), "--logdir", str(logdir), "--resume", ranks=3)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert np.array_equal(final_model(logdir, 4), expected)
    rounds = json.loads((logdir / "summary.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]


def test_a_dying_rank_ends_the_job_instead_of_hanging(tiny_config, tmp_path):  # noqa: F811
    path = write_config(tmp_path, {**tiny_config(faults={"kill_clients": list(range(40)), "rounds": [1]})})
    started = time.monotonic()
    done = train_fl("--config", str(path), "--logdir", str(tmp_path / "run"), ranks=3, timeout=120)
    assert done.returncode != 0
    assert time.monotonic() - started < 90
    # Round 0 was committed before the rank died: --resume would continue from round 1.
    assert json.loads((tmp_path / "run" / "fl" / "checkpoint.json").read_text())["round_idx"] == 1


def test_workers_stuck_past_the_timeout_stop_the_job(tiny_config, tmp_path):  # noqa: F811
    config = tiny_config(client_timeout=1.0, faults={"hang_clients": list(range(40)), "hang_seconds": 3600})
    path = write_config(tmp_path, config)
    started = time.monotonic()
    done = train_fl("--config", str(path), "--logdir", str(tmp_path / "run"), ranks=2, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "pool workers are stuck" in done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "pool workers are stuck" in summary["error"]
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("ranks", [0, 2])
def test_bad_input_is_one_line_and_exit_2(tiny_config, tmp_path, ranks):  # noqa: F811
    config = {**tiny_config(), "communications": {"gpu_map": {"localhost": [3]}}}
    path = write_config(tmp_path, config)
    done = train_fl("--config", str(path), "--logdir", str(tmp_path / "run"), ranks=ranks, timeout=120)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "communications.gpu_map" in errors[0] and "processes" in errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "fl" / "checkpoint.json").exists()


def test_num_workers_flag_and_one_process_run(tiny_config, tmp_path):  # noqa: F811
    path = write_config(tmp_path, tiny_config(rounds=1))
    done = train_fl("--config", str(path), "--logdir", str(tmp_path / "run"), "--num_workers", "5000")
    assert done.returncode == 2 and "--num_workers 5000" in done.stderr
    # key=value overrides may come before or after the flags
    done = train_fl(
        "--config",
        str(path),
        "fl.client_num_per_round=4",
        "--logdir",
        str(tmp_path / "ok"),
        "--num_workers",
        "20",
        "fl.rounds=2",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["federated"]["num_clients"] == 20 and summary["federated"]["executor"] == "in-process"
    assert [r["sampled"] for r in summary["rounds"]] == [4, 4]
