"""Lazy row noise gives final parameters with the same distribution as textbook DP-SGD.

The reference is written here from the definition (Abadi et al. 2016), not through privacy.dp: per-
example gradients by autograd one example at a time, clipped to C, summed, plus N(0, sigma^2 C^2) on
every coordinate from its own generator, over N q, then an SGD step. sigma and C sit away from 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from privacy.dp.lazy_noise import LazyRowNoise
from privacy.dp.noise import GaussianNoise
from privacy.dp.optimizer import DPSGD
from privacy.dp.sampling import PoissonBatchSampler

ROWS, DIM, USED_ROWS, N = 10, 2, 6, 40  # rows 6..9 are never looked up by any example
SIGMA, CLIP, RATE, STEPS = 1.3, 2.0, 0.25, 12
LRS = [0.5] * 6 + [0.2] * 6  # a learning-rate change mid-run must stay exact


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(ROWS, DIM, mode="sum")
        self.lin = nn.Linear(DIM, 1)

    def forward(self, idx, x):
        return self.lin(self.bag(idx.view(-1, 1)) + x).squeeze(1)


def _data():
    gen = torch.Generator().manual_seed(123)
    idx = torch.randint(0, USED_ROWS, (N,), generator=gen)
    x = torch.randn(N, DIM, generator=gen)
    y = torch.randn(N, generator=gen)
    batches = list(PoissonBatchSampler(N, sample_rate=RATE, steps=STEPS, seed=7))
    return idx, x, y, batches


DATA = _data()


def train(seed: int, *, lazy: bool, device: str = "cpu") -> np.ndarray:
    idx, x, y, batches = DATA
    idx, x, y = idx.to(device), x.to(device), y.to(device)
    torch.manual_seed(0)  # same initial model in every run
    model = Tiny().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LRS[0])
    dp = DPSGD(
        model,
        opt,
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        sample_rate=RATE,
        num_examples=N,
        lazy_noise=lazy,
        seed=seed,
    )
    for step, batch in enumerate(batches):
        opt.param_groups[0]["lr"] = LRS[step]
        b = torch.tensor(batch, dtype=torch.long, device=device)
        loss = (model(idx[b], x[b]) - y[b]) ** 2
        dp.step(loss)
    dp.flush()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu().numpy().copy()


def run_many(lazy: bool, seeds: range, device: str = "cpu") -> np.ndarray:
    return np.stack([train(s, lazy=lazy, device=device) for s in seeds])


def untouched_variance_pvalue(samples: np.ndarray) -> tuple[float, float]:
    """Chi-square test of the never-read rows against their exact law N(w0, sigma^2 C^2 sum (lr/B)^2)."""
    torch.manual_seed(0)
    initial = Tiny().bag.weight.detach().numpy()[USED_ROWS:].reshape(-1)
    values = samples[:, USED_ROWS * DIM : ROWS * DIM] - initial
    expected_var = SIGMA**2 * CLIP**2 * sum((lr / (N * RATE)) ** 2 for lr in LRS)
    statistic = float((values**2).sum() / expected_var)
    dof = values.size
    p = 2 * min(stats.chi2.cdf(statistic, dof), stats.chi2.sf(statistic, dof))
    return p, float(values.var() / expected_var)


@pytest.fixture(scope="module")
def lazy_runs():
    return run_many(True, range(300))


def train_reference(seed: int) -> np.ndarray:
    """Textbook DP-SGD on the same data, batches and initial model (independent of privacy.dp)."""
    idx, x, y, batches = DATA
    torch.manual_seed(0)
    model = Tiny()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    for step, batch in enumerate(batches):
        total = [torch.zeros_like(p) for p in params]
        for i in batch:
            loss = (model(idx[i : i + 1], x[i : i + 1]) - y[i : i + 1]) ** 2
            grads = torch.autograd.grad(loss.sum(), params)
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
            factor = min(1.0, CLIP / (float(norm) + 1e-6))
            total = [t + factor * g for t, g in zip(total, grads)]
        with torch.no_grad():
            for p, t in zip(params, total):
                noise = torch.randn(p.shape, generator=gen) * (SIGMA * CLIP)
                p -= LRS[step] * (t + noise) / (N * RATE)
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy().copy()


@pytest.fixture(scope="module")
def dense_runs():
    """The reference runs (named dense: noise on every coordinate every step)."""
    return np.stack([train_reference(s) for s in range(1000, 1300)])


def assert_same_distribution(lazy_runs, dense_runs):
    # Every coordinate (touched rows, untouched rows, dense layer): two-sample KS test, Bonferroni.
    coords = lazy_runs.shape[1]
    pvalues = [stats.ks_2samp(lazy_runs[:, j], dense_runs[:, j]).pvalue for j in range(coords)]
    assert min(pvalues) > 0.001 / coords, pvalues
    # Variances per coordinate agree (Levene), and means too.
    for j in range(coords):
        assert stats.levene(lazy_runs[:, j], dense_runs[:, j]).pvalue > 0.001 / coords
    assert not np.allclose(lazy_runs[0], lazy_runs[1])  # noise was really drawn


def test_lazy_matches_dense_in_distribution(lazy_runs, dense_runs):
    assert_same_distribution(lazy_runs, dense_runs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_lazy_noise_on_cuda_matches_dense_noise_on_cpu(dense_runs):
    """The whole lazy path on CUDA (duplicate rows in a batch included): same law as the CPU reference."""
    cuda_runs = run_many(True, range(300), device="cuda")
    assert_same_distribution(cuda_runs, dense_runs)
    p, ratio = untouched_variance_pvalue(cuda_runs)
    assert p > 1e-4 and 0.9 < ratio < 1.1, (p, ratio)


def test_untouched_rows_have_exact_law(lazy_runs, dense_runs):
    for runs in (lazy_runs, dense_runs):
        p, ratio = untouched_variance_pvalue(runs)
        assert p > 1e-4, (p, ratio)
        assert 0.9 < ratio < 1.1


def test_variance_test_detects_a_20_percent_error(monkeypatch):
    """The statistical check has power: a lazy implementation with 1.2x variance fails it."""
    original = LazyRowNoise.advance

    def wrong(self, variance):
        original(self, 1.2 * variance)

    monkeypatch.setattr(LazyRowNoise, "advance", wrong)
    p, ratio = untouched_variance_pvalue(run_many(True, range(300)))
    assert p < 1e-4 and ratio > 1.1


def test_lazy_noise_is_drawn_only_for_rows_read():
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = DPSGD(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, num_examples=4, seed=0)
    idx = torch.tensor([1, 2])
    for _ in range(3):
        dp.step(model(idx, torch.zeros(2, DIM)) ** 2)
    lazy = dp.lazy[id(model.bag.weight)]
    # rows 1, 2 were flushed before the 2nd and 3rd reads: 2 rows x DIM x 2 reads
    assert lazy.noise_draws == 2 * DIM * 2
    before = model.bag.weight.detach().clone()
    state = model.state_dict()  # state_dict() flushes every row first
    assert dp.is_flushed
    assert not torch.equal(before[5], state["bag.weight"][5])
    torch.testing.assert_close(state["bag.weight"], model.bag.weight.detach())


def test_a_flushed_row_owes_nothing_until_the_next_step():
    """Hand-computed bookkeeping: a row read (flushed) at step 3 draws nothing more at a second read or
    at the full flush until another step passes; then it owes exactly that step's variance."""
    weight = torch.zeros(5, 4, dtype=torch.float64)
    lazy = LazyRowNoise(weight, noise=GaussianNoise(seed=3))
    for variance in (0.5, 0.25, 2.0):
        lazy.advance(variance)
    rows = torch.tensor([1, 3, 1])  # a repeated row gets one draw
    assert torch.allclose(lazy.pending_variance(rows), torch.full((3,), 2.75, dtype=torch.float64))
    lazy.flush_rows(rows)
    after_read = weight.clone()
    assert (after_read[[1, 3]] != 0).all() and (after_read[[0, 2, 4]] == 0).all()
    assert torch.equal(lazy.pending_variance(torch.tensor([1, 3])), torch.zeros(2, dtype=torch.float64))
    lazy.flush_rows(torch.tensor([1, 3]))  # read again in the same step: unchanged
    assert torch.equal(weight, after_read)
    lazy.advance(0.125)
    assert torch.allclose(
        lazy.pending_variance(torch.tensor([1, 0])), torch.tensor([0.125, 2.875], dtype=torch.float64)
    )
    lazy.flush()
    assert lazy.is_flushed and (weight[[0, 2, 4]] != 0).all()


def train_embedding_lr(seed: int, *, embedding_lr: float, dense_lr: float) -> np.ndarray:
    """Lazy DP-SGD with the embedding table in its own optimizer group (``train.embedding_lr``)."""
    idx, x, y, batches = DATA
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(
        [
            {"params": model.lin.parameters(), "lr": dense_lr},
            {"params": [model.bag.weight], "lr": embedding_lr},
        ]
    )
    dp = DPSGD(
        model, opt, noise_multiplier=SIGMA, max_grad_norm=CLIP, sample_rate=RATE, num_examples=N, seed=seed
    )
    for batch in batches:
        b = torch.tensor(batch, dtype=torch.long)
        dp.step((model(idx[b], x[b]) - y[b]) ** 2)
    dp.flush()
    return model.bag.weight.detach().numpy()[USED_ROWS:].reshape(-1).copy()


def test_untouched_rows_follow_the_embedding_groups_learning_rate():
    """An embedding table in its own group (a larger step than the dense layers): the rows nobody reads
    carry exactly N(w0, sigma^2 C^2 sum (embedding_lr / B)^2), not the dense group's law."""
    torch.manual_seed(0)
    initial = Tiny().bag.weight.detach().numpy()[USED_ROWS:].reshape(-1)
    values = np.stack([train_embedding_lr(s, embedding_lr=2.0, dense_lr=0.5) for s in range(60)]) - initial

    def pvalue(lr: float) -> float:
        expected_var = SIGMA**2 * CLIP**2 * STEPS * (lr / (N * RATE)) ** 2
        statistic = float((values**2).sum() / expected_var)
        return 2 * min(stats.chi2.cdf(statistic, values.size), stats.chi2.sf(statistic, values.size))

    assert pvalue(2.0) > 1e-4
    assert pvalue(0.5) < 1e-6  # the dense group's step would be the wrong law
