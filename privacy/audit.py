"""Empirical privacy audit of DP-SGD: a lower bound on epsilon from a membership attack on a canary.

Jagielski, Ullman, Oprea 2020, "Auditing differentially private machine learning: how private is
private SGD?" (NeurIPS) and Nasr, Song, Thakurta, Papernot, Carlini 2021, "Adversary instantiation:
lower bounds for differentially private machine learning" (IEEE S&P). Train the same small model
many times on a dataset D ("out") and on D plus one canary record ("in"), score every trained model
with a membership statistic, and threshold it. Any (epsilon, delta)-DP mechanism forces every test
to satisfy ``FPR + e^eps * FNR >= 1 - delta`` and ``FNR + e^eps * FPR >= 1 - delta``, so

    eps >= max( log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR) ).

With Clopper-Pearson upper bounds on FPR and FNR (each at level alpha / 2) one statistic's bound
holds with confidence ``1 - alpha``. The verdict takes the largest bound over k statistics, so each
is evaluated at ``alpha / k`` (Bonferroni): the verdict holds at the configured confidence (0.95:
each of the two tests at 0.975), not at the ``1 - k alpha`` a best-of-k would give. The threshold is
chosen on one half of the trained models and the bound evaluated on the other half, so choosing it
does not bias the bound.

The model is logistic regression trained with DP-SGD (Poisson sampling at rate q, per-example
clipping to norm C, Gaussian noise of std sigma * C on the sum, a fixed denominator q * n), many
models at once as batched tensors. The canary is crafted so its gradient lies in a coordinate no
other record touches (a "Dirac" canary: a large value in an otherwise empty feature), so its clipped
gradient is exactly C along that coordinate whenever it is sampled. Two statistics:

* ``final``: the trained model's logit on the canary (black box on the released model only);
* ``iterates``: the log-likelihood ratio of the canary coordinate's per-step updates under "in"
  versus "out" (white box on every intermediate model, which DP-SGD's guarantee also covers and
  federated clients see each round). This is the stronger test, close to tight for the sampled
  Gaussian mechanism.

Engines: ``dpsgd`` (the default) trains with this project's optimizer, ``privacy.dp.optimizer.DPSGD``
with lazy embedding-row noise, and reads every step's weights after a flush, so both statistics
apply; ``torch`` is a batched reference re-implementation, ``opacus`` runs Opacus one model at a time.
A correct implementation must give a lower bound below the accountant's epsilon; ``broken='no_noise'``
(noise multiplier 0 while epsilon is still claimed for sigma) or ``'no_clip'`` must be flagged.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy import stats

from privacy.accounting.user_level import epsilon as accountant_epsilon
from privacy.errors import PrivacyError

Broken = Literal["no_noise", "no_clip"]
STATISTICS = ("iterates", "final")


@dataclass(frozen=True)
class AuditConfig:
    """What to train and how many times. Privacy parameters are the claimed ones."""

    noise_multiplier: float = 1.5
    max_grad_norm: float = 1.0
    sample_rate: float = 0.1
    steps: int = 50
    delta: float = 1e-5
    num_examples: int = 100  # records in D, besides the canary
    num_features: int = 4  # real features; the canary uses one more, empty in D
    lr: float = 0.002  # small, so the canary's logit stays where its gradient is always clipped
    canary_scale: float = 1000.0
    trials: int = 4000  # models trained per world (with and without the canary)
    confidence: float = 0.95  # of the verdict; each of the k statistics is evaluated at 1 - (1 - c) / k
    seed: int = 0
    accountant: str = "rdp"
    broken: Broken | None = None  # a deliberately broken mechanism (the claim still uses sigma)
    # dpsgd: this project's privacy.dp.optimizer.DPSGD (lazy embedding-row noise), all models at once
    # as one embedding table; torch: batched reference DP-SGD; opacus: Opacus, one model at a time.
    engine: Literal["torch", "opacus", "dpsgd"] = "dpsgd"
    # dpsgd: flush and read the weights after every step (both statistics); False reads them only at
    # the end (only 'final', but pending row noise then accumulates over many steps before a flush).
    iterates: bool = True
    chunk: int = 4000  # models trained together (memory: chunk * (n + 1) * (d + 1) floats)

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise PrivacyError(
                f"noise_multiplier = {self.noise_multiplier!r}: expected > 0 (the claimed noise)"
            )
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate = {self.sample_rate!r}: expected a number in (0, 1]")
        if not 0 < self.confidence < 1:
            raise PrivacyError(f"confidence = {self.confidence!r}: expected a number in (0, 1)")
        for key in ("steps", "num_examples", "num_features", "trials", "chunk"):
            if getattr(self, key) < 1:
                raise PrivacyError(f"{key} = {getattr(self, key)!r}: expected a positive integer")
        if self.trials < 20:
            raise PrivacyError(f"trials = {self.trials}: expected at least 20 (half choose the threshold)")
        if self.broken not in (None, "no_noise", "no_clip"):
            raise PrivacyError(f"broken = {self.broken!r}: expected None, 'no_noise' or 'no_clip'")
        if self.engine not in ("torch", "opacus", "dpsgd"):
            raise PrivacyError(f"engine = {self.engine!r}: expected 'torch', 'opacus' or 'dpsgd'")
        if self.engine != "torch" and self.broken == "no_clip":
            raise PrivacyError(
                f"broken = 'no_clip' with engine {self.engine!r}: only engine 'torch' can skip clipping"
            )


@dataclass
class StatisticResult:
    """The bound one membership statistic gives."""

    statistic: str
    epsilon_lower_bound: float
    threshold: float
    tpr: float
    fpr: float
    fpr_upper: float
    fnr_upper: float
    evaluation_trials: int


@dataclass
class AuditResult:
    config: AuditConfig
    claimed_epsilon: float
    results: list[StatisticResult] = field(default_factory=list)
    seconds: float = 0.0
    statistic_confidence: float = 0.0  # each statistic's level; the verdict's is config.confidence

    @property
    def epsilon_lower_bound(self) -> float:
        return max(r.epsilon_lower_bound for r in self.results)

    @property
    def violated(self) -> bool:
        """The attack proves more leakage than claimed: the mechanism or its accounting is broken."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "claimed_epsilon": self.claimed_epsilon,
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "violated": self.violated,
            "verdict": "VIOLATION: empirical epsilon exceeds the claim"
            if self.violated
            else "consistent with the claim",
            "confidence": self.config.confidence,
            "statistic_confidence": self.statistic_confidence,
            "statistics": [asdict(r) for r in self.results],
            "seconds": self.seconds,
        }


def clopper_pearson_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided upper confidence bound (level 1 - alpha) on a binomial proportion."""
    if successes >= trials:
        return 1.0
    return float(stats.beta.ppf(1 - alpha, successes + 1, trials - successes))


def epsilon_lower_bound(
    *, false_positives: int, negatives: int, false_negatives: int, positives: int, delta: float, alpha: float
) -> tuple[float, float, float]:
    """(eps lower bound, FPR upper, FNR upper) at confidence 1 - alpha (alpha / 2 per rate)."""
    fpr_u = clopper_pearson_upper(false_positives, negatives, alpha / 2)
    fnr_u = clopper_pearson_upper(false_negatives, positives, alpha / 2)
    bounds = [0.0]
    for a, b in ((fpr_u, fnr_u), (fnr_u, fpr_u)):
        if 1 - delta - a > 0 and b > 0:
            bounds.append(math.log((1 - delta - a) / b))
    return max(bounds), fpr_u, fnr_u


def _upper_bounds(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """``clopper_pearson_upper`` for an array of success counts."""
    successes = np.asarray(successes)
    bounds = np.ones(successes.shape, dtype=float)
    partial = successes < trials
    bounds[partial] = stats.beta.ppf(1 - alpha, successes[partial] + 1, trials - successes[partial])
    return bounds


def _best_threshold(scores_in: np.ndarray, scores_out: np.ndarray, *, delta: float, alpha: float) -> float:
    """The threshold (predict 'in' when score > t) with the largest bound on the selection half.

    Every distinct score is a candidate, so the threshold can sit exactly at the edge of one world's
    scores; the bound is computed for all candidates at once.
    """
    candidates = np.unique(np.concatenate([scores_in, scores_out]))
    sorted_in, sorted_out = np.sort(scores_in), np.sort(scores_out)
    tp = len(sorted_in) - np.searchsorted(sorted_in, candidates, side="right")
    fp = len(sorted_out) - np.searchsorted(sorted_out, candidates, side="right")
    fpr_u = _upper_bounds(fp, len(sorted_out), alpha / 2)
    fnr_u = _upper_bounds(len(sorted_in) - tp, len(sorted_in), alpha / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        forward = np.where(1 - delta - fpr_u > 0, np.log((1 - delta - fpr_u) / fnr_u), 0.0)
        backward = np.where(1 - delta - fnr_u > 0, np.log((1 - delta - fnr_u) / fpr_u), 0.0)
    bounds = np.maximum(np.maximum(forward, backward), 0.0)
    return float(candidates[int(np.argmax(bounds))])


def evaluate_statistic(
    name: str, scores_in: np.ndarray, scores_out: np.ndarray, *, delta: float, confidence: float
) -> StatisticResult:
    """Choose a threshold on the first half of each world's scores, bound epsilon on the second."""
    alpha = 1 - confidence
    half_in, half_out = len(scores_in) // 2, len(scores_out) // 2
    threshold = _best_threshold(scores_in[:half_in], scores_out[:half_out], delta=delta, alpha=alpha)
    eval_in, eval_out = scores_in[half_in:], scores_out[half_out:]
    tp = int(np.sum(eval_in > threshold))
    fp = int(np.sum(eval_out > threshold))
    eps, fpr_u, fnr_u = epsilon_lower_bound(
        false_positives=fp,
        negatives=len(eval_out),
        false_negatives=len(eval_in) - tp,
        positives=len(eval_in),
        delta=delta,
        alpha=alpha,
    )
    return StatisticResult(
        statistic=name,
        epsilon_lower_bound=eps,
        threshold=threshold,
        tpr=tp / len(eval_in),
        fpr=fp / len(eval_out),
        fpr_upper=fpr_u,
        fnr_upper=fnr_u,
        evaluation_trials=len(eval_in) + len(eval_out),
    )


def make_dataset(
    config: AuditConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features n x (d + 1) with the last column empty, labels from a planted model, canary row)."""
    n, d = config.num_examples, config.num_features
    features = torch.zeros(n, d + 1, dtype=torch.float64)
    features[:, :d] = torch.randn(n, d, generator=generator, dtype=torch.float64)
    planted = torch.randn(d, generator=generator, dtype=torch.float64)
    probability = torch.sigmoid(features[:, :d] @ planted)
    labels = (torch.rand(n, generator=generator, dtype=torch.float64) < probability).to(torch.float64)
    canary = torch.zeros(d + 1, dtype=torch.float64)
    canary[d] = config.canary_scale
    return features, labels, canary


def train_models(
    config: AuditConfig, *, with_canary: bool, models: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """DP-SGD on ``models`` logistic regressions at once.

    Returns (final weights ``models x (d + 1)``, canary-coordinate updates ``models x steps`` scaled
    back to gradient-sum units, i.e. what one step added to that coordinate before the learning rate).
    """
    features, labels, canary = make_dataset(config, torch.Generator().manual_seed(config.seed))
    if with_canary:
        features = torch.cat([features, canary[None, :]])
        labels = torch.cat([labels, torch.ones(1, dtype=torch.float64)])
    n, dim = features.shape
    c = config.max_grad_norm
    sigma = 0.0 if config.broken == "no_noise" else config.noise_multiplier
    denominator = config.sample_rate * config.num_examples  # fixed: expected batch size of D
    weights = torch.zeros(models, dim, dtype=torch.float64)
    canary_updates = torch.zeros(models, config.steps, dtype=torch.float64)
    for step in range(config.steps):
        mask = (torch.rand(models, n, generator=generator, dtype=torch.float64) < config.sample_rate).to(
            torch.float64
        )
        logits = weights @ features.T  # models x n
        residual = torch.sigmoid(logits) - labels  # d loss / d logit
        # Per-example gradient residual_i * x_i; its norm is |residual_i| * ||x_i||.
        norms = residual.abs() * features.norm(dim=1)
        if config.broken == "no_clip":
            factor = torch.ones_like(norms)
        else:
            factor = torch.clamp(c / torch.clamp(norms, min=1e-12), max=1.0)
        gradient_sum = (mask * residual * factor) @ features  # models x dim
        noise = torch.randn(models, dim, generator=generator, dtype=torch.float64) * (sigma * c)
        noisy = gradient_sum + noise
        weights = weights - config.lr * noisy / denominator
        canary_updates[:, step] = -noisy[:, dim - 1]
    return weights, canary_updates


def train_models_opacus(
    config: AuditConfig, *, with_canary: bool, models: int, first_index: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same training through Opacus (GradSampleModule, DPOptimizer, Poisson DPDataLoader).

    One model at a time (about 1 ms per step on one core), so use a few hundred trials. Returns
    the same (final weights, canary-coordinate updates) as ``train_models``.
    """
    import warnings

    from opacus import GradSampleModule
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer
    from torch.utils.data import TensorDataset

    features, labels, canary = make_dataset(config, torch.Generator().manual_seed(config.seed))
    if with_canary:
        features = torch.cat([features, canary[None, :]])
        labels = torch.cat([labels, torch.ones(1, dtype=torch.float64)])
    dataset = TensorDataset(features.float(), labels.float())
    dim = features.shape[1]
    sigma = 0.0 if config.broken == "no_noise" else config.noise_multiplier
    step_size = config.lr / (config.sample_rate * config.num_examples)  # the fixed denominator, as above
    all_weights = torch.zeros(models, dim, dtype=torch.float64)
    all_updates = torch.zeros(models, config.steps, dtype=torch.float64)
    for index in range(models):
        # One seed per (audit seed, world, model): models never share randomness.
        model_seed = (config.seed * 2 + int(with_canary)) * 1_000_000_007 + first_index + index
        generator = torch.Generator().manual_seed(model_seed)
        linear = torch.nn.Linear(dim, 1, bias=False)
        torch.nn.init.zeros_(linear.weight)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure_mode; the audit needs no CSPRNG
            module = GradSampleModule(linear)
            optimizer = DPOptimizer(
                torch.optim.SGD(module.parameters(), lr=step_size),
                noise_multiplier=sigma,
                max_grad_norm=config.max_grad_norm,
                expected_batch_size=None,
                loss_reduction="sum",
                generator=generator,
            )
            loader = DPDataLoader(dataset, sample_rate=config.sample_rate, generator=generator)
        step = 0
        while step < config.steps:
            for batch_features, batch_labels in loader:
                before = linear.weight.detach()[0, -1].item()
                optimizer.zero_grad()
                logits = module(batch_features).squeeze(-1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, batch_labels, reduction="sum"
                )
                with warnings.catch_warnings():
                    # "full backward hook is firing ... no inputs require gradients": expected here.
                    warnings.simplefilter("ignore", UserWarning)
                    loss.backward()
                optimizer.step()
                all_updates[index, step] = (linear.weight.detach()[0, -1].item() - before) / step_size
                step += 1
                if step == config.steps:
                    break
        all_weights[index] = linear.weight.detach()[0].to(torch.float64)
    return all_weights, all_updates


def train_models_dpsgd(
    config: AuditConfig, *, with_canary: bool, models: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same training through ``privacy.dp.optimizer.DPSGD`` with lazy embedding-row noise.

    All models are rows of one embedding table: example (model m, record i) looks up row m and
    takes its dot product with record i. Each example touches only its model's row, so per-example
    clipping, Poisson sampling of (m, i) pairs and per-coordinate noise make every row an
    independent DP-SGD run. Rows a step does not touch get their noise lazily (the path under
    audit). With ``config.iterates`` the table is flushed after every step (a flush is how a
    trainer reads parameters) and the canary coordinate's update is returned in gradient-sum units,
    as ``train_models`` does; otherwise only the final weights (after one final flush).
    """
    from privacy.dp.optimizer import DPSGD

    features, labels, canary = make_dataset(config, torch.Generator().manual_seed(config.seed))
    if with_canary:
        features = torch.cat([features, canary[None, :]])
        labels = torch.cat([labels, torch.ones(1, dtype=torch.float64)])
    features, labels = features.float(), labels.float()
    n, dim = features.shape
    table = torch.nn.Embedding(models, dim)
    torch.nn.init.zeros_(table.weight)
    model = torch.nn.Sequential(table)
    # DPSGD refuses a zero noise multiplier; a vanishing one is the broken mechanism.
    sigma = 1e-12 if config.broken == "no_noise" else config.noise_multiplier
    dp = DPSGD(
        model,
        torch.optim.SGD(model.parameters(), lr=config.lr),
        noise_multiplier=sigma,
        max_grad_norm=config.max_grad_norm,
        sample_rate=config.sample_rate,
        num_examples=config.num_examples,  # the same fixed denominator as the other engines
        lazy_noise=True,
        seed=seed,
    )
    sampler = torch.Generator().manual_seed(seed)
    # What one step adds to a weight is -lr / (q n) times the noisy gradient sum.
    to_gradient_units = config.sample_rate * config.num_examples / config.lr
    updates = torch.zeros(models, config.steps, dtype=torch.float64) if config.iterates else None
    try:
        for step in range(config.steps):
            before = table.weight.detach()[:, -1].to(torch.float64).clone() if updates is not None else None
            chosen = torch.rand(models, n, generator=sampler) < config.sample_rate
            model_ids, record_ids = chosen.nonzero(as_tuple=True)
            logits = (model(model_ids) * features[record_ids]).sum(dim=1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, labels[record_ids], reduction="none"
            )
            dp.step(loss)
            if updates is not None and before is not None:
                dp.flush()
                after = table.weight.detach()[:, -1].to(torch.float64)
                updates[:, step] = (after - before) * to_gradient_units
        dp.flush()
        weights = table.weight.detach().to(torch.float64).clone()
    finally:
        dp.close()
    return weights, updates


def _scores(
    config: AuditConfig, weights: torch.Tensor, updates: torch.Tensor | None
) -> dict[str, np.ndarray]:
    """Membership statistics: the final logit on the canary, and the iterates' log-likelihood ratio."""
    final = (weights[:, -1] * config.canary_scale).numpy()
    if updates is None:
        return {"final": final}
    sigma_c = config.noise_multiplier * config.max_grad_norm  # the claimed noise: the auditor's model
    c, q = config.max_grad_norm, config.sample_rate
    # Per step, "in": u ~ (1-q) N(0, s^2) + q N(C, s^2); "out": u ~ N(0, s^2). log of the density ratio:
    exponent = (2 * updates * c - c * c) / (2 * sigma_c**2)
    per_step = torch.logaddexp(
        torch.full_like(exponent, math.log1p(-q)) if q < 1 else torch.full_like(exponent, -math.inf),
        math.log(q) + exponent,
    )
    return {"final": final, "iterates": per_step.sum(dim=1).numpy()}


def run_audit(config: AuditConfig) -> AuditResult:
    """Train ``trials`` models per world, score, and bound epsilon with every statistic."""
    start = time.perf_counter()
    claimed = accountant_epsilon(
        noise_multiplier=config.noise_multiplier,
        sample_rate=config.sample_rate,
        steps=config.steps,
        delta=config.delta,
        accountant=config.accountant,
    )
    generator = torch.Generator().manual_seed(config.seed + 1)
    collected: dict[bool, dict[str, list[np.ndarray]]] = {True: {}, False: {}}
    for with_canary in (True, False):
        remaining = config.trials
        while remaining:
            count = min(config.chunk, remaining)
            updates: torch.Tensor | None
            if config.engine == "dpsgd":
                chunk_seed = config.seed * 1_000_003 + 2 * (config.trials - remaining) + int(with_canary)
                weights, updates = train_models_dpsgd(
                    config, with_canary=with_canary, models=count, seed=chunk_seed
                )
            elif config.engine == "opacus":
                weights, updates = train_models_opacus(
                    config, with_canary=with_canary, models=count, first_index=config.trials - remaining
                )
            else:
                weights, updates = train_models(
                    config, with_canary=with_canary, models=count, generator=generator
                )
            for name, values in _scores(config, weights, updates).items():
                collected[with_canary].setdefault(name, []).append(values)
            remaining -= count
    result = AuditResult(config=config, claimed_epsilon=claimed)
    names = [name for name in STATISTICS if name in collected[True]]
    # Bonferroni: the verdict is the best of len(names) bounds, so each gets its share of alpha.
    per_statistic = 1 - (1 - config.confidence) / len(names)
    result.statistic_confidence = per_statistic
    for name in names:
        scores_in = np.concatenate(collected[True][name])
        scores_out = np.concatenate(collected[False][name])
        if np.isnan(scores_in).any() or np.isnan(scores_out).any():
            raise PrivacyError(f"audit statistic {name!r} produced NaN scores; check lr and canary_scale")
        result.results.append(
            evaluate_statistic(name, scores_in, scores_out, delta=config.delta, confidence=per_statistic)
        )
    result.seconds = time.perf_counter() - start
    return result
