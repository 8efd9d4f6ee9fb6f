"""Shared command-line handling for scripts/ and the ``fedrec`` command: one parser, one-line errors.

Every script builds its parser with :func:`base_parser` and parses with :func:`parse_args`, so
``dotted.key=value`` overrides may come before, between or after the flags; ``--help`` lists every
config key (generated from the schema, the same tables as configs/flags.md); ``--print-config``
prints the resolved config and exits; ``--dry-run`` checks config, data and devices and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import yaml

from fedrec import __version__
from fedrec.config import ExperimentConfig, config_to_dict, load_config
from fedrec.errors import ConfigError, FedrecError

INSTALL_DOC = "docs/install.md"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the key tables of the epilog as written."""


def config_keys_help() -> str:
    """The ``--help`` epilog: every config key, from the schema (as in configs/flags.md)."""
    from fedrec.config.keys import keys_markdown

    return (
        "config keys (override any with key=value, anywhere on the command line; configs/flags.md has "
        "the same tables):\n\n" + keys_markdown()
    )


def base_parser(description: str, *, config: bool = True) -> argparse.ArgumentParser:
    """Parser with the flags every training script shares; ``dotted.key=value`` overrides anywhere.

    Args:
        description: the script's one-line summary.
        config: whether the script takes ``--config`` and config overrides (training scripts do).
    """
    parser = argparse.ArgumentParser(
        description=description,
        epilog=config_keys_help() if config else None,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fedrec {__version__}")
    if not config:
        return parser
    parser.add_argument("--config", required=True, help="YAML config file (see configs/flags.md)")
    parser.add_argument(
        "--logdir", default=None, help="directory for summary.json, TensorBoard, checkpoints (required)"
    )
    parser.add_argument("--devices", default="cpu", help="'cpu', a CUDA index '0', or a list '0,1'")
    parser.add_argument("--num_eval_batches", type=int, default=None, help="cap evaluation batches")
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    parser.add_argument("--resume", action="store_true", help="continue from LOGDIR's last checkpoint")
    parser.add_argument(
        "--print-config",
        dest="print_config",
        action="store_true",
        help="print the resolved config (file + overrides, validated) as YAML and exit",
    )
    parser.add_argument(
        "--dry-run",
        dest="dry_run",
        action="store_true",
        help="check the config, the data file and the devices, print what would run, and exit",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.05"
    )
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse flags and ``key=value`` overrides in any order; ``--logdir`` is required to run."""
    args = parser.parse_intermixed_args(argv)
    if hasattr(args, "logdir") and args.logdir is None and not args.print_config:
        parser.error("the following arguments are required: --logdir")
    return args


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """Config overrides implied by flags, followed by the explicit ones (which win)."""
    implied = []
    if getattr(args, "seed", None) is not None:
        implied.append(f"seed={args.seed}")
    if getattr(args, "num_eval_batches", None) is not None:
        implied.append(f"train.num_eval_batches={args.num_eval_batches}")
    return implied + list(getattr(args, "overrides", []) or [])


def load_script_config(args: argparse.Namespace, implied: Sequence[str] = ()) -> ExperimentConfig:
    """Load ``--config`` with the flags' implied overrides and the explicit ones (which win).

    A ``noise_multiplier`` override on a file that sets ``target_epsilon`` (or the reverse) fails with
    the override that fixes it.
    """
    overrides = list(implied) + flag_overrides(args)
    try:
        return load_config(args.config, overrides)
    except ConfigError as err:
        hint = _exclusive_override_hint(str(err), overrides)
        if hint:
            raise ConfigError(f"{err}; {hint}") from None
        raise


def _exclusive_override_hint(message: str, overrides: Sequence[str]) -> str | None:
    """For 'exactly one of noise_multiplier / target_epsilon': name the override that clears the other."""
    if "expected exactly one of them" not in message:
        return None
    pairs = {"noise_multiplier": "target_epsilon", "target_epsilon": "noise_multiplier"}
    for text in reversed(overrides):
        key = text.split("=", 1)[0].strip()
        section, _, leaf = key.rpartition(".")
        if leaf in pairs and section and "=" in text and text.split("=", 1)[1].strip() not in ("null", "~"):
            other = f"{section}.{pairs[leaf]}"
            return f"your override {key}=... replaces the file's {other}: add {other}=null"
    return None


def print_config(config: ExperimentConfig) -> int:
    """``--print-config``: the resolved config as YAML on stdout."""
    sys.stdout.write(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return 0


def cuda_build_hint() -> str:
    """How to get a CUDA build when the installed torch has none."""
    return (
        f"the installed torch {torch.__version__} is a CPU-only build; install a CUDA build of the same "
        f"version (pip install torch=={torch.__version__.split('+')[0]} --index-url "
        f"https://download.pytorch.org/whl/cu126; see {INSTALL_DOC}) or use --devices cpu"
    )


def parse_devices(spec: str) -> list[torch.device]:
    """``cpu`` | ``0`` | ``0,1`` -> torch devices; a CUDA index that does not exist is an error."""
    spec = str(spec).strip().lower()
    if spec in ("", "cpu"):
        return [torch.device("cpu")]
    try:
        indices = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ConfigError(
            f"--devices {spec!r}: expected 'cpu', a CUDA index like '0', or a list like '0,1'"
        ) from None
    if torch.version.cuda is None:
        raise ConfigError(f"--devices {spec!r}: {cuda_build_hint()}")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in indices:
        if index < 0 or index >= available:
            raise ConfigError(
                f"--devices {spec!r}: CUDA device {index} does not exist ({available} CUDA device(s) available)"
            )
    return [torch.device("cuda", index) for index in indices]


def prepare_logdir(logdir: str) -> str:
    """Create ``logdir`` (an existing file there is an error)."""
    check_logdir(logdir)
    os.makedirs(logdir, exist_ok=True)
    return logdir


def check_logdir(logdir: str) -> None:
    """``logdir`` is a directory or can be created (nothing is written)."""
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise ConfigError(f"--logdir {logdir}: exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(logdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    target = logdir if os.path.isdir(logdir) else parent
    if not os.access(target, os.W_OK):
        raise ConfigError(f"--logdir {logdir}: {target} is not writable")


def dry_run(config: ExperimentConfig, args: argparse.Namespace, **extra: Any) -> int:
    """``--dry-run``: check the devices, the data file and LOGDIR; print one JSON line; write nothing."""
    devices = parse_devices(args.devices)
    check_logdir(args.logdir)
    preproc = config.model.preproc
    if preproc.datafile is not None:
        if not os.path.isfile(preproc.datafile):
            raise ConfigError(f"config key 'model.preproc.datafile' = {preproc.datafile!r}: file not found")
        try:
            with open(preproc.datafile, "rb") as fh:
                fh.read(1)
        except OSError as err:
            raise ConfigError(f"config key 'model.preproc.datafile' = {preproc.datafile!r}: {err}") from None
        data = os.path.abspath(preproc.datafile)
    else:
        data = (
            f"synthetic {preproc.dataset} ({preproc.synthetic.rows} rows, written under {preproc.cache_dir})"
        )
    out = {
        "dry_run": "ok",
        "config": os.path.abspath(args.config),
        "model": config.model.name,
        "data": data,
        "devices": [str(d) for d in devices],
        "logdir": os.path.abspath(args.logdir),
        "resume": bool(getattr(args, "resume", False)),
        **extra,
    }
    print(json.dumps(out))
    return 0


def warn_single_rank_launch() -> None:
    """``mpirun -np 1 ... -m mpi4py.futures``: say that every client runs in this one process."""
    size = os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE")
    if size == "1" and "mpi4py.futures" in sys.modules:
        warn(
            "started by mpirun with 1 process: there are no pool workers, so every client runs in this "
            "one process (use mpirun -np 2 or more: rank 0 aggregates, the others run clients)"
        )


def warn(message: str) -> None:
    """One warning line on stderr, prefixed with the program's name."""
    print(f"{_prog()}: warning: {message}", file=sys.stderr, flush=True)


def _prog() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fedrec"


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a script's ``main`` and turn input errors into one line on stderr and exit status 2."""
    from privacy.errors import PrivacyError

    prog = _prog()
    try:
        code = main(argv)
    except (FedrecError, PrivacyError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
