"""Central (non-private) training: ``python scripts/train.py --config configs/dlrm.yml --logdir runs/exp1``.

Prepares the data (or reuses it), builds the configured model, trains with BaseTrainer, logs to
TensorBoard in LOGDIR and writes LOGDIR/summary.json.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from fedrec.cli import base_parser, flag_overrides, parse_devices, prepare_logdir, run_main
from fedrec.config import load_config
from fedrec.experiment import (
    build_model,
    open_writer,
    prepare_data,
    record_run_config,
    set_seed,
    set_threads,
    write_summary,
)
from fedrec.trainers.base_trainer import BaseTrainer, optimizer_supports_sparse


def main(argv: Sequence[str] | None = None) -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    config = load_config(args.config, flag_overrides(args))
    device = parse_devices(args.devices)[0]
    logdir = prepare_logdir(args.logdir)
    record_run_config(logdir, config, resume=args.resume, ignore=("train",))
    set_seed(config.seed)
    set_threads(config.train.num_threads)

    data = prepare_data(config, progress=config.train.progress)
    sparse = optimizer_supports_sparse(config.train.optimizer) and config.train.weight_decay == 0
    model = build_model(config, data.meta, sparse=sparse)
    writer = open_writer(logdir)
    trainer = BaseTrainer(model, data, config, logdir=logdir, device=device, writer=writer)
    if args.resume:
        trainer.load_checkpoint()
    results = trainer.fit()
    writer.close()
    rows = {name: len(split) for name, split in data.splits.items()}
    path = write_summary(
        logdir, config, results, rows=rows, device=str(device), data=data.meta.get("summary", {})
    )
    print(json.dumps({"summary": path, "test": results["test"], "val": results["val"]}, indent=None))
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
