"""Seeded runs say so loudly (issue 14 item 1): a WARNING line on stdout per seeded party, the
summary's ``noise_source`` section, and the privacy report states the noise source for every party."""

from __future__ import annotations

import json

from fedrec.config.loader import build_experiment
from fedrec.federated.simulation import Simulation
from privacy.report.build import build_run_report, read_noise_sources
from privacy.report.render import run_html, run_markdown

CLIENTS = "clients (DP-SGD noise, Poisson batches)"


def run(config, logdir):
    Simulation(build_experiment(config), str(logdir), log=lambda message: None).run()
    return json.loads((logdir / "summary.json").read_text())


def secure(tiny_config, **privacy):
    config = tiny_config(secure=True, rounds=1, local_epochs=1)
    config["privacy"] = {"noise_multiplier": 1.3, "max_grad_norm": 0.7, **privacy}
    return config


def test_a_seeded_secure_run_warns_on_stdout_and_the_report_names_the_source(tiny_config, tmp_path, capsys):
    summary = run(secure(tiny_config), tmp_path)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 1 and CLIENTS in warnings[0] and "config seed" in warnings[0]
    assert summary["federated"]["noise_source"] == {CLIENTS: read_noise_sources(str(tmp_path), {})[CLIENTS]}
    assert "config seed" in summary["federated"]["noise_source"][CLIENTS]
    report = build_run_report(str(tmp_path))
    text = run_markdown(report, {})
    assert f"| {CLIENTS} | config seed" in text
    assert any(note.startswith("Seeded noise: " + CLIENTS) for note in report["caveats"])
    assert "Noise source" in run_html(report, {})


def test_a_csprng_run_does_not_warn_and_says_so(tiny_config, tmp_path, capsys):
    summary = run(secure(tiny_config, secure_mode=True), tmp_path)
    assert "WARNING:" not in capsys.readouterr().out
    assert summary["federated"]["noise_source"] == {CLIENTS: "OS CSPRNG"}
    report = build_run_report(str(tmp_path))
    assert f"| {CLIENTS} | OS CSPRNG |" in run_markdown(report, {})
    assert not any(note.startswith("Seeded noise") for note in report["caveats"])


def test_user_dp_parties_are_named_in_plaintext_too(tiny_config, tmp_path, capsys):
    summary = run(tiny_config(rounds=1, user_dp={"noise_multiplier": 1.0, "clip_norm": 0.5}), tmp_path)
    sources = summary["federated"]["noise_source"]
    assert set(sources) == {"clients (user-level noise shares)", "aggregator (user-level client sample)"}
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 2
    assert set(build_run_report(str(tmp_path))["noise_sources"]) == set(sources)


def test_a_central_dp_summary_names_the_trainer(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"privacy": {"secure_mode": False}}))
    assert "config seed" in read_noise_sources(str(tmp_path), {})["trainer (DP-SGD noise, Poisson batches)"]
    (tmp_path / "summary.json").write_text(json.dumps({"privacy": {"secure_mode": True}}))
    assert read_noise_sources(str(tmp_path), {}) == {"trainer (DP-SGD noise, Poisson batches)": "OS CSPRNG"}
