"""Poisson sampling of DP-SGD batches, the sampling every accountant in privacy.accounting assumes.

Each step includes every training example independently with probability ``sample_rate`` (q), so
the batch size varies (Binomial(N, q)). Privacy amplification by subsampling (Abadi et al. 2016;
Mironov, Talwar, Zhang 2019) is proven for this scheme; shuffling the data and cutting fixed-size
batches is a different mechanism whose epsilon the Poisson accountants do not bound, so asking for
it is refused here rather than reported with the wrong epsilon.

Drawing N Bernoulli variables per step costs O(N) (45M examples for Criteo). Instead we draw the
batch size k ~ Binomial(N, q) and then k distinct indices uniformly: conditioned on its size, a
Bernoulli subset is a uniform k-subset, so the two are the same distribution at O(k) cost.
With ``secure_mode`` both draws come from the OS CSPRNG (``random.SystemRandom``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import numpy as np
from scipy.stats import binom
from torch.utils.data import Sampler

from privacy.errors import PrivacyError

SAMPLING_KINDS = ("poisson",)


def check_sampling(kind: str) -> str:
    """Only Poisson sampling matches the accountants; anything else is refused."""
    if kind != "poisson":
        raise PrivacyError(
            f"sampling = {kind!r}: expected 'poisson' (the RDP/PRV/GDP accountants assume Poisson "
            "sampling; shuffled fixed-size batches would report an epsilon that does not hold)"
        )
    return kind


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``steps`` batches of example indices, each example in each batch with probability q.

    Usable as a ``torch.utils.data.DataLoader(batch_sampler=...)``. Batches may be empty.

    Args:
        num_examples: N, the number of training examples.
        sample_rate: q in (0, 1].
        steps: number of batches to yield.
        seed: seed for the (non-secure) NumPy generator; None = fresh entropy.
        secure_mode: draw from ``random.SystemRandom`` (``seed`` must be None).
    """

    def __init__(
        self,
        num_examples: int,
        *,
        sample_rate: float,
        steps: int,
        seed: int | None = None,
        secure_mode: bool = False,
    ) -> None:
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise PrivacyError(f"num_examples = {num_examples!r}: expected a positive integer")
        if (
            isinstance(sample_rate, bool)
            or not isinstance(sample_rate, int | float)
            or not 0 < sample_rate <= 1
        ):
            raise PrivacyError(f"sample_rate = {sample_rate!r}: expected a number in (0, 1]")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise PrivacyError(f"steps = {steps!r}: expected an integer >= 0")
        if secure_mode and seed is not None:
            raise PrivacyError(f"seed = {seed!r} with secure_mode = True: expected no seed")
        self.num_examples = num_examples
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.secure_mode = secure_mode
        self._rng = np.random.default_rng(seed)
        self._secure = random.SystemRandom() if secure_mode else None

    @property
    def expected_batch_size(self) -> float:
        """N * q: the DP optimizer divides the noisy sum by this, not by the realised size."""
        return self.num_examples * self.sample_rate

    def sample(self) -> np.ndarray:
        """One batch: sorted distinct indices (int64)."""
        n, q = self.num_examples, self.sample_rate
        if self._secure is not None:
            u = self._secure.random()
            size = int(binom.ppf(u, n, q)) if q < 1 else n
            size = min(max(size, 0), n)
            picked = self._secure.sample(range(n), size)
            return np.sort(np.asarray(picked, dtype=np.int64))
        size = int(self._rng.binomial(n, q))
        return np.sort(self._rng.choice(n, size=size, replace=False).astype(np.int64))

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.sample().tolist()

    def __len__(self) -> int:
        return self.steps


def steps_per_epoch(*, sample_rate: float) -> int:
    """Steps that visit N examples in expectation (1/q, rounded up)."""
    if not 0 < sample_rate <= 1:
        raise PrivacyError(f"sample_rate = {sample_rate!r}: expected a number in (0, 1]")
    return math.ceil(1.0 / sample_rate)


def check_poisson_loader(loader) -> None:
    """Raise unless ``loader`` draws its batches by Poisson sampling (ours or Opacus's)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    batch_sampler = getattr(loader, "batch_sampler", None)
    if isinstance(batch_sampler, PoissonBatchSampler | UniformWithReplacementSampler):
        return
    raise PrivacyError(
        f"data loader batch_sampler = {type(batch_sampler).__name__}: expected Poisson sampling "
        "(privacy.dp.sampling.PoissonBatchSampler); shuffled fixed-size batches do not match the accountant"
    )
