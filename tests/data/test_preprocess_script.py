"""scripts/preprocess_data.py as a user runs it: summary.json, reuse, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedrec.data.synthetic import write_criteo

ROOT = Path(__file__).resolve().parents[2]


def preprocess(*args: str, config: str = "configs/dlrm.yml") -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "preprocess_data.py"), "--config", str(ROOT / config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_criteo_summary_and_reuse(tmp_path):
    data = tmp_path / "criteo" / "train.txt"
    data.parent.mkdir()
    write_criteo(str(data), rows=6000, seed=0, vocab_size=100)
    for run, reused in (("run1", False), ("run2", True)):
        done = preprocess("--logdir", str(tmp_path / run), f"model.preproc.datafile={data}")
        assert done.returncode == 0, done.stderr
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert summary["reused"] is reused
        assert summary["rows"] == {"train": 5143, "val": 429, "test": 428}
        assert summary["skipped_lines"] == 0 and summary["rows_per_second"] > 0 and summary["peak_rss_mb"] > 0
        assert summary["processed_dir"] == str(tmp_path / "criteo" / "train_processed")
    assert "reusing" in done.stderr


def test_movielens_through_the_script(tmp_path):
    data = tmp_path / "ratings.dat"
    data.write_text(
        "".join(f"{u}::{i}::{1 + (u * i) % 5}::{1000 + i}\n" for u in range(1, 6) for i in range(1, 9))
    )
    done = preprocess(
        "--logdir", str(tmp_path / "run"), f"model.preproc.datafile={data}", config="configs/mf_movielens.yml"
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["meta"]["format"] == "ml-1m" and summary["rows"] == {"train": 30, "val": 5, "test": 5}


GOOD = b"\t".join([b"1", *[b"5"] * 13, *[b"0123abcd"] * 26])


@pytest.mark.parametrize(
    ("name", "content", "extra", "message"),
    [
        ("missing.txt", None, [], "{path}: file not found"),
        ("empty.txt", b"", [], "{path}: file is empty"),
        ("adir", "dir", [], "{path}: is a directory"),
        ("u.data", b"196\t242\t3\t881250949\n", [], "{path}: does not look like Criteo train.txt: line 1 has 4 fields, expected 40"),
        ("trunc.txt", GOOD + b"\n" + GOOD[:30], ["model.preproc.strict=true"], "{path}: line 2 has 15 fields, expected 40"),
        ("latin1.txt", GOOD + b"\n" + GOOD[:-8] + b"0123ab\xe9d\n", ["model.preproc.strict=true"],
         "{path}: line 2: categorical field C26 '0123ab\\xe9d' is not 1 to 8 hex digits"),
    ],
)  # fmt: skip
def test_bad_criteo_input(tmp_path, name, content, extra, message):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    done = preprocess("--logdir", str(tmp_path / "run"), f"model.preproc.datafile={path}", *extra)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("preprocess_data.py: error: ") and message.format(path=path) in lines[-1]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith("_processed") or ".tmp-" in n]


def test_unknown_movielens_format(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("user;item;rating\n1;2;3\n")
    done = preprocess(
        "--logdir", str(tmp_path / "run"), f"model.preproc.datafile={path}", config="configs/mf_movielens.yml"
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{path}: does not look like MovieLens ratings" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "ratings_processed").exists()
