"""Criteo preprocessing throughput and peak memory against ``pandas.read_csv`` of the same file.

    flock /tmp/fedrec-bench.lock .venv/bin/python bench/preprocess.py [--rows 1000000 4000000]

Generates synthetic Criteo ``train.txt`` files (cached under ``--dir``), then for each file runs, every
one in a fresh subprocess so that peak RSS (``ru_maxrss``) belongs to that run alone:

- ours: ``fedrec.data.criteo.preprocess`` (vocabulary mode, the default config), with the default
  2 parsing threads and with 1;
- pandas: ``pandas.read_csv(path, sep='\\t', header=None)``, the baseline a user would write (it
  only parses; ours also builds the vocabulary and writes the arrays).

Rows/s is rows / wall seconds of the call itself (imports excluded; the file is read once before
to be in the page cache for everyone). Prints JSON; ``--markdown`` also prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OURS = r"""
import json, resource, sys, time
from fedrec.data import criteo
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start, cpu = time.perf_counter(), time.process_time()
data = criteo.preprocess(sys.argv[1], processed_dir=sys.argv[2], threads=int(sys.argv[3]), log=lambda m: None,
                         progress=False)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
rows = sum(data.meta["rows"].values())
print(json.dumps({"rows": rows, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_imports_mb": base / 1024, "reused": data.meta["reused"]}))
"""

PANDAS = r"""
import json, resource, sys, time
import pandas as pd
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start, cpu = time.perf_counter(), time.process_time()
frame = pd.read_csv(sys.argv[1], sep="\t", header=None)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"rows": len(frame), "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_imports_mb": base / 1024}))
"""


def run_python(code: str, *args: str) -> dict:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def generate(path: Path, rows: int, seed: int) -> float:
    """Write the file unless it is there; returns the generation rows/s (0 if cached)."""
    if path.exists():
        return 0.0
    from fedrec.data.synthetic import write_criteo

    tmp = path.with_suffix(".tmp")
    start = time.perf_counter()
    write_criteo(str(tmp), rows=rows, seed=seed, vocab_size=100_000)
    seconds = time.perf_counter() - start
    os.replace(tmp, path)
    return rows / seconds


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(16 << 20):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument(
        "--dir", default=str(ROOT / "data" / "bench"), help="where the generated files are kept"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement (the best is kept)")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table to stderr")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in args.rows:
        path = directory / f"criteo_synthetic_{rows}.txt"
        generated = generate(path, rows, seed=1)
        warm_page_cache(path)
        entry: dict = {"rows": rows, "file_mb": round(path.stat().st_size / 2**20, 1)}
        if generated:
            entry["generator_rows_per_s"] = round(generated)
        runs = {
            "ours_2_threads": (OURS, "2"),
            "ours_1_thread": (OURS, "1"),
            "pandas_read_csv": (PANDAS, None),
        }
        for name, (code, threads) in runs.items():
            best = None
            for _ in range(args.repeats):
                out = tempfile.mkdtemp(prefix="fedrec-bench-", dir=directory)
                shutil.rmtree(out)  # preprocess makes it (atomically)
                try:
                    extra = (out, threads) if threads else ()
                    result = run_python(code, str(path), *extra)
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                if best is None or result["seconds"] < best["seconds"]:
                    best = result
            assert best is not None and best["rows"] == rows, (name, best)
            entry[name] = {
                "rows_per_s": round(rows / best["seconds"]),
                "seconds": round(best["seconds"], 3),
                "cpu_seconds": round(best["cpu_seconds"], 3),
                "peak_rss_mb": round(best["peak_rss_mb"], 1),
                "rss_after_imports_mb": round(best["rss_after_imports_mb"], 1),
            }
        pandas_rate = entry["pandas_read_csv"]["rows_per_s"]
        entry["ratio_ours_2_threads_vs_pandas"] = round(
            entry["ours_2_threads"]["rows_per_s"] / pandas_rate, 2
        )
        entry["ratio_ours_1_thread_vs_pandas"] = round(entry["ours_1_thread"]["rows_per_s"] / pandas_rate, 2)
        results.append(entry)
    report = {"benchmark": "criteo_preprocessing", "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "results": results}  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.markdown:
        print(markdown(results), file=sys.stderr)


def markdown(results: list[dict]) -> str:
    lines = [
        "| rows | file | ours, 2 threads | ours, 1 thread | pandas.read_csv | ours/pandas (2 thr / 1 thr) |"
        " peak RSS ours (2 thr) | peak RSS pandas |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in results:
        o2, o1, pd_ = e["ours_2_threads"], e["ours_1_thread"], e["pandas_read_csv"]
        lines.append(
            f"| {e['rows']:,} | {e['file_mb']} MiB | {o2['rows_per_s']:,} rows/s | {o1['rows_per_s']:,} rows/s "
            f"| {pd_['rows_per_s']:,} rows/s | {e['ratio_ours_2_threads_vs_pandas']}x / "
            f"{e['ratio_ours_1_thread_vs_pandas']}x | {o2['peak_rss_mb']:.0f} MB | {pd_['peak_rss_mb']:.0f} MB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
