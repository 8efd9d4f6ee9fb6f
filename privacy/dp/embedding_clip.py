"""Per-sample gradients of embedding tables in sparse form: memory ~ batch x rows touched x dim.

Stock Opacus materialises the per-sample gradient of an ``nn.EmbeddingBag`` as a dense
batch x num_embeddings x dim tensor (512 x 1M x 16 floats = 33 GB). A sample's gradient for a table is
non-zero only on the rows it looked up, and each of those rows receives a multiple of the gradient of
the output it fed. Here a sample's gradient is kept as (sample, row, vector) triples, coalesced so that
a row looked up twice by the same sample carries the *sum* of both contributions (the per-sample
gradient is that sum; its norm is not the sum of the norms). From the coalesced triples we get each
sample's squared norm and, given clip factors, the clipped gradient sum over the rows touched by the
batch, exactly as textbook DP-SGD (Abadi et al. 2016, https://arxiv.org/abs/1607.00133) would compute
it from dense per-sample gradients.

Supported: ``nn.Embedding`` (any index shape, ``padding_idx``; not ``max_norm`` or
``scale_grad_by_freq``, which make one sample's gradient depend on others or rewrite the weights) and
``nn.EmbeddingBag`` in ``sum`` (with or without ``per_sample_weights``) and ``mean`` modes, 2-D input
or 1-D input with offsets (``include_last_offset`` either way), ``padding_idx``. Each bag is one sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from privacy.errors import PrivacyError


@dataclass
class Lookups:
    """Which output row each looked-up embedding row fed, and with what coefficient.

    Entry ``j`` says: table row ``rows[j]`` was read for sample ``samples[j]`` and its gradient is
    ``coef[j] * grad_output[outputs[j]]`` (``coef`` None means 1).
    """

    samples: torch.Tensor
    rows: torch.Tensor
    outputs: torch.Tensor
    coef: torch.Tensor | None
    batch_size: int


def check_embedding_module(name: str, module: nn.Module) -> None:
    """Raise PrivacyError for embedding options whose per-sample gradients are not independent."""
    kind = type(module).__name__
    if getattr(module, "max_norm", None) is not None:
        raise PrivacyError(
            f"module '{name}' ({kind}) max_norm = {module.max_norm!r}: expected None for DP-SGD "
            "(max_norm rewrites weight rows during the forward)"
        )
    if getattr(module, "scale_grad_by_freq", False):
        raise PrivacyError(
            f"module '{name}' ({kind}) scale_grad_by_freq = True: expected False for DP-SGD "
            "(it scales one sample's gradient by counts over the whole batch)"
        )
    if isinstance(module, nn.EmbeddingBag) and module.mode not in ("sum", "mean"):
        raise PrivacyError(f"module '{name}' (EmbeddingBag) mode = {module.mode!r}: expected 'sum' or 'mean'")


def embedding_lookups(module: nn.Embedding, indices: torch.Tensor) -> Lookups:
    """Lookups of ``nn.Embedding``: the first index dimension is the sample."""
    batch_size = indices.shape[0] if indices.dim() > 0 else 1
    flat = indices.reshape(-1).long()
    per_sample = flat.numel() // batch_size if batch_size else 0
    positions = torch.arange(flat.numel(), device=flat.device)
    samples = positions // per_sample if per_sample else positions
    keep = None
    if module.padding_idx is not None:
        keep = flat != module.padding_idx
    lookups = Lookups(samples=samples, rows=flat, outputs=positions, coef=None, batch_size=batch_size)
    return _select(lookups, keep)


def embedding_bag_lookups(
    module: nn.EmbeddingBag,
    indices: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
) -> Lookups:
    """Lookups of ``nn.EmbeddingBag``: bag ``b`` is sample ``b``."""
    if indices.dim() == 2:
        num_bags, bag_len = indices.shape
        flat = indices.reshape(-1).long()
        bags = torch.arange(num_bags, device=flat.device).repeat_interleave(bag_len)
    elif indices.dim() == 1:
        if offsets is None:
            raise PrivacyError("EmbeddingBag called with 1-D input and no offsets: expected offsets")
        offsets = offsets.long()
        starts = offsets[:-1] if module.include_last_offset else offsets
        num_bags = starts.numel()
        flat = indices.long()
        positions = torch.arange(flat.numel(), device=flat.device)
        # Entry j belongs to the last bag starting at or before j (empty bags are skipped).
        bags = torch.searchsorted(starts, positions, right=True) - 1
    else:
        raise PrivacyError(f"EmbeddingBag input of shape {tuple(indices.shape)}: expected 1-D or 2-D")
    keep = None
    if module.padding_idx is not None:
        keep = flat != module.padding_idx
    coef = None
    if per_sample_weights is not None:
        coef = per_sample_weights.reshape(-1)
    if module.mode == "mean":
        valid = keep if keep is not None else torch.ones_like(flat, dtype=torch.bool)
        counts = torch.zeros(num_bags, device=flat.device, dtype=torch.float64)
        counts.index_add_(0, bags, valid.to(torch.float64))
        coef = (1.0 / counts.clamp(min=1.0))[bags]
    lookups = Lookups(samples=bags, rows=flat, outputs=bags, coef=coef, batch_size=num_bags)
    return _select(lookups, keep)


def _select(lookups: Lookups, keep: torch.Tensor | None) -> Lookups:
    if keep is None:
        return lookups
    return Lookups(
        samples=lookups.samples[keep],
        rows=lookups.rows[keep],
        outputs=lookups.outputs[keep],
        coef=None if lookups.coef is None else lookups.coef[keep],
        batch_size=lookups.batch_size,
    )


@dataclass
class SparsePerSampleGrad:
    """Coalesced per-sample gradient of one table: one entry per distinct (sample, row)."""

    samples: torch.Tensor  # (U,)
    rows: torch.Tensor  # (U,)
    values: torch.Tensor  # (U, dim)
    batch_size: int

    def squared_norms(self) -> torch.Tensor:
        """Squared Frobenius norm of each sample's gradient for this table, shape (batch,)."""
        out = torch.zeros(self.batch_size, device=self.values.device, dtype=self.values.dtype)
        return out.index_put_((self.samples,), self.values.pow(2).sum(dim=1), accumulate=True)

    def clipped_sum(self, clip_factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum over samples of ``clip_factors[i] * g_i``, as (distinct rows, row gradients)."""
        rows, inverse = torch.unique(self.rows, return_inverse=True)
        scaled = self.values * clip_factors.to(self.values.dtype)[self.samples].unsqueeze(1)
        summed = torch.zeros(rows.numel(), self.values.shape[1], device=scaled.device, dtype=scaled.dtype)
        return rows, summed.index_put_((inverse,), scaled, accumulate=True)


def lookup_vectors(lookups: Lookups, grad_output: torch.Tensor) -> torch.Tensor:
    """Each lookup's gradient contribution ``coef_j * grad_output[outputs_j]``, shape (lookups, dim)."""
    vectors = grad_output.reshape(-1, grad_output.shape[-1])[lookups.outputs]
    if lookups.coef is not None:
        vectors = vectors * lookups.coef.to(vectors.dtype).unsqueeze(1)
    return vectors


def per_sample_gradient(lookups: Lookups, grad_output: torch.Tensor, num_rows: int) -> SparsePerSampleGrad:
    """Coalesce one table's lookups and output gradient into per-sample sparse gradients.

    Args:
        lookups: from :func:`embedding_lookups` or :func:`embedding_bag_lookups`.
        grad_output: gradient of the summed per-sample loss w.r.t. the module output.
        num_rows: rows in the table (to build a unique (sample, row) key).
    """
    grad, _ = grouped_per_sample_gradient([(lookups, grad_output, num_rows)])
    return grad


def grouped_per_sample_gradient(
    tables: list[tuple[Lookups, torch.Tensor, int]],
) -> tuple[SparsePerSampleGrad, list[int]]:
    """Per-sample sparse gradients of several tables of one dim at once, in a shared row space.

    Table ``t``'s row ``r`` becomes row ``offsets[t] + r``: one coalescing pass serves all tables
    (DLRM has 26), which matters because each tensor operation costs microseconds of dispatch.

    Returns:
        the coalesced gradient over the concatenated rows, and the row offset of each table.
    """
    offsets, total = [], 0
    for _, _, num_rows in tables:
        offsets.append(total)
        total += num_rows
    samples = torch.cat([lk.samples for lk, _, _ in tables])
    rows = torch.cat([lk.rows + off for (lk, _, _), off in zip(tables, offsets)])
    vectors = torch.cat([lookup_vectors(lk, go) for lk, go, _ in tables])
    key = samples * total + rows
    unique_keys, inverse = torch.unique(key, return_inverse=True)
    values = torch.zeros(unique_keys.numel(), vectors.shape[1], device=vectors.device, dtype=vectors.dtype)
    # index_put_(accumulate=True) sums duplicates like index_add_, with less dispatch overhead on CPU
    values.index_put_((inverse,), vectors, accumulate=True)
    grad = SparsePerSampleGrad(
        samples=unique_keys // total,
        rows=unique_keys % total,
        values=values,
        batch_size=tables[0][0].batch_size,
    )
    return grad, offsets


def split_by_table(
    rows: torch.Tensor, values: torch.Tensor, offsets: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Undo the shared row space: sorted ``rows`` -> one (rows, values) pair per table."""
    bounds = torch.searchsorted(rows, torch.tensor([*offsets[1:]], dtype=rows.dtype, device=rows.device))
    cuts = [0, *bounds.tolist(), rows.numel()]
    return [
        (rows[cuts[t] : cuts[t + 1]] - offsets[t], values[cuts[t] : cuts[t + 1]]) for t in range(len(offsets))
    ]
