"""Turn a run's privacy ledger (and its summary.json) into the numbers of a privacy budget report.

``build_run_report(logdir)`` returns a JSON-ready dict: run configuration, accountant and delta,
example-level epsilon per client (distribution and histogram), epsilon against rounds, remaining
budgets, exclusions, user-level DP-FedAvg epsilon, utility, and a plain-language statement.
``compare_runs`` lines several runs up for a utility-against-epsilon comparison and refuses runs
accounted at different deltas (their epsilons are not comparable).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from privacy.accounting.user_level import epsilon_from_merged
from privacy.errors import LedgerError, PrivacyError
from privacy.ledger import LEDGER_FILENAME, PrivacyLedger

REPORT_FORMAT = "fedrec-privacy-report"
REPORT_VERSION = 1
SUMMARY_FILENAME = "summary.json"
# Metric names tried, in order, when --metric is not given (last component of a flattened key).
UTILITY_METRICS = (
    "auc",
    "roc_auc",
    "accuracy",
    "acc",
    "ndcg",
    "hit_rate",
    "hr",
    "rmse",
    "mae",
    "logloss",
    "loss",
)
LOWER_IS_BETTER = ("rmse", "mae", "logloss", "loss")
_SPLIT_PREFERENCE = ("test", "val", "valid", "validation", "eval")
# Epsilon-against-rounds points: every round for RDP (cheap, cached), fewer for PRV (FFT per history).
MAX_TIMELINE_POINTS = {"rdp": 200, "prv": 12}


def build_run_report(logdir: str, *, metric: str | None = None) -> dict[str, Any]:
    """The report of the run in ``logdir`` (reads ``privacy_ledger.sqlite`` and ``summary.json``).

    Raises:
        LedgerError: no ledger in ``logdir``, or a corrupted/truncated one.
        PrivacyError: a ``--metric`` that summary.json does not have.
    """
    if not os.path.isdir(logdir):
        raise LedgerError(f"--logdir {logdir}: not a directory")
    path = os.path.join(logdir, LEDGER_FILENAME)
    if not os.path.isfile(path):
        raise LedgerError(f"--logdir {logdir}: no privacy ledger ({LEDGER_FILENAME}); was the run private?")
    recorded = recorded_positions(logdir)
    # Opening walks the hash chain (an edited, deleted or inserted row is refused); the positions the
    # run recorded in summary.json / its federated checkpoint catch a ledger rewound or copied in.
    with PrivacyLedger.read(path, full_check=True) as ledger:
        for source, position in recorded:
            ledger.check_position(position, source=source)
        now = ledger.position()
        chain_rows, chain_head = now["chain_rows"], now["chain_head"]
        info = ledger.info
        spends = ledger.client_spends()
        rounds = ledger.rounds()
        exclusions = ledger.exclusions()
        events = ledger.events()
        clients = ledger.clients()
    delta, accountant = info.delta, info.accountant

    final, timeline = _example_level_timeline(spends, rounds, delta=delta, accountant=accountant)
    excluded_at: dict[str, Any] = {}
    for item in exclusions:
        excluded_at.setdefault(item.client, item)
    per_client: list[dict[str, Any]] = []
    spends_by_client: dict[str, list[Any]] = {}
    for spend in spends:  # one pass: a scan per client would be quadratic at a large population
        spends_by_client.setdefault(spend.client, []).append(spend)
    for client in clients:
        client_spends = spends_by_client.get(client, [])
        eps = final.get(client, 0.0)
        budget = info.client_epsilon_budget
        per_client.append(
            {
                "client": client,
                "epsilon": _finite_or_none(eps),
                "epsilon_infinite": math.isinf(eps),
                "rounds": len({s.round for s in client_spends}),
                "steps": sum(s.steps for s in client_spends),
                "remaining_budget": None if budget is None else max(0.0, budget - eps),
                "excluded_from_round": excluded_at[client].round if client in excluded_at else None,
            }
        )
    spent = [final[c] for c in final]
    example = None
    if spent:
        finite = [e for e in spent if math.isfinite(e)]
        example = {
            "clients": len(spent),
            "clients_infinite": len(spent) - len(finite),
            "epsilon": {
                "min": _finite_or_none(min(spent)),
                "median": _finite_or_none(float(statistics.median(spent))),
                "max": _finite_or_none(max(spent)),
                "mean": _finite_or_none(float(np.mean(finite)))
                if finite and len(finite) == len(spent)
                else None,
            },
            "histogram": _histogram(finite),
            "mechanisms": _mechanisms(spends),
        }
    user = None
    if rounds:
        user = {
            "rounds": len(rounds),
            "epsilon": _finite_or_none(timeline["user_level"][-1]) if timeline["user_level"] else None,
            "epsilon_infinite": bool(timeline["user_level"]) and math.isinf(timeline["user_level"][-1]),
            "noise_multipliers": sorted({r.noise_multiplier for r in rounds}),
            "clip_norms": sorted({r.clip_norm for r in rounds}),
            "client_sampling_rates": sorted({r.client_sampling_rate for r in rounds}),
            "min_survivors": sorted({r.min_survivors for r in rounds}),
            "sampling": sorted({r.sampling for r in rounds}),
        }
    budget_summary = None
    if info.client_epsilon_budget is not None and per_client:
        remaining: list[float] = [float(c["remaining_budget"]) for c in per_client]
        budget_summary = {
            "client_epsilon_budget": info.client_epsilon_budget,
            "remaining_min": min(remaining),
            "remaining_median": float(statistics.median(remaining)),
            "remaining_max": max(remaining),
            # out of budget: nothing left, or the ledger refused a next spend (excluded at the budget)
            "clients_exhausted": sum(
                1
                for c in per_client
                if c["remaining_budget"] <= 0
                or (c["client"] in excluded_at and excluded_at[c["client"]].reason.startswith("budget"))
            ),
        }
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "logdir": os.path.abspath(logdir),
        "ledger": os.path.abspath(path),
        "run": {
            "ledger_id": info.ledger_id,
            "run_id": info.run_id,
            "delta": delta,
            "accountant": accountant,
            "client_epsilon_budget": info.client_epsilon_budget,
            "user_epsilon_budget": info.user_epsilon_budget,
            "created_at": _dt.datetime.fromtimestamp(info.created_at, _dt.UTC).isoformat(timespec="seconds"),
            "resumes": sum(1 for e in events if e.kind == "resume"),
            "config": info.config,
            "ledger_schema_version": info.schema_version,
            "spend_records": len(spends),
            "round_records": len(rounds),
            "chain_rows": chain_rows,
            "chain_head": chain_head,
            "positions_checked": [source for source, _ in recorded],
        },
        "example_level": example,
        "user_level": user,
        "epsilon_by_round": {
            key: values if key == "round" else [_finite_or_none(v) for v in values]
            for key, values in timeline.items()
        },
        "budget": budget_summary,
        "clients": per_client,
        "exclusions": [
            {"client": e.client, "round": e.round, "reason": e.reason, "epsilon": _finite_or_none(e.epsilon)}
            for e in exclusions
        ],
        "utility": read_utility(logdir, metric=metric),
        "noise_sources": read_noise_sources(logdir, info.config),
    }
    report["headline"] = _headline(report)
    report["caveats"] = _caveats(report)
    report["statement"] = plain_language(report)
    return report


# Files of a run that may record where its ledger stood (JSON only: nothing here is unpickled).
POSITION_FILES = (SUMMARY_FILENAME, os.path.join("fl", "checkpoint.json"))


def recorded_positions(logdir: str) -> list[tuple[str, dict[str, Any]]]:
    """Every ledger position (``PrivacyLedger.position()``) a run recorded in its JSON files.

    A position is a mapping with ``ledger_id``, ``chain_rows`` and ``chain_head`` at any depth of
    ``summary.json`` or ``fl/checkpoint.json``. A file that exists but is not JSON is an error.
    """
    found: list[tuple[str, dict[str, Any]]] = []
    for name in POSITION_FILES:
        path = os.path.join(logdir, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as err:
            raise PrivacyError(f"{path}: not readable JSON ({err})") from None
        stack: list[Any] = [data]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if {"ledger_id", "chain_rows", "chain_head"} <= set(node):
                    found.append((path, node))
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    return found


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no infinity: infinite epsilon is None here, with an explicit ``*_infinite`` flag."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _example_level_timeline(
    spends: Sequence[Any], rounds: Sequence[Any], *, delta: float, accountant: str
) -> tuple[dict[str, float], dict[str, list]]:
    """Final epsilon per client and (max, median, min over clients so far, user-level) after rounds."""
    round_ids = sorted({s.round for s in spends} | {r.round for r in rounds})
    limit = MAX_TIMELINE_POINTS[accountant]
    if len(round_ids) > limit:
        picks = np.unique(np.linspace(0, len(round_ids) - 1, limit).round().astype(int))
        checkpoints = {round_ids[i] for i in picks}
    else:
        checkpoints = set(round_ids)
    spends_by_round: dict[int, list] = {}
    for s in spends:
        spends_by_round.setdefault(s.round, []).append(s)
    rounds_by_round: dict[int, list] = {}
    for r in rounds:
        rounds_by_round.setdefault(r.round, []).append(r)

    mechanisms: dict[str, dict[tuple[float, float], int]] = {}
    user_mechanisms: dict[tuple[float, float], int] = {}
    eps_now: dict[str, float] = {}
    timeline: dict[str, list] = {
        "round": [],
        "example_max": [],
        "example_median": [],
        "example_min": [],
        "user_level": [],
    }
    for index in round_ids:
        changed = set()
        for s in spends_by_round.get(index, []):
            per = mechanisms.setdefault(s.client, {})
            per[(s.noise_multiplier, s.sample_rate)] = (
                per.get((s.noise_multiplier, s.sample_rate), 0) + s.steps
            )
            changed.add(s.client)
        for r in rounds_by_round.get(index, []):
            key = (r.noise_multiplier, r.client_sampling_rate)
            user_mechanisms[key] = user_mechanisms.get(key, 0) + 1
        if index not in checkpoints and index != round_ids[-1]:
            for client in changed:
                eps_now.pop(client, None)  # stale: recomputed at the next checkpoint
            continue
        for client in mechanisms:
            if client in changed or client not in eps_now:
                eps_now[client] = _merged_epsilon(mechanisms[client], delta, accountant)
        values = list(eps_now.values())
        timeline["round"].append(index)
        timeline["example_max"].append(max(values) if values else None)
        timeline["example_median"].append(float(statistics.median(values)) if values else None)
        timeline["example_min"].append(min(values) if values else None)
        timeline["user_level"].append(
            _merged_epsilon(user_mechanisms, delta, accountant) if user_mechanisms else None
        )
    if not spends:
        for name in ("example_max", "example_median", "example_min"):
            timeline[name] = []
    if not rounds:
        timeline["user_level"] = []
    return eps_now, timeline


def _merged_epsilon(mechanisms: dict[tuple[float, float], int], delta: float, accountant: str) -> float:
    merged = tuple(sorted((sigma, rate, steps) for (sigma, rate), steps in mechanisms.items()))
    return epsilon_from_merged(merged, delta=delta, accountant=accountant)


def _histogram(values: Sequence[float]) -> dict[str, list] | None:
    if not values:
        return None
    bins = int(min(20, max(5, round(math.sqrt(len(values))))))
    low, high = min(values), max(values)
    if high - low < 1e-12:
        low, high = low - 0.5 * max(abs(low), 1e-3) * 0.01, high + 0.5 * max(abs(high), 1e-3) * 0.01
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _mechanisms(spends: Sequence[Any]) -> list[dict[str, Any]]:
    totals: dict[tuple[float, float], list[int]] = {}
    for s in spends:
        entry = totals.setdefault((s.noise_multiplier, s.sample_rate), [0, 0])
        entry[0] += s.steps
        entry[1] += 1
    return [
        {"noise_multiplier": sigma, "sample_rate": rate, "steps_total": steps, "records": records}
        for (sigma, rate), (steps, records) in sorted(totals.items())
    ]


def read_utility(logdir: str, *, metric: str | None = None) -> dict[str, Any] | None:
    """The run's utility from ``summary.json``: the named (dotted) metric, or the first known one.

    Returns None when there is no summary.json or no known metric; a named metric that is missing
    or not a number is an error (never a silently different metric).
    """
    path = os.path.join(logdir, SUMMARY_FILENAME)
    if not os.path.isfile(path):
        if metric is not None:
            raise PrivacyError(f"--metric {metric}: {path} does not exist")
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            summary = json.load(fh)
    except (OSError, ValueError) as err:
        raise PrivacyError(f"{path}: not readable JSON ({err})") from None
    flat = dict(_flatten(summary))
    # The run's configuration and environment hold numbers too (lr, threads); they are not utility.
    flat = {key: value for key, value in flat.items() if not key.startswith(("config.", "environment."))}
    if metric is not None:
        value = flat.get(metric)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            known = ", ".join(sorted(flat)[:20]) or "none"
            raise PrivacyError(f"--metric {metric}: not a finite number in {path} (numeric keys: {known})")
        chosen = metric
    else:
        picked = _pick_metric(flat)
        if picked is None:
            return None
        chosen = picked
    name = chosen.rsplit(".", 1)[-1].lower()
    return {
        "metric": chosen,
        "value": float(flat[chosen]),
        "higher_is_better": not any(name.endswith(m) for m in LOWER_IS_BETTER),
        "source": os.path.abspath(path),
    }


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, float]]:
    items: list[tuple[str, float]] = []
    if isinstance(value, dict):
        for key, sub in value.items():
            items.extend(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        items.append((prefix, float(value)))
    return items


def _pick_metric(flat: dict[str, float]) -> str | None:
    def split_rank(key: str) -> int:
        lowered = key.lower()
        for rank, split in enumerate(_SPLIT_PREFERENCE):
            if (
                split in lowered.replace("-", "_").split(".")
                or lowered.startswith(f"{split}_")
                or f".{split}_" in lowered
            ):
                return rank
        return len(_SPLIT_PREFERENCE)

    for name in UTILITY_METRICS:
        candidates = []
        for key in flat:
            last = key.rsplit(".", 1)[-1].lower()
            if last == name or last.endswith(f"_{name}"):
                candidates.append(key)
        if candidates:
            return sorted(candidates, key=lambda k: (split_rank(k), k))[0]
    return None


def _headline(report: dict[str, Any]) -> dict[str, Any] | None:
    """The one epsilon a comparison plots: user-level when the run had DP-FedAvg rounds."""
    user, example = report["user_level"], report["example_level"]
    if user is not None:
        return {"kind": "user-level", "epsilon": user["epsilon"], "infinite": user["epsilon_infinite"]}
    if example is not None:
        return {
            "kind": "example-level, worst client",
            "epsilon": example["epsilon"]["max"],
            "infinite": example["clients_infinite"] > 0,
        }
    return None


SEEDED_NOISE = "config seed: replayable by anyone who holds the config (epsilon does not hold against them)"
CSPRNG_NOISE = "OS CSPRNG"


def read_noise_sources(logdir: str, config: Any) -> dict[str, str]:
    """Where each party's privacy noise came from: party -> source.

    From summary.json: a federated or deployed run's ``noise_source`` section, or a central DP run's
    ``privacy.secure_mode``; failing that, from the config the ledger recorded.
    """
    path = os.path.join(logdir, SUMMARY_FILENAME)
    summary: Any = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                summary = json.load(fh)
        except (OSError, ValueError) as err:
            raise PrivacyError(f"{path}: not readable JSON ({err})") from None
    summary = summary if isinstance(summary, dict) else {}
    for section in ("federated", "deployment"):
        node = summary.get(section)
        if isinstance(node, dict) and isinstance(node.get("noise_source"), dict):
            return {str(party): str(source) for party, source in node["noise_source"].items()}
    privacy = summary.get("privacy")
    if isinstance(privacy, dict) and isinstance(privacy.get("secure_mode"), bool):
        return {
            "trainer (DP-SGD noise, Poisson batches)": CSPRNG_NOISE
            if privacy["secure_mode"]
            else SEEDED_NOISE
        }
    config = config if isinstance(config, dict) else {}
    sources: dict[str, str] = {}
    privacy_config, fl = config.get("privacy"), config.get("fl")
    if isinstance(privacy_config, dict) and "secure_mode" in privacy_config:
        sources["DP-SGD noise, Poisson batches (from the ledger's config)"] = (
            CSPRNG_NOISE if privacy_config["secure_mode"] else SEEDED_NOISE
        )
    user_dp = fl.get("user_dp") if isinstance(fl, dict) else None
    if isinstance(user_dp, dict):
        sources["user-level noise shares (from the ledger's config)"] = (
            CSPRNG_NOISE if user_dp.get("secure_mode") else SEEDED_NOISE
        )
    return sources


def _caveats(report: dict[str, Any]) -> list[str]:
    notes = []
    run, user, example = report["run"], report["user_level"], report["example_level"]
    seeded = [party for party, source in report.get("noise_sources", {}).items() if "seed" in source]
    if seeded:
        notes.append(
            f"Seeded noise: {'; '.join(seeded)} drew privacy noise from the config seed. Anyone who holds the "
            "config can replay it, and the epsilons in this report do not hold against them."
        )
    if example is None and user is None:
        notes.append(
            "The ledger holds no spend: nothing private was released yet, or the run recorded nothing."
        )
    if example is not None and example["clients_infinite"]:
        notes.append(
            f"{example['clients_infinite']} client(s) trained with noise multiplier 0: their epsilon is infinite "
            "(no example-level privacy)."
        )
    if user is not None and "fixed_size" in user["sampling"]:
        notes.append(
            "Some rounds sampled a fixed number of clients; the user-level epsilon treats them as Poisson sampling at "
            "rate num_sampled / num_clients, a common approximation, not a proof."
        )
    if run["resumes"]:
        notes.append(
            f"The run was resumed {run['resumes']} time(s); spends recorded before a crash are kept, so epsilon may "
            "over-count (never under-count)."
        )
    return notes


def _fmt(value: float | None, infinite: bool = False) -> str:
    if infinite or value is None:
        return "infinite"
    return f"{value:.3g}"


def plain_language(report: dict[str, Any]) -> str:
    """A paragraph saying what the numbers promise, and what they do not."""
    run, user, example = report["run"], report["user_level"], report["example_level"]
    delta = run["delta"]
    parts = []
    if example is not None:
        eps = example["epsilon"]
        worst = _fmt(eps["max"], example["clients_infinite"] > 0)
        bound = f" = {math.exp(eps['max']):.3g}" if eps["max"] is not None and eps["max"] < 50 else ""
        spread = "" if example["clients"] == 1 else f" (the worst client; median {_fmt(eps['median'])})"
        if example["clients"] == 1:
            who = (
                "Example level: for each single interaction in the training data, anyone who sees everything "
                "the training released (models, checkpoints, updates)"
            )
        else:
            who = (
                f"Example level: for each of the {example['clients']} clients and each single interaction in its "
                "data, anyone who sees everything that client sent"
            )
        parts.append(
            f"{who} learns only a bounded amount about whether that interaction was used: "
            f"with epsilon = {worst}{spread} and delta = {delta:g}, any "
            f"test for 'was this record used?' says 'yes' at most e^epsilon{bound} times as often when the record "
            f"was used as when it was not, plus a probability of at most {delta:g}."
        )
    if user is not None:
        user_eps = _fmt(user["epsilon"], user["epsilon_infinite"])
        if example is not None:
            promise = (
                "the same kind of promise holds for a client's entire data at once (all its interactions together), "
                f"with epsilon = {user_eps} and delta = {delta:g}"
            )
        else:  # no example-level part to refer to: say the promise in full
            promise = (
                "anyone who sees the released models learns only a bounded amount about whether a client's entire "
                f"data (all its interactions together) was used: with epsilon = {user_eps} and delta = {delta:g}, "
                "any test for 'did this client take part?' says 'yes' at most e^epsilon times as often when it did "
                f"as when it did not, plus a probability of at most {delta:g}"
            )
        parts.append(
            f"User level (DP-FedAvg over {user['rounds']} rounds): {promise}, provided the aggregate is released "
            "only when at least the assumed minimum number of clients reported."
        )
    if run["client_epsilon_budget"] is not None:
        parts.append(
            f"Each client's budget is epsilon = {run['client_epsilon_budget']:g}; clients that would have exceeded it "
            f"were left out ({len({e['client'] for e in report['exclusions']})} client(s))."
        )
    seeded = _seeded_parts(run.get("config") or {}, example is not None, user is not None)
    if seeded:
        parts.append(
            f"This run drew its {' and '.join(seeded)} from seeded generators (secure_mode off): anyone who learns "
            "the run's seed can recompute them and undo the promise above, so it holds only against parties "
            "who do not know the seed (for experiments; a release facing an adversary needs secure_mode)."
        )
    parts.append(
        "What this does not promise: it does not hide facts that many records share (population trends), it does "
        "not protect a person whose data is spread over several clients, and it covers only what this ledger "
        "recorded, computed by the "
        + run["accountant"].upper()
        + " accountant for the code as written: a bug in "
        "clipping or noise voids it (the empirical audit, scripts/privacy_audit.py, checks for that). Epsilons "
        "above about 10 promise little in practice."
    )
    return " ".join(parts)


def _seeded_parts(config: dict[str, Any], example: bool, user: bool) -> list[str]:
    """What the run drew from seeded (predictable) generators, from its recorded config."""
    parts = []
    privacy = config.get("privacy") if isinstance(config.get("privacy"), dict) else None
    if example and privacy is not None and not privacy.get("secure_mode", False):
        parts.append("example-level noise")
    fl = config.get("fl") if isinstance(config.get("fl"), dict) else {}
    user_dp = fl.get("user_dp") if isinstance(fl, dict) else None
    if user and isinstance(user_dp, dict) and not user_dp.get("secure_mode", False):
        parts.append("user-level noise shares and client sample")
    return parts


def compare_runs(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Utility against epsilon for several runs' reports.

    Raises:
        PrivacyError: the runs were accounted at different deltas.
    """
    if len(reports) < 2:
        raise PrivacyError(f"a comparison needs at least 2 runs; got {len(reports)}")
    deltas = {r["run"]["delta"] for r in reports}
    if len(deltas) > 1:
        listed = ", ".join(f"{r['logdir']} (delta {r['run']['delta']:g})" for r in reports)
        raise PrivacyError(
            f"runs have different deltas, their epsilons are not comparable: {listed}; compare runs with one delta"
        )
    rows, caveats = [], []
    for r in reports:
        headline = r["headline"] or {}
        rows.append(
            {
                "logdir": r["logdir"],
                "epsilon_kind": headline.get("kind"),
                "epsilon": headline.get("epsilon"),
                "epsilon_infinite": headline.get("infinite", False),
                "example_level_max": (r["example_level"] or {}).get("epsilon", {}).get("max"),
                "user_level": (r["user_level"] or {}).get("epsilon"),
                "accountant": r["run"]["accountant"],
                "utility_metric": (r["utility"] or {}).get("metric"),
                "utility": (r["utility"] or {}).get("value"),
                "higher_is_better": (r["utility"] or {}).get("higher_is_better"),
            }
        )
    if len({row["epsilon_kind"] for row in rows}) > 1:
        caveats.append(
            "Runs report different kinds of epsilon (user-level vs example-level): the plot marks each kind apart."
        )
    if len({row["accountant"] for row in rows}) > 1:
        caveats.append(
            "Runs used different accountants; both give valid upper bounds, PRV usually the tighter one."
        )
    metrics = {row["utility_metric"] for row in rows if row["utility_metric"]}
    if len(metrics) > 1:
        caveats.append(
            f"Runs report different utility metrics ({', '.join(sorted(metrics))}): utility axes differ."
        )
    missing = [row["logdir"] for row in rows if row["utility"] is None]
    if missing:
        caveats.append(f"No utility found in summary.json for: {', '.join(missing)} (left off the plot).")
    return {
        "format": REPORT_FORMAT + "-comparison",
        "version": REPORT_VERSION,
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "delta": deltas.pop(),
        "runs": rows,
        "caveats": caveats,
    }
