"""Steps every training script shares: seeding, data, model, TensorBoard, run records, summary.json."""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

import fedrec
from fedrec import registry
from fedrec.cli import check_logdir, parse_devices, prepare_logdir
from fedrec.config import ExperimentConfig, config_to_dict
from fedrec.data.base import ProcessedData, write_json_atomic
from fedrec.errors import ConfigError
from fedrec.noise_source import warn_seeded
from fedrec.trainers.base_trainer import CHECKPOINT_NAME

RUN_CONFIG_NAME = "config.yml"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(num_threads: int | None) -> None:
    if num_threads is not None:
        torch.set_num_threads(num_threads)


def prepare_data(config: ExperimentConfig, *, log: Any = None, progress: bool = True) -> ProcessedData:
    """Parse (or reuse) the configured dataset; synthetic data is generated when no datafile is set."""
    dataset_cls = registry.lookup("dataset", config.model.preproc.dataset)
    return dataset_cls.prepare(config.model.preproc, log=log or _stderr, progress=progress)


def build_model(config: ExperimentConfig, meta: dict[str, Any], **kwargs: Any) -> nn.Module:
    """The registered model, sized from the data's metadata, initialised from the config seed."""
    model_cls = registry.lookup("model", config.model.name)
    return model_cls.from_data(config.model.params, meta, seed=config.seed, **kwargs)


def config_fingerprint(config: ExperimentConfig, *, ignore: tuple[str, ...] = ()) -> str:
    """Hash of the config's plain form (top-level sections in ``ignore`` left out)."""
    data = config_to_dict(config)
    for key in ignore:
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def record_run_config(
    logdir: str, config: ExperimentConfig, *, resume: bool, ignore: tuple[str, ...] = ()
) -> None:
    """Save the resolved config in LOGDIR; on resume, refuse a config that differs from the saved one.

    Sections in ``ignore`` (for example ``train`` knobs that do not change the model) may differ.
    """
    path = os.path.join(logdir, RUN_CONFIG_NAME)
    data = config_to_dict(config)
    if resume and os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            saved = yaml.safe_load(fh) or {}
        for key in ignore:
            saved.pop(key, None)
        current = {k: v for k, v in data.items() if k not in ignore}
        if saved != current:
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ConfigError(
                f"{path}: --resume with a different config (sections that differ: {', '.join(changed)})"
            )
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
    os.replace(tmp, path)


def open_writer(logdir: str) -> Any:
    """TensorBoard writer for LOGDIR (``tensorboard --logdir runs`` finds it)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=logdir)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 1024.0 if sys.platform != "darwin" else usage / 2**20


def software_versions() -> dict[str, Any]:
    """fedrec's version, its git commit (in a checkout) and the versions of the libraries it runs on."""
    versions: dict[str, Any] = {"fedrec": fedrec.__version__, "git_commit": git_commit()}
    for name in ("torch", "opacus", "tenseal", "syft", "mpi4py", "numpy"):
        try:  # the installed distribution's metadata: cheap, and never imports syft (slow)
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes), or None outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(fedrec.__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if status else commit


def write_summary(logdir: str, config: ExperimentConfig, results: dict[str, Any], **extra: Any) -> str:
    """Write LOGDIR/summary.json atomically: config, results, environment and software versions."""
    summary = {
        "config": config_to_dict(config),
        **results,
        **extra,
        "peak_rss_mb": peak_rss_mb(),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "host": platform.node(),
        },
        "versions": software_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = os.path.join(logdir, "summary.json")
    write_json_atomic(path, summary)
    return path


def check_new_run(logdir: str, *, resume: bool, checkpoint_name: str = CHECKPOINT_NAME) -> None:
    """A fresh run into a LOGDIR that holds one is refused; ``--resume`` without a checkpoint says so."""
    summary = os.path.join(logdir, "summary.json")
    checkpoint = os.path.join(logdir, checkpoint_name)
    if resume:
        if not os.path.exists(checkpoint):
            held = "a finished run's summary.json but" if os.path.exists(summary) else "no run and"
            raise ConfigError(
                f"--resume: {logdir} holds {held} no checkpoint ({checkpoint_name}) to resume from; "
                "start a fresh run without --resume"
            )
        return
    for path in (checkpoint, summary):
        if os.path.exists(path):
            raise ConfigError(
                f"--logdir {logdir}: holds a run already ({os.path.basename(path)}); continue it with --resume "
                "or choose another --logdir (nothing was overwritten)"
            )


def run_central_training(
    config: ExperimentConfig,
    trainer_cls: Any,
    *,
    logdir: str,
    devices: str = "cpu",
    resume: bool = False,
    sparse: bool,
    record_ignore: tuple[str, ...] = (),
    log: Any = None,
    **trainer_kwargs: Any,
) -> tuple[dict[str, Any], str]:
    """The shared body of scripts/train.py and scripts/train_dp.py (and ``fedrec.api.train``).

    Refuses a fresh run into a LOGDIR that holds one (``resume`` continues it), records the config
    (a resume must match it, except the keys in ``record_ignore``), seeds, prepares the data, builds
    the model, trains with ``trainer_cls(model, data, config, logdir=, device=, writer=,
    **trainer_kwargs)``, closes the trainer and writes LOGDIR/summary.json. On Ctrl-C it says whether
    a checkpoint was written (through ``log``, stderr by default) before re-raising.

    Returns:
        the trainer's results and the summary's path.
    """
    log = log or _stderr
    device = parse_devices(devices)[0]
    check_logdir(logdir)
    check_new_run(logdir, resume=resume)
    logdir = prepare_logdir(logdir)
    record_run_config(logdir, config, resume=resume, ignore=record_ignore)
    set_seed(config.seed)
    set_threads(config.train.num_threads)

    data = prepare_data(config, progress=config.train.progress)
    model = build_model(config, data.meta, sparse=sparse)
    writer = open_writer(logdir)
    if "resume" in inspect.signature(trainer_cls).parameters:  # DPTrainer: a resume keeps the ledger's spends
        trainer_kwargs["resume"] = resume
    trainer = trainer_cls(model, data, config, logdir=logdir, device=device, writer=writer, **trainer_kwargs)
    noise_sources = getattr(trainer, "noise_sources", None)  # DPTrainer: a seeded run says so on stdout
    if callable(noise_sources):
        warn_seeded(noise_sources())
    try:
        if resume:
            trainer.load_checkpoint()
        results = trainer.fit()
    except KeyboardInterrupt:
        log(interrupted_message(os.path.join(logdir, CHECKPOINT_NAME), config.train.checkpoint_every))
        raise
    finally:
        trainer.close()
        writer.close()
    rows = {name: len(split) for name, split in data.splits.items()}
    path = write_summary(
        logdir, config, results, rows=rows, device=str(device), data=data.meta.get("summary", {})
    )
    return results, path


def interrupted_message(checkpoint: str, checkpoint_every: int) -> str:
    """What an interrupted run left: its last checkpoint (and how to continue), or none."""
    if os.path.exists(checkpoint):
        written = time.strftime("%H:%M:%S", time.localtime(os.path.getmtime(checkpoint)))
        return f"interrupted: the last checkpoint (written {written}) is {checkpoint}; continue with --resume"
    return (
        f"interrupted before the first checkpoint (one every train.checkpoint_every = {checkpoint_every} "
        "steps): nothing to resume, a new run starts over"
    )


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
