"""Progress on stderr for long loops: a tqdm bar on a terminal, one line per round otherwise.

Under ``mpirun`` (how ``make demo`` runs) stderr is a pipe: a bar would never draw, so
:class:`RoundProgress` prints one line per federated round instead (round i/N, loss, the validation
metric, epsilon with its privacy unit, seconds). On a terminal the round bar shows the same figures.
"""

from __future__ import annotations

import math
import sys
from typing import Any, TextIO


def progress_bar(
    *, total: int, initial: int, desc: str, unit: str, enabled: bool, leave: bool = False
) -> Any:
    """A tqdm bar, or a no-op object when disabled; never drawn when stderr is not a terminal."""
    if enabled:
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (logs stay readable).
        return tqdm(
            total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave, disable=None
        )
    return NoBar()


class NoBar:
    """Stands in for a tqdm bar when progress is off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


# Validation metrics shown per round, in this order of preference.
SHOWN_METRICS = ("auc", "logloss", "rmse", "mae")


def round_figures(record: dict[str, Any]) -> dict[str, str]:
    """The figures of one round record worth showing, as text: clients, loss, metric, epsilon, time.

    ``record`` is a round record of the federated loop (``round``, ``completed``, ``sampled``,
    ``train_loss``, ``val``, ``epsilon`` (example level, the most exposed client), ``user_epsilon``
    (user level), ``round_seconds``); missing keys are left out.
    """
    out: dict[str, str] = {}
    if "completed" in record and "sampled" in record:
        out["clients"] = f"{record['completed']}/{record['sampled']}"
    loss = record.get("train_loss")
    if isinstance(loss, int | float) and math.isfinite(loss):
        out["loss"] = f"{loss:.4f}"
    val = record.get("val") or {}
    for name in SHOWN_METRICS:
        if isinstance(val.get(name), int | float):
            out[f"val {name}"] = f"{val[name]:.4f}"
    if record.get("epsilon") is not None:
        out["epsilon"] = f"{record['epsilon']:.3g} (example-level, max over clients)"
    if record.get("user_epsilon") is not None:
        out["user epsilon"] = f"{record['user_epsilon']:.3g} (user-level)"
    if isinstance(record.get("round_seconds"), int | float):
        out["time"] = f"{record['round_seconds']:.1f} s"
    return out


class RoundProgress:
    """Progress of a federated run: call :meth:`update` with each finished round's record.

    On a terminal: a tqdm bar whose postfix shows loss, metric and epsilon. Otherwise (mpirun, a log
    file): one line per round, ``rounds: round 3/10: clients 10/10, loss 0.4521, val auc 0.7012,
    epsilon 2.31 (example-level, max over clients), time 4.2 s``. Nothing when ``enabled`` is false.
    """

    def __init__(
        self,
        *,
        total: int,
        initial: int = 0,
        enabled: bool = True,
        desc: str = "rounds",
        stream: TextIO | None = None,
        terminal: bool | None = None,
    ):
        self.total = total
        self.done = initial
        self.enabled = enabled
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        is_terminal = terminal if terminal is not None else _isatty(self.stream)
        self.bar: Any = None
        if enabled and is_terminal:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="round",
                dynamic_ncols=True,
                leave=True,
                file=self.stream,
            )

    def update(self, record: dict[str, Any]) -> None:
        """One more round finished, with its record."""
        self.done = int(record["round"]) + 1 if "round" in record else self.done + 1
        if not self.enabled:
            return
        figures = round_figures(record)
        if self.bar is not None:
            self.bar.update(self.done - self.bar.n)
            self.bar.set_postfix(figures)
            return
        shown = ", ".join(f"{name} {value}" for name, value in figures.items())
        print(f"{self.desc}: round {self.done}/{self.total}: {shown}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
