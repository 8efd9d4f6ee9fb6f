"""Hostfiles and ``scripts/launch_fl.py``: hosts checked before anything starts, 3 ranks over a hostfile.

The 3-rank run goes through the real hydra ``mpirun`` of the venv's MPICH (``-f HOSTFILE``, the command
a multi-host run uses), on this machine, and must give the model and test metrics of the in-process run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fl_helpers import ROOT, script_env, train_fl

from fedrec.errors import ConfigError
from fedrec.federated import hosts
from fedrec.federated.hosts import check_hosts, check_reachable, is_local, local_addresses, parse_hostfile

LAUNCH = ROOT / "scripts" / "launch_fl.py"


def launch(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(LAUNCH), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env=script_env(),
    )  # fmt: skip


def hostfile(tmp_path: Path, text: str) -> str:
    path = tmp_path / "hosts"
    path.write_text(text)
    return str(path)


def test_hostfile_lines_counts_and_comments(tmp_path):
    path = hostfile(tmp_path, "# cluster\nnode1:4\n\n  node2   # no count: one rank\n10.0.0.7:2 ifhn=eth1\n")
    entries = parse_hostfile(path)
    assert [(e.name, e.processes, e.line) for e in entries] == [
        ("node1", 4, 2),
        ("node2", 1, 4),
        ("10.0.0.7", 2, 5),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("node1:0\n", r"line 1: 'node1:0': the process count after ':' must be a positive integer"),
        ("node1\nnode2:x\n", r"line 2: 'node2:x'"),
        (":3\n", r"line 1: ':3' names no host"),
        ("# nothing\n\n", r"names no host \(expected lines like 'node1:2'\)"),
    ],
)
def test_a_malformed_hostfile_is_one_line_naming_the_line(tmp_path, text, message):
    path = hostfile(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as caught:
        parse_hostfile(path)
    assert path in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="cannot read it"):
        parse_hostfile(str(tmp_path / "missing"))


def test_this_machine_is_local_under_every_name():
    own = local_addresses()
    for name in ("localhost", "127.0.0.1", socket.gethostname()):
        assert is_local(name, sorted({i[4][0] for i in socket.getaddrinfo(name, None)}), own)
    assert not is_local("node9", ["192.0.2.1"], own)


def test_reachability_is_a_real_tcp_connection():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert check_reachable("127.0.0.1", port, 2.0) is None
    assert check_reachable("127.0.0.1", port, 2.0) is not None  # closed now: refused


def test_an_unresolvable_host_fails_naming_file_line_and_host(tmp_path):
    path = hostfile(tmp_path, "localhost:1\nno-such-node.invalid:2\n")
    with pytest.raises(ConfigError, match=r"line 2: host 'no-such-node.invalid' does not resolve"):
        check_hosts(path, parse_hostfile(path))
    local = hostfile(tmp_path, "localhost:2\n127.0.0.1\n")
    assert check_hosts(local, parse_hostfile(local)) == []  # this machine: no ssh needed


def test_an_unreachable_host_fails_within_the_timeout(tmp_path, monkeypatch):
    # A port that was just opened and closed on loopback refuses for certain; the host is treated as
    # remote so that check_hosts tries it (no outside network is involved whatever the sandbox does).
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    monkeypatch.setattr(hosts, "is_local", lambda name, addresses, own: name == "localhost")
    path = hostfile(tmp_path, "localhost:1\n127.0.0.1:2\n")
    started = time.monotonic()
    with pytest.raises(
        ConfigError, match=rf"line 2: host '127.0.0.1' \(127.0.0.1\) is not reachable on port {port}"
    ):
        check_hosts(path, parse_hostfile(path), port=port, timeout=1.0)
    assert time.monotonic() - started < 5.0


@pytest.mark.slow
def test_launcher_refuses_an_unreachable_hostfile_before_anything_starts(tmp_path):
    path = hostfile(tmp_path, "localhost:1\nno-such-node.invalid:2\n")
    logdir = tmp_path / "run"
    done = launch(
        "--hostfile", path, "--", "--config", "configs/mf_movielens_fl.yml", "--logdir", str(logdir)
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    expected = f"launch_fl.py: error: hostfile {path} line 2: host 'no-such-node.invalid' does not resolve ("
    assert len(lines) == 1 and lines[0].startswith(expected), done.stderr
    assert not logdir.exists()  # train_fl.py never ran
    single = launch("--hostfile", hostfile(tmp_path, "localhost:1\n"), "--", "--config", "x", "--logdir", "y")
    assert single.returncode == 2 and "-np 1: a federated job needs at least 2 ranks" in single.stderr


@pytest.fixture(scope="module")
def tiny_mf(tmp_path_factory) -> Path:
    """configs/mf_movielens_fl.yml (stored user rows, plaintext user-level DP) on 80 users."""
    data = yaml.safe_load((ROOT / "configs" / "mf_movielens_fl.yml").read_text())
    directory = tmp_path_factory.mktemp("tiny-mf")
    data["model"]["preproc"]["synthetic"].update({"rows": 4000, "users": 80, "items": 150})
    data["model"]["preproc"]["cache_dir"] = str(directory / "data")
    data["train"]["progress"] = False
    data["fl"].update(
        {"secure": False, "client_num_per_round": 10, "rounds": 3, "local_epochs": 1, "eval_every": 3}
    )
    data["fl"]["user_dp"].update({"epsilon_budget": None, "delta": 1e-3})
    path = directory / "mf.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.slow
def test_three_ranks_over_a_hostfile_give_the_model_of_one_process(tiny_mf, tmp_path):
    reference = train_fl("--config", str(tiny_mf), "--logdir", str(tmp_path / "one"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    path = hostfile(tmp_path, "localhost:3\n")
    done = launch("--hostfile", path, "--", "--config", str(tiny_mf), "--logdir", str(tmp_path / "three"))
    assert done.returncode == 0, done.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    three = json.loads((tmp_path / "three" / "summary.json").read_text())
    assert three["federated"]["executor"] == "mpi" and three["federated"]["pool_workers"] == 2
    assert set(three["federated"]["rank_peak_rss_mb"]) == {"1", "2"}  # both worker ranks trained clients
    assert three["final"]["final_model_digest"] == one["final"]["final_model_digest"]
    # the test metrics read the user rows kept in client storage: those agree as well
    assert json.loads(done.stdout.strip().splitlines()[-1])["test"] == one["final"]["test"]
    assert three["final"]["user_epsilon"] == one["final"]["user_epsilon"]
