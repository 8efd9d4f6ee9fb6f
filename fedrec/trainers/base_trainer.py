"""BaseTrainer: the central training loop, evaluation, TensorBoard scalars and atomic checkpoints.

Subclasses change one concern each by overriding a hook: ``train_batches`` (how batches are drawn),
``training_step`` (what one optimiser step does; the DP trainer clips and noises here),
``make_optimizer`` and ``extra_summary``. Federated clients reuse ``training_step`` for local
epochs and ``evaluate`` for metrics.

Early stopping (``train.early_stopping``) watches one validation metric at every validation, keeps a
copy of the best model, stops after ``patience`` validations without improvement and, with
``restore_best``, ends with the best model: the final 'val' and 'test' figures are the best model's.
"""

from __future__ import annotations

import math
import os
import pickle
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from fedrec.config.schema import EARLY_STOPPING_METRICS, ExperimentConfig
from fedrec.data.base import ProcessedData
from fedrec.data.file_rows import rows_where_in
from fedrec.errors import ConfigError, FedrecError
from fedrec.progress import progress_bar
from fedrec.trainers import metrics as M

CHECKPOINT_NAME = "checkpoint.pt"
NUM_RANKING_NEGATIVES = 99  # HR@10 / NDCG@10: each held-out item ranked among 99 unrated items
TASK_METRICS = {"ctr": ("auc", "logloss", "accuracy"), "rating": ("rmse", "mae", "hr@10", "ndcg@10")}


def move_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def optimizer_supports_sparse(name: str) -> bool:
    return name in ("sgd", "adagrad")


def optimizer_param_groups(
    model: nn.Module, *, lr: float, embedding_lr: float | None
) -> list[dict[str, Any]]:
    """Trainable parameters as optimizer groups: embedding weights at ``embedding_lr``, the rest at ``lr``.

    One group (every parameter at ``lr``) when ``embedding_lr`` is None. DP-SGD's lazy row noise reads
    each embedding's own group learning rate, so a separate embedding step stays exact.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if embedding_lr is None:
        return [{"params": trainable, "lr": lr}]
    embedding_ids = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.weight.requires_grad
    }
    groups = [
        {"params": [p for p in trainable if id(p) not in embedding_ids], "lr": lr},
        {"params": [p for p in trainable if id(p) in embedding_ids], "lr": embedding_lr},
    ]
    return [group for group in groups if group["params"]]


def make_optimizer(name: str, params: Any, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"config key 'train.optimizer' = {name!r}: expected one of sgd, adagrad, adam")


class BaseTrainer:
    """Trains ``model`` on ``data['train']``, validates on 'val', reports 'test' at the end."""

    def __init__(
        self,
        model: nn.Module,
        data: ProcessedData,
        config: ExperimentConfig,
        *,
        logdir: str | None = None,
        device: torch.device | str = "cpu",
        writer: Any = None,
    ):
        self.config = config
        self.train_cfg = config.train
        self.data = data
        self.device = torch.device(device)
        self.model: Any = model.to(self.device)  # a registered model: forward, predict, loss
        self.task = getattr(model, "TASK", "ctr")
        self.logdir = logdir
        self.writer = writer
        self.optimizer = self.make_optimizer()
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.samples_seen = 0
        self.train_seconds = 0.0
        self.last_val_metrics: dict[str, float] = {}
        self._rated: M.RatedItems | None = None
        # Users the evaluation covers (fl.eval_users: a seeded sample); None: every user.
        self.eval_users: np.ndarray | None = None
        self._eval_splits: dict[str, Any] = {}
        self._stop = False
        self.early_stopping = self.train_cfg.early_stopping
        self.best_value: float | None = None  # early stopping: best validation value so far
        self.best_step = 0
        self.best_epoch = 0
        self.validations_since_best = 0
        self.stopped_early = False
        self._best_model: dict[str, torch.Tensor] | None = None
        if self.early_stopping is not None:
            self.check_early_stopping()

    def check_early_stopping(self) -> None:
        """Before any training: early stopping needs a non-empty 'val' split and a metric of this task."""
        cfg = self.early_stopping
        assert cfg is not None
        known = TASK_METRICS.get(self.task, ())
        if cfg.metric not in known:
            raise ConfigError(
                f"config key 'train.early_stopping.metric' = {cfg.metric!r}: a {self.task} model reports "
                f"{', '.join(known)}"
            )
        rows = len(self.data.split("val")) if "val" in self.data.splits else 0
        if rows == 0:
            raise ConfigError(
                "config key 'train.early_stopping' is set but the data has no validation split "
                "('val' is empty): set train.early_stopping=null or use a split that holds out validation rows"
            )

    # ----------------------------------------------------------------- hooks
    def make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.train_cfg
        params = optimizer_param_groups(self.model, lr=cfg.lr, embedding_lr=cfg.embedding_lr)
        return make_optimizer(cfg.optimizer, params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def epoch_rng(self, epoch: int) -> np.random.Generator:
        """Deterministic per-epoch generator, so a resumed run draws the same batches."""
        return np.random.default_rng([self.config.seed, epoch])

    def train_batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of one epoch: a seeded permutation of the training split."""
        return self.data.split("train").batches(
            self.train_cfg.batch_size, shuffle=True, generator=self.epoch_rng(epoch)
        )

    def steps_per_epoch(self) -> int:
        return self.data.split("train").num_batches(self.train_cfg.batch_size)

    def training_step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimiser step on ``batch``; returns the batch's mean loss."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        scores = self.model(batch)
        loss = self.model.loss(scores, batch["label"])
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def extra_summary(self) -> dict[str, Any]:
        """Subclasses add their own figures (epsilon, ...) to summary.json."""
        return {}

    def should_stop(self) -> bool:
        """Subclasses stop early (for example at the privacy budget) by returning True."""
        return self._stop

    # ------------------------------------------------------------- training
    def planned_steps(self) -> int:
        total = self.steps_per_epoch() * self.train_cfg.epochs
        if self.train_cfg.max_steps is not None:
            total = min(total, self.train_cfg.max_steps)
        return total

    def fit(self, *, progress: bool | None = None) -> dict[str, Any]:
        """Train to the planned number of steps (continuing from a loaded checkpoint) and evaluate."""
        cfg = self.train_cfg
        show = cfg.progress if progress is None else progress
        total = self.planned_steps()
        bar = progress_bar(total=total, initial=self.step, desc="train", unit="step", enabled=show)
        running_loss, running_count = 0.0, 0
        try:
            while self.epoch < cfg.epochs and self.step < total and not self.should_stop():
                skip = self.batch_in_epoch
                for index, batch in enumerate(self.train_batches(self.epoch)):
                    if index < skip:
                        continue  # resumed mid-epoch: these batches were already trained on
                    if self.step >= total or self.should_stop():
                        break
                    batch = move_batch(batch, self.device)
                    started = time.perf_counter()
                    loss = self.training_step(batch)
                    self.train_seconds += time.perf_counter() - started
                    if not math.isfinite(loss):
                        raise FedrecError(
                            f"training diverged at step {self.step + 1}: loss is {loss} (lower train.lr?)"
                        )
                    size = len(batch["label"])
                    self.samples_seen += size
                    self.step += 1
                    self.batch_in_epoch = index + 1
                    running_loss += loss * size
                    running_count += size
                    bar.update(1)
                    if self.step % cfg.log_every == 0 and running_count:
                        self.log_scalars(
                            "train",
                            {"loss": running_loss / running_count, "samples_per_second": self.throughput()},
                        )
                        bar.set_postfix(loss=f"{running_loss / running_count:.4f}")
                        running_loss, running_count = 0.0, 0
                    if cfg.eval_every is not None and self.step % cfg.eval_every == 0:
                        self.validate()
                    if self.logdir and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                else:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    if cfg.eval_every is None:
                        self.validate()
                    continue
                break  # stopped inside the epoch (max_steps or should_stop)
        finally:
            bar.close()
        if self.logdir:
            # The last model (with the best one beside it): a resumed run continues exactly.
            self.save_checkpoint()
        if (
            self.early_stopping is not None
            and self.early_stopping.restore_best
            and self._best_model is not None
        ):
            self.model.load_state_dict(self._best_model)
        return self.final_summary()

    def validate(self) -> dict[str, float]:
        self.last_val_metrics = self.evaluate("val", self.train_cfg.num_eval_batches)
        self.log_scalars("val", self.last_val_metrics)
        if self.early_stopping is not None:
            self.track_best(self.last_val_metrics)
        return self.last_val_metrics

    def track_best(self, metrics: dict[str, float]) -> None:
        """Early stopping: keep the best model so far; stop after ``patience`` validations without
        an improvement of at least ``min_delta``."""
        cfg = self.early_stopping
        assert cfg is not None
        value = float(metrics[cfg.metric])
        larger_is_better = EARLY_STOPPING_METRICS[cfg.metric]
        gain = (
            float("-inf")
            if self.best_value is None
            else (value - self.best_value) * (1 if larger_is_better else -1)
        )
        if math.isfinite(value) and (self.best_value is None or gain > cfg.min_delta):
            self.best_value, self.best_step, self.best_epoch = value, self.step, self.epoch
            self.validations_since_best = 0
            self._best_model = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
            return
        self.validations_since_best += 1
        if self.validations_since_best >= cfg.patience:
            self.stopped_early = True
            self._stop = True

    def throughput(self) -> float:
        return self.samples_seen / self.train_seconds if self.train_seconds > 0 else 0.0

    def final_summary(self) -> dict[str, Any]:
        val = self.evaluate("val", self.train_cfg.num_eval_batches)
        test = self.evaluate("test", self.train_cfg.num_eval_batches)
        self.log_scalars("test", test)
        if self.writer is not None:
            self.writer.flush()
        return {
            "steps": self.step,
            "epochs_completed": self.epoch,
            "samples_seen": self.samples_seen,
            "train_seconds": self.train_seconds,
            "train_samples_per_second": self.throughput(),
            "val": val,
            "test": test,
            **self.early_stopping_summary(),
            **self.extra_summary(),
        }

    def early_stopping_summary(self) -> dict[str, Any]:
        if self.early_stopping is None:
            return {}
        restored = self.early_stopping.restore_best and self._best_model is not None
        return {
            "early_stopping": {
                "metric": self.early_stopping.metric,
                "best_value": self.best_value,
                "best_step": self.best_step,
                "best_epoch": self.best_epoch,
                "stopped_early": self.stopped_early,
                "restored_best": restored,
            }
        }

    def log_scalars(self, prefix: str, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{name}", value, self.step)

    # ----------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict_split(self, split_name: str, max_batches: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(labels, predictions) over a split, in order, at most ``max_batches`` batches."""
        self.model.eval()
        split = self.eval_split(split_name)
        labels, predictions = [], []
        for batch in split.batches(self.train_cfg.eval_batch_size, max_batches=max_batches):
            batch = move_batch(batch, self.device)
            predictions.append(self.model.predict(self.model(batch)).float().cpu().numpy())
            labels.append(batch["label"].float().cpu().numpy())
        if not labels:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(labels), np.concatenate(predictions)

    def evaluate(self, split_name: str, max_batches: int | None = None) -> dict[str, float]:
        labels, predictions = self.predict_split(split_name, max_batches)
        if labels.size == 0:
            return {"rows": 0}
        if self.task == "ctr":
            return {
                "auc": M.roc_auc(labels, predictions),
                "logloss": M.log_loss(labels, predictions),
                "accuracy": M.accuracy(labels, predictions),
                "rows": int(labels.size),
            }
        out = {
            "rmse": M.rmse(labels, predictions),
            "mae": M.mae(labels, predictions),
            "rows": int(labels.size),
        }
        hr, ndcg = self.ranking_metrics(split_name, max_batches)
        out.update({"hr@10": hr, "ndcg@10": ndcg})
        return out

    def eval_split(self, split_name: str) -> Any:
        """The split's rows of the users under evaluation (``eval_users``), or the whole split."""
        split = self.data.split(split_name)
        if self.eval_users is None or "user" not in split.arrays:
            return split
        if split_name not in self._eval_splits:
            keep = np.isin(np.asarray(split.arrays["user"]), self.eval_users)
            self._eval_splits[split_name] = split.subset(np.flatnonzero(keep))
        return self._eval_splits[split_name]

    @torch.no_grad()
    def ranking_metrics(
        self, split_name: str, max_batches: int | None = None, k: int = 10
    ) -> tuple[float, float]:
        """HR@k and NDCG@k: each held-out rating's item against 99 items its user never rated,
        ranked in batches (memory: one batch of candidates, whatever the number of users)."""
        split = self.eval_split(split_name)
        n = len(split)
        if max_batches is not None:
            n = min(n, max_batches * self.train_cfg.eval_batch_size)
        if n == 0:
            return float("nan"), float("nan")
        users = np.asarray(split.arrays["user"][:n]).astype(np.int64)
        items = np.asarray(split.arrays["item"][:n]).astype(np.int64)
        self.model.eval()

        def score(batch_users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
            return (
                self.model.score_items(
                    torch.from_numpy(batch_users).to(self.device),
                    torch.from_numpy(candidates).to(self.device),
                )
                .cpu()
                .numpy()
            )

        return M.ranking_in_batches(
            score,
            users,
            items,
            self.rated_items(),
            num_negatives=NUM_RANKING_NEGATIVES,
            seed=self.config.seed,
            k=k,
        )

    def rated_items(self) -> M.RatedItems:
        if self._rated is None:
            parts = []
            for split in self.data.splits.values():
                if self.eval_users is None:
                    parts.append((np.asarray(split.arrays["user"]), np.asarray(split.arrays["item"])))
                    continue
                # Only the evaluated users' ratings are ever looked up: keep those (read a chunk at a time).
                pairs = {name: split.arrays[name] for name in ("user", "item")}
                rated = rows_where_in(pairs, "user", self.eval_users)
                parts.append((rated["user"], rated["item"]))
            if not parts:
                parts.append((np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))
            users = np.concatenate([u for u, _ in parts])
            items = np.concatenate([i for _, i in parts])
            self._rated = M.RatedItems.from_pairs(
                users, items, int(self.data.meta["num_users"]), int(self.data.meta["num_items"])
            )
        return self._rated

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_seen": self.samples_seen,
            "train_seconds": self.train_seconds,
            "torch_rng": torch.get_rng_state(),
            "early_stopping": {
                "best_value": self.best_value,
                "best_step": self.best_step,
                "best_epoch": self.best_epoch,
                "validations_since_best": self.validations_since_best,
                "stopped_early": self.stopped_early,
                "best_model": self._best_model,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.samples_seen = int(state["samples_seen"])
        self.train_seconds = float(state["train_seconds"])
        torch.set_rng_state(state["torch_rng"])
        best = state.get("early_stopping") or {}
        self.best_value = best.get("best_value")
        self.best_step = int(best.get("best_step", 0))
        self.best_epoch = int(best.get("best_epoch", 0))
        self.validations_since_best = int(best.get("validations_since_best", 0))
        self.stopped_early = bool(best.get("stopped_early", False))
        self._stop = self.stopped_early and self.early_stopping is not None
        self._best_model = best.get("best_model")

    def checkpoint_path(self) -> str:
        if not self.logdir:
            raise FedrecError("no logdir: checkpoints need one")
        return os.path.join(self.logdir, CHECKPOINT_NAME)

    def save_checkpoint(self, path: str | None = None) -> str:
        """Write the trainer state to a temporary file, fsync, rename over the old checkpoint."""
        path = path or self.checkpoint_path()
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(self.state_dict(), tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        """Release what the trainer holds open (nothing here; DPTrainer closes its privacy ledger)."""

    def load_checkpoint(self, path: str | None = None) -> None:
        """Restore from our own checkpoint file (``weights_only=True``: no arbitrary unpickling)."""
        path = path or self.checkpoint_path()
        if not os.path.isfile(path):
            raise FedrecError(f"{path}: no checkpoint to resume from")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            self.load_state_dict(state)
        except (RuntimeError, KeyError, EOFError, ValueError, pickle.UnpicklingError) as err:
            raise FedrecError(
                f"{path}: cannot resume from this checkpoint ({str(err).splitlines()[0]})"
            ) from None
