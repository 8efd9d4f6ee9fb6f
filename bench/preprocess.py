"""Criteo preprocessing throughput and peak memory against ``pandas.read_csv`` of the same file.

    flock /tmp/fedrec-bench.lock .venv/bin/python bench/preprocess.py [--rows 1000000 4000000]

Generates synthetic Criteo ``train.txt`` files (cached under ``--dir``), then for each file runs, every
one in a fresh subprocess so that peak RSS (``ru_maxrss``) belongs to that run alone:

- ours: ``fedrec.data.criteo.preprocess`` in vocabulary mode (the default config) and in hashing
  mode (``max_ind_range``), each parsed in one process (the default below 4 CPUs) and by 2
  worker processes;
- pandas: ``pandas.read_csv(path, sep='\\t', header=None)``, the baseline a user would write (it
  only parses; ours also builds the vocabulary and writes the arrays).

Rows/s is rows / wall seconds of the call itself (imports excluded; the file is read once before
to be in the page cache for everyone); rows per CPU-second counts the parsing workers' CPU too, and
is the figure to compare when other work shares the machine. Peak RSS is per process (the workers'
own peaks are not included; each holds a few 4 MiB ranges). Prints JSON; ``--markdown`` also prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PEAK = r"""
def cpu_seconds():  # this process and its finished children (the parsing workers)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def peak_mb():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/status") as fh:  # VmHWM: the same peak, reset at exec on every kernel
        hwm = [int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM")]
    return rss, (hwm[0] if hwm else rss)
"""

OURS = (
    r"""
import json, resource, sys, time
from fedrec.data import criteo
"""
    + PEAK
    + r"""
base = peak_mb()[1]
start, cpu = time.perf_counter(), cpu_seconds()
data = criteo.preprocess(sys.argv[1], processed_dir=sys.argv[2], workers=int(sys.argv[3]),
                         max_ind_range=int(sys.argv[4]), log=lambda m: None, progress=False)
seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
rows = sum(data.meta["rows"].values())
rss, hwm = peak_mb()
workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"rows": rows, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": rss, "vm_hwm_mb": hwm,
                  "rss_after_imports_mb": base, "table_rows": sum(data.meta["table_sizes"]),
                  "worker_peak_rss_mb": workers_rss}))
"""
)

PANDAS = (
    r"""
import json, resource, sys, time
import pandas as pd
"""
    + PEAK
    + r"""
base = peak_mb()[1]
start, cpu = time.perf_counter(), time.process_time()
frame = pd.read_csv(sys.argv[1], sep="\t", header=None)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
rss, hwm = peak_mb()
print(json.dumps({"rows": len(frame), "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": rss, "vm_hwm_mb": hwm,
                  "rss_after_imports_mb": base}))
"""
)

GENERATE = r"""
import json, sys, time
from fedrec.data.synthetic import write_criteo
start = time.perf_counter()
facts = write_criteo(sys.argv[1], rows=int(sys.argv[2]), seed=int(sys.argv[3]), vocab_size=int(sys.argv[4]))
print(json.dumps(dict(facts, rows_per_s=int(sys.argv[2]) / (time.perf_counter() - start))))
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


def generate(path: Path, rows: int, seed: int, vocab_size: int) -> float:
    """Write the file (in a subprocess, keeping this process small) unless it is there; returns
    the generation rows/s (0 if cached)."""
    if path.exists():
        return 0.0
    tmp = path.with_suffix(".tmp")
    facts = run_python(GENERATE, str(tmp), str(rows), str(seed), str(vocab_size))
    os.replace(tmp, path)
    return facts["rows_per_s"]


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
    parser.add_argument(
        "--vocab-size", type=int, default=100_000, help="categories per field of the generated data"
    )
    parser.add_argument("--hash-range", type=int, default=10_000_000, help="max_ind_range of the hashing run")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table to stderr")
    args = parser.parse_args()
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in args.rows:
        path = directory / f"criteo_synthetic_{rows}_v{args.vocab_size}.txt"
        generated = generate(path, rows, 1, args.vocab_size)
        warm_page_cache(path)
        entry: dict = {"rows": rows, "file_mb": round(path.stat().st_size / 2**20, 1)}
        if generated:
            entry["generator_rows_per_s"] = round(generated)
        runs = {
            "ours_vocabulary_1_process": (OURS, ["1", "-1"]),
            "ours_vocabulary_2_workers": (OURS, ["2", "-1"]),
            "ours_hashing_1_process": (OURS, ["1", str(args.hash_range)]),
            "ours_hashing_2_workers": (OURS, ["2", str(args.hash_range)]),
            "pandas_read_csv": (PANDAS, None),
        }
        for name, (code, settings) in runs.items():
            best = None
            for _ in range(args.repeats):
                out = tempfile.mkdtemp(prefix="fedrec-bench-", dir=directory)
                shutil.rmtree(out)  # preprocess makes it (atomically)
                try:
                    extra = (out, *settings) if settings else ()
                    result = run_python(code, str(path), *extra)
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                if best is None or result["seconds"] < best["seconds"]:
                    best = result
            assert best is not None and best["rows"] == rows, (name, best)
            entry[name] = {
                "rows_per_s": round(rows / best["seconds"]),
                "rows_per_cpu_s": round(rows / best["cpu_seconds"]),
                "seconds": round(best["seconds"], 3),
                "cpu_seconds": round(best["cpu_seconds"], 3),
                "peak_rss_mb": round(best["peak_rss_mb"], 1),
                "vm_hwm_mb": round(best["vm_hwm_mb"], 1),
                "rss_after_imports_mb": round(best["rss_after_imports_mb"], 1),
            }
            if "table_rows" in best:
                entry[name]["embedding_rows"] = best["table_rows"]
                entry[name]["worker_peak_rss_mb"] = round(best["worker_peak_rss_mb"], 1)
        pandas = entry["pandas_read_csv"]
        for name in runs:
            if name != "pandas_read_csv":
                entry[f"ratio_{name}_vs_pandas"] = round(entry[name]["rows_per_s"] / pandas["rows_per_s"], 2)
                entry[f"cpu_ratio_{name}_vs_pandas"] = round(
                    entry[name]["rows_per_cpu_s"] / pandas["rows_per_cpu_s"], 2
                )
        results.append(entry)
    report = {"benchmark": "criteo_preprocessing", "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "results": results}  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.markdown:
        print(markdown(results), file=sys.stderr)


def markdown(results: list[dict]) -> str:
    names = (
        "ours_vocabulary_1_process",
        "ours_vocabulary_2_workers",
        "ours_hashing_1_process",
        "ours_hashing_2_workers",
        "pandas_read_csv",
    )
    lines = [
        "| rows | file | " + " | ".join(names) + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for e in results:
        cells = []
        for name in names:
            r = e[name]
            ratio = e.get(f"ratio_{name}_vs_pandas")
            extra = f" ({ratio}x)" if ratio else ""
            cells.append(f"{r['rows_per_s']:,} rows/s{extra}, {r['peak_rss_mb']:.0f} MB")
        lines.append(f"| {e['rows']:,} | {e['file_mb']} MiB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
