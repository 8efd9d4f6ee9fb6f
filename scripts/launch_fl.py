"""Run train_fl.py over the hosts of a hostfile: ``python scripts/launch_fl.py --hostfile hosts -np 3 -- --config ...``.

Checks every host of the MPICH hostfile (``host`` or ``host:N`` per line) before anything starts: the
name resolves, and a host other than this machine answers on the ssh port (hydra starts remote ranks
over ssh). A failure is one line naming the file, the line and the host, exit status 2, and nothing is
launched. Then it runs ``mpirun -f HOSTFILE -np N python -m mpi4py.futures scripts/train_fl.py ...``
with the arguments after ``--`` (rank 0 aggregates; the others run clients). Every host needs this
checkout and its virtual environment at the same paths, and LOGDIR on a shared file system; the
network between the hosts must be trusted (ranks exchange pickled objects: docs/threat-model.md).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

try:
    from fedrec.cli import run_main, warn
    from fedrec.errors import ConfigError
    from fedrec.federated.hosts import (
        CONNECT_TIMEOUT_SECONDS,
        SSH_PORT,
        check_hosts,
        mpirun_command,
        parse_hostfile,
    )
except ImportError as err:  # a python without fedrec's dependencies (the system one, not .venv's)
    if (err.name or "").startswith(("fedrec.", "privacy.")):
        raise
    if err.name is None:  # fedrec's own import-time check (a shadowing 'privacy' package)
        sys.exit(f"{sys.argv[0]}: {err}")
    sys.exit(
        f"{sys.argv[0]}: cannot import {err.name!r}: run it with the project's .venv/bin/python (docs/install.md)"
    )

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch_fl.py",
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
        epilog="Arguments after -- (or any this launcher does not know) go to scripts/train_fl.py.",
    )
    p.add_argument("--hostfile", required=True, help="MPICH hostfile: 'host' or 'host:N' per line")
    p.add_argument("-np", type=int, default=None, help="ranks in all (default: the hostfile's total)")
    p.add_argument(
        "--mpirun",
        default=os.path.join(os.path.dirname(sys.executable), "mpirun"),
        help="hydra's mpirun (default: the one beside this python, .venv/bin/mpirun)",
    )
    p.add_argument("--ssh-port", type=int, default=SSH_PORT, help="port checked on remote hosts (ssh)")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT_SECONDS,
        help="seconds a remote host has to answer on --ssh-port",
    )
    p.add_argument(
        "--print-command",
        action="store_true",
        help="check the hosts, print the mpirun command, do not run it",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if rest and rest[0] == "--":
        rest = rest[1:]
    entries = parse_hostfile(args.hostfile)
    processes = args.np if args.np is not None else sum(entry.processes for entry in entries)
    if processes < 2:
        raise ConfigError(
            f"-np {processes}: a federated job needs at least 2 ranks (rank 0 aggregates, the others run clients)"
        )
    if not os.access(args.mpirun, os.X_OK):
        raise ConfigError(f"--mpirun {args.mpirun}: not an executable (MPICH's hydra mpirun is expected)")
    if args.connect_timeout <= 0:
        raise ConfigError(f"--connect-timeout {args.connect_timeout}: expected seconds > 0")
    remote = check_hosts(args.hostfile, entries, port=args.ssh_port, timeout=args.connect_timeout)
    if not remote:
        warn(
            "every host of the hostfile is this machine: hydra's mpirun still listens on 0.0.0.0; on one "
            "machine mpiexec.gforker with the loopback settings keeps MPI on 127.0.0.1 (docs/federated.md)"
        )
    else:
        warn(
            f"ranks on {', '.join(remote)}: MPI traffic between hosts is neither authenticated nor encrypted "
            "and pool workers unpickle it: use a trusted private network only"
        )
    script = os.path.join(ROOT, "scripts", "train_fl.py")
    command = mpirun_command(args.mpirun, args.hostfile, processes, sys.executable, script, rest)
    if args.print_command:
        print(shlex.join(command), flush=True)
        return 0
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)  # mpirun's output and exit status are the job's
    return 0  # not reached


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
