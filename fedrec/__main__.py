"""The ``fedrec`` command: ``fedrec train|train-dp|train-fl|launch-fl|deploy|report|audit|preprocess ...``.

Also ``python -m fedrec ...``. Each subcommand runs the script of the same job in ``scripts/``
with the remaining arguments (``fedrec train --config configs/dlrm.yml --logdir runs/x`` is
``python scripts/train.py --config configs/dlrm.yml --logdir runs/x``), so flags, overrides, output
and exit status are the script's. The scripts live in the source checkout, which the documented
install (``pip install -e .``, docs/install.md) keeps in place.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence

from fedrec import __version__

COMMANDS = {
    "train": ("train.py", "central (non-private) training"),
    "train-dp": ("train_dp.py", "DP-SGD training (example-level DP)"),
    "train-fl": ("train_fl.py", "federated simulation (one process, or under mpirun)"),
    "launch-fl": ("launch_fl.py", "train-fl under mpirun over a hostfile's hosts (checked first)"),
    "deploy": ("deploy_syft.py", "federated training on PySyft datasites"),
    "report": ("privacy_report.py", "privacy budget reports and what-if plans"),
    "audit": ("privacy_audit.py", "empirical privacy audit (a lower bound on epsilon)"),
    "preprocess": ("preprocess_data.py", "preprocess a dataset once"),
}

SCRIPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def usage() -> str:
    lines = [
        f"usage: fedrec {{{','.join(COMMANDS)}}} [args ...]   (fedrec COMMAND --help for its flags)",
        "       fedrec --version",
        "",
        "commands:",
    ]
    lines += [
        f"  {name:<11} {help_text} (scripts/{script})" for name, (script, help_text) in COMMANDS.items()
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the command's script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"fedrec {__version__}")
        return 0
    command = args[0]
    if command not in COMMANDS:
        print(f"fedrec: error: unknown command {command!r}\n{usage()}", file=sys.stderr)
        return 2
    script = os.path.join(SCRIPTS_DIR, COMMANDS[command][0])
    if not os.path.isfile(script):
        print(
            f"fedrec: error: {script} not found: the fedrec command runs the scripts of a source checkout "
            "(install with pip install -e ., docs/install.md)",
            file=sys.stderr,
        )
        return 2
    sys.argv = [script, *args[1:]]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:
        code = done.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
