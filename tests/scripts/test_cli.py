"""The command line every script shares (fedrec.cli), as users run it.

Covers: overrides in any position in every script; ``--print-config``, ``--dry-run``, ``--version``
and ``--help`` (config keys from the schema, the same text as configs/flags.md); a LOGDIR holding a
run refused without ``--resume``; what Ctrl-C left; the late or vague checks (CPU-only torch,
``mpirun -np 1``, noise_multiplier over a target_epsilon file, a python without the dependencies, a
shadowing ``privacy`` package); ``python -m fedrec``; summary.json's versions; top-level
``import_modules``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fedrec.cli import parse_devices
from fedrec.config import load_config
from fedrec.config.keys import keys_markdown, replace_generated
from fedrec.errors import ConfigError
from fedrec.experiment import run_central_training
from fedrec.trainers.base_trainer import BaseTrainer

ROOT = Path(__file__).resolve().parents[2]
MPIRUN = Path(sys.executable).parent / "mpirun"
SCRIPTS = ["train.py", "train_dp.py", "train_fl.py", "deploy_syft.py", "preprocess_data.py"]
CONFIG_OF = {
    "train.py": "mf_movielens.yml",
    "train_dp.py": "dlrm_dp.yml",
    "train_fl.py": "dlrm_fl.yml",
    "deploy_syft.py": "syft_fl.yml",
    "preprocess_data.py": "dlrm.yml",
}
TINY_MF = [
    "model.preproc.synthetic.rows=3000",
    "model.preproc.synthetic.users=80",
    "model.preproc.synthetic.items=100",
    "train.progress=false",
    "train.num_eval_batches=1",
]


def env() -> dict[str, str]:
    out = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT), out.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return out


def run(*command: str, cwd: Path = ROOT, environ: dict | None = None, timeout: int = 300):
    return subprocess.run(
        list(command), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environ or env()
    )


def script(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(sys.executable, str(ROOT / "scripts" / name), *args, **kwargs)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# ---------------------------------------------------------------- overrides anywhere, --print-config


@pytest.mark.parametrize("name", SCRIPTS)
def test_overrides_in_any_position_in_every_script(name, capsys, tmp_path):
    main = load_script(name).main
    argv = ["--config", str(ROOT / "configs" / CONFIG_OF[name]), "train.lr=0.05", "--logdir"]
    argv += [str(tmp_path / "run"), f"model.preproc.cache_dir={tmp_path}/cache", "--print-config", "seed=7"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 0.05 and printed["seed"] == 7
    assert printed["model"]["preproc"]["cache_dir"] == f"{tmp_path}/cache"
    assert not (tmp_path / "run").exists()  # --print-config writes nothing


def test_print_config_needs_no_logdir_but_a_run_does(capsys):
    main = load_script("train.py").main
    assert main(["--config", str(ROOT / "configs" / "dlrm.yml"), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["name"] == "dlrm"
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(ROOT / "configs" / "dlrm.yml")])
    assert exit_info.value.code == 2
    assert "--logdir" in capsys.readouterr().err


# ---------------------------------------------------------------- --help, --version, python -m fedrec


def test_help_lists_the_config_keys_as_flags_md_does(capsys):
    with pytest.raises(SystemExit):
        load_script("train_dp.py").main(["--help"])
    out = capsys.readouterr().out
    generated = keys_markdown()
    assert generated in out
    for key in (
        "`privacy.target_epsilon`",
        "`fl.user_dp.clip_norm`",
        "`import_modules`",
        "`model.embedding_dim`",
    ):
        assert key in generated
    flags_md = (ROOT / "configs" / "flags.md").read_text()
    assert replace_generated(flags_md, generated) == flags_md, (
        "configs/flags.md is stale: python -m fedrec.config.keys --write configs/flags.md"
    )


def test_version_and_python_m_fedrec(tmp_path):
    done = run(sys.executable, "-m", "fedrec", "--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "fedrec 0.1.0", done.stderr
    done = script("train.py", "--version")
    assert done.returncode == 0 and done.stdout.strip() == "fedrec 0.1.0"
    plan = ["noise_multiplier=1.1", "sample_rate=0.01", "steps=500", "delta=1e-6"]
    done = run(sys.executable, "-m", "fedrec", "report", "--plan", *plan, cwd=tmp_path)
    direct = script("privacy_report.py", "--plan", *plan)
    assert done.returncode == 0 and done.stdout == direct.stdout and "epsilon = " in done.stdout
    done = run(sys.executable, "-m", "fedrec", "nonsense", cwd=tmp_path)
    assert done.returncode == 2 and "unknown command 'nonsense'" in done.stderr
    # The installed command (console_scripts) is declared; it needs a reinstall to appear in .venv/bin.
    assert '"fedrec=fedrec.__main__:main"' in (ROOT / "setup.py").read_text()


# ---------------------------------------------------------------- a LOGDIR holding a run, Ctrl-C


def test_train_refuses_a_logdir_holding_a_run_and_records_versions(tmp_path):
    logdir = tmp_path / "run"
    cache = f"model.preproc.cache_dir={tmp_path}/cache"
    args = ["--config", str(ROOT / "configs" / "mf_movielens.yml"), "train.lr=0.05", "--logdir", str(logdir)]
    done = script("train.py", *args, cache, "train.max_steps=3", *TINY_MF)
    assert done.returncode == 0, done.stderr
    summary_text = (logdir / "summary.json").read_text()
    summary = json.loads(summary_text)
    assert summary["config"]["train"]["lr"] == 0.05
    versions = summary["versions"]
    for name in ("torch", "opacus", "tenseal", "syft", "mpi4py"):
        assert versions[name] == importlib.metadata.version(name)
    assert versions["fedrec"] == "0.1.0"
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert versions["git_commit"].startswith(head.stdout.strip())

    again = script("train.py", *args, cache, "train.max_steps=3", *TINY_MF)
    message = one_line_error(again)
    assert "holds a run already" in message and "--resume" in message
    assert (logdir / "summary.json").read_text() == summary_text  # nothing overwritten
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1  # no second events file
    assert "holds a run already" in one_line_error(script("train.py", *args, "--dry-run"))

    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--config", str(ROOT / "configs" / "mf_movielens.yml"), "--logdir", str(empty), "--resume"]
    message = one_line_error(script("train.py", *args, cache, *TINY_MF))
    assert "no checkpoint" in message and "without --resume" in message


class InterruptedTrainer(BaseTrainer):
    """A real trainer whose user presses Ctrl-C after ``INTERRUPT_AT`` steps."""

    INTERRUPT_AT = 5

    def training_step(self, batch):
        loss = super().training_step(batch)
        if self.step + 1 >= self.INTERRUPT_AT:
            raise KeyboardInterrupt
        return loss


@pytest.mark.parametrize("checkpoint_every, written", [(2, True), (1000, False)])
def test_ctrl_c_says_whether_a_checkpoint_was_written(tmp_path, checkpoint_every, written):
    overrides = [f"model.preproc.cache_dir={tmp_path}/cache", f"train.checkpoint_every={checkpoint_every}"]
    config = load_config(ROOT / "configs" / "mf_movielens.yml", [*TINY_MF, *overrides])
    messages: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_central_training(
            config, InterruptedTrainer, logdir=str(tmp_path / "run"), sparse=False, log=messages.append
        )
    assert len(messages) == 1
    if written:
        assert "the last checkpoint" in messages[0] and "--resume" in messages[0]
        assert (tmp_path / "run" / "checkpoint.pt").exists()
    else:
        assert "before the first checkpoint" in messages[0] and "nothing to resume" in messages[0]
        assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------- --dry-run


def test_dry_run_checks_data_and_devices_and_writes_nothing(tmp_path):
    logdir = tmp_path / "run"
    args = ["--config", str(ROOT / "configs" / "dlrm.yml"), "--logdir", str(logdir), "--dry-run"]
    done = script("train.py", *args)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["dry_run"] == "ok" and out["devices"] == ["cpu"] and out["model"] == "dlrm"
    assert not logdir.exists()
    missing = script("train.py", *args, f"model.preproc.datafile={tmp_path}/nope.txt")
    assert "model.preproc.datafile" in one_line_error(missing) and "not found" in missing.stderr
    bad_key = script("train_dp.py", *args[:-1], "--dry-run", "privacy.noise_multiplier=-1")
    one_line_error(bad_key)


# ---------------------------------------------------------------- late or vague checks


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch build")
def test_devices_0_with_a_cpu_only_torch_says_how_to_get_cuda():
    with pytest.raises(ConfigError) as err:
        parse_devices("0")
    assert "CPU-only build" in str(err.value) and "download.pytorch.org" in str(err.value)


def test_noise_multiplier_override_on_a_target_epsilon_file_suggests_the_fix():
    done = script("train_dp.py", "--config", str(ROOT / "configs" / "dlrm_dp.yml"), "--print-config",
                  "privacy.noise_multiplier=1.1")  # fmt: skip
    assert "add privacy.target_epsilon=null" in one_line_error(done)
    done = script("train_dp.py", "--config", str(ROOT / "configs" / "dlrm_dp.yml"), "--print-config",
                  "privacy.noise_multiplier=1.1", "privacy.target_epsilon=null")  # fmt: skip
    assert done.returncode == 0 and yaml.safe_load(done.stdout)["privacy"]["noise_multiplier"] == 1.1


@pytest.mark.slow
def test_mpirun_with_one_process_says_so(tmp_path):
    command = [
        str(MPIRUN),
        "-np",
        "1",
        sys.executable,
        "-m",
        "mpi4py.futures",
        str(ROOT / "scripts" / "train_fl.py"),
    ]
    command += [
        "--config",
        str(ROOT / "configs" / "dlrm_fl.yml"),
        "--logdir",
        str(tmp_path / "run"),
        "--dry-run",
    ]
    done = run(*command, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (
        "started by mpirun with 1 process" in done.stderr
        and "every client runs in this one process" in done.stderr
    )
    plain = script("train_fl.py", *command[command.index("--config") :])
    assert plain.returncode == 0 and "mpirun" not in plain.stderr


@pytest.mark.parametrize("name", [*SCRIPTS, "privacy_report.py", "privacy_audit.py"])
def test_a_python_without_the_dependencies_points_to_the_venv(name):
    done = run(sys.executable, "-S", str(ROOT / "scripts" / name), "--help")  # -S: no site-packages
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert ".venv/bin/python" in lines[0] and "cannot import" in lines[0]


def test_a_shadowing_privacy_package_is_a_clear_error(tmp_path):
    (tmp_path / "privacy").mkdir()
    (tmp_path / "privacy" / "__init__.py").write_text("")
    environ = env()
    environ["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    done = run(sys.executable, "-c", "import fedrec", environ=environ, cwd=tmp_path)
    assert done.returncode != 0 and "another package named 'privacy'" in done.stderr
    assert str(tmp_path / "privacy") in done.stderr
    done = run(sys.executable, str(ROOT / "scripts" / "train.py"), "--help", environ=environ, cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr and "shadows fedrec's own" in done.stderr


# ---------------------------------------------------------------- import_modules


MODULE = """
from dataclasses import dataclass
from torch import nn
from fedrec import registry

@dataclass
class TinyConfig:
    width: int = 3

@registry.load("model", "usability_tiny")
class Tiny(nn.Module):
    Config = TinyConfig
    TASK = "ctr"

    @classmethod
    def check_config(cls, config, dataset_cls, path):
        pass
"""


def test_import_modules_registers_a_model_before_validation(tmp_path, monkeypatch):
    (tmp_path / "usability_tiny_model.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    config_file = tmp_path / "c.yml"
    config_file.write_text(yaml.safe_dump({"model": {"name": "usability_tiny", "width": 5}}))
    with pytest.raises(ConfigError, match="usability_tiny"):
        load_config(config_file)  # not imported: unknown model
    config = load_config(config_file, ["import_modules=[usability_tiny_model]"])
    assert config.model.name == "usability_tiny" and config.model.params.width == 5
    with pytest.raises(ConfigError, match=r"'import_modules'.*'no_such_module_xyz'"):
        load_config(config_file, ["import_modules=[no_such_module_xyz]"])


# ---------------------------------------------------------------- tensorboard (setuptools pin)


def test_tensorboard_entry_point_imports():
    """`tensorboard --logdir runs` needs pkg_resources (setuptools < 82); fails until the venv has the pin."""
    done = run(sys.executable, "-c", "import tensorboard.main", timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert "setuptools<82" in (ROOT / "setup.py").read_text()
    pins = [
        line
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.startswith("setuptools==")
    ]
    assert len(pins) == 1 and int(pins[0].split("==")[1].split(".")[0]) < 82
