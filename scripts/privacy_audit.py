"""Empirical privacy audit: ``python scripts/privacy_audit.py [--broken no_noise] [--trials 4000]``.

Trains a small logistic regression with DP-SGD many times with and without a canary record (by
default with this project's optimizer, privacy.dp.DPSGD, reading every step), turns both membership
tests into lower bounds on epsilon (Clopper-Pearson; each test at 1 - (1 - --confidence) / 2, so the
verdict on the best of the two holds at --confidence) and compares the best with the accountant's epsilon. Prints one JSON object; exit status 0 when the bound stays below
the claim, 1 when the audit finds a violation (the mechanism or its accounting is broken), 2 on bad
input. ``--broken no_noise`` (or no_clip) audits a deliberately broken mechanism that must be flagged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

try:
    import torch

    from fedrec.cli import base_parser, run_main
    from privacy.audit import AuditConfig, run_audit
    from privacy.report.render import write_atomic
except ImportError as err:  # a python without fedrec's dependencies (the system one, not .venv's)
    if (err.name or "").startswith(("fedrec.", "privacy.")):
        raise
    if err.name is None:  # fedrec's own import-time check (a shadowing 'privacy' package)
        sys.exit(f"{sys.argv[0]}: {err}")
    sys.exit(
        f"{sys.argv[0]}: cannot import {err.name!r}: run it with the project's .venv/bin/python (docs/install.md)"
    )

_DEFAULTS = AuditConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument(
        "--noise_multiplier", type=float, default=_DEFAULTS.noise_multiplier, help="claimed sigma"
    )
    parser.add_argument("--max_grad_norm", type=float, default=_DEFAULTS.max_grad_norm)
    parser.add_argument("--sample_rate", type=float, default=_DEFAULTS.sample_rate)
    parser.add_argument("--steps", type=int, default=_DEFAULTS.steps)
    parser.add_argument("--delta", type=float, default=_DEFAULTS.delta)
    parser.add_argument("--accountant", default=_DEFAULTS.accountant, choices=("rdp", "prv"))
    parser.add_argument("--trials", type=int, default=_DEFAULTS.trials, help="models trained per world")
    parser.add_argument("--confidence", type=float, default=_DEFAULTS.confidence)
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    parser.add_argument(
        "--engine",
        default=_DEFAULTS.engine,
        choices=("dpsgd", "torch", "opacus"),
        help="dpsgd: privacy.dp.DPSGD (default); torch: batched reference; opacus: Opacus",
    )
    parser.add_argument(
        "--final_only",
        action="store_true",
        help="dpsgd: read the weights only at the end (lazy row noise pending over many steps; 'final' test only)",
    )
    parser.add_argument(
        "--broken", default=None, choices=("no_noise", "no_clip"), help="audit a broken mechanism"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=None, help="also write the result JSON to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    config = AuditConfig(
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
        sample_rate=args.sample_rate,
        steps=args.steps,
        delta=args.delta,
        accountant=args.accountant,
        trials=args.trials,
        confidence=args.confidence,
        seed=args.seed,
        engine=args.engine,
        iterates=not args.final_only,
        broken=args.broken,
    )
    result = run_audit(config).to_dict()
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_atomic(args.out, (text + "\n").encode("utf-8"))
    print(text)
    return 1 if result["violated"] else 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
