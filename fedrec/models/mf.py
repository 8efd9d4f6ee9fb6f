"""Matrix factorisation with user and item biases for explicit ratings (Koren et al. 2009).

prediction(u, i) = mu + b_u + b_i + <p_u, q_i>. The user-side parameters are listed in
``PRIVATE_PARAMETERS``: in federated training they stay on the client that owns the user.
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

    def validate(self, path: str) -> None:
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
        dot = (self.user_embedding(users) * self.item_embedding(items)).sum(dim=1)
        return self.global_bias + self.user_bias(users).squeeze(1) + self.item_bias(items).squeeze(1) + dot

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
        return F.mse_loss(scores, labels, reduction=reduction)
