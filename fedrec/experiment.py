"""Steps every training script shares: seeding, data, model, TensorBoard, run records, summary.json."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import resource
import sys
import time
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from fedrec import registry
from fedrec.cli import parse_devices, prepare_logdir
from fedrec.config import ExperimentConfig, config_to_dict
from fedrec.data.base import ProcessedData, write_json_atomic
from fedrec.errors import ConfigError

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


def write_summary(logdir: str, config: ExperimentConfig, results: dict[str, Any], **extra: Any) -> str:
    """Write LOGDIR/summary.json atomically: config, results, environment."""
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
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = os.path.join(logdir, "summary.json")
    write_json_atomic(path, summary)
    return path


def run_central_training(
    args: Any,
    config: ExperimentConfig,
    trainer_cls: Any,
    *,
    sparse: bool,
    record_ignore: tuple[str, ...] = (),
    **trainer_kwargs: Any,
) -> tuple[dict[str, Any], str]:
    """The shared body of scripts/train.py and scripts/train_dp.py.

    Prepares LOGDIR (recording the config; a resume must match it, except the keys in
    ``record_ignore``), seeds, prepares the data, builds the model, trains with
    ``trainer_cls(model, data, config, logdir=, device=, writer=, **trainer_kwargs)`` (resuming from its
    checkpoint with ``--resume``), closes the trainer and writes LOGDIR/summary.json.

    Returns:
        the trainer's results and the summary's path.
    """
    device = parse_devices(args.devices)[0]
    logdir = prepare_logdir(args.logdir)
    record_run_config(logdir, config, resume=args.resume, ignore=record_ignore)
    set_seed(config.seed)
    set_threads(config.train.num_threads)

    data = prepare_data(config, progress=config.train.progress)
    model = build_model(config, data.meta, sparse=sparse)
    writer = open_writer(logdir)
    trainer = trainer_cls(model, data, config, logdir=logdir, device=device, writer=writer, **trainer_kwargs)
    try:
        if args.resume:
            trainer.load_checkpoint()
        results = trainer.fit()
    finally:
        trainer.close()
        writer.close()
    rows = {name: len(split) for name, split in data.splits.items()}
    path = write_summary(
        logdir, config, results, rows=rows, device=str(device), data=data.meta.get("summary", {})
    )
    return results, path


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
