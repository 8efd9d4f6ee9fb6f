"""The round engine over an in-memory backend: retries, per-task deadlines, stuck workers, refusals, failures.

No data, model or pool: each client's "training" returns a fixed update vector, and the backend's
publish decodes the plain fixed-point sum and applies it, so every figure below is computed by hand.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedrec.config.loader import build_experiment
from fedrec.errors import FedrecError
from fedrec.federated.algorithms.fed_avg import FedAvgWorker
from fedrec.federated.checkpoint import initial_state, load_checkpoint
from fedrec.federated.codec import PlainCodec
from fedrec.federated.engine import ClientFailed, ClosedRound, Published, RoundEngine
from fedrec.federated.run import params_digest
from fedrec.federated.worker import ClientResult, ParamLayout

SIZE = 4
CLIENTS = 6


class EngineTestError(FedrecError):
    """The error the in-memory backend stops a run with."""


class MemoryBackend:
    """Client tasks on a thread pool; ``behaviour(client, round, attempt)`` says what each one does.

    Behaviours: 'ok', 'raise' (the task fails), 'hang' (sleeps until released), 'slow' (sleeps
    ``slow_seconds`` then answers), 'reject' / 'refuse' (accept refuses the output), 'late' (answers
    at once but reports a run time past the deadline, as a rank whose clock says so).
    """

    error = EngineTestError
    summary_key = "memory"
    log_rounds = False
    publish_timeout = 5.0

    def __init__(self, codec: PlainCodec, behaviour: Callable[[int, int, int], str], *, slots: int | None):
        self.codec = codec
        self.behaviour = behaviour
        self.slots = slots
        self.pool = cf.ThreadPoolExecutor(max_workers=slots or CLIENTS)
        self.release = threading.Event()
        self.slow_seconds = 0.0
        self.timeout = 0.0
        self.params = np.zeros(SIZE, dtype=np.float32)
        self.submitted: list[tuple[int, int, int]] = []
        self.published: list[np.ndarray] = []

    @staticmethod
    def update_of(client: int) -> np.ndarray:
        return np.full(SIZE, float(client + 1), dtype=np.float32)

    def submit(self, client: int, round_idx: int, attempt: int, noise: Any) -> cf.Future:
        self.submitted.append((client, round_idx, attempt))
        kind = self.behaviour(client, round_idx, attempt)

        def task() -> dict[str, Any]:
            if kind == "raise":
                raise RuntimeError(f"client {client} crashed")
            if kind == "hang":
                self.release.wait(30)
            if kind == "slow":
                time.sleep(self.slow_seconds)
            seconds = self.timeout + 1.0 if kind == "late" else 0.0
            return {"kind": kind, "delta": self.update_of(client), "weight": 1.0, "seconds": seconds}

        return self.pool.submit(task)

    def accept(
        self, client: int, output: Any, running: Any, *, round_idx: int, attempt: int, elapsed: float
    ) -> ClientResult:
        if output["kind"] == "reject":
            raise ClientFailed("rejected", f"client {client}: malformed update")
        if output["kind"] == "refuse":
            raise ClientFailed("refused", f"client {client}: over budget")
        if output["seconds"] > self.timeout:
            raise ClientFailed("timeout", f"took {output['seconds']}s")
        self.codec.add(running, (output["delta"], output["weight"]))
        return ClientResult(client, 10, 1.0, 0.5, 1, elapsed, SIZE * 4, 0, 0)

    def publish(self, closed: ClosedRound) -> cf.Future:
        def apply() -> Published:
            mean = self.codec.decode_mean(closed.payload, tag=0).mean
            self.params = (self.params + mean).astype(np.float32)
            self.published.append(mean)
            return Published(
                params_digest(self.params), 0.0, 0.0, record={"survivors": list(closed.survivors)}
            )

        return self.pool.submit(apply)

    def summary_fields(self) -> dict[str, Any]:
        return {"backend": "memory"}

    def privacy_fields(self) -> dict[str, Any]:
        return {}

    def final_fields(self) -> dict[str, Any]:
        return {"final_params": self.params.tolist()}


def engine_for(tmp_path, behaviour, *, slots=None, timeout=0.5, retries=2, rate=0.5, rounds=2):
    config = build_experiment(
        {
            "seed": 0,
            "model": {"name": "mf", "preproc": {"dataset": "movielens"}},
            "train": {"progress": False},
            "fl": {
                "secure": False,
                "num_workers": CLIENTS,
                "client_num_per_round": CLIENTS,
                "rounds": rounds,
                "partition": "iid",
                "client_timeout": timeout,
                "min_completion_rate": rate,
                "max_round_retries": retries,
            },
        }
    )
    layout = ParamLayout([("w", (SIZE,))])
    codec = PlainCodec(layout, bits=24)
    backend = MemoryBackend(codec, behaviour, slots=slots)
    backend.timeout = timeout
    state = initial_state(
        global_digest=params_digest(np.zeros(SIZE)), config_fingerprint="test", layout_digest=layout.digest()
    )
    engine = RoundEngine(
        config,
        str(tmp_path),
        backend=backend,
        codec=codec,
        state=state,
        checkpoint=str(tmp_path / "fl" / "checkpoint.json"),
        algorithm=(FedAvgWorker, FedAvgWorker.Config()),
        sizes=np.full(CLIENTS, 10),
        log=lambda message: None,
    )
    return engine, backend


def summary(tmp_path) -> dict:
    return json.loads((tmp_path / "summary.json").read_text())


def test_every_failure_kind_is_data_and_only_survivors_reach_the_mean(tmp_path):
    kinds = {0: "ok", 1: "raise", 2: "reject", 3: "refuse", 4: "late", 5: "ok"}
    engine, backend = engine_for(tmp_path, lambda c, r, a: kinds[c], rate=0.3)
    final = engine.run()
    rounds = summary(tmp_path)["rounds"]
    assert len(rounds) == 2 and final["rounds_completed"] == 2
    for record in rounds:
        reasons = {f["client"]: f["reason"] for f in record["failures"]}
        assert reasons == {1: "error", 2: "rejected", 3: "refused", 4: "timeout"}
        assert record["completed"] == 2 and record["dropped"] == 4 and record["aggregate_clients"] == 2
        assert record["survivors"] == [0, 5] and record["attempts"] == 1
    # Mean of clients 0 and 5 only (updates 1 and 6), applied twice: nothing refused was ever added.
    expected = (backend.update_of(0) + backend.update_of(5)) / 2
    for mean in backend.published:
        np.testing.assert_allclose(mean, expected, atol=2**-20)
    np.testing.assert_allclose(final["final_params"], 2 * expected, atol=2**-19)
    checkpoint = load_checkpoint(str(tmp_path / "fl" / "checkpoint.json"))
    assert checkpoint.round_idx == 2 and checkpoint.global_digest == final["final_model_digest"]
    assert summary(tmp_path)["memory"] == {"backend": "memory", "privacy": None, "noise_source": {}}
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_a_short_round_is_retried_with_the_global_model_untouched(tmp_path):
    # Attempt 0 of round 0: four of six fail (below 0.5); attempt 1: all return.
    def behaviour(client, round_idx, attempt):
        return "raise" if round_idx == 0 and attempt == 0 and client < 4 else "ok"

    engine, backend = engine_for(tmp_path, behaviour)
    engine.run()
    first = summary(tmp_path)["rounds"][0]
    assert first["attempts"] == 2 and first["failed_attempts"] == [{"completed": 2, "sampled": 6}]
    assert first["completed"] == 6 and len(backend.published) == 2  # one publish per round, not per attempt
    assert {a for _, r, a in backend.submitted if r == 0} == {0, 1}


def test_too_many_retries_stop_the_run_with_the_backends_error_and_a_summary(tmp_path):
    engine, backend = engine_for(tmp_path, lambda c, r, a: "raise" if c < 4 else "ok", retries=1)
    with pytest.raises(EngineTestError, match="round 0: too few clients returned in 2 attempts"):
        engine.run()
    assert "too few clients" in summary(tmp_path)["error"] and not backend.published
    assert not (tmp_path / "fl" / "checkpoint.json").exists()  # nothing was committed


def test_deadlines_are_per_task_when_slots_are_few(tmp_path):
    # One slot, six tasks of 0.2 s each: 1.2 s in all, far past the 0.5 s timeout, yet none timed out.
    engine, backend = engine_for(tmp_path, lambda c, r, a: "slow", slots=1, rounds=1)
    backend.slow_seconds = 0.2
    started = time.monotonic()
    engine.run()
    assert time.monotonic() - started >= 1.2
    (record,) = summary(tmp_path)["rounds"]
    assert record["completed"] == 6 and record["failures"] == []


def test_a_hung_task_times_out_and_its_worker_gets_no_new_work(tmp_path):
    # Two slots: client 0 hangs (its thread cannot be cancelled), so the other five run on one slot.
    engine, backend = engine_for(
        tmp_path, lambda c, r, a: "hang" if c == 0 and r == 0 else "ok", slots=2, rounds=1
    )
    try:
        engine.run()
        (record,) = summary(tmp_path)["rounds"]
        assert [(f["client"], f["reason"]) for f in record["failures"]] == [(0, "timeout")]
        assert record["completed"] == 5 and len(engine.stuck) == 1
    finally:
        backend.release.set()


def test_every_worker_stuck_stops_the_run_instead_of_hanging(tmp_path):
    engine, backend = engine_for(tmp_path, lambda c, r, a: "hang", slots=1, timeout=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(EngineTestError, match="all 1 pool workers are stuck"):
            engine.run()
        assert time.monotonic() - started < 5  # one timeout, then one more for a stuck worker to free up
    finally:
        backend.release.set()
