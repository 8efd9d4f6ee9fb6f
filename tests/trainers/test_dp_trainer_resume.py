"""DPTrainer resume: the noise stream continues (no noise reused), the ledger's history wins over an
older checkpoint's accountant, and secure mode reaches the noise and the sampler.

References: an uninterrupted run with the same seed (bit for bit), and epsilon from Opacus's RDP
analysis functions over the ledger's spends (tests/reference_accounting.py).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from reference_accounting import opacus_rdp_epsilon
from test_dp_trainer import config, make

from privacy.ledger import PrivacyLedger, ledger_path

PRIVACY = {"noise_multiplier": 1.3, "max_grad_norm": 0.6}


def fit(logdir, *, max_steps: int, resume: bool = False, privacy=None):
    cfg = config({**PRIVACY, **(privacy or {})}, max_steps=max_steps, checkpoint_every=6)
    logdir.mkdir(exist_ok=True)
    trainer = make(cfg, logdir=str(logdir), resume=resume)
    if resume:
        trainer.load_checkpoint()
    summary = trainer.fit()
    params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.close()
    return summary, params


def test_resumed_seeded_run_equals_the_uninterrupted_run(tmp_path):
    """Stopped at step 6 and resumed to 12 = 12 steps straight, bit for bit: the noise generator
    continues where the checkpoint left it (restarting it at the seed would redraw steps 1-6's noise).

    Dense noise (lazy_noise false): lazy row noise is drawn when rows are read, and a run that ends
    at step 6 reads rows for its final evaluation in another order than a run passing step 6, so
    lazy runs continue with independent but differently ordered draws.
    """
    dense = {"lazy_noise": False}
    _, whole = fit(tmp_path / "whole", max_steps=12, privacy=dense)
    fit(tmp_path / "split", max_steps=6, privacy=dense)
    summary, resumed = fit(tmp_path / "split", max_steps=12, resume=True, privacy=dense)
    assert summary["steps"] == 12 and summary["privacy"]["steps"] == 12
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name


def ledger_history(logdir):
    with PrivacyLedger.read(ledger_path(str(logdir))) as ledger:
        return ledger.client_history("central"), ledger.info.delta


def test_resume_from_a_checkpoint_older_than_the_ledger_counts_every_recorded_step(tmp_path):
    """The ledger holds 12 steps, the checkpoint 6: the 6 more steps of the resume make 18 spent."""
    fit(tmp_path, max_steps=6)
    shutil.copy(tmp_path / "checkpoint.pt", tmp_path / "step6.pt")
    fit(tmp_path, max_steps=12, resume=True)
    history, delta = ledger_history(tmp_path)
    assert sum(steps for _, _, steps in history) == 12
    shutil.copy(tmp_path / "step6.pt", tmp_path / "checkpoint.pt")  # e.g. the later checkpoint was lost
    summary, _ = fit(tmp_path, max_steps=12, resume=True)
    history, delta = ledger_history(tmp_path)
    assert sum(steps for _, _, steps in history) == 18
    privacy = summary["privacy"]
    assert privacy["steps"] == 18
    assert privacy["epsilon"] == pytest.approx(opacus_rdp_epsilon(history, delta), rel=1e-9)
    assert privacy["epsilon"] > opacus_rdp_epsilon([(1.3, history[0][1], 12)], delta)


def test_secure_mode_reaches_noise_and_sampler_and_is_not_reproducible_from_the_seed():
    finals = []
    for _ in range(2):
        trainer = make(config({**PRIVACY, "secure_mode": True}, max_steps=3))
        assert trainer.dp.noise.secure_mode
        summary = trainer.fit()
        assert summary["privacy"]["secure_mode"] is True
        finals.append(torch.cat([p.detach().ravel() for p in trainer.model.parameters()]))
        trainer.close()
    assert not torch.equal(finals[0], finals[1])
