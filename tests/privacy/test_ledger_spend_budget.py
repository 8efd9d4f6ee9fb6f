"""The ledger refuses a spend that takes a client just past its budget (public API only).

Budget 1% above one spend's epsilon: the second identical spend reaches about 1.4x the budget, well
below 2x, so a check that compares with a loosened bound lets it through. The epsilons come from
Opacus's RDP analysis functions called directly (tests/reference_accounting.py).
"""

from __future__ import annotations

import pytest
from reference_accounting import opacus_rdp_epsilon

from privacy.ledger import BudgetExceededError, PrivacyLedger

SPEND = {"noise_multiplier": 1.3, "sample_rate": 0.07, "steps": 30}
DELTA = 1e-5


def test_the_spend_past_the_budget_is_refused_and_not_recorded(tmp_path):
    one = opacus_rdp_epsilon([tuple(SPEND.values())], DELTA)
    two = opacus_rdp_epsilon([tuple(SPEND.values())] * 2, DELTA)
    budget = 1.01 * one
    assert budget < two < 2 * budget
    with PrivacyLedger.open(
        str(tmp_path / "ledger.sqlite"), delta=DELTA, client_epsilon_budget=budget
    ) as ledger:
        ledger.record_client_spend(client=4, round=0, **SPEND)
        assert ledger.client_epsilon(4) == pytest.approx(one, rel=1e-9)
        with pytest.raises(BudgetExceededError, match="must not be sent"):
            ledger.record_client_spend(client=4, round=1, **SPEND)
        assert [s.round for s in ledger.client_spends(4)] == [0]
        ledger.record_client_spend(client=5, round=1, **SPEND)  # another client's budget is its own
        assert ledger.client_epsilon(5) == pytest.approx(one, rel=1e-9)
