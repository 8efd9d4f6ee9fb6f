"""Server optimisers (FedAdam, FedYogi, FedAdagrad) and per-round schedules: maths, config errors, the hook."""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest

from fedrec.config.loader import build_experiment
from fedrec.errors import ConfigError
from fedrec.federated.server_opt import (
    LRScheduleConfig,
    ServerOptimizerConfig,
    ServerOptState,
    check_server_optimizer,
    lr_at,
    server_step,
    state_path,
)
from fedrec.federated.simulation import Simulation, SimulationError

# Two rounds by hand (Reddi et al. 2021, Algorithm 2; m_-1 = 0, v_-1 = tau^2), beta1 0.5, beta2 0.75,
# tau 0.1, lr 2, on x0 = [1, -1] with mean updates d0 = [0.2, -0.4], d1 = [-0.2, 0.1]:
#   m0 = 0.5*0 + 0.5*d0 = [0.1, -0.2]              m1 = 0.5*m0 + 0.5*d1 = [-0.05, -0.05]
#   adagrad v0 = 0.01 + d0^2 = [0.05, 0.17]       v1 = v0 + d1^2 = [0.09, 0.18]
#   adam    v0 = 0.75*0.01 + 0.25*d0^2 = [0.0175, 0.0475]
#           v1 = 0.75*v0 + 0.25*d1^2 = [0.023125, 0.038125]
#   yogi    v0 = 0.01 - 0.25*d0^2*sign(0.01 - d0^2) = [0.02, 0.05]
#           v1 = v0 - 0.25*d1^2*sign(v0 - d1^2) = [0.03, 0.0475]   (0.02 < 0.04: +; 0.05 > 0.01: -)
#   x1 = x0 + 2 m0 / (sqrt(v0) + 0.1),  x2 = x1 + 2 m1 / (sqrt(v1) + 0.1)
X0 = np.array([1.0, -1.0])
D0 = np.array([0.2, -0.4])
D1 = np.array([-0.2, 0.1])
M0 = np.array([0.1, -0.2])
M1 = np.array([-0.05, -0.05])
HAND_V = {
    "fedadagrad": (np.array([0.05, 0.17]), np.array([0.09, 0.18])),
    "fedadam": (np.array([0.0175, 0.0475]), np.array([0.023125, 0.038125])),
    "fedyogi": (np.array([0.02, 0.05]), np.array([0.03, 0.0475])),
}


@pytest.mark.parametrize("name", sorted(HAND_V))
def test_two_rounds_match_the_hand_computed_update(name):
    config = ServerOptimizerConfig(name=name, beta1=0.5, beta2=0.75, tau=0.1)  # type: ignore[arg-type]
    v0, v1 = HAND_V[name]
    x1, state = server_step(X0, D0, None, config=config, lr=2.0)
    assert state is not None and state.rounds == 1
    np.testing.assert_allclose(state.m, M0, rtol=1e-12)
    np.testing.assert_allclose(state.v, v0, rtol=1e-12)
    np.testing.assert_allclose(x1, X0 + 2 * M0 / (np.sqrt(v0) + 0.1), rtol=1e-12)
    x2, state = server_step(x1, D1, state, config=config, lr=2.0)
    assert state is not None and state.rounds == 2
    np.testing.assert_allclose(state.m, M1, rtol=1e-12)
    np.testing.assert_allclose(state.v, v1, rtol=1e-12)
    np.testing.assert_allclose(x2, x1 + 2 * M1 / (np.sqrt(v1) + 0.1), rtol=1e-12)


def test_the_optimisers_differ_and_sgd_is_fedavg():
    results = {}
    for name in HAND_V:
        config = ServerOptimizerConfig(name=name, beta1=0.5, beta2=0.75, tau=0.1)  # type: ignore[arg-type]
        x1, state = server_step(X0, D0, None, config=config, lr=2.0)
        results[name], _ = server_step(x1, D1, state, config=config, lr=2.0)
    assert len({tuple(np.round(x, 12)) for x in results.values()}) == 3
    x, state = server_step(X0.astype(np.float32), D0, None, config=ServerOptimizerConfig(), lr=0.5)
    assert state is None and x.dtype == np.float32
    np.testing.assert_allclose(x, X0 + 0.5 * D0, rtol=1e-6)


def test_state_round_trips_and_a_changed_state_is_refused(tmp_path):
    _, state = server_step(X0, D0, None, config=ServerOptimizerConfig(name="fedadam"), lr=1.0)
    assert state is not None
    path = str(tmp_path / "s.npz")
    digest = state.save(path)
    loaded = ServerOptState.load(path, digest=digest)
    assert loaded.rounds == 1 and np.array_equal(loaded.m, state.m) and np.array_equal(loaded.v, state.v)
    ServerOptState(1, state.m + 1e-9, state.v).save(path)
    with pytest.raises(ValueError, match="does not match"):
        ServerOptState.load(path, digest=digest)
    with pytest.raises(ValueError, match="size"):
        server_step(np.zeros(3), np.zeros(3), state, config=ServerOptimizerConfig(name="fedadam"), lr=1.0)


def test_schedules():
    constant = LRScheduleConfig()
    assert [lr_at(0.5, constant, round_idx=r, rounds=5) for r in range(5)] == [0.5] * 5
    cosine = LRScheduleConfig(kind="cosine", min_factor=0.1)
    values = [lr_at(1.0, cosine, round_idx=r, rounds=5) for r in range(5)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert values[2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert all(a > b for a, b in itertools.pairwise(values))
    exponential = LRScheduleConfig(kind="exponential", decay=0.5)
    assert lr_at(1.0, exponential, round_idx=3, rounds=10) == pytest.approx(0.125)
    step = LRScheduleConfig(kind="step", decay=0.1, step_rounds=2)
    assert [lr_at(1.0, step, round_idx=r, rounds=6) for r in range(5)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01]
    )
    warm = LRScheduleConfig(warmup_rounds=3)
    assert [lr_at(1.0, warm, round_idx=r, rounds=6) for r in range(5)] == pytest.approx(
        [0.25, 0.5, 0.75, 1, 1]
    )


# ------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"name": "adam"}, "fl.server_optimizer.name"),
        ({"tau": 0}, "fl.server_optimizer.tau"),
        ({"beta1": 1.0}, "fl.server_optimizer.beta1"),
        ({"beta2": -0.1}, "fl.server_optimizer.beta2"),
        ({"schedule": {"kind": "cosine", "min_factor": 2}}, "fl.server_optimizer.schedule.min_factor"),
        ({"schedule": {"kind": "linear"}}, "fl.server_optimizer.schedule.kind"),
    ],
)
def test_bad_server_optimizer_keys_are_errors(tiny_config, override, message):
    config = tiny_config(server_optimizer=override)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        build_experiment(config)


def test_deployment_refuses_a_stateful_optimiser_or_a_schedule(tiny_config):
    # Datasites: the coordinator never holds the decoded mean and the owners apply it statelessly.
    for fl in (
        {"server_optimizer": {"name": "fedadam"}},
        {"server_optimizer": {"schedule": {"kind": "cosine"}}},
        {"client_lr_schedule": {"kind": "exponential"}},
    ):
        config = build_experiment(tiny_config(**fl))
        with pytest.raises(ConfigError, match="deployment"):
            check_server_optimizer(config.fl, custom_rule=False, deployment=True)
    check_server_optimizer(build_experiment(tiny_config()).fl, custom_rule=False, deployment=True)


def test_an_algorithm_with_its_own_server_rule_refuses_a_server_optimiser(tiny_config, tmp_path):
    config = tiny_config(algorithm="fed_avg", server_optimizer={"name": "fedyogi"})
    fl = build_experiment(config).fl
    with pytest.raises(ConfigError, match="own server rule"):
        check_server_optimizer(fl, custom_rule=True, deployment=False)


# ------------------------------------------------------------------------------ the hook in a real run


def run(config: dict, logdir, **kwargs):
    simulation = Simulation(build_experiment(config), str(logdir), log=lambda message: None, **kwargs)
    return simulation.run()


def model_at(logdir, round_idx: int) -> np.ndarray:
    return np.load(os.path.join(logdir, "fl", "clients", "global", f"round_{round_idx:06d}.npy"))


def test_fedadam_runs_where_the_mean_is_decoded_and_its_state_survives_resume(tiny_config, tmp_path):
    fl = {
        "server_optimizer": {"name": "fedadam", "beta1": 0.5, "beta2": 0.75, "tau": 0.01},
        "server_lr": 0.05,
    }
    run(tiny_config(rounds=1, **fl), tmp_path / "a")
    run(tiny_config(rounds=2, **fl), tmp_path / "a", resume=True)  # the state after round 1 from disk
    run(tiny_config(rounds=2, **fl), tmp_path / "b")
    assert np.array_equal(model_at(tmp_path / "a", 2), model_at(tmp_path / "b", 2))
    # The checkpoint keeps the state's digest; the state itself stays in client storage.
    checkpoint = json.loads((tmp_path / "b" / "fl" / "checkpoint.json").read_text())
    path2 = state_path(str(tmp_path / "b" / "fl" / "clients" / "global" / "round_000002.npy"))
    s2 = ServerOptState.load(path2, digest=checkpoint["server_state"]["server_opt_digest"])
    s1 = ServerOptState.load(path2.replace("000002", "000001"))
    assert s1.rounds == 1 and s2.rounds == 2
    # Round 2's model is round 1's moved by the FedAdam step of the recovered mean update.
    d0 = s1.m / 0.5
    d1 = (s2.m - 0.5 * s1.m) / 0.5
    np.testing.assert_allclose(s1.v, 0.75 * 1e-4 + 0.25 * d0**2, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(s2.v, 0.75 * s1.v + 0.25 * d1**2, rtol=1e-9, atol=1e-15)
    x1 = model_at(tmp_path / "b", 1).astype(np.float64)
    expected = (x1 + 0.05 * s2.m / (np.sqrt(s2.v) + 0.01)).astype(np.float32)
    np.testing.assert_array_equal(model_at(tmp_path / "b", 2), expected)
    assert np.abs(d1).max() > 0
    # Plain FedAvg (sgd) from the same start gives another model.
    run(tiny_config(rounds=2, server_lr=0.05), tmp_path / "sgd")
    assert not np.array_equal(model_at(tmp_path / "sgd", 2), model_at(tmp_path / "b", 2))


def test_a_changed_optimiser_state_stops_the_resumed_run(tiny_config, tmp_path):
    fl = {"server_optimizer": {"name": "fedyogi"}, "server_lr": 0.05}
    run(tiny_config(rounds=1, **fl), tmp_path)
    path = state_path(str(tmp_path / "fl" / "clients" / "global" / "round_000001.npy"))
    state = ServerOptState.load(path)
    ServerOptState(state.rounds, state.m * 2, state.v).save(path)
    with pytest.raises((SimulationError, ValueError), match="server optimiser state"):
        run(tiny_config(rounds=2, **fl), tmp_path, resume=True)
