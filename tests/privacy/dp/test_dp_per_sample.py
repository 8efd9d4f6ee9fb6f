"""Exactness of privacy.dp.per_sample against textbook DP-SGD clipping computed one sample at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from privacy.dp.per_sample import CLIP_EPS, PerSampleClipper
from privacy.errors import PrivacyError


def naive_clipped_sum(model: nn.Module, loss_fn, batch: list, max_grad_norm: float) -> dict:
    """Loop over samples: full dense per-sample gradient, clip the whole-model norm, sum."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for sample in batch:
        grads = torch.autograd.grad(loss_fn(model, [sample]).sum(), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, max_grad_norm / (float(norm) + CLIP_EPS))
        for acc, g in zip(total, grads):
            acc += factor * g
    return {p: t for p, t in zip(params, total)}, torch.stack(norms)


class BagModel(nn.Module):
    """Two EmbeddingBags (sum with per-sample weights, mean with padding) + an Embedding + Linear."""

    def __init__(self, mode: str):
        super().__init__()
        self.bag = nn.EmbeddingBag(7, 3, mode=mode, padding_idx=0 if mode == "mean" else None)
        self.bag2 = nn.EmbeddingBag(5, 3, mode="sum", include_last_offset=True)
        self.emb = nn.Embedding(6, 3, padding_idx=5)
        self.lin = nn.Linear(9, 4)
        self.head = nn.Linear(4, 1)
        self.mode = mode

    def forward(self, samples):
        # One sample: (bag indices, bag weights, bag2 indices, emb index pair)
        idx = torch.cat([s[0] for s in samples])
        offsets = torch.tensor([0, *[len(s[0]) for s in samples][:-1]]).cumsum(0)
        weights = torch.cat([s[1] for s in samples]) if self.mode == "sum" else None
        a = self.bag(idx, offsets, per_sample_weights=weights)
        idx2 = torch.cat([s[2] for s in samples])
        off2 = torch.tensor([0] + [len(s[2]) for s in samples]).cumsum(0)
        b = self.bag2(idx2, off2)
        c = self.emb(torch.stack([s[3] for s in samples])).sum(dim=1)
        return self.head(torch.relu(self.lin(torch.cat([a, b, c], dim=1)))).squeeze(1)


def bag_loss(model, samples):
    return (model(samples) - 0.3) ** 2 * 5.0


def make_bag_batch(mode: str):
    t = torch.tensor
    w = torch.float64
    return [
        # row 2 looked up twice by the same sample (sum of both contributions), row 3 twice in bag2
        (t([2, 2, 4]), t([0.5, 1.5, -1.0], dtype=w), t([3, 3]), t([1, 1])),
        (t([0, 1]), t([2.0, 1.0], dtype=w), t([0]), t([2, 5])),
        (t([2]), t([1.0], dtype=w), t([], dtype=torch.long), t([5, 5])),  # empty bag2, padding in emb
        (t([6, 0, 0, 3]), t([1.0, 1.0, 3.0, 0.1], dtype=w), t([1, 4, 1]), t([0, 3])),
    ]


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("max_grad_norm", [0.05, 1e6])  # every sample clipped / none clipped
def test_embedding_bag_matches_naive(mode, max_grad_norm):
    torch.manual_seed(0)
    model = BagModel(mode).double()
    batch = make_bag_batch(mode)
    expected, expected_norms = naive_clipped_sum(model, bag_loss, batch, max_grad_norm)
    clipper = PerSampleClipper(model, max_grad_norm=max_grad_norm)
    got = clipper.clip(bag_loss(model, batch))
    torch.testing.assert_close(got.norms, expected_norms, rtol=1e-10, atol=1e-12)
    for p, want in expected.items():
        torch.testing.assert_close(got.to_dense(p), want, rtol=1e-10, atol=1e-12)
    assert set(got.sparse) == {model.bag.weight, model.bag2.weight, model.emb.weight}
    # sparse rows: only rows the batch looked up; the padding row is listed with zeros only
    rows, values = got.sparse[model.emb.weight]
    assert set(rows.tolist()) <= {0, 1, 2, 3, 5}
    assert bool((values[rows == 5] == 0).all())
    if max_grad_norm < 1:
        assert bool((got.norms > max_grad_norm).all())


class TwoDimModel(nn.Module):
    """EmbeddingBag with 2-D input (fixed bags) and an Embedding over [B, L] indices, bias-free Linear."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 4, mode="mean")
        self.emb = nn.Embedding(8, 4)
        self.lin = nn.Linear(4, 3, bias=False)
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        bags, tokens = x
        h = self.bag(bags) + self.emb(tokens).mean(dim=1)
        # A fixed read-out: a plain sum of LayerNorm's output would have zero input gradient.
        readout = torch.tensor([1.0, -0.5, 0.25], dtype=h.dtype)
        return self.norm(self.lin(h)) @ readout


def test_two_dim_inputs_layer_norm_fallback_and_repeated_rows():
    torch.manual_seed(1)
    model = TwoDimModel().double()
    bags = torch.tensor([[1, 1, 2], [3, 4, 5], [9, 9, 9], [1, 2, 3]])
    tokens = torch.tensor([[0, 0], [7, 1], [2, 2], [0, 7]])

    def loss_fn(m, samples):
        b = torch.stack([s[0] for s in samples])
        t = torch.stack([s[1] for s in samples])
        return torch.sin(m((b, t))) * 3

    batch = list(zip(bags, tokens))
    expected, norms = naive_clipped_sum(model, loss_fn, batch, 0.5)
    got = PerSampleClipper(model, max_grad_norm=0.5).clip(loss_fn(model, batch))
    assert bool((got.to_dense(model.bag.weight).abs().sum(dim=1) > 0).sum() >= 5)  # not a vacuous test
    torch.testing.assert_close(got.norms, norms, rtol=1e-10, atol=1e-12)
    for p, want in expected.items():
        torch.testing.assert_close(got.to_dense(p), want, rtol=1e-10, atol=1e-12)


class SeqModel(nn.Module):
    """Linear over a [B, T, d] sequence: the ghost norm needs cross terms between positions."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return self.lin(x).pow(2).sum(dim=(1, 2))


@pytest.mark.parametrize("shape", [(3, 5, 4), (3, 2, 1)])  # ghost gram path / explicit per-sample path
def test_linear_on_sequences(shape):
    torch.manual_seed(2)
    t, d, out = shape
    model = SeqModel(d, out).double()
    xs = torch.randn(5, t, d, dtype=torch.float64)

    def loss_fn(m, samples):
        return m(torch.stack(samples))

    expected, norms = naive_clipped_sum(model, loss_fn, list(xs), 0.7)
    got = PerSampleClipper(model, max_grad_norm=0.7).clip(loss_fn(model, list(xs)))
    torch.testing.assert_close(got.norms, norms, rtol=1e-10, atol=1e-12)
    for p, want in expected.items():
        torch.testing.assert_close(got.to_dense(p), want, rtol=1e-10, atol=1e-12)


def test_memory_is_rows_touched_not_table_rows():
    # 2M rows x 16 dims: a dense per-sample gradient for 64 samples would be 8 GiB.
    model = nn.Sequential()
    bag = nn.EmbeddingBag(2_000_000, 16, mode="sum")
    model.add_module("bag", bag)
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    idx = torch.randint(0, 2_000_000, (64,))
    out = model.bag(idx, torch.arange(64))
    got = clipper.clip(out.sum(dim=1))
    rows, values = got.sparse[bag.weight]
    assert values.shape == (rows.numel(), 16) and rows.numel() <= 64
    assert bag.weight.grad is None  # no dense table gradient was formed


def test_unsupported_layers_and_options_refused():
    with pytest.raises(PrivacyError, match="BatchNorm1d"):
        PerSampleClipper(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), max_grad_norm=1.0)
    with pytest.raises(PrivacyError, match="GRU"):
        PerSampleClipper(nn.GRU(2, 2), max_grad_norm=1.0)
    with pytest.raises(PrivacyError, match="max"):
        PerSampleClipper(nn.EmbeddingBag(4, 2, mode="max"), max_grad_norm=1.0)
    with pytest.raises(PrivacyError, match="scale_grad_by_freq"):
        PerSampleClipper(nn.Embedding(4, 2, scale_grad_by_freq=True), max_grad_norm=1.0)
    with pytest.raises(PrivacyError, match="max_norm"):
        PerSampleClipper(nn.Embedding(4, 2, max_norm=1.0), max_grad_norm=1.0)
    with pytest.raises(PrivacyError, match="max_grad_norm"):
        PerSampleClipper(nn.Linear(2, 2), max_grad_norm=0)
    shared = nn.Linear(2, 2)
    tied = nn.Sequential(shared, nn.Linear(2, 2))
    tied[1].weight = shared.weight
    with pytest.raises(PrivacyError, match="shared"):
        PerSampleClipper(tied, max_grad_norm=1.0)


def test_called_twice_and_wrong_batch_refused():
    lin = nn.Linear(3, 1)
    clipper = PerSampleClipper(lin, max_grad_norm=1.0)
    x = torch.randn(4, 3)
    lin(x)
    with pytest.raises(PrivacyError, match="twice"):
        lin(x)
    clipper.clear()
    out = lin(x).squeeze(1)
    with pytest.raises(PrivacyError, match="batch of 4"):
        clipper.clip(out[:2])
    out = lin(x).squeeze(1)
    with pytest.raises(PrivacyError, match="scalar"):
        clipper.clip(out.sum())


def test_eval_forward_under_no_grad_is_not_recorded():
    lin = nn.Linear(3, 1)
    clipper = PerSampleClipper(lin, max_grad_norm=1.0)
    with torch.no_grad():
        lin(torch.randn(4, 3))
    got = clipper.clip(lin(torch.randn(2, 3)).squeeze(1))
    assert got.batch_size == 2


class BiasedMF(nn.Module):
    """Matrix factorisation with a global bias owned by the model itself (a 'free' parameter)."""

    def __init__(self):
        super().__init__()
        self.user = nn.Embedding(5, 3)
        self.item = nn.Embedding(7, 3)
        self.item_bias = nn.Embedding(7, 1)
        self.global_bias = nn.Parameter(torch.tensor([0.4]))

    def forward(self, samples):
        users = torch.stack([s[0] for s in samples])
        items = torch.stack([s[1] for s in samples])
        dot = (self.user(users) * self.item(items)).sum(dim=1)
        return self.global_bias + self.item_bias(items).squeeze(1) + dot


def test_free_parameters_of_a_container_module():
    torch.manual_seed(3)
    model = BiasedMF().double()
    t = torch.tensor
    r = torch.float64
    batch = [(t(0), t(1), t(4.0, dtype=r)), (t(0), t(1), t(2.0, dtype=r)), (t(4), t(6), t(5.0, dtype=r))]

    def loss_fn(m, samples):
        return (m(samples) - torch.stack([s[2] for s in samples])) ** 2

    expected, norms = naive_clipped_sum(model, loss_fn, batch, 1.5)
    got = PerSampleClipper(model, max_grad_norm=1.5).clip(loss_fn(model, batch))
    torch.testing.assert_close(got.norms, norms, rtol=1e-10, atol=1e-12)
    for p, want in expected.items():
        torch.testing.assert_close(got.to_dense(p), want, rtol=1e-10, atol=1e-12)


def test_large_free_parameters_refused():
    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.table = nn.Parameter(torch.zeros(1000, 100))

    with pytest.raises(PrivacyError, match="at most"):
        PerSampleClipper(Big(), max_grad_norm=1.0)


def test_fused_dlrm_matches_naive():
    """The shipped DLRM (26-style tables fused in one embedding, MLPs, dot interaction): exact clipping."""
    from fedrec.models.dlrm import DLRM, DLRMConfig, interaction_size

    sizes = [5, 7, 3]
    cfg = DLRMConfig(
        arch_sparse_feature_size=4,
        arch_mlp_bot=[13, 8, 4],
        arch_mlp_top=[interaction_size("dot", 4, 4, False), 8, 1],
    )
    model = DLRM(cfg, table_sizes=sizes, seed=0).double()
    g = torch.Generator().manual_seed(5)
    n = 6
    dense = torch.rand(n, 13, generator=g, dtype=torch.float64)
    sparse = torch.stack([torch.randint(0, s, (n,), generator=g) for s in sizes], dim=1)
    sparse[1] = sparse[0]  # two samples reading the same rows
    labels = torch.randint(0, 2, (n,), generator=g).double()
    batch = list(range(n))

    def loss(m, idx):
        b = {"dense": dense[idx], "sparse": sparse[idx]}
        return m.loss(m(b), labels[idx], reduction="none")

    expected, expected_norms = naive_clipped_sum(model, loss, batch, max_grad_norm=0.05)
    clipper = PerSampleClipper(model, max_grad_norm=0.05)
    got = clipper.clip(loss(model, batch))
    assert (got.clip_factors < 1).any()  # the bound bites
    torch.testing.assert_close(got.norms, expected_norms)
    for p, want in expected.items():
        torch.testing.assert_close(got.to_dense(p), want)
    assert model.sparse_arch.embedding.weight in got.sparse  # rows, not a dense table gradient
