"""privacy.dp.optimizer.DPSGD: the update is textbook DP-SGD; unsupported optimizers are refused."""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from test_dp_per_sample import BagModel, bag_loss, make_bag_batch, naive_clipped_sum
from torch import nn

from privacy.accounting.accountants import Accountant, epsilon_for
from privacy.dp.noise import GaussianNoise
from privacy.dp.optimizer import DPSGD
from privacy.errors import PrivacyError


def _kwargs(**over):
    base = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.5, "num_examples": 8}
    base.update(over)
    return base


def replayed_noise(model: nn.Module, seed: int) -> dict:
    """The standard normal draws DPSGD makes with ``seed``, replayed from an independent generator.

    Draw order (privacy.dp.optimizer): one draw for all dense parameters (model order), then one per
    embedding table (model order): during the step without lazy noise, at the flush with it.
    """
    gen = torch.Generator().manual_seed(seed)
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)]
    dense = [p for p in model.parameters() if all(p is not t for t in tables)]
    flat = torch.randn(sum(p.numel() for p in dense), generator=gen, dtype=torch.float64)
    out = {p: z.view_as(p) for p, z in zip(dense, flat.split([p.numel() for p in dense]))}
    for table in tables:
        out[table] = torch.randn(table.shape, generator=gen, dtype=torch.float64)
    return out


@pytest.mark.parametrize("lazy", [True, False])
def test_update_is_clipped_sum_plus_noise_over_expected_batch_size(lazy):
    """Hand-computed DP-SGD step: w - lr (sum_i clip_C(g_i) + sigma C z) / (N q), with noise that shows."""
    torch.manual_seed(0)
    model = BagModel("sum").double()
    batch = make_bag_batch("sum")
    sigma, clip, lr, n, q, seed = 0.9, 0.3, 0.7, 10, 0.3, 11
    expected, _ = naive_clipped_sum(model, bag_loss, batch, clip)
    before = {p: p.detach().clone() for p in model.parameters()}
    z = replayed_noise(model, seed)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    dp = DPSGD(
        model, opt, noise_multiplier=sigma, max_grad_norm=clip, sample_rate=q, num_examples=n, lazy_noise=lazy,
        seed=seed,
    )  # fmt: skip
    dp.step(bag_loss(model, batch))
    dp.flush()
    for p, grad in expected.items():
        # Lazy row noise is added (+z) when the row is flushed, dense noise is subtracted: same law.
        sign = 1.0 if lazy and id(p) in tables else -1.0
        want = before[p] - lr * grad / (n * q) + sign * lr * sigma * clip * z[p] / (n * q)
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-9)
        noise_part = (lr * sigma * clip * z[p] / (n * q)).abs().max()
        assert noise_part > 1e-3  # the noise term is large enough that a wrong factor shows


def test_accountant_is_stepped_and_matches_independent_computation():
    model = nn.Linear(3, 1)
    acc = Accountant(mechanism="rdp")
    dp = DPSGD(
        model, torch.optim.SGD(model.parameters(), lr=0.1), accountant=acc, **_kwargs(noise_multiplier=1.3)
    )
    for _ in range(7):
        dp.step(model(torch.randn(4, 3)).squeeze(1) ** 2)
    assert acc.steps == dp.steps == 7
    assert acc.epsilon(delta=1e-5) == epsilon_for(noise_multiplier=1.3, sample_rate=0.5, steps=7, delta=1e-5)


def test_empty_poisson_batch_still_adds_noise():
    model = nn.Linear(3, 1)
    before = model.weight.detach().clone()
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), seed=1, **_kwargs())
    stats_ = dp.step(torch.zeros(0))
    assert stats_.batch_size == 0
    assert not torch.equal(model.weight.detach(), before)


@pytest.mark.parametrize(
    ("make_opt", "match"),
    [
        (lambda p: torch.optim.Adam(p, lr=0.1), "Adam"),
        (lambda p: torch.optim.Adagrad(p, lr=0.1), "Adagrad"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "momentum"),
        (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-4), "weight_decay"),
    ],
)
def test_lazy_noise_refuses_other_optimizers(make_opt, match):
    model = BagModel("sum")
    with pytest.raises(PrivacyError, match=match):
        DPSGD(model, make_opt(model.parameters()), **_kwargs())
    # dense noise is the documented fallback for these optimizers
    before = [p.detach().clone() for p in model.parameters()]
    dp = DPSGD(model, make_opt(model.parameters()), lazy_noise=False, **_kwargs())
    dp.step(bag_loss(model, [(s[0], s[1].float(), s[2], s[3]) for s in make_bag_batch("sum")]))
    # dense noise reaches every coordinate, rows no example touched included
    for p, b in zip(model.parameters(), before):
        assert (p.detach() != b).all()


def test_optimizer_changed_after_construction_is_refused():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = DPSGD(model, opt, **_kwargs())
    opt.param_groups[0]["momentum"] = 0.9
    with pytest.raises(PrivacyError, match="momentum"):
        dp.step(model(torch.randn(2, 2)).squeeze(1))


def test_optimizer_must_cover_exactly_the_model():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with pytest.raises(PrivacyError, match="does not hold"):
        DPSGD(model, torch.optim.SGD(model[0].parameters(), lr=0.1), **_kwargs())
    stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(PrivacyError, match="not in the model"):
        DPSGD(model, torch.optim.SGD([*model.parameters(), stray], lr=0.1), **_kwargs())


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"noise_multiplier": 0}, "noise_multiplier"),
        ({"noise_multiplier": -0.5}, "noise_multiplier"),
        ({"max_grad_norm": 0}, "max_grad_norm"),
        ({"sample_rate": 0}, "sample_rate"),
        ({"num_examples": 0}, "num_examples"),
    ],
)
def test_bad_parameters(over, match):
    model = nn.Linear(2, 1)
    with pytest.raises(PrivacyError, match=match):
        DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), **_kwargs(**over))


def test_secure_noise_is_standard_normal_and_unseeded():
    z = GaussianNoise(secure_mode=True).normal((20000,), dtype=torch.float64)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    assert not torch.equal(z[:10], GaussianNoise(secure_mode=True).normal((10,), dtype=torch.float64))
    with pytest.raises(PrivacyError, match="seed"):
        GaussianNoise(secure_mode=True, seed=0)
    finals = []
    for _ in range(2):
        torch.manual_seed(0)
        model = BagModel("sum")
        before = [p.detach().clone() for p in model.parameters()]
        dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), secure_mode=True, **_kwargs())
        assert dp.noise.secure_mode and not dp.noise.state_dict()  # nothing to replay
        dp.step(bag_loss(model, [(s[0], s[1].float(), s[2], s[3]) for s in make_bag_batch("sum")]))
        dp.flush()
        for p, b in zip(model.parameters(), before):
            assert (p.detach() != b).all()  # every coordinate, untouched rows included, got noise
        finals.append(torch.cat([p.detach().ravel() for p in model.parameters()]))
    # same model, same batch: only the secure noise differs (its law: test_dp_noise_law.py)
    assert not torch.equal(finals[0], finals[1])


def test_seeded_noise_is_reproducible():
    def run(seed):
        torch.manual_seed(0)
        model = nn.Linear(2, 1)
        dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), seed=seed, **_kwargs())
        dp.step(model(torch.ones(3, 2)).squeeze(1))
        return model.weight.detach().clone()

    assert torch.equal(run(5), run(5)) and not torch.equal(run(5), run(6))


def _stream_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.3)


def test_state_round_trips_noise_stream_and_steps():
    """A DPSGD rebuilt from state_dict continues the noise stream: 2 + 2 steps equal 4 uninterrupted."""
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    kwargs = _kwargs(noise_multiplier=1.3, max_grad_norm=0.7)

    def steps(dp, model, count):
        for _ in range(count):
            dp.step(model(x).squeeze(1) ** 2)

    model, opt = _stream_model()
    whole = DPSGD(model, opt, seed=9, **kwargs)
    steps(whole, model, 4)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model, opt = _stream_model()
    first = DPSGD(model, opt, seed=9, **kwargs)
    steps(first, model, 2)
    state = first.state_dict()
    params = {k: v.clone() for k, v in model.state_dict().items()}

    def resumed(load: bool):
        model, opt = _stream_model()
        model.load_state_dict(params)
        second = DPSGD(model, opt, seed=9, **kwargs)
        if load:
            second.load_state_dict(state)
        steps(second, model, 2)
        return second, [p.detach().clone() for p in model.parameters()]

    second, got = resumed(load=True)
    assert second.steps == 4 and state["steps"] == 2
    for a, b in zip(got, uninterrupted):
        assert torch.equal(a, b)
    # Without the state the generator restarts at the seed and repeats the first two steps' noise.
    _, repeated = resumed(load=False)
    assert not all(torch.equal(a, b) for a, b in zip(repeated, uninterrupted))
    with pytest.raises(PrivacyError, match="steps"):
        second.load_state_dict({"noise": {}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("secure_mode", [False, True])
def test_cuda_step_matches_cpu_clipping(secure_mode):
    torch.manual_seed(0)
    model = BagModel("sum").double()
    batch = make_bag_batch("sum")
    expected, _ = naive_clipped_sum(model, bag_loss, batch, 0.3)
    cuda_model = BagModel("sum").double().cuda()
    cuda_model.load_state_dict(model.state_dict())
    from privacy.dp.per_sample import PerSampleClipper

    cuda_batch = [tuple(t.cuda() for t in s) for s in batch]

    def cuda_loss(m, samples):
        # BagModel builds offsets on the CPU; move them with the inputs
        idx = torch.cat([s[0] for s in samples])
        offsets = torch.tensor([0, *[len(s[0]) for s in samples][:-1]]).cumsum(0).cuda()
        a = m.bag(idx, offsets, per_sample_weights=torch.cat([s[1] for s in samples]))
        idx2 = torch.cat([s[2] for s in samples])
        off2 = torch.tensor([0] + [len(s[2]) for s in samples]).cumsum(0).cuda()
        b = m.bag2(idx2, off2)
        c = m.emb(torch.stack([s[3] for s in samples])).sum(dim=1)
        return (m.head(torch.relu(m.lin(torch.cat([a, b, c], dim=1)))).squeeze(1) - 0.3) ** 2 * 5.0

    clipper = PerSampleClipper(cuda_model, max_grad_norm=0.3)
    got = clipper.clip(cuda_loss(cuda_model, cuda_batch))
    for (name, p), cp in zip(model.named_parameters(), cuda_model.parameters()):
        torch.testing.assert_close(got.to_dense(cp).cpu(), expected[p], rtol=1e-9, atol=1e-11, msg=name)
    clipper.remove()
    opt = torch.optim.SGD(cuda_model.parameters(), lr=0.1)
    dp = DPSGD(cuda_model, opt, secure_mode=secure_mode, **_kwargs())
    dp.step(cuda_loss(cuda_model, cuda_batch))
    dp.flush()
    assert all(p.device.type == "cuda" for p in cuda_model.parameters())
