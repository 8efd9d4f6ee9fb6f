"""scripts/privacy_report.py and scripts/privacy_audit.py as a user runs them (real subprocesses)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from privacy.ledger import PrivacyLedger, ledger_path

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def make_run(logdir: Path, *, delta: float = 1e-5, auc: float = 0.7) -> str:
    logdir.mkdir(parents=True)
    with PrivacyLedger.open(ledger_path(logdir), delta=delta, client_epsilon_budget=3.0) as ledger:
        for r in range(5):
            ledger.record_round(
                round=r,
                noise_multiplier=1.2,
                clip_norm=1.0,
                client_sampling_rate=0.5,
                num_sampled=4,
                min_survivors=3,
            )
            for client in ledger.admit_clients(
                range(6), round=r, noise_multiplier=1.1, sample_rate=0.05, steps=40
            ):
                ledger.record_client_spend(
                    client=client, round=r, noise_multiplier=1.1, sample_rate=0.05, steps=40
                )
    (logdir / "summary.json").write_text(json.dumps({"final": {"test": {"auc": auc}}}))
    return str(logdir)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_report_and_comparison(tmp_path):
    a = make_run(tmp_path / "runs" / "a", auc=0.70)
    b = make_run(tmp_path / "runs" / "b", auc=0.74)
    proc = run("privacy_report.py", "--logdir", a, "--logdir", b)
    assert proc.returncode == 0, proc.stderr
    for logdir in (a, b):
        names = set(os.listdir(logdir))
        assert {"privacy_report.html", "privacy_report.md", "privacy_report.json"} <= names
        assert {"privacy_report_epsilon_histogram.png", "privacy_report_epsilon_by_round.png"} <= names
        report = json.loads(Path(logdir, "privacy_report.json").read_text())
        assert report["exclusions"], "budget 3.0 must have excluded clients"
    comparison = tmp_path / "runs" / "privacy_comparison"
    data = json.loads((comparison / "privacy_comparison.json").read_text())
    assert [row["utility"] for row in data["runs"]] == [0.70, 0.74]
    assert (comparison / "privacy_comparison_utility_vs_epsilon.png").stat().st_size > 0


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """The script's main under fedrec.cli.run_main, in this process (no interpreter start-up)."""
    from fedrec.cli import run_main

    script = load_script("privacy_report.py")
    with pytest.raises(SystemExit) as exit_info:
        run_main(script.main, list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_different_deltas_are_refused_end_to_end(tmp_path):
    a = make_run(tmp_path / "a")
    c = make_run(tmp_path / "c", delta=1e-6)
    message = one_line_error(
        run("privacy_report.py", "--logdir", a, "--logdir", c, "--out", str(tmp_path / "cmp"))
    )
    assert "different deltas" in message
    assert not (tmp_path / "cmp").exists()


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_in_process(capsys, "--logdir", str(empty))
    assert code == 2 and "no privacy ledger" in err and len(err.strip().splitlines()) == 1

    a = make_run(tmp_path / "a")
    path = ledger_path(a)
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 3)
    code, _, err = run_in_process(capsys, "--logdir", a)
    assert code == 2 and "privacy_ledger.sqlite" in err and len(err.strip().splitlines()) == 1
    assert not (Path(a) / "privacy_report.html").exists()

    code, _, err = run_in_process(capsys, "--plan", "noise=1", "sample_rate=0.1", "steps=1")
    assert code == 2 and "unknown" in err
    code, _, err = run_in_process(capsys)
    assert code == 2 and "--logdir" in err


def test_plan_reference_value():
    proc = run(
        "privacy_report.py", "--plan", "noise_multiplier=1.5", "sample_rate=0.04", "steps=2250", "delta=1e-5"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("epsilon = 7.3291 ")


def test_plan_target_epsilon(capsys):
    code, out, _ = run_in_process(
        capsys, "--plan", "target_epsilon=3", "sample_rate=0.01", "steps=5000", "delta=1e-6"
    )
    assert code == 0 and out.startswith("noise_multiplier = 1.37")


def test_audit_script_flags_a_broken_run(tmp_path):
    out = tmp_path / "audit.json"
    proc = run("privacy_audit.py", "--broken", "no_noise", "--trials", "1000", "--out", str(out))
    assert proc.returncode == 1, proc.stderr
    result = json.loads(out.read_text())
    assert result["violated"] and result["epsilon_lower_bound"] > result["claimed_epsilon"]
    assert json.loads(proc.stdout) == result
