"""Every command in README.md, run as written at a tiny size, so the README cannot rot.

The test parses README.md's ```bash blocks (and the Python blocks: the "Adding a model" module and
the API example) and runs every command in order in one scratch directory, as a user would from a
checkout, with only these substitutions (listed in ``adapt``): ``.venv/bin/...`` -> this venv;
``scripts/`` and ``configs/`` -> this checkout; ``/data/...`` raw files -> tiny files in the real
formats; ``--devices 0`` -> ``cpu`` without CUDA; ``mpirun -np 4`` -> ``-np 2`` and
``--num_workers 1000`` -> 20 (2 cores); ``tensorboard --logdir runs`` gets ``--inspect`` (it reads
the event files and exits instead of serving); and tiny-size overrides appended to each training
command (rows, architecture, steps, rounds). ``make demo``, ``make test`` and ``make mutants`` are not run here (the
demo takes minutes; make test runs this suite; CI runs make mutants after it); their scripts are the ones tested below.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
NOT_RUN = {"make demo", "make test", "make mutants"}

TINY_CRITEO = ["model.preproc.synthetic.vocab_size=20"]
TINY_DLRM = [
    "model.arch_sparse_feature_size=4",
    "model.arch_mlp_bot=[13,8,4]",
    "model.arch_mlp_top=[355,8,1]",
]
TINY_MOVIELENS = ["model.preproc.synthetic.users=80", "model.preproc.synthetic.items=100"]
TINY_STEPS = ["train.max_steps=4", "train.epochs=1"]
TINY_FL = ["fl.rounds=1", "fl.client_num_per_round=4", "fl.local_steps=2", "fl.local_epochs=1"]
TRAINING_SCRIPTS = ("train.py", "train_dp.py", "train_fl.py", "deploy_syft.py", "preprocess_data.py")


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[str]:
    """Shell commands of a bash block: comments dropped, a heredoc kept with its command."""
    out: list[str] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        heredoc = re.search(r"<<'?(\w+)'?", line)
        if heredoc:
            body = [line]
            while i < len(lines):
                body.append(lines[i])
                i += 1
                if lines[i - 1].strip() == heredoc.group(1):
                    break
            out.append("\n".join(body))
            continue
        out.append(re.sub(r"\s+#\s.*$", "", line).strip())
    return out


def config_overrides(command: str, scratch: Path) -> list[str]:
    """Tiny-size overrides for a training command, from its script and config."""
    script = next((s for s in TRAINING_SCRIPTS if f"scripts/{s}" in command), None)
    if script is None:
        return []
    config = re.search(r"--config (\S+)", command)
    name = os.path.basename(config.group(1)) if config else ""
    extra = [f"model.preproc.cache_dir={scratch}/data", "model.preproc.synthetic.rows=3000"]
    extra += ["train.progress=false", "train.num_eval_batches=1", "train.eval_batch_size=512"]
    if name.startswith(("mf_", "movielens")):
        extra += TINY_MOVIELENS
    else:
        extra += TINY_CRITEO
    if name.startswith(("dlrm", "syft")):
        extra += TINY_DLRM
    if script in ("train.py", "train_dp.py"):
        extra += TINY_STEPS
    if script == "train_fl.py":
        extra += TINY_FL
        if name.startswith("mf_movielens_fl"):  # user-level DP (on in both MF FL configs) needs a Poisson
            # sample large enough for the encryption grid
            extra.append("fl.client_num_per_round=80")  # every one of the 80 users
    if script == "deploy_syft.py":
        extra += ["fl.rounds=1", "fl.num_workers=2", "fl.client_num_per_round=2", "fl.local_steps=2"]
    return extra


def adapt(command: str, scratch: Path, raw_files: dict[str, Path]) -> str:
    """The README command as it runs here (the substitutions the module docstring lists)."""
    if command.startswith("cat >"):
        return command
    command = command.replace(".venv/bin/mpirun -np 4", f"{VENV_BIN / 'mpirun'} -np 2")
    command = command.replace(".venv/bin/python", sys.executable)
    command = command.replace(
        ".venv/bin/tensorboard --logdir runs", f"{VENV_BIN / 'tensorboard'} --logdir runs --inspect"
    )
    command = re.sub(r"(^| )scripts/", rf"\g<1>{ROOT}/scripts/", command)
    command = re.sub(r"(^| )configs/", rf"\g<1>{ROOT}/configs/", command)
    for readme_path, path in raw_files.items():
        command = command.replace(readme_path, str(path))
    import torch

    if not torch.cuda.is_available():
        command = command.replace("--devices 0", "--devices cpu")
    command = command.replace("--num_workers 1000", "--num_workers 20")
    if "scripts/privacy_audit.py" in command and "--trials" not in command:
        command += " --trials 100 --steps 20"
    extra = config_overrides(command, scratch)
    return command + "".join(f" {shlex.quote(o)}" for o in extra)


def write_raw_files(scratch: Path, readme: str) -> dict[str, Path]:
    """Tiny raw files in the formats of the ``/data/...`` paths the README names."""
    from fedrec.data.synthetic import write_criteo, write_movielens

    files = {}
    for readme_path in sorted(set(re.findall(r"/data/\S+", readme))):
        target = scratch / "raw" / readme_path.lstrip("/").replace("/", "_")
        target.parent.mkdir(parents=True, exist_ok=True)
        if readme_path.endswith("train.txt"):
            write_criteo(str(target), rows=3000, seed=0, vocab_size=20)
        elif readme_path.endswith(("u.data", "ratings.dat", "ratings.csv")):
            target = target.with_name(os.path.basename(readme_path))
            write_movielens(str(target), rows=3000, seed=0, users=80, items=100, rank=4)
        else:
            raise AssertionError(f"README names a data file this test cannot stand in for: {readme_path}")
        files[readme_path] = target
    return files


def api_example(block: str, scratch: Path) -> str:
    """The README's API example with this checkout's configs and tiny overrides."""
    small = [
        f"model.preproc.cache_dir={scratch}/data",
        "model.preproc.synthetic.rows=3000",
        "train.progress=false",
    ]
    small += [*TINY_MOVIELENS, "train.max_steps=4", "train.num_eval_batches=1"]
    fl_small = [
        *small,
        "fl.client_num_per_round=80",  # the MF FL config has user-level DP on: a sample the grid can hold
        "fl.local_steps=2",
        "fl.local_epochs=1",
        "fl.eval_every=1",
    ]
    block = block.replace('"configs/', f'"{ROOT}/configs/')
    block = re.sub(r"(load_config\([^,]+, )\[", rf"\g<1>[*{small!r}, ", block)
    block = block.replace("overrides=[", f"overrides=[*{fl_small!r}, ")
    return block


def test_every_readme_command_runs(tmp_path):
    readme = README.read_text()
    raw_files = write_raw_files(tmp_path, readme)
    python_blocks = code_blocks(readme, "python")
    module = [b for b in python_blocks if 'registry.load("model", "my_model")' in b]
    assert len(module) == 1, "README's 'Adding a model' module not found"
    (tmp_path / "my_module.py").write_text(module[0])
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ran = []
    for block in code_blocks(readme, "bash"):
        for command in commands(block):
            if command in NOT_RUN:
                continue
            adapted = adapt(command, tmp_path, raw_files)
            started = time.perf_counter()
            done = subprocess.run(
                ["bash", "-c", adapted], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, (
                f"README command failed (exit {done.returncode}):\n{command}\nran as:\n{adapted}\n"
                f"stderr:\n{done.stderr[-3000:]}\nstdout:\n{done.stdout[-1000:]}"
            )
            ran.append(command)
            print(f"{time.perf_counter() - started:6.1f} s  {command[:100]}")  # shown with -s or on failure
    assert any("train_fl.py" in c for c in ran) and any(
        "privacy_report.py --logdir runs/dp1" in c for c in ran
    )
    assert (tmp_path / "runs" / "my1" / "summary.json").exists()  # the README's own model trained
    assert (tmp_path / "runs" / "privacy_comparison").exists()  # dp1 vs dp2: one delta, compared
    api = [b for b in python_blocks if "from fedrec import api" in b]
    assert len(api) == 1, "README's API example not found"
    script = tmp_path / "api_example.py"
    script.write_text(api_example(api[0], tmp_path))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
