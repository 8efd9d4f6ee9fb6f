"""Matrix factorisation vs scikit-surprise (SVD, BaselineOnly) and the global mean: test RMSE.

Two protocols on the same ratings, every model on the same rows:

- ``random``: 5-fold cross-validation over all ratings (a seeded permutation). Our MF holds out 5 %
  of the training fold (seeded) for early stopping and trains on the rest; the Surprise models and
  the global mean fit the whole training fold (so they train on 5 % more rows than ours).
- ``llo`` (leave-last-out): the preprocessed split: each user's last rating is test, the one before
  validation. Our MF trains on 'train' and stops early on 'val'; the Surprise models and the global
  mean fit 'train' (the same rows; ``--peers-fit-val`` adds 'val', each user's second-to-last rating).

Surprise gets its rows in a random order, as u.data is. With the built-in generator (``datafile``
null) every figure is reported for each generator seed in ``--seeds``. Prints JSON.

    .venv/bin/python bench/mf_movielens.py --seeds 0 1               # realistic ml-100k-like data
    .venv/bin/python bench/mf_movielens.py --datafile /data/ml-100k/u.data
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from surprise import SVD, BaselineOnly, Dataset, Reader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fedrec.config import load_config
from fedrec.config.schema import ExperimentConfig
from fedrec.data.base import ArraySplit, ProcessedData
from fedrec.experiment import build_model, prepare_data, set_seed
from fedrec.trainers import metrics as M
from fedrec.trainers.base_trainer import BaseTrainer

ROOT = os.path.join(os.path.dirname(__file__), "..")
COLUMNS = ("user", "item", "label")
VAL_SHARE = 0.05  # random protocol: share of the training fold our model holds out for early stopping


def all_ratings(data: ProcessedData) -> dict[str, np.ndarray]:
    return {
        name: np.concatenate([np.asarray(split.arrays[name]) for split in data.splits.values()])
        for name in COLUMNS
    }


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    ids = np.empty(n, dtype=np.int64)
    ids[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return ids


def subset(ratings: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[mask] for name, values in ratings.items()}


def ours(
    config: ExperimentConfig, train: dict, val: dict, test: dict, meta: dict[str, Any]
) -> dict[str, Any]:
    """Our MF with the config's defaults: trains on ``train``, stops early on ``val``."""
    fold_meta = dict(meta, global_mean=float(train["label"].mean()))
    data = ProcessedData(
        {"train": ArraySplit(train), "val": ArraySplit(val), "test": ArraySplit(test)}, fold_meta
    )
    set_seed(config.seed)
    trainer = BaseTrainer(build_model(config, fold_meta), data, config)
    started = time.perf_counter()
    summary = trainer.fit(progress=False)
    labels, predictions = trainer.predict_split("test")
    return {
        "rmse": M.rmse(labels, predictions),
        "seconds": time.perf_counter() - started,
        "epochs": summary["epochs_completed"],
        "best_epoch": summary.get("early_stopping", {}).get("best_epoch"),
    }


def surprise_models(fit: dict, test: dict, seed: int) -> dict[str, float]:
    """Test RMSE of Surprise's SVD (library defaults: 100 factors, 20 epochs, lr 0.005, reg 0.02),
    BaselineOnly (ALS defaults) and the global mean, all fitted on ``fit``."""
    lo, hi = float(fit["label"].min()), float(fit["label"].max())
    # In a random order, as in u.data: Surprise's SGD visits ratings in the order given, and rows
    # sorted by user and time would hand it each user's latest ratings last (a recency edge that
    # no file order we read promises).
    order = np.random.default_rng([2, seed]).permutation(len(fit["label"]))
    frame = pd.DataFrame(
        {"user": fit["user"][order], "item": fit["item"][order], "rating": fit["label"][order].astype(float)}
    )
    trainset = Dataset.load_from_df(frame, Reader(rating_scale=(lo, hi))).build_full_trainset()
    out = {"global_mean": M.rmse(test["label"], np.full(len(test["label"]), fit["label"].mean()))}
    for name, algo in (("svd", SVD(random_state=seed)), ("baseline_only", BaselineOnly(verbose=False))):
        algo.fit(trainset)
        estimates = np.array([algo.predict(int(u), int(i)).est for u, i in zip(test["user"], test["item"])])
        out[name] = M.rmse(test["label"], estimates)
    return out


def random_protocol(config: ExperimentConfig, data: ProcessedData, folds: int, max_folds: int | None) -> dict:
    ratings = all_ratings(data)
    ids = fold_ids(len(ratings["label"]), folds, seed=0)
    per_fold = []
    for fold in range(max_folds or folds):
        train_mask = ids != fold
        held = np.random.default_rng([1, fold]).random(len(ids)) < VAL_SHARE
        mf = ours(
            config,
            subset(ratings, train_mask & ~held),
            subset(ratings, train_mask & held),
            subset(ratings, ~train_mask),
            data.meta,
        )
        peers = surprise_models(subset(ratings, train_mask), subset(ratings, ~train_mask), seed=fold)
        per_fold.append({"fold": fold, "ours": mf["rmse"], **peers, "ours_epochs": mf["epochs"],
                         "ours_best_epoch": mf["best_epoch"], "ours_seconds": mf["seconds"]})  # fmt: skip
        print(json.dumps(per_fold[-1]), file=sys.stderr)
    return summarise(per_fold)


def llo_protocol(config: ExperimentConfig, data: ProcessedData, peers_fit_val: bool) -> dict:
    split = {
        name: {c: np.asarray(data.split(name).arrays[c]) for c in COLUMNS}
        for name in ("train", "val", "test")
    }
    mf = ours(config, split["train"], split["val"], split["test"], data.meta)
    parts = ("train", "val") if peers_fit_val else ("train",)
    fit = {c: np.concatenate([split[p][c] for p in parts]) for c in COLUMNS}
    peers = surprise_models(fit, split["test"], seed=0)
    row = {"ours": mf["rmse"], **peers, "ours_epochs": mf["epochs"], "ours_best_epoch": mf["best_epoch"],
           "ours_seconds": mf["seconds"]}  # fmt: skip
    print(json.dumps(row), file=sys.stderr)
    return summarise([row])


def summarise(rows: list[dict]) -> dict:
    mean = {
        key: float(np.mean([r[key] for r in rows])) for key in ("ours", "svd", "baseline_only", "global_mean")
    }
    return {
        "rmse": mean,
        "ratio_ours_over_svd": mean["ours"] / mean["svd"],
        "ratio_ours_over_baseline_only": mean["ours"] / mean["baseline_only"],
        "per_fold": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "mf_movielens.yml"))
    parser.add_argument(
        "--datafile", default=None, help="a real ratings file (default: the built-in generator)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="generator seeds (built-in data)"
    )
    parser.add_argument("--protocols", nargs="+", default=["random", "llo"], choices=["random", "llo"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--max-folds", type=int, default=None, help="run only the first K folds")
    parser.add_argument("--peers-fit-val", action="store_true", help="llo: the peers also fit 'val'")
    parser.add_argument("--cache-dir", default="/tmp/fedrec-bench-mf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = ["train.progress=false", f"model.preproc.cache_dir={args.cache_dir}", *args.overrides]
    if args.datafile:
        runs = [("datafile", [*base, f"model.preproc.datafile={args.datafile}"])]
    else:
        runs = [(f"generator seed {s}", [*base, f"model.preproc.synthetic.seed={s}"]) for s in args.seeds]
    results = []
    for label, overrides in runs:
        entry: dict[str, Any] = {"data": label, "overrides": overrides}
        for protocol in args.protocols:
            split = "random" if protocol == "random" else "leave_last_out"
            config = load_config(args.config, [*overrides, f"model.preproc.split={split}"])
            data = prepare_data(config, progress=False)
            entry["ratings"] = int(sum(len(s) for s in data.splits.values()))
            if protocol == "random":
                entry["random_5fold"] = random_protocol(config, data, args.folds, args.max_folds)
            else:
                entry["leave_last_out"] = llo_protocol(config, data, args.peers_fit_val)
        results.append(entry)
    print(json.dumps({"benchmark": "mf_movielens", "config": args.config, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
