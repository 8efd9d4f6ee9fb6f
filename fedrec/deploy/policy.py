"""Owner policy: which code a datasite runs without asking, how often, and the owner's privacy budget.

A data owner writes one YAML file (example: ``configs/syft_owner_policy.yml``)::

    approve:                      # code approved without asking, pinned by the SHA-256 of its source
                                  # (a name may be listed with several digests, e.g. two versions)
      - {name: fedrec_train_round, sha256: 3f...}
      - {name: fedrec_apply_round, sha256: 9a...}
    max_executions: 1000          # largest execution count a request may ask for (PySyft output policy)
    unlisted: deny                # any other code: 'deny', or 'ask' (the owner answers on the terminal)
    min_aggregate_clients: 2      # the apply step refuses aggregates of fewer contributors
    allowed_modules: []           # modules a request's fl.import_modules may load here (default: none)
    reproducible_noise: false     # true: DP noise from the request's seed (replayable; tests only)
    privacy:                      # enforced by the owner's own ledger on the datasite
      epsilon_budget: 10.0        # example-level epsilon over every run that touches this data
      delta: 1.0e-5
      accountant: rdp

A request is approved only when its function name and source digest are both listed, its execution
limit is within ``max_executions``, and its inputs are exactly this datasite's training asset (for
``data``), its owner asset (for ``owner``) and a dict the requester owns (for ``request``); swapping
an asset into another argument is refused like changed code. The owner's daemon re-reads the file
when it changes, so approving new code is an edit of this file. The privacy budget is not a PySyft
setting: the approved code records every spend in the owner's ledger before it returns an update and
refuses (returns nothing) past the budget.

``allowed_modules`` lists the Python modules (installed on the owner's side, e.g. one registering a
custom federated algorithm) that a request's ``fl.import_modules`` may import on this datasite: the
approved code pins its own source, not what it imports, so any other module a request names is
refused before anything is imported or trained. It is read when the datasite publishes its owner
asset (restart the datasite after changing it).

DP-SGD noise and Poisson batches on the datasite come from the owner's own CSPRNG whatever the request
says (noise anyone could regenerate from a config seed protects nothing against a party colluding with
the coordinator); a request that tries to set ``privacy.secure_mode`` is refused. ``reproducible_noise:
true`` makes the datasite draw them from the request's seed instead, so a deployment reproduces the
simulation bit for bit: for tests and demos only, and every output then says so.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal

from fedrec.config.loader import read_yaml
from fedrec.config.typed import build
from fedrec.errors import ConfigError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# What each argument of an approvable function must be bound to.
EXPECTED_INPUTS = {"data": "asset:train", "owner": "asset:owner", "request": "user:dict"}


@dataclass
class ApprovedCode:
    """One function the owner approves: its name and the SHA-256 of its source."""

    name: str
    sha256: str

    def validate(self, path: str) -> None:
        if not self.name.isidentifier():
            raise ConfigError(f"config key '{path}.name' = {self.name!r}: expected a Python function name")
        if not _SHA256.match(self.sha256):
            raise ConfigError(
                f"config key '{path}.sha256' = {self.sha256!r}: expected 64 lowercase hex digits"
            )


@dataclass
class OwnerPrivacy:
    """The owner's example-level budget, kept in the owner's own privacy ledger."""

    epsilon_budget: float
    delta: float
    accountant: Literal["rdp", "prv"] = "rdp"

    def validate(self, path: str) -> None:
        if not 0 < self.epsilon_budget < float("inf"):
            raise ConfigError(
                f"config key '{path}.epsilon_budget' = {self.epsilon_budget!r}: expected a finite number > 0"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(f"config key '{path}.delta' = {self.delta!r}: expected a number in (0, 1)")


@dataclass
class OwnerPolicy:
    """An owner's approval policy (see the module docstring)."""

    approve: list[ApprovedCode]
    privacy: OwnerPrivacy
    max_executions: int = 1000
    unlisted: Literal["deny", "ask"] = "deny"
    min_aggregate_clients: int = 2
    allowed_modules: list[str] = field(default_factory=list)
    reproducible_noise: bool = False
    source: str = field(default="<policy>", init=False, compare=False)

    def validate(self, path: str) -> None:
        if self.max_executions < 1:
            raise ConfigError(
                f"config key 'max_executions' = {self.max_executions!r}: expected a positive integer"
            )
        if self.min_aggregate_clients < 1:
            raise ConfigError(
                f"config key 'min_aggregate_clients' = {self.min_aggregate_clients!r}: expected a positive integer"
            )
        for module in self.allowed_modules:
            if not all(part.isidentifier() for part in str(module).split(".")):
                raise ConfigError(
                    f"config key 'allowed_modules' entry {module!r}: expected a dotted Python module name"
                )
        pins = [(code.name, code.sha256) for code in self.approve]
        if len(set(pins)) != len(pins):
            raise ConfigError(f"config key 'approve': an entry is listed twice in {pins}")

    @classmethod
    def load(cls, path: str) -> OwnerPolicy:
        data = read_yaml(path)
        try:
            policy = build(cls, data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        policy.source = os.fspath(path)
        return policy

    def decide(self, request: CodeRequest) -> Decision:
        """Approve, deny or ask about one code request."""
        pinned = {(code.name, code.sha256) for code in self.approve}
        if (request.name, request.sha256) not in pinned:
            reason = (
                f"code {request.name!r} with source digest {request.sha256[:16]}... is not pinned in "
                f"the owner policy {self.source}"
            )
            return Decision("ask" if self.unlisted == "ask" else "deny", reason)
        if request.max_executions is None or request.max_executions > self.max_executions:
            return Decision(
                "deny",
                f"code {request.name!r} asks for {request.max_executions} executions; the owner policy allows at "
                f"most max_executions={self.max_executions}",
            )
        for argument, bound in request.inputs.items():
            wanted = EXPECTED_INPUTS.get(argument)
            if wanted != bound:
                return Decision(
                    "deny",
                    f"code {request.name!r} binds argument {argument!r} to {bound}; the owner policy expects "
                    f"{wanted or 'no such argument'}",
                )
        return Decision("approve", f"code {request.name!r} digest pinned in {self.source}")


@dataclass(frozen=True)
class CodeRequest:
    """A code request as the policy sees it (the owner daemon builds it from PySyft's request)."""

    name: str
    sha256: str
    max_executions: int | None
    inputs: dict[str, str]  # argument -> 'asset:train' | 'asset:owner' | 'user:dict' | other description


@dataclass(frozen=True)
class Decision:
    action: Literal["approve", "deny", "ask"]
    reason: str


def policy_text(
    digests: dict[str, str],
    *,
    epsilon_budget: float,
    delta: float,
    accountant: str = "rdp",
    max_executions: int = 1000,
    min_aggregate_clients: int = 2,
    unlisted: str = "deny",
    allowed_modules: list[str] | tuple[str, ...] = (),
    reproducible_noise: bool = False,
) -> str:
    """A policy file approving ``digests`` (what ``python -m fedrec.deploy.owner digests`` prints)."""
    lines = ["# fedrec owner policy (see fedrec/deploy/policy.py and docs/deployment.md)", "approve:"]
    lines += [f"  - {{name: {name}, sha256: {digest}}}" for name, digest in sorted(digests.items())]
    lines += [
        f"max_executions: {int(max_executions)}",
        f"unlisted: {unlisted}",
        f"min_aggregate_clients: {int(min_aggregate_clients)}",
        f"allowed_modules: [{', '.join(str(m) for m in allowed_modules)}]",
        f"reproducible_noise: {'true' if reproducible_noise else 'false'}",
        "privacy:",
        f"  epsilon_budget: {float(epsilon_budget)!r}",
        f"  delta: {float(delta)!r}",
        f"  accountant: {accountant}",
    ]
    return "\n".join(lines) + "\n"
