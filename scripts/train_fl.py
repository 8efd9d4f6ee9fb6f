"""Federated simulation: ``mpirun -np 4 python -m mpi4py.futures scripts/train_fl.py --config configs/dlrm_fl.yml --logdir runs/fl1``.

Without ``mpirun`` the same script runs every client in one process. Splits the training data among
``--num_workers`` simulated clients (``fl.partition``), runs ``fl.rounds`` rounds of the configured
algorithm (``fl.algorithm``, FedAvg by default), checkpoints after every round (``--resume``
continues), logs to TensorBoard in LOGDIR and writes LOGDIR/summary.json after every round.
``fl.user_dp`` adds user-level DP-FedAvg (docs/federated.md); the run then stops cleanly at the last
round within ``fl.user_dp.epsilon_budget``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

try:
    from fedrec.cli import (
        base_parser,
        dry_run,
        load_script_config,
        parse_args,
        parse_devices,
        prepare_logdir,
        print_config,
        run_main,
        warn_single_rank_launch,
    )
    from fedrec.errors import ConfigError
    from fedrec.experiment import record_run_config, set_seed
except ImportError as err:  # a python without fedrec's dependencies (the system one, not .venv's)
    if (err.name or "").startswith(("fedrec.", "privacy.")):
        raise
    if err.name is None:  # fedrec's own import-time check (a shadowing 'privacy' package)
        sys.exit(f"{sys.argv[0]}: {err}")
    sys.exit(
        f"{sys.argv[0]}: cannot import {err.name!r}: run it with the project's .venv/bin/python (docs/install.md)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--num_workers", type=int, default=None, help="simulated clients (same as fl.num_workers=N)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds (same as fl.rounds=N)")
    args = parse_args(parser, argv)  # key=value overrides may come before, between or after flags
    implied = []
    if args.num_workers is not None:
        implied.append(f"fl.num_workers={args.num_workers}")
    if args.rounds is not None:
        implied.append(f"fl.rounds={args.rounds}")
    config = load_script_config(args, implied)
    if config.fl is None:
        raise ConfigError(f"{args.config}: no 'fl' section (see configs/dlrm_fl.yml and configs/flags.md)")
    if args.print_config:
        return print_config(config)
    warn_single_rank_launch()
    if args.dry_run:
        return dry_run(config, args)
    device = parse_devices(args.devices)[0]
    logdir = prepare_logdir(args.logdir)
    # fl and train are compared through the checkpoint's fingerprint, which lets fl.rounds grow on --resume.
    record_run_config(logdir, config, resume=args.resume, ignore=("fl", "train"))
    set_seed(config.seed)

    from fedrec.federated.simulation import Simulation, SimulationError

    simulation = Simulation(config, logdir, resume=args.resume, device=str(device))
    try:
        final = simulation.run()
    except SimulationError as err:
        if not getattr(simulation, "stuck_workers", False):
            raise
        print(f"{os.path.basename(sys.argv[0] or 'train_fl.py')}: error: {err}", file=sys.stderr, flush=True)
        _end_with_stuck_workers(2)
    stuck = getattr(simulation, "stuck_workers", False)
    out = {
        "summary": os.path.join(logdir, "summary.json"),
        "tensorboard": f"tensorboard --logdir {logdir}",
        "mode": "secure" if config.fl.secure else "plain",
        "rounds": final["rounds_completed"],
        "test": final["test"],
        "epsilon": final["epsilon"],
        "user_epsilon": final["user_epsilon"],
        "stopped_at_budget": final["stopped_at_budget"],
        "final_model": final["final_model"],
    }
    out["privacy_unit"] = privacy_unit(config)
    for line in loud_epsilon_lines(out):
        print(line, flush=True)
    print(json.dumps(out), flush=True)
    if stuck:
        _end_with_stuck_workers(0)
    return 0


EPSILON_WARNING = 10.0  # above this an epsilon protects little: the run says so on stdout


def privacy_unit(config: Any) -> str | None:
    """What one epsilon of this run protects: an example (DP-SGD in each client), a user (DP-FedAvg), both."""
    units = []
    if config.fl.secure:
        units.append("example-level (DP-SGD in each client; epsilon per client)")
    if config.fl.user_dp is not None:
        units.append("user-level (DP-FedAvg: a client's whole contribution)")
    return "; ".join(units) or None


def loud_epsilon_lines(out: dict[str, Any]) -> list[str]:
    """One line per epsilon above EPSILON_WARNING (printed before the JSON line)."""
    lines = []
    for key, unit in (("epsilon", "example-level, most exposed client"), ("user_epsilon", "user-level")):
        value = out.get(key)
        if value is not None and value > EPSILON_WARNING:
            lines.append(
                f"WARNING: epsilon {value:.2f} ({unit}) is above {EPSILON_WARNING:g}: a weak privacy guarantee"
            )
    return lines


def _end_with_stuck_workers(code: int) -> None:
    """A worker is still inside a timed-out task: end the job now instead of waiting for it."""
    sys.stdout.flush()
    sys.stderr.flush()
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1:
            time.sleep(0.5)  # let mpiexec forward what this rank wrote before it tears the job down
            MPI.COMM_WORLD.Abort(code)
    os._exit(code)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
