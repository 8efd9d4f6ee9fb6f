"""Shared command-line handling for scripts/: common flags, overrides, one-line errors."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import torch

from fedrec.errors import ConfigError, FedrecError


def base_parser(description: str) -> argparse.ArgumentParser:
    """Parser with the flags every training script shares; trailing ``dotted.key=value`` overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/flags.md)")
    parser.add_argument(
        "--logdir", required=True, help="directory for summary.json, TensorBoard, checkpoints"
    )
    parser.add_argument("--devices", default="cpu", help="'cpu', a CUDA index '0', or a list '0,1'")
    parser.add_argument("--num_eval_batches", type=int, default=None, help="cap evaluation batches")
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    parser.add_argument("--resume", action="store_true", help="continue from LOGDIR's last checkpoint")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.05"
    )
    return parser


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """Config overrides implied by flags, followed by the explicit ones (which win)."""
    implied = []
    if getattr(args, "seed", None) is not None:
        implied.append(f"seed={args.seed}")
    if getattr(args, "num_eval_batches", None) is not None:
        implied.append(f"train.num_eval_batches={args.num_eval_batches}")
    return implied + list(getattr(args, "overrides", []) or [])


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
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in indices:
        if index < 0 or index >= available:
            raise ConfigError(
                f"--devices {spec!r}: CUDA device {index} does not exist ({available} CUDA device(s) available)"
            )
    return [torch.device("cuda", index) for index in indices]


def prepare_logdir(logdir: str) -> str:
    """Create ``logdir`` (an existing file there is an error)."""
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise ConfigError(f"--logdir {logdir}: exists and is not a directory")
    os.makedirs(logdir, exist_ok=True)
    return logdir


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a script's ``main`` and turn input errors into one line on stderr and exit status 2."""
    try:
        from privacy.errors import PrivacyError
    except ImportError:  # pragma: no cover - privacy is part of this distribution
        PrivacyError = FedrecError  # type: ignore[misc,assignment]
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fedrec"
    try:
        code = main(argv)
    except (FedrecError, PrivacyError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
