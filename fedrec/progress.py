"""Progress bars on stderr for long loops (training steps, federated rounds)."""

from __future__ import annotations

from typing import Any


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
