"""Preprocess a dataset once: ``python scripts/preprocess_data.py --config configs/dlrm.yml --logdir runs/pre``.

Parses the raw file named by ``model.preproc.datafile`` (Criteo ``train.txt`` or a MovieLens ratings
file; with null, synthetic data in the same format is generated first) into memory-mappable
arrays, or reuses an up-to-date earlier result, and writes LOGDIR/summary.json (rows per split,
skipped lines, rows/s, seconds, peak RSS, processed_dir, reused).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Sequence

try:
    from fedrec import registry
    from fedrec.cli import (
        base_parser,
        dry_run,
        load_script_config,
        parse_args,
        prepare_logdir,
        print_config,
        run_main,
    )
    from fedrec.data.base import write_json_atomic
except ImportError as err:  # a python without fedrec's dependencies (the system one, not .venv's)
    if (err.name or "").startswith(("fedrec.", "privacy.")):
        raise
    if err.name is None:  # fedrec's own import-time check (a shadowing 'privacy' package)
        sys.exit(f"{sys.argv[0]}: {err}")
    sys.exit(
        f"{sys.argv[0]}: cannot import {err.name!r}: run it with the project's .venv/bin/python (docs/install.md)"
    )


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(base_parser(__doc__.splitlines()[0]), argv)
    config = load_script_config(args)
    if args.print_config:
        return print_config(config)
    if args.dry_run:
        return dry_run(config, args)
    logdir = prepare_logdir(args.logdir)
    preproc = config.model.preproc
    dataset = registry.lookup("dataset", preproc.dataset)
    started = time.perf_counter()
    data = dataset.prepare(preproc, log=_stderr, progress=config.train.progress)
    seconds = time.perf_counter() - started
    meta = data.meta
    rows = {name: len(split) for name, split in data.splits.items()}
    summary = {
        "dataset": preproc.dataset,
        "datafile": os.path.abspath(preproc.datafile)
        if preproc.datafile
        else meta.get("fingerprint", {}).get("path"),
        "synthetic": preproc.datafile is None,
        "processed_dir": meta["processed_dir"],
        "reused": bool(meta["reused"]),
        "rows": rows,
        "rows_total": sum(rows.values()),
        "lines": meta.get("lines"),
        "skipped_lines": meta.get("skipped_lines", 0),
        "skipped_examples": meta.get("skipped_examples", []),
        "seconds": round(seconds, 3),
        # Of the run that made the arrays (this one unless reused).
        "preprocess_seconds": meta.get("seconds"),
        "rows_per_second": meta.get("rows_per_second"),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "meta": {
            k: v for k, v in meta.items() if k not in ("days", "skipped_examples", "fingerprint", "summary")
        },
    }
    path = os.path.join(logdir, "summary.json")
    write_json_atomic(path, summary)
    print(
        json.dumps(
            {
                "summary": path,
                "rows": rows,
                "reused": summary["reused"],
                "processed_dir": summary["processed_dir"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
