"""Central (non-private) training: ``python scripts/train.py --config configs/dlrm.yml --logdir runs/exp1``.

Prepares the data (or reuses it), builds the configured model, trains with BaseTrainer, logs to
TensorBoard in LOGDIR and writes LOGDIR/summary.json.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from fedrec.cli import base_parser, flag_overrides, run_main
from fedrec.config import load_config
from fedrec.experiment import run_central_training
from fedrec.trainers.base_trainer import BaseTrainer, optimizer_supports_sparse


def main(argv: Sequence[str] | None = None) -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    config = load_config(args.config, flag_overrides(args))
    sparse = optimizer_supports_sparse(config.train.optimizer) and config.train.weight_decay == 0
    # train.* (epochs, batch size, ...) may change on --resume.
    results, path = run_central_training(args, config, BaseTrainer, sparse=sparse, record_ignore=("train",))
    print(json.dumps({"summary": path, "test": results["test"], "val": results["val"]}, indent=None))
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
