"""DP-SGD training: ``python scripts/train_dp.py --config configs/dlrm_dp.yml --logdir runs/dp1``.

Like scripts/train.py, with example-level differential privacy from the config's ``privacy:``
section (docs/privacy.md): Poisson batches, exact per-sample clipping, Gaussian noise (lazy on
embedding rows), an Opacus accountant, and a privacy ledger in LOGDIR. Epsilon goes to TensorBoard
as training goes and into LOGDIR/summary.json with delta, noise multiplier, sample rate, steps,
accountant and max_grad_norm. Bad privacy parameters stop the script before any training (exit 2).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

try:
    from fedrec.cli import base_parser, dry_run, load_script_config, parse_args, print_config, run_main
    from fedrec.errors import ConfigError
    from fedrec.experiment import check_new_run, run_central_training
    from fedrec.trainers.dp_trainer import DPTrainer
except ImportError as err:  # a python without fedrec's dependencies (the system one, not .venv's)
    if (err.name or "").startswith(("fedrec.", "privacy.")):
        raise
    if err.name is None:  # fedrec's own import-time check (a shadowing 'privacy' package)
        sys.exit(f"{sys.argv[0]}: {err}")
    sys.exit(
        f"{sys.argv[0]}: cannot import {err.name!r}: run it with the project's .venv/bin/python (docs/install.md)"
    )

EPSILON_WARNING = 10.0  # above this an epsilon protects little: the run says so on stdout


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(base_parser(__doc__.splitlines()[0]), argv)
    config = load_script_config(args)
    if config.privacy is None:
        raise ConfigError(
            f"{args.config}: no 'privacy:' section (train_dp.py needs one; see configs/dlrm_dp.yml)"
        )
    if args.print_config:
        return print_config(config)
    if args.dry_run:
        check_new_run(args.logdir, resume=args.resume)  # the run would be refused: say so now
        return dry_run(config, args)
    # Unlike train.py, train.* is part of the privacy guarantee (steps, batch size): a resume must match.
    # Embedding gradients never go through autograd in DP-SGD: dense tables, no sparse flag.
    results, path = run_central_training(
        config, DPTrainer, logdir=args.logdir, devices=args.devices, resume=args.resume, sparse=False
    )
    privacy = {**results["privacy"], "unit": "example-level (DP-SGD: one training example)"}
    if privacy["epsilon"] > EPSILON_WARNING:
        print(
            f"WARNING: epsilon {privacy['epsilon']:.2f} (example-level) is above {EPSILON_WARNING:g}: "
            "a weak privacy guarantee",
            flush=True,
        )
    print(json.dumps({"summary": path, "test": results["test"], "privacy": privacy}))
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
