"""train_fl.py states its privacy unit and warns on stdout, before the JSON line, when epsilon is above 10."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "federated"))
from fl_helpers import data_cache, tiny_config, train_fl, write_config  # noqa: F401  (fixtures)


def run(tiny_config, tmp_path, **privacy):  # noqa: F811
    config = tiny_config(secure=True, rounds=1, num_workers=10, client_num_per_round=2)
    config["privacy"].update(privacy)
    done = train_fl("--config", str(write_config(tmp_path, config)), "--logdir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    return lines[:-1], json.loads(lines[-1])


def test_a_large_epsilon_is_said_loudly_and_the_unit_is_stated(tiny_config, tmp_path):  # noqa: F811
    before, out = run(tiny_config, tmp_path, noise_multiplier=0.3)
    assert out["epsilon"] > 10
    assert out["privacy_unit"].startswith("example-level")
    assert [line for line in before if line.startswith("WARNING: epsilon")], before


def test_a_small_epsilon_prints_no_warning(tiny_config, tmp_path):  # noqa: F811
    before, out = run(tiny_config, tmp_path, noise_multiplier=5.0)
    # (a seeded run still warns that its noise is replayable: a different warning, tested elsewhere)
    assert out["epsilon"] < 10 and not [line for line in before if line.startswith("WARNING: epsilon")]
