"""bench/run_all.py (what `make bench` runs): every bench at a quick size, one JSON object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_all(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def test_make_bench_target_runs_run_all():
    makefile = (ROOT / "Makefile").read_text()
    target = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert "bench/run_all.py" in target and (ROOT / "bench" / "run_all.py").is_file()


def test_a_quick_bench_prints_its_json():
    done = run_all("--only", "he_aggregation")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["mode"] == "quick" and report["failed"] == []
    bench = report["benches"]["he_aggregation"]
    assert bench["returncode"] == 0 and bench["result"]["benchmark"] == "he_aggregation"
    assert "--params" in bench["command"]  # the quick size, not the bench's default


def test_every_bench_file_has_a_quick_size_and_unknown_names_fail():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run_all as module
    finally:
        sys.path.pop(0)
    benches = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"run_all"}
    assert set(module.quick_args("/tmp/x")) == benches
    done = run_all("--only", "nonsense")
    assert done.returncode == 2 and "unknown bench nonsense" in done.stderr
