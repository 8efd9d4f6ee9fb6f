"""What-if planning: epsilon for given noise, or the noise for a target epsilon (``--plan key=value``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from privacy.accounting.user_level import ACCOUNTANTS, epsilon, gdp_approximation, noise_multiplier_for
from privacy.errors import PrivacyError

PLAN_KEYS = ("noise_multiplier", "target_epsilon", "sample_rate", "steps", "epochs", "delta", "accountant")


def parse_plan(tokens: Sequence[str]) -> dict[str, Any]:
    """``['noise_multiplier=1.1', 'sample_rate=0.01', ...]`` -> validated parameters.

    Exactly one of noise_multiplier / target_epsilon; steps, or epochs (steps = ceil(epochs /
    sample_rate)); delta is required (no silent default); accountant defaults to rdp.
    """
    values: dict[str, str] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise PrivacyError(f"--plan {token!r}: expected key=value with key one of {', '.join(PLAN_KEYS)}")
        if key not in PLAN_KEYS:
            raise PrivacyError(f"--plan key {key!r}: unknown; expected one of {', '.join(PLAN_KEYS)}")
        if key in values:
            raise PrivacyError(f"--plan key {key!r}: given twice")
        values[key] = value.strip()
    if ("noise_multiplier" in values) == ("target_epsilon" in values):
        raise PrivacyError(
            "--plan: give exactly one of noise_multiplier=... (prints epsilon) or target_epsilon=... (prints noise)"
        )
    for required in ("sample_rate", "delta"):
        if required not in values:
            raise PrivacyError(f"--plan: {required}=... is required")
    if ("steps" in values) == ("epochs" in values):
        raise PrivacyError("--plan: give exactly one of steps=... or epochs=...")
    plan: dict[str, Any] = {"accountant": values.get("accountant", "rdp")}
    if plan["accountant"] not in ACCOUNTANTS:
        raise PrivacyError(
            f"--plan accountant={plan['accountant']!r}: expected one of {', '.join(ACCOUNTANTS)}"
        )
    for key in ("noise_multiplier", "target_epsilon", "sample_rate", "delta", "epochs"):
        if key in values:
            plan[key] = _number(key, values[key])
    if "steps" in values:
        try:
            plan["steps"] = int(values["steps"])
        except ValueError:
            raise PrivacyError(f"--plan steps={values['steps']!r}: expected a positive integer") from None
    else:
        if not 0 < plan["sample_rate"] <= 1 or plan["epochs"] <= 0:
            raise PrivacyError(
                f"--plan epochs={values['epochs']}, sample_rate={values['sample_rate']}: expected > 0"
            )
        plan["steps"] = math.ceil(plan.pop("epochs") / plan["sample_rate"])
    return plan


def _number(key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PrivacyError(f"--plan {key}={text!r}: expected a number") from None
    if not math.isfinite(value):
        raise PrivacyError(f"--plan {key}={text!r}: expected a finite number")
    return value


def run_plan(plan: dict[str, Any]) -> str:
    """One line answering the what-if."""
    common = dict(
        sample_rate=plan["sample_rate"],
        steps=plan["steps"],
        delta=plan["delta"],
        accountant=plan["accountant"],
    )
    where = (
        f"(accountant {plan['accountant']}, sample_rate {plan['sample_rate']:g}, steps {plan['steps']}, "
        f"delta {plan['delta']:g}"
    )
    if "noise_multiplier" in plan:
        eps = epsilon(noise_multiplier=plan["noise_multiplier"], **common)
        shown = "infinite" if math.isinf(eps) else f"{eps:.4f}"
        line = f"epsilon = {shown} {where}, noise_multiplier {plan['noise_multiplier']:g})"
        if plan["accountant"] == "gdp":
            entry = [(plan["noise_multiplier"], plan["sample_rate"], plan["steps"])]
            approx = gdp_approximation(entry, delta=plan["delta"])
            line += (
                f"; gdp is never reported below the tight PRV accountant (raw GDP approximation {approx:.4f}"
                f"{', an under-estimate' if approx < eps else ''})"
            )
        return line
    sigma = noise_multiplier_for(target_epsilon=plan["target_epsilon"], **common)
    reached = epsilon(noise_multiplier=sigma, **common)
    return f"noise_multiplier = {sigma:.4f} {where}; gives epsilon {reached:.4f} <= target {plan['target_epsilon']:g})"
