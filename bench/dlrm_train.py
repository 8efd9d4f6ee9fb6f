"""DLRM training throughput on CPU: the Kaggle reference architecture at batch 128 and 2048.

Prints JSON. Embedding tables use the 26 Criteo Kaggle vocabulary sizes the DLRM reference reports
(33.8M rows in all, dim 16), or ``--table-rows N`` rows each; inputs are random Zipf-like indices in
memory, so the figure is the model step plus batching, not file I/O.

    .venv/bin/python bench/dlrm_train.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fedrec.config.loader import build_experiment
from fedrec.data.base import ArraySplit, ProcessedData
from fedrec.experiment import build_model
from fedrec.trainers.base_trainer import BaseTrainer, move_batch

# Rows per categorical feature of Criteo Kaggle (DLRM reference, all categories kept).
KAGGLE_TABLE_SIZES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip


def synthetic_split(rows: int, table_sizes: list[int], seed: int) -> ArraySplit:
    rng = np.random.default_rng(seed)
    dense = np.log1p(rng.exponential(5.0, size=(rows, 13))).astype(np.float32)
    sparse = np.empty((rows, len(table_sizes)), dtype=np.int32)
    for t, size in enumerate(table_sizes):
        sparse[:, t] = np.minimum(rng.zipf(1.2, size=rows) - 1, size - 1)
    label = (rng.random(rows) < 0.25).astype(np.float32)
    return ArraySplit({"dense": dense, "sparse": sparse, "label": label})


def measure(batch_size: int, table_sizes: list[int], steps: int, warmup: int, device: str) -> dict:
    config = build_experiment(
        {
            "model": {"name": "dlrm", "preproc": {"dataset": "criteo"}},
            "train": {"batch_size": batch_size, "progress": False, "optimizer": "sgd", "lr": 0.1},
        }
    )
    rows = batch_size * (steps + warmup)
    split = synthetic_split(rows, table_sizes, seed=batch_size)
    data = ProcessedData({"train": split, "val": split, "test": split}, {"table_sizes": table_sizes})
    model = build_model(config, data.meta, sparse=True)
    trainer = BaseTrainer(model, data, config, device=device)
    batches = list(split.batches(batch_size))
    for batch in batches[:warmup]:
        trainer.training_step(move_batch(batch, trainer.device))
    synchronize(device)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        trainer.training_step(move_batch(batch, trainer.device))
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "steps": steps,
        "step_ms": 1000 * seconds / steps,
        "samples_per_second": batch_size * steps / seconds,
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--table-rows", type=int, default=None, help="rows per table instead of Kaggle's")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:0 (batches are copied to it each step)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    table_sizes = [args.table_rows] * 26 if args.table_rows else KAGGLE_TABLE_SIZES
    results = [measure(b, table_sizes, args.steps, args.warmup, args.device) for b in (128, 2048)]
    print(
        json.dumps(
            {
                "benchmark": "dlrm_train_cpu",
                "architecture": "bottom 13-512-256-64-16, top 367-512-256-1, dot interaction, bce, SGD",
                "embedding_rows_total": int(sum(table_sizes)),
                "threads": args.threads,
                "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(),
                "results": results,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
