"""Durable, append-only privacy ledger: a spend is committed before the update it pays for leaves.

One SQLite file per run (``LOGDIR/privacy_ledger.sqlite``) in WAL mode with ``synchronous=FULL``:
``record_*`` returns only after the transaction is on disk, so a caller that sends its update after
the call returns can crash at any point and the ledger over-counts at worst, never under-counts.
Every table refuses UPDATE and DELETE (SQL triggers), and every row is linked into a hash chain
(``chain`` table): each link's SHA-256 covers the row's table, sequence number and content and the
previous link, and the first link covers the run metadata (ledger id, run id, delta, accountant,
budgets, config). Opening a ledger to resume or report walks the whole chain and refuses a row that
was edited, deleted or inserted outside this API, and any impossible value (noise multiplier <= 0 or
not finite, sample rate outside (0, 1], steps < 1, delta outside (0, 1), a negative epsilon).
``position()`` gives the chain's head and length; a checkpoint or summary that stores it is checked
with ``check_position`` (a ledger rewound to an older copy, or copied from another run, is refused).
The chain has no secret: someone who rewrites every row and link consistently is caught only by a
head recorded elsewhere (docs/ledger.md says what holds and what does not). The file carries an
application id and a schema version; a file that is not a ledger, another schema, a failed
``PRAGMA quick_check`` or a truncated file raise ``LedgerError`` with one line naming the file.

What is recorded:

* run metadata, written once: delta, accountant, per-client and user-level epsilon budgets, config;
* per-client DP-SGD spends: client, round, noise multiplier, sample rate, steps (example level);
* per-round DP-FedAvg events: round, noise multiplier sigma, clip norm S, client sampling rate q,
  clients sampled, minimum survivors the noise shares assume (user level, McMahan et al. 2018);
* exclusions: a client left out of further rounds, with the round and the reason;
* run events: start and each resume with the config it ran with.

Several processes may write one ledger (WAL + ``busy_timeout``, ``BEGIN IMMEDIATE``): a federated
simulation can let each pool worker ``PrivacyLedger.attach`` the file and record its own spend before
returning its update, or let the aggregator ``record_client_spends`` a batch on the workers' behalf
before it adds their updates into the aggregate. SQLite's WAL needs shared memory, so every writer
must run on the same host as the file (not over NFS); processes on other hosts report to one writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from privacy.accounting.user_level import (
    BUDGET_ACCOUNTANTS,
    epsilon_from_history,
    validate_accountant,
    validate_delta,
    validate_entry,
)
from privacy.errors import LedgerError, PrivacyError

SCHEMA_VERSION = 2  # 2: hash chain over rows, noise multiplier > 0
LEDGER_FILENAME = "privacy_ledger.sqlite"
# Written into the SQLite header (PRAGMA application_id): "FRLG", a fedrec ledger.
APPLICATION_ID = 0x46524C47
BUSY_TIMEOUT_S = 60.0
SAMPLING_SCHEMES = ("poisson", "fixed_size")
_META_KEYS = (
    "schema_version",
    "ledger_id",
    "run_id",
    "delta",
    "accountant",
    "client_epsilon_budget",
    "user_epsilon_budget",
    "config",
    "created_at",
)
_TABLES = ("meta", "client_spends", "rounds", "exclusions", "run_events", "chain")
# The columns each chained table's link covers, in order (everything but the sequence number).
_CHAINED_COLUMNS = {
    "client_spends": (
        "client",
        "round",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "recorded_at",
        "writer_pid",
    ),
    "rounds": (
        "round",
        "noise_multiplier",
        "clip_norm",
        "client_sampling_rate",
        "num_sampled",
        "min_survivors",
        "sampling",
        "recorded_at",
        "writer_pid",
    ),
    "exclusions": ("client", "round", "reason", "epsilon", "recorded_at", "writer_pid"),
    "run_events": ("kind", "detail", "recorded_at", "writer_pid"),
}
CHAIN_GENESIS_TAG = b"fedrec-privacy-ledger-chain-v2"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE client_spends (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    client TEXT NOT NULL CHECK (length(client) > 0),
    round INTEGER NOT NULL CHECK (round >= 0),
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 1),
    recorded_at REAL NOT NULL,
    writer_pid INTEGER NOT NULL
);
CREATE INDEX client_spends_by_client ON client_spends (client, seq);
CREATE TABLE rounds (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL CHECK (round >= 0),
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    clip_norm REAL NOT NULL CHECK (clip_norm > 0),
    client_sampling_rate REAL NOT NULL CHECK (client_sampling_rate > 0 AND client_sampling_rate <= 1),
    num_sampled INTEGER NOT NULL CHECK (num_sampled >= 0),
    min_survivors INTEGER NOT NULL CHECK (min_survivors >= 1),
    sampling TEXT NOT NULL CHECK (sampling IN ('poisson', 'fixed_size')),
    recorded_at REAL NOT NULL,
    writer_pid INTEGER NOT NULL
);
CREATE TABLE exclusions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    client TEXT NOT NULL CHECK (length(client) > 0),
    round INTEGER NOT NULL CHECK (round >= 0),
    reason TEXT NOT NULL,
    epsilon REAL,
    recorded_at REAL NOT NULL,
    writer_pid INTEGER NOT NULL
);
CREATE INDEX exclusions_by_client ON exclusions (client);
CREATE TABLE run_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    writer_pid INTEGER NOT NULL
);
CREATE TABLE chain (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    row_seq INTEGER NOT NULL,
    digest TEXT NOT NULL
);
""" + "".join(
    f"""
CREATE TRIGGER {table}_append_only_update BEFORE UPDATE ON {table}
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only'); END;
CREATE TRIGGER {table}_append_only_delete BEFORE DELETE ON {table}
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only'); END;
"""
    for table in _TABLES
)

T = TypeVar("T")


class BudgetExceededError(LedgerError):
    """A spend or round that would take a client (or the run) past its epsilon budget: do not send."""


def ledger_path(logdir: str | os.PathLike) -> str:
    """The ledger file of the run in ``logdir``."""
    return os.path.join(os.fspath(logdir), LEDGER_FILENAME)


@dataclass(frozen=True)
class RunInfo:
    """The run metadata a ledger was created with (never changes afterwards)."""

    ledger_id: str
    run_id: str | None
    delta: float
    accountant: str
    client_epsilon_budget: float | None
    user_epsilon_budget: float | None
    config: dict[str, Any]
    created_at: float
    schema_version: int


@dataclass(frozen=True)
class ClientSpend:
    """One client's DP-SGD spend in one round: ``steps`` sampled Gaussian steps."""

    client: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    seq: int = 0
    recorded_at: float = 0.0


@dataclass(frozen=True)
class RoundRecord:
    """One DP-FedAvg round's user-level parameters (recorded before its clients send anything)."""

    round: int
    noise_multiplier: float
    clip_norm: float
    client_sampling_rate: float
    num_sampled: int
    min_survivors: int
    sampling: str
    seq: int = 0
    recorded_at: float = 0.0


@dataclass(frozen=True)
class Exclusion:
    """A client left out of every round from ``round`` on."""

    client: str
    round: int
    reason: str
    epsilon: float | None
    seq: int = 0
    recorded_at: float = 0.0


@dataclass(frozen=True)
class RunEvent:
    kind: str
    detail: dict[str, Any]
    seq: int = 0
    recorded_at: float = 0.0


def _client_id(client: Any) -> str:
    if isinstance(client, bool) or not isinstance(client, str | int):
        raise PrivacyError(f"client = {client!r}: expected a string or an integer id")
    text = str(client)
    if not text:
        raise PrivacyError("client = '': expected a non-empty id")
    return text


def _round_index(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PrivacyError(f"round = {value!r}: expected an integer >= 0")
    return int(value)


def _budget(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise PrivacyError(f"{name} = {value!r}: expected a number > 0 or None") from None
    if not budget > 0 or math.isnan(budget):
        raise PrivacyError(f"{name} = {value!r}: expected a number > 0 or None")
    return budget


class PrivacyLedger:
    """Handle on one run's ledger file. Open it with ``open`` (create or resume), ``attach`` or ``read``.

    One handle belongs to one process and thread (SQLite connections do not cross ``fork``); every
    process opens its own handle on the same file.
    """

    def __init__(self, path: str, connection: sqlite3.Connection, info: RunInfo, *, readonly: bool):
        self.path = path
        self._con = connection
        self.info = info
        self.readonly = readonly

    # ----------------------------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        delta: float,
        accountant: str = "rdp",
        client_epsilon_budget: float | None = None,
        user_epsilon_budget: float | None = None,
        run_id: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> PrivacyLedger:
        """Create the ledger at ``path``, or resume it if it exists (the run's single owner calls this).

        A resume must ask for the same delta, accountant and budgets (and run id, when both give one)
        the file was created with; the config it runs with is recorded as a 'resume' event.

        Raises:
            PrivacyError: a bad delta, accountant or budget.
            LedgerError: the file is corrupted, truncated, not a ledger, or belongs to another run.
        """
        path = os.fspath(path)
        requested = {
            "run_id": run_id,
            "delta": validate_delta(delta),
            "accountant": validate_accountant(accountant, allowed=BUDGET_ACCOUNTANTS),
            "client_epsilon_budget": _budget(client_epsilon_budget, "client_epsilon_budget"),
            "user_epsilon_budget": _budget(user_epsilon_budget, "user_epsilon_budget"),
        }
        config = dict(config or {})
        _json_text(config, path)  # a config that cannot be stored is an error before anything is written
        created = False
        if not os.path.exists(path):
            created = _create(path, {**requested, "config": config})
        ledger = cls._connect_checked(path, readonly=False)
        try:
            for key, wanted in requested.items():
                have = getattr(ledger.info, key)
                if key == "run_id" and (have is None or wanted is None):
                    continue
                if have != wanted:
                    raise LedgerError(
                        f"privacy ledger {path}: {key} is {have!r} in the ledger but {wanted!r} was requested; "
                        "a ledger belongs to one run (use a new logdir for a new run)"
                    )
            if not created:
                ledger.record_event("resume", config=config)
        except BaseException:
            ledger.close()
            raise
        return ledger

    @classmethod
    def attach(cls, path: str | os.PathLike) -> PrivacyLedger:
        """Open an existing ledger for writing (a pool worker recording its own spends)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise LedgerError(f"no privacy ledger at {path}")
        # A pool worker appends to a ledger its aggregator verified when it opened it: walking the
        # whole chain per worker and round would cost O(rows) each time.
        return cls._connect_checked(path, readonly=False, chain=False)

    @classmethod
    def read(cls, path: str | os.PathLike, *, full_check: bool = False) -> PrivacyLedger:
        """Open an existing ledger read-only (reports). ``full_check`` runs ``integrity_check``."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise LedgerError(f"no privacy ledger at {path}")
        return cls._connect_checked(path, readonly=True, full_check=full_check)

    @classmethod
    def _connect_checked(
        cls, path: str, *, readonly: bool, full_check: bool = False, chain: bool = True
    ) -> PrivacyLedger:
        con = None
        try:
            con = _connect(path, readonly=readonly)
            info = _verify(con, path, full_check=full_check)
            if chain:
                _verify_chain(con, path)
        except sqlite3.Error as err:
            if con is not None:
                con.close()
            raise LedgerError(f"privacy ledger {path}: corrupted or truncated ({err})") from None
        except BaseException:
            if con is not None:
                con.close()
            raise
        return cls(path, con, info, readonly=readonly)

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- writing
    def record_client_spend(
        self, *, client: str | int, round: int, noise_multiplier: float, sample_rate: float, steps: int
    ) -> ClientSpend:
        """Commit one client's spend for ``round``; returns after the commit is on disk. Send afterwards.

        Raises:
            BudgetExceededError: the client is excluded, or this spend takes it past its budget; the
                update it pays for must not be sent.
        """
        spend = ClientSpend(client, round, noise_multiplier, sample_rate, steps)  # type: ignore[arg-type]
        return self.record_client_spends([spend])[0]

    def record_client_spends(self, spends: Iterable[ClientSpend]) -> list[ClientSpend]:
        """Commit several spends in one transaction (all or none), e.g. an aggregator for its workers."""
        pending = []
        for spend in spends:
            sigma, rate, steps = validate_entry(
                noise_multiplier=spend.noise_multiplier, sample_rate=spend.sample_rate, steps=spend.steps
            )
            pending.append(
                ClientSpend(_client_id(spend.client), _round_index(spend.round), sigma, rate, steps)
            )
        if not pending:
            return []

        def insert(con: sqlite3.Connection) -> list[ClientSpend]:
            clients = sorted({spend.client for spend in pending})
            excluded = self._excluded(con, clients)
            if excluded:
                raise BudgetExceededError(
                    f"privacy ledger {self.path}: client {excluded[0]!r} is excluded from further rounds; "
                    "its update must not be sent"
                )
            budget = self.info.client_epsilon_budget
            if budget is not None:
                for client in clients:
                    history = self._history(con, client) + [
                        (s.noise_multiplier, s.sample_rate, s.steps) for s in pending if s.client == client
                    ]
                    eps = self._epsilon(history)
                    if eps > budget:
                        raise BudgetExceededError(
                            f"privacy ledger {self.path}: client {client!r} would reach epsilon {eps:.4g} > budget "
                            f"{budget:g}; its update must not be sent"
                        )
            now, pid = time.time(), os.getpid()
            done = []
            for s in pending:
                seq = _insert_chained(
                    con,
                    "client_spends",
                    (s.client, s.round, s.noise_multiplier, s.sample_rate, s.steps, now, pid),
                )
                done.append(
                    ClientSpend(s.client, s.round, s.noise_multiplier, s.sample_rate, s.steps, seq, now)
                )
            return done

        return self._write(insert)

    def record_round(
        self,
        *,
        round: int,
        noise_multiplier: float,
        clip_norm: float,
        client_sampling_rate: float,
        num_sampled: int,
        min_survivors: int,
        sampling: Literal["poisson", "fixed_size"] = "poisson",
    ) -> RoundRecord:
        """Commit a DP-FedAvg round's user-level parameters before any of its clients sends.

        ``noise_multiplier`` is what the accountant composes: the noise std on the sum of clipped
        updates over ``clip_norm`` when exactly ``min_survivors`` clients report (more survivors add
        more noise; fewer must not be released, see ``privacy.dp.dp_fedavg``).

        Raises:
            BudgetExceededError: the round would take the user-level epsilon past its budget.
        """
        sigma, q, _ = validate_entry(
            noise_multiplier=noise_multiplier, sample_rate=client_sampling_rate, steps=1
        )
        index = _round_index(round)
        if not (isinstance(clip_norm, int | float) and math.isfinite(clip_norm) and clip_norm > 0):
            raise PrivacyError(f"clip_norm = {clip_norm!r}: expected a finite number > 0")
        if isinstance(num_sampled, bool) or not isinstance(num_sampled, int) or num_sampled < 0:
            raise PrivacyError(f"num_sampled = {num_sampled!r}: expected an integer >= 0")
        if isinstance(min_survivors, bool) or not isinstance(min_survivors, int) or min_survivors < 1:
            raise PrivacyError(f"min_survivors = {min_survivors!r}: expected an integer >= 1")
        if sampling not in SAMPLING_SCHEMES:
            raise PrivacyError(f"sampling = {sampling!r}: expected one of {', '.join(SAMPLING_SCHEMES)}")

        def insert(con: sqlite3.Connection) -> RoundRecord:
            budget = self.info.user_epsilon_budget
            if budget is not None:
                rounds = [
                    (r[0], r[1])
                    for r in con.execute("SELECT noise_multiplier, client_sampling_rate FROM rounds")
                ]
                eps = self._epsilon([(s, rate, 1) for s, rate in [*rounds, (sigma, q)]])
                if eps > budget:
                    raise BudgetExceededError(
                        f"privacy ledger {self.path}: round {index} would take user-level epsilon to {eps:.4g} > "
                        f"budget {budget:g}; stop the run"
                    )
            now = time.time()
            seq = _insert_chained(
                con,
                "rounds",
                (index, sigma, float(clip_norm), q, num_sampled, min_survivors, sampling, now, os.getpid()),
            )
            return RoundRecord(
                index, sigma, float(clip_norm), q, num_sampled, min_survivors, sampling, seq, now
            )

        return self._write(insert)

    def record_exclusion(
        self, *, client: str | int, round: int, reason: str, epsilon: float | None = None
    ) -> Exclusion:
        """Commit that ``client`` is left out from ``round`` on (a second exclusion is kept, not merged)."""
        client_id, index = _client_id(client), _round_index(round)
        if not isinstance(reason, str) or not reason.strip():
            raise PrivacyError(f"reason = {reason!r}: expected a non-empty string")
        if epsilon is not None:
            epsilon = _epsilon_value(epsilon, "epsilon")

        def insert(con: sqlite3.Connection) -> Exclusion:
            now = time.time()
            seq = _insert_chained(con, "exclusions", (client_id, index, reason, epsilon, now, os.getpid()))
            return Exclusion(client_id, index, reason, epsilon, seq, now)

        return self._write(insert)

    def record_event(self, kind: str, **detail: Any) -> RunEvent:
        """Commit a run event (start, resume, or a note the report should show)."""
        if not isinstance(kind, str) or not kind:
            raise PrivacyError(f"event kind = {kind!r}: expected a non-empty string")
        text = _json_text(detail, self.path)

        def insert(con: sqlite3.Connection) -> RunEvent:
            now = time.time()
            seq = _insert_chained(con, "run_events", (kind, text, now, os.getpid()))
            return RunEvent(kind, detail, seq, now)

        return self._write(insert)

    def admit_clients(
        self,
        clients: Iterable[str | int],
        *,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> list[str]:
        """The clients that may take part in ``round`` with this planned spend, in the given order.

        A client already excluded is left out; a client whose planned spend would exceed its budget
        is excluded now (recorded with the round and the epsilon it would reach) and left out.
        """
        index = _round_index(round)
        planned = validate_entry(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        ids = [_client_id(c) for c in clients]
        budget = self.info.client_epsilon_budget

        def decide(con: sqlite3.Connection) -> list[str]:
            excluded = set(self._excluded(con, ids))
            admitted, now = [], time.time()
            for client in ids:
                if client in excluded:
                    continue
                if budget is not None:
                    eps = self._epsilon([*self._history(con, client), planned])
                    if eps > budget:
                        _insert_chained(
                            con,
                            "exclusions",
                            (
                                client,
                                index,
                                f"budget: next round would reach epsilon {eps:.4g} > {budget:g}",
                                eps,
                                now,
                                os.getpid(),
                            ),
                        )
                        excluded.add(client)
                        continue
                admitted.append(client)
            return admitted

        return self._write(decide)

    # ----------------------------------------------------------------------------------- reading
    def client_spends(self, client: str | int | None = None) -> list[ClientSpend]:
        query = (
            "SELECT client, round, noise_multiplier, sample_rate, steps, seq, recorded_at FROM client_spends"
        )
        args: tuple = ()
        if client is not None:
            query, args = query + " WHERE client = ?", (_client_id(client),)
        return [ClientSpend(*row) for row in self._query(query + " ORDER BY seq", args)]

    def rounds(self) -> list[RoundRecord]:
        rows = self._query(
            "SELECT round, noise_multiplier, clip_norm, client_sampling_rate, num_sampled, min_survivors, sampling,"
            " seq, recorded_at FROM rounds ORDER BY seq"
        )
        return [RoundRecord(*row) for row in rows]

    def exclusions(self) -> list[Exclusion]:
        rows = self._query(
            "SELECT client, round, reason, epsilon, seq, recorded_at FROM exclusions ORDER BY seq"
        )
        return [Exclusion(*row) for row in rows]

    def events(self) -> list[RunEvent]:
        rows = self._query("SELECT kind, detail, seq, recorded_at FROM run_events ORDER BY seq")
        return [RunEvent(kind, json.loads(detail), seq, at) for kind, detail, seq, at in rows]

    def clients(self) -> list[str]:
        """Every client that spent or was excluded, sorted (numerically where ids are integers)."""
        rows = self._query("SELECT client FROM client_spends UNION SELECT client FROM exclusions")
        return sorted((row[0] for row in rows), key=_natural_key)

    def excluded_clients(self) -> set[str]:
        return {row[0] for row in self._query("SELECT DISTINCT client FROM exclusions")}

    def client_history(self, client: str | int) -> list[tuple[float, float, int]]:
        """The client's spends as Opacus accountant history entries ``(noise, rate, steps)``.

        A resumed DP-SGD trainer can set ``accountant.history`` to this, so its own epsilon is the
        ledger's (which may over-count after a crash, never under-count).
        """
        return self._run_read(lambda con: self._history(con, _client_id(client)))

    def client_epsilon(self, client: str | int) -> float:
        return self._epsilon(self.client_history(client))

    def epsilons(self) -> dict[str, float]:
        """Example-level epsilon of every client that spent, at the ledger's delta and accountant."""
        histories: dict[str, list[tuple[float, float, int]]] = {}
        rows = self._query(
            "SELECT client, noise_multiplier, sample_rate, SUM(steps) FROM client_spends"
            " GROUP BY client, noise_multiplier, sample_rate"
        )
        for client, sigma, rate, steps in rows:
            histories.setdefault(client, []).append((sigma, rate, int(steps)))
        return {client: self._epsilon(histories[client]) for client in sorted(histories, key=_natural_key)}

    def user_level_epsilon(self) -> float:
        """User-level DP-FedAvg epsilon over every recorded round (0.0 when no round was recorded)."""
        rounds = self._query("SELECT noise_multiplier, client_sampling_rate FROM rounds")
        return self._epsilon([(sigma, q, 1) for sigma, q in rounds])

    def can_afford(
        self, client: str | int, *, noise_multiplier: float, sample_rate: float, steps: int
    ) -> bool:
        """Whether ``client`` is not excluded and this next spend keeps it within its budget."""
        client_id = _client_id(client)
        planned = validate_entry(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)

        def check(con: sqlite3.Connection) -> bool:
            if self._excluded(con, [client_id]):
                return False
            budget = self.info.client_epsilon_budget
            return budget is None or self._epsilon([*self._history(con, client_id), planned]) <= budget

        return self._run_read(check)

    def can_afford_round(self, *, noise_multiplier: float, client_sampling_rate: float) -> bool:
        """Whether one more DP-FedAvg round keeps the user-level epsilon within its budget."""
        sigma, q, _ = validate_entry(
            noise_multiplier=noise_multiplier, sample_rate=client_sampling_rate, steps=1
        )
        budget = self.info.user_epsilon_budget
        if budget is None:
            return True
        rounds = self._query("SELECT noise_multiplier, client_sampling_rate FROM rounds")
        return self._epsilon([(s, r, 1) for s, r in [*rounds, (sigma, q)]]) <= budget

    def remaining_budget(self, client: str | int) -> float | None:
        """Budget minus spent epsilon (may be 0, never negative), or None without a budget."""
        budget = self.info.client_epsilon_budget
        if budget is None:
            return None
        return max(0.0, budget - self.client_epsilon(client))

    def position(self) -> dict[str, Any]:
        """Where the ledger stands now: its id, the hash chain's length and head, and rows per event table.

        Store it in every checkpoint and in the summary; ``check_position`` on resume (and the report)
        then refuses a ledger that lost rows, was rewound to an older copy, rewritten, or copied in from
        another run. JSON-able.
        """

        def read(con: sqlite3.Connection) -> dict[str, Any]:
            head = con.execute("SELECT COUNT(*), MAX(seq) FROM chain").fetchone()
            last = con.execute("SELECT digest FROM chain ORDER BY seq DESC LIMIT 1").fetchone()
            counts = {
                table: int(con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                for table in ("client_spends", "rounds", "exclusions")
            }
            return {
                "ledger_id": self.info.ledger_id,
                "chain_rows": int(head[0]),
                "chain_head": str(last[0]) if last else "",
                **counts,
            }

        return self._run_read(read)

    def check_position(self, position: dict[str, Any], *, source: str = "the checkpoint") -> None:
        """Raise LedgerError unless this ledger is the one ``position`` was taken from, at or after it.

        Checks the ledger id (a ledger copied in from another run), the hash-chain link at the recorded
        length (a ledger rewound, rewritten or with rows deleted since) and the per-table row counts.
        """
        if not isinstance(position, dict):
            raise LedgerError(f"privacy ledger {self.path}: {source} records position {position!r:.80}")
        recorded_id = position.get("ledger_id")
        if recorded_id is not None and recorded_id != self.info.ledger_id:
            raise LedgerError(
                f"privacy ledger {self.path}: ledger id {self.info.ledger_id} but {source} was written with "
                f"ledger {recorded_id}; this is another run's ledger (copied in?)"
            )
        now = self.position()
        if "chain_rows" in position or "chain_head" in position:
            rows, head = position.get("chain_rows"), position.get("chain_head")
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1 or not isinstance(head, str):
                raise LedgerError(
                    f"privacy ledger {self.path}: {source} records chain_rows={rows!r}, chain_head={head!r}"
                )
            if now["chain_rows"] < rows:
                raise LedgerError(
                    f"privacy ledger {self.path}: {now['chain_rows']} chained rows but {source} saw {rows}; "
                    "the ledger lost records (restored from an older copy?)"
                )
            link = self._query("SELECT digest FROM chain ORDER BY seq LIMIT 1 OFFSET ?", (rows - 1,))
            if not link or link[0][0] != head:
                raise LedgerError(
                    f"privacy ledger {self.path}: hash-chain link {rows} differs from the head {source} recorded; "
                    "the ledger was rewritten or replaced since"
                )
        for table, count in position.items():
            if table in ("ledger_id", "chain_rows", "chain_head"):
                continue
            if table not in now:
                raise LedgerError(f"privacy ledger {self.path}: {source} names unknown table {table!r}")
            if isinstance(count, bool) or not isinstance(count, int):
                raise LedgerError(f"privacy ledger {self.path}: {source} records {table} = {count!r}")
            if now[table] < count:
                raise LedgerError(
                    f"privacy ledger {self.path}: {table} has {now[table]} rows but {source} saw {count}; "
                    "the ledger lost records (restored from an older copy?)"
                )

    def verify_chain(self) -> tuple[int, str]:
        """Walk the whole hash chain and check every row's values; returns (links, head).

        Raises:
            LedgerError: a row edited, deleted or inserted outside this API, or an impossible value.
        """
        try:
            return _verify_chain(self._con, self.path)
        except sqlite3.Error as err:
            raise LedgerError(f"privacy ledger {self.path}: read failed ({err})") from None

    def check_integrity(self) -> None:
        """Run the full ``PRAGMA integrity_check``; raise LedgerError on any problem."""
        rows = self._query("PRAGMA integrity_check")
        if [tuple(r) for r in rows] != [("ok",)]:
            raise LedgerError(f"privacy ledger {self.path}: integrity check failed ({rows[0][0]})")

    # ----------------------------------------------------------------------------------- internals
    def _epsilon(self, history: Sequence[Sequence[float]]) -> float:
        return epsilon_from_history(history, delta=self.info.delta, accountant=self.info.accountant)

    @staticmethod
    def _history(con: sqlite3.Connection, client: str) -> list[tuple[float, float, int]]:
        rows = con.execute(
            "SELECT noise_multiplier, sample_rate, steps FROM client_spends WHERE client = ? ORDER BY seq",
            (client,),
        )
        return [(float(s), float(r), int(n)) for s, r, n in rows]

    @staticmethod
    def _excluded(con: sqlite3.Connection, clients: Sequence[str]) -> list[str]:
        if not clients:
            return []
        found: set[str] = set()
        unique = sorted(set(clients))
        for start in range(0, len(unique), 500):  # stay below SQLite's bound-parameter limit
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                row[0]
                for row in con.execute(f"SELECT client FROM exclusions WHERE client IN ({marks})", chunk)
            )
        return sorted(found, key=_natural_key)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        return self._run_read(lambda con: con.execute(sql, args).fetchall())

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._con)
        except sqlite3.Error as err:
            raise LedgerError(f"privacy ledger {self.path}: read failed ({err})") from None

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT``; returns after the commit is durable."""
        if self.readonly:
            raise LedgerError(f"privacy ledger {self.path}: opened read-only")
        con = self._con
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as err:
            raise LedgerError(f"privacy ledger {self.path}: cannot start a write ({err})") from None
        try:
            result = fn(con)
            con.execute("COMMIT")
        except BaseException as err:
            if con.in_transaction:
                # If ROLLBACK fails the connection is unusable; nothing was committed either way.
                with contextlib.suppress(sqlite3.Error):
                    con.execute("ROLLBACK")
            if isinstance(err, sqlite3.Error):
                raise LedgerError(f"privacy ledger {self.path}: write failed ({err})") from None
            raise
        return result


def _json_text(value: Any, path: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise PrivacyError(f"privacy ledger {path}: config/detail is not JSON-serialisable ({err})") from None


def _epsilon_value(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise PrivacyError(f"{name} = {value!r}: expected a number >= 0 (an epsilon is never negative)")
    return float(value)


def _canonical(value: Any) -> str:
    # Types matter (3 and 3.0 differ): a value rewritten with another SQLite type breaks its link.
    return json.dumps(value, separators=(",", ":"), default=repr)


def _genesis(con: sqlite3.Connection) -> str:
    """The chain's first 'previous' digest: the run metadata exactly as stored (ids, delta, budgets)."""
    meta = sorted(con.execute("SELECT key, value FROM meta").fetchall())
    text = _canonical([[str(k), v] for k, v in meta])
    return hashlib.sha256(CHAIN_GENESIS_TAG + b"\0" + text.encode()).hexdigest()


def _link(previous: str, table: str, row_seq: int, row: Sequence[Any]) -> str:
    text = _canonical([table, row_seq, list(row)])
    return hashlib.sha256(previous.encode() + b"\n" + text.encode()).hexdigest()


def _insert_chained(con: sqlite3.Connection, table: str, values: Sequence[Any]) -> int:
    """Insert one row and its hash-chain link (inside the caller's transaction); returns the row's seq.

    The link hashes the row as SQLite stored it (read back), so type affinity cannot break a check.
    """
    columns = _CHAINED_COLUMNS[table]
    cursor = con.execute(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", tuple(values)
    )
    seq = int(cursor.lastrowid or 0)
    row = con.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE seq = ?", (seq,)).fetchone()
    last = con.execute("SELECT digest FROM chain ORDER BY seq DESC LIMIT 1").fetchone()
    previous = str(last[0]) if last else _genesis(con)
    con.execute(
        "INSERT INTO chain (tbl, row_seq, digest) VALUES (?, ?, ?)",
        (table, seq, _link(previous, table, seq, row)),
    )
    return seq


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _impossible(table: str, row: Sequence[Any]) -> str | None:
    """What is impossible about a stored row (None when it is a value the API could have written)."""
    values = dict(zip(_CHAINED_COLUMNS[table], row))
    checks: list[tuple[str, bool]] = [("recorded_at", _finite(values["recorded_at"]))]
    if "round" in values:
        checks.append(("round", _is_int(values["round"], 0)))
    if "noise_multiplier" in values:
        sigma = values["noise_multiplier"]
        checks.append(("noise_multiplier", _finite(sigma) and sigma > 0))
    if table == "client_spends":
        rate = values["sample_rate"]
        checks += [
            ("sample_rate", _finite(rate) and 0 < rate <= 1),
            ("steps", _is_int(values["steps"], 1)),
            ("client", isinstance(values["client"], str) and bool(values["client"])),
        ]
    elif table == "rounds":
        q, clip = values["client_sampling_rate"], values["clip_norm"]
        checks += [
            ("client_sampling_rate", _finite(q) and 0 < q <= 1),
            ("clip_norm", _finite(clip) and clip > 0),
            ("num_sampled", _is_int(values["num_sampled"], 0)),
            ("min_survivors", _is_int(values["min_survivors"], 1)),
            ("sampling", values["sampling"] in SAMPLING_SCHEMES),
        ]
    elif table == "exclusions":
        eps = values["epsilon"]
        checks.append(("epsilon", eps is None or (isinstance(eps, int | float) and eps >= 0)))
    for name, ok in checks:
        if not ok:
            return f"{name} = {values[name]!r}"
    return None


def _verify_chain(con: sqlite3.Connection, path: str) -> tuple[int, str]:
    """Recompute every link from the metadata on; every row must be linked exactly once."""
    rows: dict[str, dict[int, tuple]] = {}
    for table, columns in _CHAINED_COLUMNS.items():
        found = con.execute(f"SELECT seq, {', '.join(columns)} FROM {table} ORDER BY seq").fetchall()
        rows[table] = {int(r[0]): tuple(r[1:]) for r in found}
    previous, links = _genesis(con), 0
    for link_seq, table, row_seq, digest in con.execute(
        "SELECT seq, tbl, row_seq, digest FROM chain ORDER BY seq"
    ):
        links += 1
        row = rows.get(str(table), {}).pop(row_seq, None) if str(table) in rows else None
        if row is None:
            raise LedgerError(
                f"privacy ledger {path}: hash-chain link {link_seq} names {table} row {row_seq}, which is missing "
                "(deleted or linked twice); the ledger was tampered with"
            )
        expected = _link(previous, str(table), int(row_seq), row)
        if digest != expected:
            where = "the run metadata or " if links == 1 else ""
            raise LedgerError(
                f"privacy ledger {path}: {where}{table} row {row_seq} does not match hash-chain link {link_seq}; "
                "it was edited outside the ledger API (tampered)"
            )
        bad = _impossible(str(table), row)
        if bad is not None:
            raise LedgerError(
                f"privacy ledger {path}: {table} row {row_seq} holds an impossible value ({bad})"
            )
        previous = expected
    for table, left in rows.items():
        if left:
            raise LedgerError(
                f"privacy ledger {path}: {table} row {min(left)} is not in the hash chain; it was inserted outside "
                "the ledger API (tampered)"
            )
    if links == 0:
        raise LedgerError(f"privacy ledger {path}: empty hash chain (not even the start event); tampered")
    return links, previous


def _natural_key(client: str) -> tuple[int, int | str]:
    return (0, int(client)) if client.lstrip("-").isdigit() else (1, client)


def _connect(path: str, *, readonly: bool) -> sqlite3.Connection:
    # A reader opens the file read-write where it may but refuses writes (query_only): its close can
    # then checkpoint and remove the -wal/-shm files; a file it may not write is opened mode=ro.
    writable = os.access(path, os.W_OK) and os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)
    mode = "rw" if writable or not readonly else "ro"
    uri = f"file:{quote(os.path.abspath(path))}?mode={mode}"
    con = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if readonly:
            con.execute("PRAGMA query_only = ON")
        else:
            mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(f"privacy ledger {path}: cannot use WAL journal mode (got {mode!r})")
        con.execute("PRAGMA synchronous = FULL")
    except BaseException:
        con.close()
        raise
    return con


def _verify(con: sqlite3.Connection, path: str, *, full_check: bool) -> RunInfo:
    app_id = con.execute("PRAGMA application_id").fetchone()[0]
    if app_id != APPLICATION_ID:
        raise LedgerError(
            f"privacy ledger {path}: not a privacy ledger (application id {app_id:#x}, expected "
            f"{APPLICATION_ID:#x}); the file is truncated, corrupted or something else"
        )
    version = con.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION:
        raise LedgerError(
            f"privacy ledger {path}: schema version {version}, this code reads version {SCHEMA_VERSION}"
        )
    check = "integrity_check" if full_check else "quick_check"
    rows = con.execute(f"PRAGMA {check}").fetchall()
    if [tuple(r) for r in rows] != [("ok",)]:
        raise LedgerError(f"privacy ledger {path}: {check} failed ({rows[0][0]})")
    meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    missing = [key for key in _META_KEYS if key not in meta]
    if missing:
        raise LedgerError(f"privacy ledger {path}: metadata lacks {', '.join(missing)}")
    try:
        values = {key: json.loads(meta[key]) for key in _META_KEYS}
        info = RunInfo(
            ledger_id=str(values["ledger_id"]),
            run_id=values["run_id"],
            delta=validate_delta(values["delta"]),
            accountant=validate_accountant(values["accountant"], allowed=BUDGET_ACCOUNTANTS),
            client_epsilon_budget=_budget(values["client_epsilon_budget"], "client_epsilon_budget"),
            user_epsilon_budget=_budget(values["user_epsilon_budget"], "user_epsilon_budget"),
            config=dict(values["config"]),
            created_at=float(values["created_at"]),
            schema_version=int(values["schema_version"]),
        )
    except (ValueError, TypeError, PrivacyError) as err:
        raise LedgerError(f"privacy ledger {path}: malformed metadata ({err})") from None
    if info.schema_version != SCHEMA_VERSION:
        raise LedgerError(
            f"privacy ledger {path}: metadata schema version {info.schema_version} != {SCHEMA_VERSION}"
        )
    return info


def _create(path: str, meta: dict[str, Any]) -> bool:
    """Build a new ledger under a temporary name and link it into place; False if ``path`` appeared."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise LedgerError(f"privacy ledger {path}: directory {directory} does not exist")
    tmp = f"{path}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    values = {
        **meta,
        "schema_version": SCHEMA_VERSION,
        "ledger_id": uuid.uuid4().hex,
        "created_at": time.time(),
    }
    try:
        con = sqlite3.connect(tmp, isolation_level=None)
        try:
            con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("PRAGMA synchronous = FULL")
            con.execute("BEGIN IMMEDIATE")
            for statement in _split_sql(_SCHEMA):
                con.execute(statement)
            con.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [(key, json.dumps(values[key], sort_keys=True, allow_nan=False)) for key in _META_KEYS],
            )
            _insert_chained(
                con,
                "run_events",
                (
                    "start",
                    json.dumps({"config": meta.get("config", {})}, sort_keys=True),
                    values["created_at"],
                    os.getpid(),
                ),
            )
            con.execute("COMMIT")
        finally:
            con.close()  # the last connection checkpoints the WAL into the file and removes it
        _fsync_file(tmp)
        try:
            os.link(tmp, path)  # atomic and refuses to replace: two creators cannot overwrite each other
        except FileExistsError:
            return False
        _fsync_dir(directory)
        return True
    except sqlite3.Error as err:
        raise LedgerError(f"privacy ledger {path}: cannot create ({err})") from None
    except OSError as err:
        raise LedgerError(f"privacy ledger {path}: cannot create ({err})") from None
    finally:
        for leftover in (tmp, f"{tmp}-wal", f"{tmp}-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _split_sql(script: str) -> list[str]:
    """Statements of ``_SCHEMA``; triggers contain ``;`` inside BEGIN ... END."""
    statements, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        text = "\n".join(current).strip()
        if text.endswith(";") and (
            not text.upper().startswith("CREATE TRIGGER") or text.upper().endswith("END;")
        ):
            statements.append(text)
            current = []
    if "".join(current).strip():
        raise AssertionError("unterminated statement in the ledger schema")
    return statements


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the link itself is already atomic
    finally:
        os.close(fd)
