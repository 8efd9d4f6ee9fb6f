"""Where a run's privacy-protecting randomness comes from, and the loud line a seeded run prints.

DP noise and Poisson batches drawn from ``config.seed`` can be replayed by anyone who holds the
config: against them the run's epsilon does not hold (issue 14, item 1). A run that draws them so says
it on stdout before it trains, the same line in every mode (central ``train_dp``, the federated
engine of ``train_fl`` and the deployment), and the privacy report repeats it as a caveat.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

SEEDED_SOURCE = "config seed: replayable by anyone who holds the config (epsilon does not hold against them)"
CSPRNG_SOURCE = "OS CSPRNG"
CENTRAL_PARTY = "trainer (DP-SGD noise, Poisson batches)"  # the report's name for a central DP run


def seeded_warning(party: str, source: str) -> str:
    """The one line a seeded party's run prints."""
    return (
        f"WARNING: {party}: privacy noise from the {source}; set privacy.secure_mode / "
        "fl.user_dp.secure_mode for a run whose epsilon holds against the config's holders"
    )


def warn_seeded(sources: Mapping[str, str], log: Callable[[str], None] | None = None) -> list[str]:
    """Print :func:`seeded_warning` on stdout for every party whose source is a seed; returns the lines."""
    lines = [seeded_warning(party, source) for party, source in sources.items() if "seed" in source]
    for line in lines:
        print(line, flush=True)
        if log is not None:
            log(line)
    return lines
