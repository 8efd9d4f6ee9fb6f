"""Poisson batch sampling: inclusion probability, batch-size law, refusal of shuffled batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from privacy.dp.sampling import PoissonBatchSampler, check_poisson_loader, check_sampling
from privacy.errors import PrivacyError


@pytest.mark.parametrize("secure_mode", [False, True])
def test_each_example_included_independently_with_probability_q(secure_mode):
    n, q, steps = 200, 0.1, 1500
    seed = None if secure_mode else 3
    sampler = PoissonBatchSampler(n, sample_rate=q, steps=steps, seed=seed, secure_mode=secure_mode)
    counts = np.zeros(n)
    sizes = []
    for batch in sampler:
        assert len(set(batch)) == len(batch) and batch == sorted(batch)
        counts[batch] += 1
        sizes.append(len(batch))
    # Per-example inclusion counts ~ Binomial(steps, q): chi-square goodness of fit on the counts
    expected = steps * q
    chi2 = float(((counts - expected) ** 2 / (expected * (1 - q))).sum())
    assert stats.chi2.sf(chi2, n) > 1e-4
    # Batch size ~ Binomial(n, q): mean and variance
    sizes = np.array(sizes)
    assert abs(sizes.mean() - n * q) < 4 * np.sqrt(n * q * (1 - q) / steps)
    assert 0.85 < sizes.var() / (n * q * (1 - q)) < 1.15
    assert sampler.expected_batch_size == pytest.approx(n * q)


def test_large_dataset_is_cheap_and_batches_vary():
    sampler = PoissonBatchSampler(45_000_000, sample_rate=512 / 45_000_000, steps=20, seed=0)
    sizes = {len(b) for b in sampler}
    assert len(sizes) > 1 and all(400 < s < 640 for s in sizes)


def test_shuffled_batches_refused():
    with pytest.raises(PrivacyError, match="poisson"):
        check_sampling("shuffle")
    dataset = TensorDataset(torch.arange(10))
    with pytest.raises(PrivacyError, match="Poisson"):
        check_poisson_loader(DataLoader(dataset, batch_size=2, shuffle=True))
    check_poisson_loader(DataLoader(dataset, batch_sampler=PoissonBatchSampler(10, sample_rate=0.5, steps=2)))


def test_bad_parameters():
    with pytest.raises(PrivacyError, match="sample_rate"):
        PoissonBatchSampler(10, sample_rate=0.0, steps=1)
    with pytest.raises(PrivacyError, match="num_examples"):
        PoissonBatchSampler(0, sample_rate=0.5, steps=1)
    with pytest.raises(PrivacyError, match="seed"):
        PoissonBatchSampler(10, sample_rate=0.5, steps=1, seed=1, secure_mode=True)
