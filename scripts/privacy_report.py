"""Privacy budget report: ``python scripts/privacy_report.py --logdir runs/fl1``.

One --logdir writes privacy_report.html (self-contained), .md, .json and PNG plots into that logdir.
Several --logdir also write a utility-against-epsilon comparison (privacy_comparison.*) into --out
(default: a 'privacy_comparison' folder beside the runs); runs at different deltas are refused.
``--plan key=value ...`` answers a what-if instead: noise_multiplier=... prints epsilon,
target_epsilon=... prints the noise multiplier (with sample_rate, steps or epochs, delta[, accountant]).
Errors (no ledger, a corrupted or truncated ledger, different deltas) are one line, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

try:
    from fedrec.cli import base_parser, run_main
    from privacy.errors import PrivacyError
    from privacy.report.build import build_run_report, compare_runs
    from privacy.report.plan import PLAN_KEYS, parse_plan, run_plan
    from privacy.report.render import write_comparison, write_run_report
except ImportError as err:  # a python without fedrec's dependencies (the system one, not .venv's)
    if (err.name or "").startswith(("fedrec.", "privacy.")):
        raise
    if err.name is None:  # fedrec's own import-time check (a shadowing 'privacy' package)
        sys.exit(f"{sys.argv[0]}: {err}")
    sys.exit(
        f"{sys.argv[0]}: cannot import {err.name!r}: run it with the project's .venv/bin/python (docs/install.md)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument(
        "--logdir", action="append", default=[], help="run directory holding privacy_ledger.sqlite"
    )
    parser.add_argument("--out", default=None, help="where a comparison of several runs is written")
    parser.add_argument("--metric", default=None, help="utility key in summary.json (dotted), e.g. test.auc")
    parser.add_argument(
        "--plan", nargs="+", metavar="key=value", help=f"what-if; keys: {', '.join(PLAN_KEYS)}"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plan:
        if args.logdir:
            raise PrivacyError("--plan answers a what-if; give it without --logdir")
        print(run_plan(parse_plan(args.plan)))
        return 0
    if not args.logdir:
        raise PrivacyError("give --logdir RUN (one or more) or --plan key=value ...")
    reports = [build_run_report(logdir, metric=args.metric) for logdir in args.logdir]
    comparison = compare_runs(reports) if len(reports) > 1 else None  # refuse mixed deltas before writing
    for logdir, report in zip(args.logdir, reports):
        written = write_run_report(report, logdir)
        print(f"{logdir}: {written['html']}")
    if comparison is not None:
        out = args.out or os.path.join(
            os.path.commonpath([os.path.abspath(d) for d in args.logdir]), "privacy_comparison"
        )
        written = write_comparison(comparison, out)
        print(f"comparison: {written['html']}")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
