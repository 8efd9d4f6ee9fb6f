"""Lazy Gaussian noise for embedding rows: the same distribution as noising every row every step.

With plain SGD (no momentum, no weight decay), DP-SGD's update of an embedding row r at step s is
``w_r -= lr_s / B * (g_{s,r} + z_{s,r})`` with ``z_{s,r} ~ N(0, sigma^2 C^2)`` independent of everything.
A row the batch did not touch has ``g_{s,r} = 0``, so between two reads its value only collects the sum
of independent Gaussians, which is one Gaussian with the summed variance
``sigma^2 C^2 sum_s (lr_s / B)^2``. Drawing that one Gaussian when the row is next *read* (before the
forward that reads it), or at :meth:`LazyRowNoise.flush` (before export, checkpoint or evaluation),
gives every value anyone can observe exactly the distribution it has under dense noising, so the
privacy guarantee is unchanged; it only stops paying for noise on rows nobody reads.

Per table this costs one int32 per row (the step up to which the row is noised) and one float64 per
step since the last full flush (the running sum of per-step variances, so a changing learning rate
stays exact). Gradients are still applied eagerly, only the noise waits.

Exact only for updates of the form ``w -= a_s * (g + z)``: torch.optim.SGD with momentum 0, dampening
irrelevant, weight_decay 0, nesterov False, maximize False. privacy.dp.optimizer enforces this.
"""

from __future__ import annotations

import torch

from privacy.dp.noise import GaussianNoise


class LazyRowNoise:
    """Pending-noise bookkeeping for one embedding table.

    Args:
        weight: the table (rows x dim); noise is added to it in place.
        noise: the Gaussian source.
    """

    def __init__(self, weight: torch.Tensor, *, noise: GaussianNoise) -> None:
        self.weight = weight
        self.noise = noise
        self.last = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
        # cumvar[k] = sum of per-step variances over steps [0, k) since the last full flush.
        self._cumvar = torch.zeros(64, dtype=torch.float64, device=weight.device)
        self.step_index = 0  # steps advanced since the last full flush
        self.noise_draws = 0  # noise values drawn (for benchmarks and tests)

    def advance(self, variance: float) -> None:
        """One DP step happened: every row owes one more N(0, ``variance``) per coordinate."""
        if self.step_index + 1 >= self._cumvar.numel():
            grown = torch.zeros(2 * self._cumvar.numel(), dtype=torch.float64, device=self._cumvar.device)
            grown[: self._cumvar.numel()] = self._cumvar
            self._cumvar = grown
        self._cumvar[self.step_index + 1] = self._cumvar[self.step_index] + variance
        self.step_index += 1

    def pending_variance(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Variance each of ``rows`` (default: every row) still owes (float64)."""
        last = self.last if rows is None else self.last.index_select(0, rows)
        return self._cumvar[self.step_index] - self._cumvar.index_select(0, last)

    @torch.no_grad()
    def flush_rows(self, rows: torch.Tensor) -> None:
        """Bring ``rows`` up to date before they are read; ``rows`` may repeat.

        A repeated row gathers its old value once per occurrence, each occurrence adds its own draw,
        and the scatter keeps one of them: the row gets exactly one draw of the owed variance.
        Rows already current draw standard deviation 0. No ``unique`` (a host sync on GPUs).
        """
        if self.step_index == 0 or rows.numel() == 0:
            return
        rows = rows.reshape(-1).long()
        std = self.pending_variance(rows).clamp_(min=0).sqrt_().to(self.weight.dtype).unsqueeze_(1)
        draw = self.noise.normal(
            (rows.numel(), self.weight.shape[1]), device=self.weight.device, dtype=self.weight.dtype
        )
        self.noise_draws += draw.numel()
        self.weight.index_put_((rows,), torch.addcmul(self.weight.index_select(0, rows), draw, std))
        self.last[rows] = self.step_index

    @torch.no_grad()
    def flush(self) -> None:
        """Bring every row up to date (before export, checkpoint, evaluation of all rows)."""
        if self.step_index == 0:
            return
        std = self.pending_variance().clamp_(min=0).sqrt_().to(self.weight.dtype).unsqueeze_(1)
        draw = self.noise.normal(tuple(self.weight.shape), device=self.weight.device, dtype=self.weight.dtype)
        self.noise_draws += draw.numel()
        self.weight.add_(draw * std)
        # Everything is current: rebase the bookkeeping so it does not grow without bound.
        self.last.zero_()
        self._cumvar.zero_()
        self.step_index = 0

    @property
    def is_flushed(self) -> bool:
        return self.step_index == 0
