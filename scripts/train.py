"""Central (non-private) training: ``python scripts/train.py --config configs/dlrm.yml --logdir runs/exp1``.

Prepares the data (or reuses it), builds the configured model, trains with BaseTrainer, logs to
TensorBoard in LOGDIR and writes LOGDIR/summary.json. A LOGDIR that holds a run is refused unless
``--resume`` continues it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

try:
    from fedrec.cli import base_parser, dry_run, load_script_config, parse_args, print_config, run_main
    from fedrec.experiment import check_new_run, run_central_training
    from fedrec.trainers.base_trainer import BaseTrainer, optimizer_supports_sparse
except ImportError as err:  # a python without fedrec's dependencies (the system one, not .venv's)
    if (err.name or "").startswith(("fedrec.", "privacy.")):
        raise
    if err.name is None:  # fedrec's own import-time check (a shadowing 'privacy' package)
        sys.exit(f"{sys.argv[0]}: {err}")
    sys.exit(
        f"{sys.argv[0]}: cannot import {err.name!r}: run it with the project's .venv/bin/python (docs/install.md)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(base_parser(__doc__.splitlines()[0]), argv)
    config = load_script_config(args)
    if args.print_config:
        return print_config(config)
    if args.dry_run:
        check_new_run(args.logdir, resume=args.resume)  # the run would be refused: say so now
        return dry_run(config, args)
    sparse = optimizer_supports_sparse(config.train.optimizer) and config.train.weight_decay == 0
    # train.* (epochs, batch size, ...) may change on --resume.
    results, path = run_central_training(
        config,
        BaseTrainer,
        logdir=args.logdir,
        devices=args.devices,
        resume=args.resume,
        sparse=sparse,
        record_ignore=("train",),
    )
    print(json.dumps({"summary": path, "test": results["test"], "val": results["val"]}, indent=None))
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
