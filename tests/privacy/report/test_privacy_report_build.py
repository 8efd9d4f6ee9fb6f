"""Privacy budget report: numbers agree with the ledger, files are complete and self-contained."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import statistics
from pathlib import Path

import numpy as np
import pytest

from privacy.errors import LedgerError, PrivacyError
from privacy.ledger import PrivacyLedger, ledger_path
from privacy.report.build import build_run_report, compare_runs, read_utility
from privacy.report.plan import parse_plan, run_plan
from privacy.report.render import write_comparison, write_run_report

SPEND = dict(noise_multiplier=1.1, sample_rate=0.05, steps=40)


def make_run(
    logdir,
    *,
    delta=1e-5,
    rounds=8,
    clients=20,
    budget=4.0,
    user_rounds=True,
    auc=0.7,
    accountant="rdp",
    config=None,
):
    """A federated-looking run: Poisson client sampling, budget exclusions, DP-FedAvg round records."""
    os.makedirs(logdir, exist_ok=True)
    rng = np.random.default_rng(0)
    with PrivacyLedger.open(
        ledger_path(logdir),
        delta=delta,
        client_epsilon_budget=budget,
        accountant=accountant,
        config=config if config is not None else {"rounds": rounds},
    ) as ledger:
        for r in range(rounds):
            sampled = [c for c in range(clients) if rng.random() < 0.4]
            if user_rounds:
                ledger.record_round(
                    round=r, noise_multiplier=1.0, clip_norm=1.0, client_sampling_rate=0.4,
                    num_sampled=len(sampled), min_survivors=max(1, len(sampled) - 1),
                )  # fmt: skip
            for client in ledger.admit_clients(sampled, round=r, **SPEND):
                ledger.record_client_spend(client=client, round=r, **SPEND)
    if auc is not None:
        with open(os.path.join(logdir, "summary.json"), "w") as fh:
            json.dump(
                {
                    "config": {"train": {"lr": 0.1}},
                    "val": {"auc": auc + 0.01},
                    "test": {"auc": auc, "loss": 0.4},
                },
                fh,
            )
    return logdir


def test_report_numbers_agree_with_the_ledger(tmp_path):
    logdir = make_run(str(tmp_path / "run"))
    report = build_run_report(logdir)
    with PrivacyLedger.read(ledger_path(logdir)) as ledger:
        epsilons = ledger.epsilons()
        user = ledger.user_level_epsilon()
        exclusions = ledger.exclusions()
    values = list(epsilons.values())
    example = report["example_level"]
    assert example["clients"] == len(epsilons)
    assert example["epsilon"]["min"] == pytest.approx(min(values))
    assert example["epsilon"]["median"] == pytest.approx(statistics.median(values))
    assert example["epsilon"]["max"] == pytest.approx(max(values))
    assert sum(example["histogram"]["counts"]) == len(values)
    per_client = {c["client"]: c for c in report["clients"]}
    for client, eps in epsilons.items():
        assert per_client[client]["epsilon"] == pytest.approx(eps)
        assert per_client[client]["remaining_budget"] == pytest.approx(max(0.0, 4.0 - eps))
    # epsilon against rounds ends at the final values and never decreases
    timeline = report["epsilon_by_round"]
    assert timeline["example_max"][-1] == pytest.approx(max(values))
    assert timeline["user_level"][-1] == pytest.approx(user)
    for key in ("example_max", "user_level"):
        assert all(b >= a - 1e-12 for a, b in zip(timeline[key], timeline[key][1:]))
    assert report["user_level"]["epsilon"] == pytest.approx(user)
    assert report["user_level"]["rounds"] == 8
    assert exclusions, "the run should have excluded someone"
    assert [(e["client"], e["round"]) for e in report["exclusions"]] == [
        (e.client, e.round) for e in exclusions
    ]
    assert {per_client[e.client]["excluded_from_round"] for e in exclusions} == {e.round for e in exclusions}
    assert report["run"]["delta"] == 1e-5 and report["run"]["accountant"] == "rdp"
    assert report["utility"]["metric"] == "test.auc" and report["utility"]["value"] == 0.7
    assert report["headline"]["kind"] == "user-level"
    assert f"{max(values):.3g}" in report["statement"] and "does not promise" in report["statement"]


def test_files_are_written_and_html_is_self_contained(tmp_path):
    logdir = make_run(str(tmp_path / "run"))
    written = write_run_report(build_run_report(logdir), logdir)
    for key in ("json", "md", "html", "epsilon_histogram", "epsilon_by_round"):
        assert os.path.getsize(written[key]) > 0
    for png in ("epsilon_histogram", "epsilon_by_round"):
        with open(written[png], "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    page = Path(written["html"]).read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    # Nothing to fetch: no external scripts, styles, fonts or images.
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page
    markdown = Path(written["md"]).read_text()
    assert "privacy_report_epsilon_histogram.png" in markdown and "## Excluded clients" in markdown
    loaded = json.loads(Path(written["json"]).read_text())
    assert loaded["format"] == "fedrec-privacy-report"
    assert not [name for name in os.listdir(logdir) if ".tmp-" in name]


def test_zero_noise_spend_never_reaches_a_report(tmp_path):
    logdir = str(tmp_path / "nonoise")
    os.makedirs(logdir)
    with PrivacyLedger.open(ledger_path(logdir), delta=1e-5) as ledger:
        with pytest.raises(PrivacyError, match="noise_multiplier"):
            ledger.record_client_spend(client=1, round=0, noise_multiplier=0.0, sample_rate=0.1, steps=10)
        ledger.record_client_spend(client=2, round=0, **SPEND)
    report = build_run_report(logdir)
    assert report["example_level"]["clients"] == 1 and report["example_level"]["clients_infinite"] == 0


def test_missing_and_damaged_ledgers_are_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LedgerError, match="no privacy ledger"):
        build_run_report(str(empty))
    logdir = make_run(str(tmp_path / "run"))
    path = ledger_path(logdir)
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    with pytest.raises(LedgerError, match=r"privacy_ledger\.sqlite"):
        build_run_report(logdir)


def test_comparison_refuses_different_deltas_and_compares_same_delta(tmp_path):
    a = build_run_report(make_run(str(tmp_path / "a"), delta=1e-5, auc=0.70))
    b = build_run_report(make_run(str(tmp_path / "b"), delta=1e-6, auc=0.72))
    with pytest.raises(PrivacyError, match="different deltas"):
        compare_runs([a, b])
    c = build_run_report(make_run(str(tmp_path / "c"), delta=1e-5, auc=0.75, user_rounds=False))
    comparison = compare_runs([a, c])
    assert [row["utility"] for row in comparison["runs"]] == [0.70, 0.75]
    assert comparison["runs"][1]["epsilon_kind"] == "example-level, worst client"
    assert any("different kinds" in note for note in comparison["caveats"])
    written = write_comparison(comparison, str(tmp_path / "cmp"))
    assert os.path.getsize(written["utility_vs_epsilon"]) > 0
    assert "data:image/png;base64," in Path(written["html"]).read_text()


def test_prv_run_report(tmp_path):
    report = build_run_report(make_run(str(tmp_path / "prv"), accountant="prv", rounds=4, clients=8))
    assert report["run"]["accountant"] == "prv"
    assert report["example_level"]["epsilon"]["max"] > 0
    assert "PRV" in report["statement"]


def test_utility_metric_selection(tmp_path):
    run = tmp_path / "u"
    run.mkdir()
    assert read_utility(str(run)) is None
    (run / "summary.json").write_text(
        json.dumps({"config": {"auc": 9}, "val": {"rmse": 1.1}, "test": {"rmse": 0.9}})
    )
    picked = read_utility(str(run))
    assert picked["metric"] == "test.rmse" and picked["higher_is_better"] is False
    assert read_utility(str(run), metric="val.rmse")["value"] == 1.1
    with pytest.raises(PrivacyError, match=r"--metric test\.auc"):
        read_utility(str(run), metric="test.auc")


def test_plan_what_ifs():
    line = run_plan(parse_plan(["noise_multiplier=1.5", "sample_rate=0.04", "steps=2250", "delta=1e-5"]))
    assert line.startswith("epsilon = 7.3291 ")
    line = run_plan(parse_plan(["target_epsilon=3", "sample_rate=0.01", "steps=5000", "delta=1e-6"]))
    sigma = float(line.split()[2])
    assert 1.0 < sigma < 2.0
    assert parse_plan(["noise_multiplier=1", "sample_rate=0.01", "epochs=2", "delta=1e-6"])["steps"] == 200
    for bad in (
        ["noise_multiplier=1", "sample_rate=0.01", "steps=10"],  # no delta
        ["noise_multiplier=1", "target_epsilon=2", "sample_rate=0.01", "steps=10", "delta=1e-5"],
        ["noise=1", "sample_rate=0.01", "steps=10", "delta=1e-5"],
        ["noise_multiplier=x", "sample_rate=0.01", "steps=10", "delta=1e-5"],
        ["noise_multiplier=1", "sample_rate=0.01", "steps=10", "delta=1e-5", "accountant=moments"],
    ):
        with pytest.raises(PrivacyError):
            run_plan(parse_plan(bad))
    assert math.isfinite(float(run_plan(parse_plan(["noise_multiplier=1", "sample_rate=1", "steps=1", "delta=1e-5",
                                                     "accountant=gdp"])).split()[2]))  # fmt: skip


def test_statement_says_when_the_noise_came_from_seeded_generators(tmp_path):
    seeded = {"privacy": {"secure_mode": False}, "fl": {"user_dp": {"secure_mode": False}}}
    report = build_run_report(make_run(str(tmp_path / "seeded"), config=seeded))
    assert (
        "example-level noise and user-level noise shares and client sample from seeded" in report["statement"]
    )
    secure = {"privacy": {"secure_mode": True}, "fl": {"user_dp": {"secure_mode": True}}}
    report = build_run_report(make_run(str(tmp_path / "secure"), config=secure))
    assert "seeded generators" not in report["statement"]


def test_a_large_population_is_summarised_with_each_clients_own_rounds_and_steps(tmp_path):
    """400 clients over 6 rounds: every client's rounds and steps come from its own spends; the Markdown
    and HTML list the 200 most exposed clients and say how many more the JSON holds."""
    logdir = make_run(str(tmp_path / "run"), clients=400, rounds=6, budget=None)
    report = build_run_report(logdir)
    with PrivacyLedger.read(ledger_path(logdir)) as ledger:
        spends = ledger.client_spends()
    own: dict[str, list] = {}
    for spend in spends:
        own.setdefault(spend.client, []).append(spend)
    assert len(report["clients"]) == len(own) > 300
    for client in report["clients"]:
        mine = own[client["client"]]
        assert client["rounds"] == len({s.round for s in mine}) and client["steps"] == sum(
            s.steps for s in mine
        )
    assert max(c["rounds"] for c in report["clients"]) > 1
    files = write_run_report(report, str(tmp_path / "out"))
    markdown = Path(files["md"]).read_text()
    assert f"... and {len(own) - 200} more in privacy_report.json." in markdown
    assert f"... and {len(own) - 200} more in privacy_report.json." in Path(files["html"]).read_text()


def user_level_run(logdir: str, *, excluded: int = 0) -> str:
    os.makedirs(logdir)
    with PrivacyLedger.open(ledger_path(logdir), delta=1e-7, accountant="rdp", config={}) as ledger:
        for r in range(20):
            ledger.record_round(
                round=r, noise_multiplier=1.0, clip_norm=1.0, client_sampling_rate=1e-3,
                num_sampled=1000, min_survivors=900,
            )  # fmt: skip
        for client in range(excluded):
            ledger.record_exclusion(client=client, round=19, reason="budget")
    return logdir


def test_a_user_level_only_run_says_its_ledger_has_one_record_per_round(tmp_path):
    report = build_run_report(user_level_run(str(tmp_path / "run")))
    assert report["clients"] == [] and report["run"]["round_records"] == 20
    assert report["user_level"]["rounds"] == 20
    files = write_run_report(report, str(tmp_path / "out"))
    for name in ("md", "html"):
        text = Path(files[name]).read_text()
        assert "the ledger keeps one record per round (20 rounds above), not one per client" in text


def test_the_exclusion_tables_list_200_and_name_the_rest(tmp_path):
    report = build_run_report(user_level_run(str(tmp_path / "run"), excluded=250))
    assert len(report["exclusions"]) == 250
    files = write_run_report(report, str(tmp_path / "out"))
    markdown = Path(files["md"]).read_text()
    assert "| 199 | 19 | budget |" in markdown and "| 200 | 19 | budget |" not in markdown
    assert markdown.count("... and 50 more in privacy_report.json.") == 2  # exclusions and clients
    assert Path(files["html"]).read_text().count("... and 50 more in privacy_report.json.") == 2
