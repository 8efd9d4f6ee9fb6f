"""Run every benchmark in bench/ and print one JSON object: ``python bench/run_all.py [--full]``.

By default each bench runs at a small, quick size (a smoke run of a few minutes in all on 2 cores:
the figures show the benches work, they are not the ones docs/PERFORMANCE.md quotes). ``--full``
runs each bench with its own defaults (the sizes docs/PERFORMANCE.md quotes; hours on 2 cores).
``--only a,b`` runs a subset. Each bench runs in its own process; the JSON holds, per bench, its
command, exit status, seconds and the JSON it printed. Exit status 1 when any bench failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def quick_args(scratch: str) -> dict[str, list[str]]:
    """Each bench's arguments for a quick run (data under ``scratch``)."""
    return {
        "dlrm_train": ["--steps", "5", "--warmup", "2", "--table-rows", "1000"],
        "dp_sgd": ["--rows", "26000", "--batch", "64", "--steps", "3", "--warmup", "1", "--rounds", "1",
                   "--memory-rounds", "1", "--opacus-steps", "1", "--opacus-rows", "2600",
                   "--utility-rows", "5000", "--utility-epochs", "1", "--epsilons", "3",
                   "--data-dir", f"{scratch}/dp"],
        "federated": ["--quick", "--parts", "client_breakdown"],
        "he_aggregation": ["--params", "20000", "--clients", "5", "--skip-peer"],
        "mf_movielens": ["--folds", "2", "--max-folds", "1", "model.preproc.synthetic.rows=5000",
                         f"model.preproc.cache_dir={scratch}/ml", "train.epochs=1"],
        "preprocess": ["--rows", "20000", "--dir", f"{scratch}/criteo", "--vocab-size", "1000",
                       "--hash-range", "10000"],
    }  # fmt: skip


def last_json(text: str) -> Any:
    """The last JSON value printed on stdout (a bench prints one object, possibly indented)."""
    decoder = json.JSONDecoder()
    found = None
    index = 0
    while True:
        start = text.find("{", index)
        if start < 0:
            return found
        try:
            found, end = decoder.raw_decode(text, start)
            index = end
        except json.JSONDecodeError:
            index = start + 1


def run_bench(name: str, args: list[str], *, timeout: float) -> dict[str, Any]:
    command = [sys.executable, os.path.join(BENCH_DIR, f"{name}.py"), *args]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": command, "returncode": None, "error": f"timed out after {timeout:g} s"}
    out: dict[str, Any] = {
        "command": command,
        "returncode": done.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "result": last_json(done.stdout),
    }
    if done.returncode != 0:
        out["stderr_tail"] = done.stderr[-2000:]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="each bench at its own default size (slow)")
    parser.add_argument("--only", default=None, help="comma-separated benches to run (default: all)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per bench (default 900 quick)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedrec-bench-") as scratch:
        plan = quick_args(scratch)
        names = list(plan) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in plan]
        if unknown:
            parser.error(f"--only: unknown bench {', '.join(unknown)} (known: {', '.join(plan)})")
        timeout = args.timeout or (86400.0 if args.full else 900.0)
        results = {}
        for name in names:
            print(f"run_all: {name} ...", file=sys.stderr, flush=True)
            results[name] = run_bench(name, [] if args.full else plan[name], timeout=timeout)
    report = {
        "mode": "full" if args.full else "quick",
        "load_average": os.getloadavg(),
        "benches": results,
        "failed": [n for n, r in results.items() if r.get("returncode") != 0],
    }
    print(json.dumps(report, indent=2))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
