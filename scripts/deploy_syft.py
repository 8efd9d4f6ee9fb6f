"""Deploy federated training to PySyft datasites: ``python scripts/deploy_syft.py --config configs/syft_fl.yml --logdir runs/syft1``.

With ``syft.datasites: []`` (the default) the script starts ``fl.num_workers`` data owners on
``syft.host`` (127.0.0.1), each a real PySyft 0.9 datasite in its own process holding one partition
of the data, plays the key authority for them, runs the coordinator and shuts every datasite down at
the end (also on error or Ctrl-C). With ``syft.datasites`` listing URLs it connects to datasites
their owners started (``python -m fedrec.deploy.owner serve``) with the given accounts and the key
authority's public context (``syft.public_context``).

Writes LOGDIR/summary.json after every round, the privacy report (privacy_report.html/.md/.json and
plots, from the coordinator's ledger copy), TensorBoard scalars, and the encrypted global models
(LOGDIR/deploy/global/); ``--resume`` continues from LOGDIR/deploy/checkpoint.json. Prints one JSON
line with the outcome. Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Sequence

try:
    from fedrec.cli import (
        base_parser,
        dry_run,
        load_script_config,
        parse_args,
        prepare_logdir,
        print_config,
        run_main,
    )
    from fedrec.errors import ConfigError
    from privacy.encryption.context import read_context_file
    from privacy.errors import EncryptionError
except ImportError as err:  # a python without fedrec's dependencies (the system one, not .venv's)
    if (err.name or "").startswith(("fedrec.", "privacy.")):
        raise
    if err.name is None:  # fedrec's own import-time check (a shadowing 'privacy' package)
        sys.exit(f"{sys.argv[0]}: {err}")
    sys.exit(
        f"{sys.argv[0]}: cannot import {err.name!r}: run it with the project's .venv/bin/python (docs/install.md)"
    )


def remote_datasites(config) -> tuple[list, bytes]:  # type: ignore[no-untyped-def]
    """Specs and public context of datasites started by their owners (``syft.datasites``)."""
    from fedrec.deploy.local import DatasiteSpec

    specs = []
    for i, site in enumerate(config.syft.datasites):
        try:
            with open(site.password_file, encoding="utf-8") as fh:
                password = fh.read().strip()
        except OSError as err:
            raise ConfigError(
                f"config key 'syft.datasites[{i}].password_file' = {site.password_file!r}: {err}"
            ) from None
        specs.append(
            DatasiteSpec(client_id=site.client_id, url=site.url, email=site.email, password=password)
        )
    try:  # one line naming the file: missing, unreadable, damaged, or a secret context (refused)
        read_context_file(config.syft.public_context, role="public")
        with open(config.syft.public_context, "rb") as fh:
            public_context = fh.read()
    except EncryptionError as err:
        raise ConfigError(f"config key 'syft.public_context': {err}") from None
    except OSError as err:
        raise ConfigError(
            f"config key 'syft.public_context' = {config.syft.public_context!r}: {err}"
        ) from None
    return specs, public_context


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds (same as fl.rounds=N)")
    parser.add_argument(
        "--datasites",
        type=int,
        default=None,
        help="local mode: datasites to start (same as fl.num_workers=N)",
    )
    args = parse_args(parser, argv)
    implied = []
    if args.rounds is not None:
        implied.append(f"fl.rounds={args.rounds}")
    if args.datasites is not None:
        implied.append(f"fl.num_workers={args.datasites}")
    config = load_script_config(args, implied)
    if config.fl is None:
        raise ConfigError(f"{args.config}: no 'fl' section (see configs/syft_fl.yml and configs/flags.md)")
    if args.print_config:
        return print_config(config)
    from fedrec.deploy.coordinator import refuse_user_dp

    refuse_user_dp(config)  # before any datasite starts
    if config.syft is None:
        from fedrec.config.schema import SyftConfig

        config.syft = SyftConfig()
    if args.devices not in ("cpu", ""):
        raise ConfigError(
            f"--devices {args.devices!r}: datasites train on their own hardware; use --devices cpu"
        )
    if args.dry_run:
        return dry_run(config, args, datasites=len(config.syft.datasites) or config.fl.num_workers)
    logdir = prepare_logdir(args.logdir)
    # SIGTERM unwinds like Ctrl-C, so local datasites are shut down on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    from fedrec.experiment import record_run_config, set_seed

    record_run_config(logdir, config, resume=args.resume)
    set_seed(config.seed)
    stdout = sys.stdout
    sys.stdout = sys.stderr  # PySyft prints banners and progress on stdout; ours is the JSON line below
    try:
        final, datasites = _run(config, logdir, resume=args.resume)
    finally:
        sys.stdout = stdout

    from privacy.report.build import build_run_report
    from privacy.report.render import write_run_report

    written = write_run_report(build_run_report(logdir), logdir)
    out = {
        "summary": os.path.join(logdir, "summary.json"),
        "privacy_report": written["html"],
        "datasites": datasites,
        "rounds": final.get("rounds_completed"),
        "epsilon": final.get("epsilon"),
        "final_model": final.get("final_model"),
        "final_model_digest": final.get("final_model_digest"),
    }
    print(json.dumps(out), flush=True)
    return 0


def _run(config, logdir: str, *, resume: bool) -> tuple[dict, int]:  # type: ignore[no-untyped-def]
    from fedrec.deploy.coordinator import Coordinator

    syft = config.syft
    if syft.datasites:
        specs, public_context = remote_datasites(config)
        coordinator = Coordinator(config, logdir, specs, public_context=public_context, resume=resume)
        return coordinator.run(), len(specs)

    from fedrec.deploy.local import LocalFederation

    if config.fl.num_workers is None:
        raise ConfigError(
            "config key 'fl.num_workers' = None: local mode needs the number of datasites to start"
        )
    federation = LocalFederation.prepare(
        config,
        os.path.join(logdir, "owners"),
        host=syft.host,
        owner_epsilon_budget=syft.owner_epsilon_budget,
        owner_delta=syft.owner_delta,
        owner_max_executions=syft.owner_max_executions,
        min_aggregate_clients=syft.min_aggregate_clients,
        reproducible_noise=syft.owner_reproducible_noise,
    )
    with federation:
        specs = federation.start()
        coordinator = Coordinator(
            config, logdir, specs, public_context=federation.public_context, resume=resume
        )
        return coordinator.run(), len(specs)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
