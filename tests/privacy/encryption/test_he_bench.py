"""Smoke test of bench/he_aggregation.py at a tiny size: it runs, prints JSON only, and its checks hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_benchmark_prints_consistent_json():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "he_aggregation.py"), "--params", "9000", "--clients", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)  # stdout is JSON only (TenSEAL's C++ warnings go to stderr)
    rows = out["results"]
    assert set(rows) == {"bfv_packed_weighted", "bfv_packed_equal_weights", "ckks_common"}
    # The bound, computed here from the grid (not the benchmark's own flag): a BFV average of values
    # on the grid clip * 2**-precision_bits is off by at most one quantum (stochastic rounding).
    quantum = out["clip"] * 2.0 ** -out["precision_bits"]
    assert out["params"] == 9000 and out["clients"] == 3
    for label in ("bfv_packed_weighted", "bfv_packed_equal_weights"):
        row = rows[label]
        assert 0 < row["max_abs_error"] <= quantum
        assert row["total_weight_decrypted"] == row["total_weight"]
        assert row["upload_bytes_per_param"] < rows["ckks_common"]["upload_bytes_per_param"]
    assert rows["ckks_common"]["max_abs_error"] < 1e-6
