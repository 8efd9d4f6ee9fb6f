"""DPTrainer: example-level differentially private training (DP-SGD) on top of BaseTrainer.

Abadi et al. 2016 (https://arxiv.org/abs/1607.00133) with the parts that make it work for
recommendation models: batches are Poisson samples of the training split (privacy.dp.sampling),
every sample's gradient is clipped exactly without per-sample copies of the embedding tables
(privacy.dp.per_sample), Gaussian noise on embedding rows is drawn lazily with the same distribution
as dense noise (privacy.dp.lazy_noise), and an Opacus accountant tracks epsilon
(privacy.accounting.accountants). Spends are recorded in the run's privacy ledger (privacy.ledger)
before anything computed from the model leaves the process: a checkpoint, a validation, the summary.

Everything is checked before the first step: the privacy parameters (delta below 1/N, noise > 0,
a budget that affords the plan), the layers (supported by per-sample clipping) and the optimizer
(plain SGD when ``privacy.lazy_noise``); a bad one raises ConfigError or PrivacyError.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from fedrec.config.schema import ExperimentConfig, PrivacyConfig
from fedrec.data.base import ProcessedData
from fedrec.errors import ConfigError
from fedrec.noise_source import CENTRAL_PARTY, CSPRNG_SOURCE, SEEDED_SOURCE
from fedrec.trainers.base_trainer import BaseTrainer
from privacy.accounting.accountants import (
    Accountant,
    check_budget,
    check_delta,
    epsilon_for,
    largest_within,
    noise_multiplier_for,
)
from privacy.accounting.user_level import gdp_approximation
from privacy.dp.optimizer import DPSGD, StepStats
from privacy.dp.sampling import PoissonBatchSampler, check_sampling
from privacy.errors import PrivacyError
from privacy.ledger import PrivacyLedger, ledger_path

LEDGER_CLIENT = "central"  # the ledger's client name for central DP-SGD spends


def resolve_privacy(
    privacy: PrivacyConfig, *, num_examples: int, batch_size: int, planned_steps: int
) -> dict:
    """Turn the ``privacy:`` section into concrete parameters for a split of ``num_examples``.

    Returns:
        dict with noise_multiplier, delta, sample_rate, accountant, max_grad_norm and how each was chosen.

    Raises:
        PrivacyError: delta at or above 1/N, an unreachable target epsilon, a budget below one step.
    """
    check_sampling(privacy.sampling)
    if num_examples < 1:
        raise PrivacyError("the training split is empty: nothing to train with DP-SGD")
    delta = privacy.delta if privacy.delta is not None else 0.1 / num_examples
    delta = check_delta(delta, num_examples=num_examples)
    sample_rate = (
        privacy.sample_rate if privacy.sample_rate is not None else min(1.0, batch_size / num_examples)
    )
    if privacy.noise_multiplier is not None:
        noise = float(privacy.noise_multiplier)
    else:
        assert privacy.target_epsilon is not None
        noise = noise_multiplier_for(
            target_epsilon=privacy.target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=max(1, planned_steps),
            accountant=privacy.accountant,
        )
    # A noise so small that one step is not accountable (1e-300) is refused here, before the ledger
    # or a checkpoint is written.
    one_step = epsilon_for(
        noise_multiplier=noise, sample_rate=sample_rate, steps=1, delta=delta, accountant=privacy.accountant
    )
    if not math.isfinite(one_step):
        raise PrivacyError(
            f"privacy.noise_multiplier = {noise!r}: one step already gives epsilon {one_step}; expected a noise "
            "multiplier with a finite epsilon"
        )
    if privacy.epsilon_budget is not None:
        check_budget(
            epsilon_budget=privacy.epsilon_budget,
            noise_multiplier=noise,
            sample_rate=sample_rate,
            delta=delta,
            accountant=privacy.accountant,
        )
    return {
        "noise_multiplier": noise,
        "delta": delta,
        "sample_rate": sample_rate,
        "accountant": privacy.accountant,
        "max_grad_norm": privacy.max_grad_norm,
        "delta_source": "config" if privacy.delta is not None else "1/(10 N)",
        "noise_source": "config" if privacy.noise_multiplier is not None else "target_epsilon",
    }


class DPTrainer(BaseTrainer):
    """BaseTrainer with Poisson batches, DP-SGD steps, epsilon reporting and a privacy ledger.

    Args: as BaseTrainer; ``config.privacy`` must be set. ``resume`` says the caller will load a
    checkpoint (the budget is then enforced by stopping, not by refusing the plan).
    """

    def __init__(
        self,
        model: nn.Module,
        data: ProcessedData,
        config: ExperimentConfig,
        *,
        logdir: str | None = None,
        device: torch.device | str = "cpu",
        writer: Any = None,
        resume: bool = False,
        ledger: bool = True,
    ):
        if config.privacy is None:
            raise ConfigError(
                "config section 'privacy' is missing: DP training needs privacy.noise_multiplier etc."
            )
        self.privacy_cfg = config.privacy
        self._check_optimizer_config(config)
        self.num_examples = len(data.split("train"))
        self._reset_data_dependent_init(model, data)
        super().__init__(model, data, config, logdir=logdir, device=device, writer=writer)
        self.params = resolve_privacy(
            self.privacy_cfg,
            num_examples=self.num_examples,
            batch_size=self.train_cfg.batch_size,
            planned_steps=self.planned_steps(),
        )
        self.accountant = Accountant(mechanism=self.params["accountant"])
        self.ledger: PrivacyLedger | None = None
        self._recorded_steps = 0  # DP steps of this process already in the ledger
        if ledger and logdir:
            self._open_ledger(logdir, config, resume=resume)
        secure = self.privacy_cfg.secure_mode
        self.dp = DPSGD(
            self.model,
            self.optimizer,
            noise_multiplier=self.params["noise_multiplier"],
            max_grad_norm=self.params["max_grad_norm"],
            sample_rate=self.params["sample_rate"],
            num_examples=self.num_examples,
            lazy_noise=self.privacy_cfg.lazy_noise,
            secure_mode=secure,
            seed=None if secure else config.seed,
            accountant=self.accountant,
        )
        self.last_stats: StepStats | None = None
        self.stopped_at_budget = False
        self._allowed_steps: int | None = None
        self._steps_at_plan = 0
        self._resume = resume
        self._check_plan()

    # ------------------------------------------------------------------------------ setup checks
    def _check_optimizer_config(self, config: ExperimentConfig) -> None:
        train, privacy = config.train, config.privacy
        assert privacy is not None
        if privacy.lazy_noise and (train.optimizer != "sgd" or train.weight_decay != 0):
            raise ConfigError(
                f"config key 'train.optimizer' = {train.optimizer!r} (weight_decay {train.weight_decay}) with "
                "'privacy.lazy_noise' = true: expected sgd with weight_decay 0 (lazy noise is exact only for "
                "plain SGD); set privacy.lazy_noise=false for dense noise with any optimizer"
            )

    def _reset_data_dependent_init(self, model: nn.Module, data: ProcessedData) -> None:
        """A global rating mean computed from the training data is not private: start at the public midpoint."""
        bias = getattr(model, "global_bias", None)
        meta = data.meta
        self.reset_global_bias: float | None = None
        if isinstance(bias, torch.Tensor) and "rating_min" in meta and "rating_max" in meta:
            midpoint = (float(meta["rating_min"]) + float(meta["rating_max"])) / 2.0
            with torch.no_grad():
                bias.fill_(midpoint)
            self.reset_global_bias = midpoint

    def _open_ledger(self, logdir: str, config: ExperimentConfig, *, resume: bool) -> None:
        from fedrec.config import config_to_dict

        accountant = self.params["accountant"]
        # The ledger accounts with rdp or prv. A gdp run is recorded under PRV, the tight accountant
        # its reported epsilon is never below (privacy.accounting), and its budget is enforced by the
        # ledger like every other: the trainer's own max(GDP, PRV) stops it no later than the ledger.
        ledger_accountant = accountant if accountant in ("rdp", "prv") else "prv"
        budget = self.privacy_cfg.epsilon_budget
        path = ledger_path(logdir)
        if resume and not os.path.exists(path) and os.path.isfile(self.checkpoint_path()):
            raise PrivacyError(
                f"--resume: {self.checkpoint_path()} exists but the privacy ledger {path} does not; a resume "
                "without the run's ledger would forget the steps already spent (restore the ledger)"
            )
        self.ledger = PrivacyLedger.open(
            path,
            delta=self.params["delta"],
            accountant=ledger_accountant,
            client_epsilon_budget=budget,
            config=config_to_dict(config),
        )
        # Spends already in this logdir's ledger (an earlier or crashed run) count against this run.
        history = self.ledger.client_history(LEDGER_CLIENT)
        for sigma, rate, steps in history:
            self.accountant.step(noise_multiplier=sigma, sample_rate=rate, steps=steps)

    def _check_plan(self) -> None:
        """Refuse a plan above the budget (fresh runs); compute the steps that stay within it."""
        budget = self.privacy_cfg.epsilon_budget
        if budget is None:
            return
        p = self.params
        remaining = max(0, self.planned_steps() - self.step)
        planned_eps = self.accountant.epsilon_after(
            delta=p["delta"],
            noise_multiplier=p["noise_multiplier"],
            sample_rate=p["sample_rate"],
            steps=max(1, remaining),
        )
        if planned_eps > budget and not self._resume:
            raise PrivacyError(
                f"epsilon_budget = {budget:g}: the plan ({remaining} steps, noise_multiplier "
                f"{p['noise_multiplier']:.4g}, sample_rate {p['sample_rate']:.4g}, already spent "
                f"{self.accountant.epsilon(delta=p['delta']):.4g}) reaches epsilon {planned_eps:.4g}; "
                "lower train.epochs/train.max_steps or raise the noise"
            )
        self._allowed_steps = self._steps_within_budget(remaining)
        self._steps_at_plan = self.dp.steps

    def _steps_within_budget(self, upper: int) -> int:
        """Most further steps (at most ``upper``) whose epsilon, on top of the history, fits the budget."""
        p = self.params
        budget = self.privacy_cfg.epsilon_budget
        assert budget is not None

        def fits(steps: int) -> bool:
            eps = self.accountant.epsilon_after(
                delta=p["delta"],
                noise_multiplier=p["noise_multiplier"],
                sample_rate=p["sample_rate"],
                steps=steps,
            )
            return eps <= budget

        return largest_within(upper, fits)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        dp_state = state.get("dp")
        if not isinstance(dp_state, dict):
            raise PrivacyError("checkpoint has no DP-SGD state: it was not written by train_dp.py")
        self._check_checkpoint_ledger(dp_state)
        self.dp.load_state_dict(dp_state)
        self._recorded_steps = self.dp.steps  # recorded before that checkpoint was written
        if self.ledger is None:
            self.accountant.load_state_dict(dp_state["accountant"])
        # else: the accountant already holds the ledger's history, which covers every recorded step;
        # the checkpoint's accountant never replaces it.
        self._allowed_steps = None
        self._resume = True
        self._check_plan()

    def _check_checkpoint_ledger(self, dp_state: dict[str, Any]) -> None:
        """Refuse a checkpoint the ledger does not cover: wrong or missing ledger, fewer steps recorded.

        Raises:
            PrivacyError: the checkpoint was written with a ledger this run lacks, names another ledger
                (copied in, replaced), one rewound since (fewer rows, another chain head), or holds
                more DP steps than the ledger recorded for this run.
        """
        recorded = dp_state.get("ledger_position")
        saved = Accountant(mechanism=self.params["accountant"])
        saved.load_state_dict(dp_state["accountant"])
        if self.ledger is None:
            if recorded is not None:
                raise PrivacyError(
                    f"checkpoint was written with privacy ledger {recorded.get('ledger_id')} but this run has no "
                    "ledger; resume with the run's logdir and its privacy_ledger.sqlite"
                )
            return
        if recorded is not None:
            self.ledger.check_position(recorded)
        covered = self.accountant.steps
        if covered < saved.steps:
            raise PrivacyError(
                f"privacy ledger {self.ledger.path}: records {covered} DP-SGD steps for {LEDGER_CLIENT!r} but the "
                f"checkpoint has taken {saved.steps}; the ledger does not cover the checkpoint (replaced or lost "
                "records?), refusing to resume"
            )

    # ---------------------------------------------------------------------------------- batches
    def steps_per_epoch(self) -> int:
        """Poisson 'epochs': 1/q steps visit N examples in expectation (Opacus's convention)."""
        rate = self.privacy_cfg.sample_rate
        if rate is None:
            rate = min(1.0, self.train_cfg.batch_size / max(1, len(self.data.split("train"))))
        return max(1, math.ceil(1.0 / rate))

    def train_batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        split = self.data.split("train")
        secure = self.privacy_cfg.secure_mode
        seed = None if secure else int(np.random.default_rng([self.config.seed, epoch, 7]).integers(2**62))
        sampler = PoissonBatchSampler(
            len(split),
            sample_rate=self.params["sample_rate"],
            steps=self.steps_per_epoch(),
            seed=seed,
            secure_mode=secure,
        )
        for _ in range(len(sampler)):
            yield split.rows(sampler.sample())

    # ------------------------------------------------------------------------------------- step
    def should_stop(self) -> bool:
        if self._allowed_steps is not None and self.dp.steps - self._steps_at_plan >= self._allowed_steps:
            self.stopped_at_budget = self.step < self.planned_steps()
            return True
        return super().should_stop()

    def training_step(self, batch: dict[str, torch.Tensor]) -> float:
        """One DP-SGD step; returns the batch's mean loss (computed on private data: not DP)."""
        self.model.train()
        labels = batch["label"]
        if labels.numel() == 0:  # an empty Poisson batch still costs a step and adds noise
            self.last_stats = self.dp.step(torch.zeros(0, device=self.device))
            return 0.0
        model: Any = self.model  # a registered model: forward(batch) and loss(scores, labels, reduction)
        scores = model(batch)
        losses = model.loss(scores, labels, reduction="none")
        self.last_stats = self.dp.step(losses)
        return float(losses.detach().mean())

    # -------------------------------------------------------------------------------- reporting
    def epsilon(self) -> float:
        return self.accountant.epsilon(delta=self.params["delta"])

    def _gdp_approximation(self) -> float | None:
        """For accountant gdp: the raw GDP value, shown beside the reported max(GDP, PRV) epsilon."""
        if self.params["accountant"] != "gdp" or not self.accountant.history:
            return None
        return gdp_approximation(self.accountant.history, delta=self.params["delta"])

    def log_scalars(self, prefix: str, values: dict[str, float]) -> None:
        if prefix == "train":
            self.record_spend()
            values = {
                **values,
                "clipped_fraction": self.last_stats.clipped_fraction if self.last_stats else 0.0,
            }
        super().log_scalars(prefix, values)
        if prefix == "train" and self.writer is not None:
            self.writer.add_scalar("privacy/epsilon", self.epsilon(), self.step)

    def record_spend(self) -> None:
        """Commit the steps taken since the last record to the ledger (before anything is released)."""
        new = self.dp.steps - self._recorded_steps
        if self.ledger is None or new <= 0:
            return
        self.ledger.record_client_spend(
            client=LEDGER_CLIENT,
            round=self.step,
            noise_multiplier=self.params["noise_multiplier"],
            sample_rate=self.params["sample_rate"],
            steps=new,
        )
        self._recorded_steps = self.dp.steps

    def validate(self) -> dict[str, float]:
        self.record_spend()
        return super().validate()

    def state_dict(self) -> dict[str, Any]:
        self.record_spend()
        state = super().state_dict()  # model.state_dict() flushes pending row noise first
        state["dp"] = {
            **self.dp.state_dict(),
            "accountant": self.accountant.state_dict(),
            # Bound into the checkpoint: a resume refuses a ledger rewound or replaced since.
            "ledger_position": self.ledger.position() if self.ledger is not None else None,
        }
        return state

    def final_summary(self) -> dict[str, Any]:
        self.record_spend()
        self.dp.flush()
        return super().final_summary()

    def noise_sources(self) -> dict[str, str]:
        """Where this run's DP noise and Poisson batches come from (``run_central_training`` warns on a seed)."""
        return {CENTRAL_PARTY: CSPRNG_SOURCE if self.privacy_cfg.secure_mode else SEEDED_SOURCE}

    def extra_summary(self) -> dict[str, Any]:
        p = self.params
        return {
            "privacy": {
                "epsilon": self.epsilon(),
                "delta": p["delta"],
                "delta_source": p["delta_source"],
                "noise_multiplier": p["noise_multiplier"],
                "noise_source": p["noise_source"],
                "target_epsilon": self.privacy_cfg.target_epsilon,
                "sample_rate": p["sample_rate"],
                "expected_batch_size": self.dp.expected_batch_size,
                "num_examples": self.num_examples,
                "steps": self.accountant.steps,
                "steps_this_run": self.dp.steps,
                "accountant": p["accountant"],
                "gdp_approximation": self._gdp_approximation(),
                "max_grad_norm": p["max_grad_norm"],
                "epsilon_budget": self.privacy_cfg.epsilon_budget,
                "stopped_at_budget": self.stopped_at_budget,
                "secure_mode": self.privacy_cfg.secure_mode,
                "lazy_noise": self.privacy_cfg.lazy_noise,
                "sampling": "poisson",
                "ledger": self.ledger.path if self.ledger is not None else None,
                # The report checks the ledger against this (id, chain length and head).
                "ledger_position": self.ledger.position() if self.ledger is not None else None,
                "global_bias_reset_to": self.reset_global_bias,
            }
        }

    def close(self) -> None:
        if self.ledger is not None:
            self.record_spend()
            self.ledger.close()
            self.ledger = None
