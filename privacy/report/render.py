"""Write a privacy report as JSON, Markdown, PNG plots and one self-contained HTML page.

The HTML page embeds its plots as base64 PNG and its style inline: it opens from disk with no
network. Every file is written to a temporary name, fsynced and renamed into place.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Callable
from typing import Any

from privacy.report import plots

REPORT_BASENAME = "privacy_report"
COMPARISON_BASENAME = "privacy_comparison"
MAX_CLIENT_ROWS = (
    200  # the HTML and Markdown tables show the worst clients (and first exclusions); the JSON holds all
)
# The report's own statement: "Epsilons above about 10 promise little in practice". A figure above it is
# flagged where it is shown, not only in that sentence.
WEAK_EPSILON = 10.0
WEAK_EPSILON_FLAG = f"(above {WEAK_EPSILON:g}: promises little)"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:60rem;margin:2rem auto;
padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}th{background:#f3f3f3}
.statement{background:#f6f8fa;border-left:4px solid #4c72b0;padding:.6rem 1rem}
.caveat{background:#fff8e1;border-left:4px solid #e0a800;padding:.4rem 1rem;margin:.3rem 0}
img{max-width:100%}pre{background:#f6f8fa;padding:.6rem;overflow-x:auto;font-size:.8rem}
"""


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name, fsync, rename: readers never see a partial file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def write_run_report(report: dict[str, Any], outdir: str) -> dict[str, str]:
    """Write privacy_report.{json,md,html} and the PNG plots into ``outdir``; returns name -> path."""
    images = {
        "epsilon_histogram": plots.epsilon_histogram(report),
        "epsilon_by_round": plots.epsilon_by_round(report),
    }
    return _write_all(outdir, REPORT_BASENAME, report, images, run_markdown, run_html)


def write_comparison(comparison: dict[str, Any], outdir: str) -> dict[str, str]:
    """Write privacy_comparison.{json,md,html} and its plot into ``outdir``."""
    images = {"utility_vs_epsilon": plots.utility_vs_epsilon(comparison)}
    return _write_all(outdir, COMPARISON_BASENAME, comparison, images, comparison_markdown, comparison_html)


def _write_all(
    outdir: str,
    basename: str,
    data: dict[str, Any],
    images: dict[str, bytes | None],
    markdown: Callable[[dict[str, Any], dict[str, str]], str],
    page: Callable[[dict[str, Any], dict[str, bytes]], str],
) -> dict[str, str]:
    os.makedirs(outdir, exist_ok=True)
    written: dict[str, str] = {}
    image_files: dict[str, str] = {}
    present = {name: png for name, png in images.items() if png is not None}
    for name, png in present.items():
        filename = f"{basename}_{name}.png"
        write_atomic(os.path.join(outdir, filename), png)
        image_files[name] = filename
        written[name] = os.path.join(outdir, filename)
    for suffix, content in (
        ("json", _json_bytes(data)),
        ("md", markdown(data, image_files).encode("utf-8")),
        ("html", page(data, present).encode("utf-8")),
    ):
        path = os.path.join(outdir, f"{basename}.{suffix}")
        write_atomic(path, content)
        written[suffix] = path
    return written


# --------------------------------------------------------------------------------- formatting helpers
def _num(value: Any, infinite: bool = False) -> str:
    if infinite:
        return "infinite"
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _eps(value: Any, infinite: bool = False) -> str:
    """An epsilon as text, flagged when above ``WEAK_EPSILON`` (or infinite)."""
    text = _num(value, infinite)
    if infinite or (isinstance(value, int | float) and value > WEAK_EPSILON):
        return f"{text} {WEAK_EPSILON_FLAG}"
    return text


def _run_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    run = report["run"]
    return [
        ("ledger", report["ledger"]),
        ("accountant", run["accountant"]),
        ("delta", f"{run['delta']:g}"),
        ("client epsilon budget", _num(run["client_epsilon_budget"])),
        ("user-level epsilon budget", _num(run["user_epsilon_budget"])),
        ("run id", _num(run["run_id"])),
        ("created", run["created_at"]),
        ("resumes", str(run["resumes"])),
        ("spend records", str(run["spend_records"])),
        ("round records", str(run["round_records"])),
    ]


def _summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    example, user = report["example_level"], report["user_level"]
    if example is not None:
        eps = example["epsilon"]
        rows += [
            ("clients that spent", str(example["clients"])),
            ("epsilon per client: min", _eps(eps["min"])),
            ("epsilon per client: median", _eps(eps["median"])),
            ("epsilon per client: max", _eps(eps["max"], example["clients_infinite"] > 0)),
        ]
        for m in example["mechanisms"]:
            rows.append(
                (
                    "DP-SGD steps",
                    f"noise multiplier {m['noise_multiplier']:g}, sample rate {m['sample_rate']:g}: "
                    f"{m['steps_total']} steps in {m['records']} records",
                )
            )
    if user is not None:
        rows += [
            ("DP-FedAvg rounds", str(user["rounds"])),
            ("user-level epsilon", _eps(user["epsilon"], user["epsilon_infinite"])),
            ("noise multiplier(s) sigma", ", ".join(f"{v:g}" for v in user["noise_multipliers"])),
            ("clip norm(s) S", ", ".join(f"{v:g}" for v in user["clip_norms"])),
            ("client sampling rate(s) q", ", ".join(f"{v:g}" for v in user["client_sampling_rates"])),
            ("minimum survivors assumed", ", ".join(str(v) for v in user["min_survivors"])),
            ("client sampling", ", ".join(user["sampling"])),
        ]
    budget = report["budget"]
    if budget is not None:
        rows += [
            ("remaining budget: min", _num(budget["remaining_min"])),
            ("remaining budget: median", _num(budget["remaining_median"])),
            ("remaining budget: max", _num(budget["remaining_max"])),
            ("clients with no budget left", str(budget["clients_exhausted"])),
        ]
    utility = report["utility"]
    rows.append(
        (
            "utility",
            f"{utility['metric']} = {utility['value']:.4g}" if utility else "n/a (no summary.json metric)",
        )
    )
    return rows


def _client_rows(report: dict[str, Any]) -> tuple[list[list[str]], int]:
    clients = sorted(
        report["clients"],
        key=lambda c: (not c["epsilon_infinite"], -(c["epsilon"] or 0.0)),
    )
    rows = [
        [
            c["client"],
            _num(c["epsilon"], c["epsilon_infinite"]),
            str(c["rounds"]),
            str(c["steps"]),
            _num(c["remaining_budget"]),
            _num(c["excluded_from_round"]) if c["excluded_from_round"] is not None else "",
        ]
        for c in clients[:MAX_CLIENT_ROWS]
    ]
    return rows, max(0, len(clients) - MAX_CLIENT_ROWS)


def _exclusion_rows(report: dict[str, Any]) -> tuple[list[list[str]], int]:
    """The first MAX_CLIENT_ROWS exclusions (in ledger order) and how many more the JSON holds."""
    exclusions = report["exclusions"]
    rows = [[e["client"], str(e["round"]), e["reason"]] for e in exclusions[:MAX_CLIENT_ROWS]]
    return rows, max(0, len(exclusions) - MAX_CLIENT_ROWS)


def _no_client_rows(report: dict[str, Any]) -> str:
    """Why the per-client table is empty: user-level DP alone keeps one ledger record per round."""
    user = report.get("user_level")
    if user:
        return (
            f"No example-level spends: this run's privacy is user-level only, and the ledger keeps one record per "
            f"round ({user['rounds']} rounds above), not one per client, however many users took part."
        )
    return "No client spent anything."


_CLIENT_HEADER = ["client", "epsilon", "rounds", "steps", "remaining budget", "excluded from round"]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def clean(cell: str) -> str:
        return cell.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str] | None, rows: list[list[str]]) -> str:
    parts = ["<table>"]
    if header:
        parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _page(title: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


# --------------------------------------------------------------------------------- run report
def run_markdown(report: dict[str, Any], image_files: dict[str, str]) -> str:
    out = [f"# Privacy budget report: {report['logdir']}", "", f"Generated {report['generated_at']}.", ""]
    out += ["## What the numbers promise", "", report["statement"], ""]
    for note in report["caveats"]:
        out += [f"> **Note:** {note}", ""]
    out += ["## Summary", "", _md_table(["", ""], [list(r) for r in _summary_rows(report)]), ""]
    if "epsilon_histogram" in image_files:
        out += [f"![Epsilon per client]({image_files['epsilon_histogram']})", ""]
    if report["example_level"] and report["example_level"]["histogram"]:
        hist = report["example_level"]["histogram"]
        rows = [
            [f"{a:.4g} to {b:.4g}", str(n)]
            for a, b, n in zip(hist["edges"][:-1], hist["edges"][1:], hist["counts"])
        ]
        out += ["### Epsilon histogram", "", _md_table(["epsilon", "clients"], rows), ""]
    if "epsilon_by_round" in image_files:
        out += [
            "## Epsilon against rounds",
            "",
            f"![Epsilon against rounds]({image_files['epsilon_by_round']})",
            "",
        ]
    out += ["## Noise source", ""]
    sources = report.get("noise_sources") or {}
    if sources:
        out += [_md_table(["party", "privacy noise from"], [[p, src] for p, src in sources.items()]), ""]
    else:
        out += ["Not recorded (no party drew privacy noise, or the run predates the record).", ""]
    out += ["## Excluded clients", ""]
    if report["exclusions"]:
        rows, more = _exclusion_rows(report)
        out += [_md_table(["client", "from round", "reason"], rows), ""]
        if more:
            out += [f"... and {more} more in {REPORT_BASENAME}.json.", ""]
    else:
        out += ["None.", ""]
    rows, more = _client_rows(report)
    out += ["## Clients (highest epsilon first)", ""]
    out += [_md_table(_CLIENT_HEADER, rows) if rows else _no_client_rows(report), ""]
    if more:
        out += [f"... and {more} more in {REPORT_BASENAME}.json.", ""]
    out += ["## Run configuration", "", _md_table(["", ""], [list(r) for r in _run_rows(report)]), ""]
    out += ["```json", json.dumps(report["run"]["config"], indent=2, sort_keys=True), "```", ""]
    return "\n".join(out)


def run_html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    body = [
        f"<h1>Privacy budget report</h1><p><code>{html.escape(report['logdir'])}</code>, generated "
        f"{html.escape(report['generated_at'])}</p>"
    ]
    body += [
        "<h2>What the numbers promise</h2>",
        f'<p class="statement">{html.escape(report["statement"])}</p>',
    ]
    body += [f'<p class="caveat"><b>Note:</b> {html.escape(note)}</p>' for note in report["caveats"]]
    body += ["<h2>Summary</h2>", _html_table(None, [list(r) for r in _summary_rows(report)])]
    body.append(_img(images.get("epsilon_histogram"), "Histogram of epsilon per client"))
    if "epsilon_by_round" in images:
        body += [
            "<h2>Epsilon against rounds</h2>",
            _img(images["epsilon_by_round"], "Epsilon against rounds"),
        ]
    body.append("<h2>Noise source</h2>")
    sources = report.get("noise_sources") or {}
    if sources:
        body.append(_html_table(["party", "privacy noise from"], [[p, src] for p, src in sources.items()]))
    else:
        body.append("<p>Not recorded (no party drew privacy noise, or the run predates the record).</p>")
    body.append("<h2>Excluded clients</h2>")
    if report["exclusions"]:
        rows, more = _exclusion_rows(report)
        body.append(_html_table(["client", "from round", "reason"], rows))
        if more:
            body.append(f"<p>... and {more} more in {REPORT_BASENAME}.json.</p>")
    else:
        body.append("<p>None.</p>")
    rows, more = _client_rows(report)
    body.append("<h2>Clients (highest epsilon first)</h2>")
    body.append(
        _html_table(_CLIENT_HEADER, rows) if rows else f"<p>{html.escape(_no_client_rows(report))}</p>"
    )
    if more:
        body.append(f"<p>... and {more} more in {REPORT_BASENAME}.json.</p>")
    body += ["<h2>Run configuration</h2>", _html_table(None, [list(r) for r in _run_rows(report)])]
    body.append(f"<pre>{html.escape(json.dumps(report['run']['config'], indent=2, sort_keys=True))}</pre>")
    return _page("Privacy budget report", body)


# --------------------------------------------------------------------------------- comparison
def _comparison_rows(comparison: dict[str, Any]) -> list[list[str]]:
    return [
        [
            r["logdir"],
            r["epsilon_kind"] or "n/a",
            _eps(r["epsilon"], r["epsilon_infinite"]),
            _eps(r["example_level_max"]),
            _eps(r["user_level"]),
            r["accountant"],
            f"{r['utility_metric']} = {r['utility']:.4g}" if r["utility"] is not None else "n/a",
        ]
        for r in comparison["runs"]
    ]


_COMPARISON_HEADER = [
    "run",
    "epsilon kind",
    "epsilon",
    "example-level max",
    "user-level",
    "accountant",
    "utility",
]


def comparison_markdown(comparison: dict[str, Any], image_files: dict[str, str]) -> str:
    out = [
        "# Privacy comparison: utility against epsilon",
        "",
        f"All runs at delta = {comparison['delta']:g}.",
        "",
    ]
    out += [f"> **Note:** {note}" for note in comparison["caveats"]]
    out += ["", _md_table(_COMPARISON_HEADER, _comparison_rows(comparison)), ""]
    if "utility_vs_epsilon" in image_files:
        out += [f"![Utility against epsilon]({image_files['utility_vs_epsilon']})", ""]
    return "\n".join(out)


def comparison_html(comparison: dict[str, Any], images: dict[str, bytes]) -> str:
    body = [
        "<h1>Privacy comparison: utility against epsilon</h1>",
        f"<p>All runs at delta = {comparison['delta']:g}.</p>",
    ]
    body += [f'<p class="caveat"><b>Note:</b> {html.escape(note)}</p>' for note in comparison["caveats"]]
    body.append(_html_table(_COMPARISON_HEADER, _comparison_rows(comparison)))
    body.append(_img(images.get("utility_vs_epsilon"), "Utility against epsilon"))
    return _page("Privacy comparison", body)
