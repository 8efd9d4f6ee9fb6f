"""Bad config input from the attack run (issue 14, finding 8): each a one-line ConfigError naming the key.

Duplicate YAML keys were kept silently (the last won), an alias bomb raised MemoryError, seed=2**70
gave a traceback, and 1e309 passed validation as infinity (train.lr, fl.encryption.clip,
fl.server_lr), failing late after spends were recorded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrec.config import load_config
from fedrec.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DLRM = "model:\n  name: dlrm\n  preproc:\n    dataset: criteo\n"


def write(tmp_path, text, name="c.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_duplicate_yaml_key_is_an_error_naming_the_file_and_key(tmp_path):
    path = write(tmp_path, DLRM + "train:\n  lr: 0.1\n  lr: 100.0\n")
    with pytest.raises(ConfigError, match=r"c\.yml: invalid YAML at line 7.*duplicate key 'lr'"):
        load_config(path)
    path = write(tmp_path, DLRM + "seed: 1\nseed: 2\n", name="d.yml")
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        load_config(path)


def test_duplicate_key_in_an_override_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="duplicate key"):
        load_config(write(tmp_path, DLRM), ["train={lr: 0.1, lr: 9}"])


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    path = write(tmp_path, DLRM + "\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"c\.yml: invalid YAML at line \d+.*alias \*a is not allowed"):
        load_config(path)
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("value", [2**70, -1, 2**32])
def test_seed_out_of_range_is_an_error(tmp_path, value):
    with pytest.raises(
        ConfigError, match=rf"config key 'seed' = {value}: expected an integer (in \[0, |that fits)"
    ):
        load_config(write(tmp_path, DLRM), [f"seed={value}"])
    with pytest.raises(ConfigError, match=r"model\.preproc\.synthetic\.seed"):
        load_config(write(tmp_path, DLRM), [f"model.preproc.synthetic.seed={value}"])


def test_huge_integers_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.batch_size' = .*64 bits"):
        load_config(write(tmp_path, DLRM), [f"train.batch_size={2**80}"])


@pytest.mark.parametrize("text", ["1e309", "-1e309", ".inf", ".nan", "1.0e400"])
def test_non_finite_float_is_an_error(tmp_path, text):
    with pytest.raises(ConfigError, match=r"config key 'train\.lr' = .*expected a finite number"):
        load_config(write(tmp_path, DLRM), [f"train.lr={text}"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("fl.encryption.clip=1e309", "fl.encryption.clip"),
        ("fl.server_lr=1e309", "fl.server_lr"),
        ("privacy.delta=.nan", "privacy.delta"),
        ("privacy.max_grad_norm=1e400", "privacy.max_grad_norm"),
    ],
)
def test_non_finite_settings_of_shipped_configs_are_errors(override, key):
    config = "configs/dlrm_fl.yml" if override.startswith("fl.") else "configs/dlrm_dp.yml"
    with pytest.raises(ConfigError, match=f"config key '{key}' = .*expected a finite number"):
        load_config(ROOT / config, [override])


def test_script_prints_one_line_and_writes_nothing(tmp_path):
    logdir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train_dp.py"),
            "--config",
            "configs/dlrm_dp.yml",
            "--logdir",
            str(logdir),
            "train.lr=1e309",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "train_dp.py: error: configs/dlrm_dp.yml: config key 'train.lr' = '1e309': expected a finite number (got inf)"
    ]
    assert not logdir.exists()
