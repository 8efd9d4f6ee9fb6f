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

from fedrec.cli import base_parser, flag_overrides, parse_devices, prepare_logdir, run_main
from fedrec.config import load_config
from fedrec.errors import ConfigError
from fedrec.experiment import (
    build_model,
    open_writer,
    prepare_data,
    record_run_config,
    set_seed,
    set_threads,
    write_summary,
)
from fedrec.trainers.dp_trainer import DPTrainer


def main(argv: Sequence[str] | None = None) -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    config = load_config(args.config, flag_overrides(args))
    if config.privacy is None:
        raise ConfigError(
            f"{args.config}: no 'privacy:' section (train_dp.py needs one; see configs/dlrm_dp.yml)"
        )
    device = parse_devices(args.devices)[0]
    logdir = prepare_logdir(args.logdir)
    # Unlike train.py, train.* is part of the privacy guarantee (steps, batch size): a resume must match.
    record_run_config(logdir, config, resume=args.resume)
    set_seed(config.seed)
    set_threads(config.train.num_threads)

    data = prepare_data(config, progress=config.train.progress)
    # Embedding gradients never go through autograd in DP-SGD: dense tables, no sparse flag.
    model = build_model(config, data.meta, sparse=False)
    writer = open_writer(logdir)
    trainer = DPTrainer(model, data, config, logdir=logdir, device=device, writer=writer, resume=args.resume)
    try:
        if args.resume:
            trainer.load_checkpoint()
        results = trainer.fit()
    finally:
        trainer.close()
        writer.close()
    rows = {name: len(split) for name, split in data.splits.items()}
    path = write_summary(
        logdir, config, results, rows=rows, device=str(device), data=data.meta.get("summary", {})
    )
    print(json.dumps({"summary": path, "test": results["test"], "privacy": results["privacy"]}))
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
