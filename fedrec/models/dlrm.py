"""DLRM: Deep Learning Recommendation Model (Naumov et al. 2019, arXiv:1906.00091).

Named parts as in TorchRec: a sparse arch (the categorical features' tables fused in one embedding), a dense arch
(bottom MLP over the dense features), the feature interaction (pairwise dot products or
concatenation) and the over arch (top MLP). The default configuration is the DLRM Kaggle reference:
bottom 13-512-256-64-16, top 367-512-256-1, binary cross-entropy. No transport or privacy code here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedrec import registry
from fedrec.errors import ConfigError
from fedrec.models.layers import MLP


@dataclass
class DLRMConfig:
    """``model:`` keys of DLRM (the seed's names)."""

    arch_sparse_feature_size: int = 16  # embedding dimension; must equal the bottom MLP's last width
    arch_mlp_bot: list[int] = field(default_factory=lambda: [13, 512, 256, 64, 16])  # last = embedding dim
    arch_mlp_top: list[int] = field(default_factory=lambda: [367, 512, 256, 1])  # first = interaction width
    arch_interaction_op: Literal["dot", "cat"] = "dot"  # pairwise dot products, or concatenation
    arch_interaction_itself: bool = False  # include each vector's dot product with itself
    sigmoid_bot: Literal["relu", "sigmoid", "none"] = "relu"  # activation after the bottom MLP
    sigmoid_top: Literal["sigmoid", "none"] = "sigmoid"  # output activation of the top MLP
    loss_function: Literal["bce", "mse"] = "bce"  # binary cross-entropy (on logits) or squared error
    embedding_rows: int | None = None  # cap on rows per table (hashing); null = the data's vocabulary
    # Embedding vectors are ``embedding_scale`` x the stored rows (stored rows start at the reference
    # initialisation / scale, so the vectors start as in the reference). An SGD step then moves a vector
    # by scale^2 x lr x its gradient, while DP-SGD's noise on it (same clip C) grows only by scale: the
    # tables learn faster at less noise per unit of progress than with train.embedding_lr = scale^2 x lr,
    # at the price of a larger share of each example's clipped gradient norm.
    embedding_scale: float = 1.0  # embedding vectors = scale x stored rows (faster tables, less DP noise)

    def validate(self, path: str) -> None:
        if self.arch_sparse_feature_size < 1:
            raise ConfigError(
                f"config key '{path}.arch_sparse_feature_size' = {self.arch_sparse_feature_size!r}: "
                "expected a positive integer"
            )
        for key in ("arch_mlp_bot", "arch_mlp_top"):
            widths = getattr(self, key)
            if len(widths) < 2 or any(w < 1 for w in widths):
                raise ConfigError(
                    f"config key '{path}.{key}' = {widths!r}: expected at least two positive layer widths"
                )
        if self.arch_mlp_bot[-1] != self.arch_sparse_feature_size:
            raise ConfigError(
                f"config key '{path}.arch_mlp_bot' = {self.arch_mlp_bot!r}: last width must equal "
                f"arch_sparse_feature_size ({self.arch_sparse_feature_size})"
            )
        if self.arch_mlp_top[-1] != 1:
            raise ConfigError(
                f"config key '{path}.arch_mlp_top' = {self.arch_mlp_top!r}: last width must be 1 (one score)"
            )
        scale = self.embedding_scale
        if (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not math.isfinite(scale)
            or scale <= 0
        ):
            raise ConfigError(
                f"config key '{path}.embedding_scale' = {scale!r}: expected a finite number > 0"
            )
        if self.embedding_rows is not None and self.embedding_rows < 1:
            raise ConfigError(
                f"config key '{path}.embedding_rows' = {self.embedding_rows!r}: expected a positive integer or null"
            )


def interaction_size(op: str, num_vectors: int, dim: int, itself: bool) -> int:
    """Width of the interaction output for ``num_vectors`` vectors of size ``dim``."""
    if op == "cat":
        return num_vectors * dim
    pairs = num_vectors * (num_vectors + 1) // 2 if itself else num_vectors * (num_vectors - 1) // 2
    return dim + pairs


class SparseArch(nn.Module):
    """Every categorical feature's table in one fused embedding (DLRM-reference uniform initialisation).

    Table ``t`` owns rows ``[row_offsets[t], row_offsets[t] + table_sizes[t])`` of ``embedding.weight``, as
    in TorchRec's fused table-batched embeddings: a batch costs one lookup and one (sparse) gradient
    instead of one per table, which is what a step's time goes to on GPUs and with small batches.
    With one index per example and table, sum pooling is the lookup itself.
    """

    row_offsets: torch.Tensor
    row_limits: torch.Tensor

    def __init__(
        self,
        table_sizes: list[int],
        dim: int,
        generator: torch.Generator | None = None,
        sparse: bool = False,
        scale: float = 1.0,
    ):
        super().__init__()
        self.table_sizes = list(table_sizes)
        starts = [0]
        for rows in self.table_sizes[:-1]:
            starts.append(starts[-1] + rows)
        self.embedding = nn.Embedding(sum(self.table_sizes), dim, sparse=sparse)
        self.scale = float(scale)
        with torch.no_grad():
            for start, rows in zip(starts, self.table_sizes):
                bound = math.sqrt(1.0 / rows) / self.scale
                self.embedding.weight[start : start + rows].uniform_(-bound, bound, generator=generator)
        self.register_buffer("row_offsets", torch.tensor(starts, dtype=torch.long), persistent=False)
        self.register_buffer("row_limits", torch.tensor(self.table_sizes, dtype=torch.long), persistent=False)

    def table(self, t: int) -> torch.Tensor:
        """Table ``t``'s rows (a view of the fused weight)."""
        start = int(self.row_offsets[t])
        return self.embedding.weight[start : start + self.table_sizes[t]]

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        """``sparse``: [B, num_tables] indices, one per table -> [B, num_tables, dim]."""
        if sparse.dim() != 2 or sparse.shape[1] != len(self.table_sizes):
            raise ValueError(
                f"sparse features of shape {tuple(sparse.shape)}: expected [batch, {len(self.table_sizes)}]"
            )
        sparse = sparse.long()
        # A fused table must not let an index past its table read the next one: check the range.
        outside = (sparse < 0) | (sparse >= self.row_limits)
        if sparse.device.type == "cpu":
            if bool(outside.any()):
                b, t = (int(v) for v in outside.nonzero()[0])
                raise IndexError(
                    f"sparse feature {t} = {int(sparse[b, t])} in example {b}: expected 0 to "
                    f"{self.table_sizes[t] - 1} (table {t} has {self.table_sizes[t]} rows)"
                )
        else:  # no host synchronisation on accelerators: a device-side assertion
            torch._assert_async(~outside.any(), "sparse feature index outside its embedding table")
        embedded = self.embedding(sparse + self.row_offsets)
        return embedded if self.scale == 1.0 else embedded * self.scale


class InteractionArch(nn.Module):
    """Pairwise dot products of all vectors (plus the dense vector) or their concatenation."""

    pair_index: torch.Tensor

    def __init__(self, op: str, itself: bool, num_vectors: int):
        super().__init__()
        self.op = op
        self.itself = itself
        self.num_vectors = num_vectors
        rows, cols = torch.tril_indices(num_vectors, num_vectors, offset=0 if itself else -1)
        # Flat positions of the kept pairs in the [n, n] product matrix: one index_select per batch
        # (forward and backward about 1.5x faster than products[:, rows, cols] at batch 32).
        self.register_buffer("pair_index", rows * num_vectors + cols, persistent=False)

    def forward(self, dense: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """``dense`` [B, d], ``embedded`` [B, num_tables, d]."""
        if self.op == "cat":
            return torch.cat([dense, embedded.flatten(1)], dim=1)
        vectors = torch.cat([dense.unsqueeze(1), embedded], dim=1)  # [B, n, d]
        if vectors.shape[1] != self.num_vectors:
            raise ValueError(f"{vectors.shape[1]} vectors to interact: expected {self.num_vectors}")
        products = torch.bmm(vectors, vectors.transpose(1, 2))  # [B, n, n]
        return torch.cat([dense, products.flatten(1).index_select(1, self.pair_index)], dim=1)


@registry.load("model", "dlrm")
class DLRM(nn.Module):
    """DLRM for click-through rate: ``forward(batch)`` returns one raw score per example."""

    Config = DLRMConfig
    TASK = "ctr"

    def __init__(
        self, config: DLRMConfig, *, table_sizes: list[int], seed: int | None = None, sparse: bool = False
    ):
        super().__init__()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        num_vectors = len(table_sizes) + 1
        expected = interaction_size(
            config.arch_interaction_op,
            num_vectors,
            config.arch_sparse_feature_size,
            config.arch_interaction_itself,
        )
        if config.arch_mlp_top[0] != expected:
            raise ConfigError(
                f"config key 'model.arch_mlp_top' = {config.arch_mlp_top!r}: first width must equal the "
                f"interaction output size {expected} for {len(table_sizes)} tables"
            )
        if config.embedding_rows is not None:
            table_sizes = [min(rows, config.embedding_rows) for rows in table_sizes]
        self.config = config
        self.table_sizes = list(table_sizes)
        self.sparse_arch = SparseArch(
            self.table_sizes,
            config.arch_sparse_feature_size,
            generator,
            sparse,
            scale=float(config.embedding_scale),
        )
        self.dense_arch = MLP(config.arch_mlp_bot, config.sigmoid_bot, generator)
        self.interaction = InteractionArch(
            config.arch_interaction_op, config.arch_interaction_itself, num_vectors
        )
        self.over_arch = MLP(config.arch_mlp_top, "none", generator)

    @classmethod
    def check_config(cls, config: DLRMConfig, dataset_cls: Any, path: str) -> None:
        """Check the architecture against the dataset's feature counts (before any data is read)."""
        if getattr(dataset_cls, "TASK", None) != cls.TASK:
            raise ConfigError(
                f"config key '{path}.preproc.dataset': model 'dlrm' needs a click-through dataset (criteo), "
                f"got {getattr(dataset_cls, 'TASK', '?')!r} data"
            )
        if config.arch_mlp_bot[0] != dataset_cls.NUM_DENSE:
            raise ConfigError(
                f"config key '{path}.arch_mlp_bot' = {config.arch_mlp_bot!r}: first width must equal the "
                f"number of dense features ({dataset_cls.NUM_DENSE})"
            )
        expected = interaction_size(
            config.arch_interaction_op,
            dataset_cls.NUM_SPARSE + 1,
            config.arch_sparse_feature_size,
            config.arch_interaction_itself,
        )
        if config.arch_mlp_top[0] != expected:
            raise ConfigError(
                f"config key '{path}.arch_mlp_top' = {config.arch_mlp_top!r}: first width must equal the "
                f"interaction output size ({expected} for {config.arch_interaction_op!r} over "
                f"{dataset_cls.NUM_SPARSE} tables + dense, dim {config.arch_sparse_feature_size})"
            )

    @classmethod
    def from_data(
        cls, config: DLRMConfig, meta: dict[str, Any], *, seed: int | None = None, sparse: bool = False
    ) -> DLRM:
        """Size the tables from the processed data; ``sparse`` gives embedding tables sparse gradients."""
        return cls(config, table_sizes=list(meta["table_sizes"]), seed=seed, sparse=sparse)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        dense = self.dense_arch(batch["dense"])
        sparse = batch["sparse"]
        if self.config.embedding_rows is not None:
            sparse = sparse % self.config.embedding_rows
        embedded = self.sparse_arch(sparse)
        return self.over_arch(self.interaction(dense, embedded)).squeeze(1)

    def predict(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores -> click probabilities (or raw outputs when sigmoid_top is 'none')."""
        return torch.sigmoid(scores) if self.config.sigmoid_top == "sigmoid" else scores

    def loss(self, scores: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.config.loss_function == "bce":
            if self.config.sigmoid_top == "sigmoid":
                return F.binary_cross_entropy_with_logits(scores, labels, reduction=reduction)
            return F.binary_cross_entropy(scores.clamp(1e-7, 1 - 1e-7), labels, reduction=reduction)
        return F.mse_loss(self.predict(scores), labels, reduction=reduction)
