"""Every config shipped in configs/ loads and runs, at tiny size, through the script a user runs it with.

Only sizes are overridden (rows, users/items, clients, rounds, steps): the model, privacy,
encryption and algorithm settings are the file's own, so a config that stops matching the code
(an unknown key, a setting the code refuses) fails here. syft_fl.yml runs through train_fl.py,
the simulation of the same deployment (the datasite deployment itself: tests/deploy);
syft_owner_policy.yml is a data owner's policy, loaded by fedrec.deploy.policy.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from fedrec.config import load_config
from fedrec.deploy.policy import OwnerPolicy

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yml"))
POLICIES = {"syft_owner_policy.yml"}
SCRIPT = {
    "dlrm.yml": "train.py",
    "mf_movielens.yml": "train.py",
    "dlrm_dp.yml": "train_dp.py",
    "mf_movielens_dp.yml": "train_dp.py",
}  # fmt: skip  (the rest: train_fl.py)


def script_main(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name[:-3]}", ROOT / "scripts" / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def tiny_overrides(name: str, cache: Path) -> list[str]:
    config = load_config(ROOT / "configs" / name)
    out = [f"model.preproc.cache_dir={cache}"]
    if "movielens" in name:
        users, rows, items = 50, 2000, 100
        if config.model.preproc.synthetic.preset == "population-1m":
            # 500 users keep q = 3/500 small enough for one round to fit the file's user-level budget;
            # the preset lets a user rate at most 20 % of the items (200 items: 40) and at least 20
            users, rows, items = 500, 10000, 200
        out += [f"model.preproc.synthetic.rows={rows}", f"model.preproc.synthetic.users={users}",
                f"model.preproc.synthetic.items={items}"]  # fmt: skip
    else:
        out += ["model.preproc.synthetic.rows=3000", "model.preproc.synthetic.vocab_size=20"]
    out += ["train.max_steps=3", "train.eval_batch_size=512"]
    if config.privacy is not None and config.privacy.epsilon_budget is not None:
        # a batch sized for ~86k-row silos would sample most of a tiny client's rows each step: a
        # tiny batch keeps the sampling rate, and so the spend, inside the file's own budget
        out.append("train.batch_size=16")
    if config.fl is not None:
        out += ["fl.rounds=1", "fl.client_num_per_round=3", "fl.local_steps=2", "fl.eval_every=1"]
        if config.fl.num_workers is not None:
            out.append("fl.num_workers=4")
        if config.fl.eval_users is not None:
            out.append("fl.eval_users=null")  # every user of the tiny set
        if config.fl.user_dp is not None:
            # 3 clients a round instead of 100: the encryption grid must hold a larger noise share
            # (sigma S / sqrt(k) with k ~ 1), which the simulation checks against fl.encryption.clip.
            out += ["fl.min_completion_rate=0.5", "fl.encryption.clip=8.0"]
            if config.fl.user_dp.adaptive_clip is not None:
                # its default count noise is the expected clients / 20: 3 clients would give 0.15,
                # below sigma / 2 (refused); a tiny run names one that fits
                out.append("fl.user_dp.adaptive_clip.count_noise_multiplier=1.0")
    return out


def test_every_config_is_covered():
    assert set(CONFIGS) >= {"dlrm_fl.yml", "mf_movielens_fl.yml", "mf_movielens_fl_userdp.yml", "syft_fl.yml"}


@pytest.mark.parametrize("name", [c for c in CONFIGS if c not in POLICIES])
def test_config_runs_at_tiny_size(name, tmp_path, capsys):
    script = SCRIPT.get(name, "train_fl.py")
    logdir = tmp_path / "run"
    code = script_main(script)(["--config", str(ROOT / "configs" / name), "--logdir", str(logdir),
                                *tiny_overrides(name, tmp_path / "data")])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((logdir / "summary.json").read_text())
    metrics = out["test"]
    config = load_config(ROOT / "configs" / name)
    main = "rmse" if config.model.preproc.dataset == "movielens" else "auc"
    assert math.isfinite(metrics[main])
    if script == "train_fl.py":
        assert out["rounds"] == 1
        if config.fl.secure:
            assert out["epsilon"] is not None and out["epsilon"] > 0  # DP-SGD on every client
        assert summary["config"]["model"]["name"] == config.model.name
    elif script == "train_dp.py":
        assert summary["privacy"]["steps"] == 3 and summary["privacy"]["epsilon"] > 0


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_file_loads(name):
    policy = OwnerPolicy.load(str(ROOT / "configs" / name))
    assert policy.approve
