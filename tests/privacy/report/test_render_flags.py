"""Report rendering: epsilons above 10 are flagged where they are shown; the epsilon-per-round plot
has whole-number round ticks and the median line drawn on top."""

from __future__ import annotations

from pathlib import Path

from privacy.ledger import PrivacyLedger, ledger_path
from privacy.report.build import build_run_report
from privacy.report.plots import epsilon_by_round_figure
from privacy.report.render import WEAK_EPSILON_FLAG, write_run_report


def make_run(logdir, *, noise_multiplier: float, rounds: int = 3) -> str:
    """Every client spends the same each round, so best, median and worst client coincide."""
    logdir.mkdir(parents=True)
    with PrivacyLedger.open(ledger_path(logdir), delta=1e-5) as ledger:
        for r in range(rounds):
            for client in ledger.admit_clients(
                range(4), round=r, noise_multiplier=noise_multiplier, sample_rate=0.2, steps=50
            ):
                ledger.record_client_spend(
                    client=client, round=r, noise_multiplier=noise_multiplier, sample_rate=0.2, steps=50
                )
    return str(logdir)


def summary_line(markdown: str, label: str) -> str:
    return next(line for line in markdown.splitlines() if label in line)


def test_an_epsilon_above_10_is_flagged_next_to_the_figure(tmp_path):
    weak = make_run(tmp_path / "weak", noise_multiplier=0.5)
    report = build_run_report(weak)
    assert report["example_level"]["epsilon"]["max"] > 10
    written = write_run_report(report, weak)
    markdown = Path(written["md"]).read_text(encoding="utf-8")
    assert WEAK_EPSILON_FLAG in summary_line(markdown, "epsilon per client: max")
    html = Path(written["html"]).read_text(encoding="utf-8")
    assert WEAK_EPSILON_FLAG in html

    strong = make_run(tmp_path / "strong", noise_multiplier=3.0)
    report = build_run_report(strong)
    assert report["example_level"]["epsilon"]["max"] < 10
    markdown = Path(write_run_report(report, strong)["md"]).read_text(encoding="utf-8")
    assert WEAK_EPSILON_FLAG not in summary_line(markdown, "epsilon per client: max")


def test_epsilon_by_round_has_integer_ticks_and_the_median_on_top(tmp_path):
    report = build_run_report(make_run(tmp_path / "run", noise_multiplier=1.0, rounds=3))
    fig = epsilon_by_round_figure(report)
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    lines = {line.get_label(): line for line in ax.get_lines()}
    median = lines["example level, median client"]
    best = lines["example level, best client"]
    worst = lines["example level, worst client"]
    # The three coincide here: the median must be the one that stays visible.
    assert list(median.get_ydata()) == list(best.get_ydata()) == list(worst.get_ydata())
    assert median.get_zorder() > max(best.get_zorder(), worst.get_zorder())
    assert median.get_linewidth() > max(best.get_linewidth(), worst.get_linewidth())
