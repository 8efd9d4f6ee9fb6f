"""Matrix factorisation with user and item biases for explicit ratings (Koren et al. 2009).

prediction(u, i) = mu + b_u + b_i + <p_u, q_i>. The user-side parameters are listed in
``PRIVATE_PARAMETERS``: in federated training they stay on the client that owns the user.

Regularisation is L2 on the rows each example touches, as scikit-surprise's SVD ``reg``: example
(u, i, r) has loss (prediction - r)^2 + reg * (|p_u|^2 + |q_i|^2) + reg_bias * (b_u^2 + b_i^2),
taken from the embedding outputs of that example's own forward pass. Rows no example in the batch
touches get no gradient (unlike ``train.weight_decay``, which shrinks the whole table), and the
term stays a function of one example alone, so DP-SGD's per-sample clipping bounds it with the
rest of that example's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedrec import registry
from fedrec.errors import ConfigError


@dataclass
class MFConfig:
    """``model:`` keys of matrix factorisation."""

    embedding_dim: int = 32  # latent factors per user and item
    use_bias: bool = True  # learn user and item biases (a global mean bias is always used)
    init_std: float = 0.05  # standard deviation of the factors' normal initialisation
    loss_function: Literal["mse"] = "mse"  # squared error on ratings
    clip_predictions: bool = True  # clamp predictions to the data's rating range at evaluation
    reg: float = 0.0  # L2 on the factor rows each example touches (Surprise's reg_pu / reg_qi)
    reg_bias: float | None = None  # L2 on the bias rows each example touches; null = reg

    def validate(self, path: str) -> None:
        for key in ("reg", "reg_bias"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < float("inf"):
                raise ConfigError(f"config key '{path}.{key}' = {value!r}: expected a finite number >= 0")
        if self.embedding_dim < 1:
            raise ConfigError(
                f"config key '{path}.embedding_dim' = {self.embedding_dim!r}: expected a positive integer"
            )
        if self.init_std <= 0:
            raise ConfigError(f"config key '{path}.init_std' = {self.init_std!r}: expected a positive number")


@registry.load("model", "mf")
class MatrixFactorization(nn.Module):
    """Biased matrix factorisation: ``forward(batch)`` returns predicted ratings."""

    Config = MFConfig
    TASK = "rating"
    PRIVATE_PARAMETERS = ("user_embedding.weight", "user_bias.weight")

    def __init__(
        self,
        config: MFConfig,
        *,
        num_users: int,
        num_items: int,
        global_mean: float = 0.0,
        rating_range: tuple[float, float] | None = None,
        seed: int | None = None,
        sparse: bool = False,
    ):
        super().__init__()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.config = config
        self.rating_range = rating_range
        self.user_embedding = nn.Embedding(num_users, config.embedding_dim, sparse=sparse)
        self.item_embedding = nn.Embedding(num_items, config.embedding_dim, sparse=sparse)
        self.user_bias = nn.Embedding(num_users, 1, sparse=sparse)
        self.item_bias = nn.Embedding(num_items, 1, sparse=sparse)
        self.global_bias = nn.Parameter(torch.tensor([float(global_mean)]))
        with torch.no_grad():
            self.user_embedding.weight.normal_(0.0, config.init_std, generator=generator)
            self.item_embedding.weight.normal_(0.0, config.init_std, generator=generator)
            self.user_bias.weight.zero_()
            self.item_bias.weight.zero_()
        if not config.use_bias:
            self.user_bias.weight.requires_grad_(False)
            self.item_bias.weight.requires_grad_(False)
        self.reg = float(config.reg)
        self.reg_bias = (
            float(config.reg if config.reg_bias is None else config.reg_bias) if config.use_bias else 0.0
        )
        self._penalty: torch.Tensor | None = None  # per-example L2 of the last training forward

    @classmethod
    def check_config(cls, config: MFConfig, dataset_cls: Any, path: str) -> None:
        if getattr(dataset_cls, "TASK", None) != cls.TASK:
            raise ConfigError(
                f"config key '{path}.preproc.dataset': model 'mf' needs a ratings dataset (movielens), "
                f"got {getattr(dataset_cls, 'TASK', '?')!r} data"
            )

    @classmethod
    def from_data(
        cls, config: MFConfig, meta: dict[str, Any], *, seed: int | None = None, sparse: bool = False
    ) -> MatrixFactorization:
        return cls(
            config,
            num_users=int(meta["num_users"]),
            num_items=int(meta["num_items"]),
            global_mean=float(meta.get("global_mean", 0.0)),
            rating_range=(float(meta["rating_min"]), float(meta["rating_max"]))
            if "rating_min" in meta
            else None,
            seed=seed,
            sparse=sparse,
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        users, items = batch["user"], batch["item"]
        p, q = self.user_embedding(users), self.item_embedding(items)
        b_u, b_i = self.user_bias(users).squeeze(1), self.item_bias(items).squeeze(1)
        self._penalty = None
        if self.training and torch.is_grad_enabled() and (self.reg > 0 or self.reg_bias > 0):
            # From this forward's own lookups: one penalty per example, on the rows it touched.
            self._penalty = self.reg * ((p * p).sum(dim=1) + (q * q).sum(dim=1)) + self.reg_bias * (
                b_u * b_u + b_i * b_i
            )
        return self.global_bias + b_u + b_i + (p * q).sum(dim=1)

    def score_items(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of ``items`` [B, K] for ``users`` [B] (for ranking metrics)."""
        p = self.user_embedding(users)  # [B, d]
        q = self.item_embedding(items)  # [B, K, d]
        return (
            self.global_bias
            + self.user_bias(users)
            + self.item_bias(items).squeeze(2)
            + torch.einsum("bd,bkd->bk", p, q)
        )

    def predict(self, scores: torch.Tensor) -> torch.Tensor:
        if self.config.clip_predictions and self.rating_range is not None:
            return scores.clamp(*self.rating_range)
        return scores

    def loss(self, scores: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Squared error plus, in training, each example's L2 penalty (``reg``, ``reg_bias``).

        ``reduction='none'`` gives one loss per example (DP-SGD clips each); 'mean' and 'sum' reduce it.
        """
        losses = F.mse_loss(scores, labels, reduction="none")
        penalty, self._penalty = self._penalty, None  # used once: never a stale batch's penalty
        if penalty is not None:
            if penalty.shape != losses.shape:
                raise ValueError(
                    f"MF loss: {tuple(losses.shape)} scores but the last forward penalised {tuple(penalty.shape)} examples"
                )
            losses = losses + penalty
        if reduction == "none":
            return losses
        if reduction == "sum":
            return losses.sum()
        if reduction == "mean":
            return losses.mean()
        raise ValueError(f"MF loss: reduction {reduction!r}: expected 'none', 'mean' or 'sum'")
