"""Deployment parts without datasites: owner policy, sealed global model, key files, mocks, the checks
a coordinator applies to datasite outputs, and the datasite code run in-process against the simulation."""

from __future__ import annotations

import copy
import dataclasses
import os
import stat
import struct
import subprocess
import sys

import numpy as np
import pytest
from deploy_helpers import build, deploy_data

from fedrec.deploy.errors import DeployError, RejectedOutput
from fedrec.deploy.functions import approved_digests, function_digest
from fedrec.deploy.policy import CodeRequest, OwnerPolicy, policy_text
from fedrec.deploy.sealed import OVERHEAD, new_model_key, open_global_model, seal_global_model
from fedrec.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOOD_INPUTS = {"data": "asset:train", "owner": "asset:owner", "request": "user:dict"}


# ------------------------------------------------------------------------------------------ policy
def _policy(tmp_path, text: str) -> OwnerPolicy:
    path = tmp_path / "policy.yml"
    path.write_text(text)
    return OwnerPolicy.load(str(path))


def test_example_policy_pins_this_installations_functions():
    policy = OwnerPolicy.load(os.path.join(ROOT, "configs", "syft_owner_policy.yml"))
    assert {code.name: code.sha256 for code in policy.approve} == approved_digests()


def test_policy_approves_only_pinned_code_with_its_own_assets(tmp_path):
    digests = approved_digests()
    policy = _policy(tmp_path, policy_text(digests, epsilon_budget=5.0, delta=1e-5, max_executions=50))
    train = digests["fedrec_train_round"]
    ok = CodeRequest("fedrec_train_round", train, 10, dict(GOOD_INPUTS))
    assert policy.decide(ok).action == "approve"
    cases = {
        "changed source": CodeRequest("fedrec_train_round", "0" * 64, 10, dict(GOOD_INPUTS)),
        "other name": CodeRequest("leak_rows", train, 10, {"data": "asset:train"}),
        "too many runs": CodeRequest("fedrec_train_round", train, 51, dict(GOOD_INPUTS)),
        "no run limit": CodeRequest("fedrec_train_round", train, None, dict(GOOD_INPUTS)),
        "assets swapped": CodeRequest(
            "fedrec_train_round", train, 10, {**GOOD_INPUTS, "data": "asset:owner", "owner": "asset:train"}
        ),
        "extra argument": CodeRequest("fedrec_train_round", train, 10, {**GOOD_INPUTS, "extra": "user:dict"}),
        "constant rule": CodeRequest("fedrec_train_round", train, 10, {**GOOD_INPUTS, "request": "Constant"}),
    }
    for label, request in cases.items():
        decision = policy.decide(request)
        assert decision.action == "deny", label
        assert decision.reason


def test_policy_asks_about_unlisted_code_only_when_told(tmp_path):
    text = policy_text(approved_digests(), epsilon_budget=5.0, delta=1e-5, unlisted="ask")
    policy = _policy(tmp_path, text)
    assert policy.decide(CodeRequest("leak_rows", "1" * 64, 1, {"data": "asset:train"})).action == "ask"


@pytest.mark.parametrize(
    "text, key",
    [
        ("approve: []\nprivacy: {epsilon_budget: 1.0}\n", "privacy.delta"),
        ("approve: [{name: f, sha256: abc}]\nprivacy: {epsilon_budget: 1.0, delta: 1.0e-5}\n", "sha256"),
        ("approve: []\nprivacy: {epsilon_budget: -1.0, delta: 1.0e-5}\n", "epsilon_budget"),
        ("approve: []\nprivacy: {epsilon_budget: 1.0, delta: 1.0e-5}\nunlisted: allow\n", "unlisted"),
        ("approve: []\nprivacy: {epsilon_budget: 1.0, delta: 1.0e-5}\nmax_runs: 3\n", "max_runs"),
    ],
)
def test_bad_policy_files_are_one_line_errors(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        _policy(tmp_path, text)
    assert key in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ sealed model
def test_sealed_global_model_opens_only_for_its_key_run_and_round():
    params = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    key = new_model_key()
    blob = seal_global_model(params, key=key, run_id="run-a", round_idx=3)
    assert len(blob) == OVERHEAD + 4 * params.size
    opened = open_global_model(blob, key=key, run_id="run-a", round_idx=3, size=params.size)
    np.testing.assert_array_equal(opened, params)
    tampered = bytearray(blob)
    tampered[-20] ^= 1
    refused = [
        dict(blob=blob, key=new_model_key(), run_id="run-a", round_idx=3, size=params.size),
        dict(blob=blob, key=key, run_id="run-b", round_idx=3, size=params.size),
        dict(blob=blob, key=key, run_id="run-a", round_idx=4, size=params.size),
        dict(blob=blob, key=key, run_id="run-a", round_idx=3, size=params.size + 1),
        dict(blob=bytes(tampered), key=key, run_id="run-a", round_idx=3, size=params.size),
        dict(blob=blob[:-1], key=key, run_id="run-a", round_idx=3, size=params.size),
    ]
    for case in refused:
        with pytest.raises(DeployError):
            open_global_model(case.pop("blob"), **case)
    assert params.tobytes() not in blob  # the coordinator's copy does not hold the plaintext


def test_owner_key_file_is_private_and_round_trips(tmp_path):
    from fedrec.deploy.keys import OwnerKeys

    keys = OwnerKeys(client_id=2, secret_context=b"secret-context-bytes", model_key=new_model_key())
    path = str(tmp_path / "keys.json")
    keys.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = OwnerKeys.load(path)
    assert (loaded.client_id, loaded.secret_context, loaded.model_key) == (
        2,
        keys.secret_context,
        keys.model_key,
    )
    assert "secret" not in repr(loaded) and str(keys.model_key) not in repr(loaded)
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(DeployError, match="not a fedrec owner key file"):
        OwnerKeys.load(str(tmp_path / "bad.json"))


# ------------------------------------------------------------------------------------------ owner key material
@pytest.fixture(scope="module")
def two_key_generations():
    """Two key generations with the same parameters (a stale or swapped keys.json is from the other)."""
    from fedrec.deploy.keys import generate_federation_keys

    kwargs = dict(client_ids=[0, 1], max_clients=2, max_weight=100, scheme="bfv", clip=1.0, precision_bits=16)
    return generate_federation_keys(**kwargs), generate_federation_keys(**kwargs)


def _owner_dir(path, keys, public: bytes | None) -> str:
    from fedrec.deploy.owner import KEYS_FILE, POLICY_FILE, PUBLIC_CONTEXT_FILE

    path.mkdir()
    keys.save(str(path / KEYS_FILE))
    if public is not None:
        (path / PUBLIC_CONTEXT_FILE).write_bytes(public)
    (path / POLICY_FILE).write_text(policy_text(approved_digests(), epsilon_budget=5.0, delta=1e-5))
    return str(path)


def test_owner_checks_its_key_material_before_anything_starts(tmp_path, two_key_generations, monkeypatch):
    """issue 14, item 8 in deployment: a deleted public.ctx, a swapped keys.json (another key
    generation), a public context in keys.json or a secret one in public.ctx stop ``serve`` with one
    line naming the file, before the datasite, the owner's ledger or any spend exists."""
    from fedrec.deploy.keys import OwnerKeys
    from fedrec.deploy.owner import LEDGER_FILE, READY_FILE, SYFT_STATE_DIR, Owner
    from fedrec.deploy.owner import main as owner_main

    def start(self):  # without the check the owner would launch its datasite: fail fast instead
        raise RuntimeError(f"{self.directory}: owner started with this key material")

    monkeypatch.setattr(Owner, "start", start)
    ours, other = two_key_generations
    mine = ours.owners[0]
    assert Owner(_owner_dir(tmp_path / "good", mine, ours.public_context)).keys.client_id == 0
    public_in_keys = OwnerKeys(
        client_id=0,
        secret_context=ours.public_context,
        model_key=mine.model_key,
        signing_key=mine.signing_key,
        registered_keys=mine.registered_keys,
    )
    cases = {
        "missing": (mine, None, r"public\.ctx: public context file not found"),
        "swapped": (other.owners[0], ours.public_context, r"keys\.json and \S+public\.ctx: .*key generation"),
        "public in keys.json": (public_in_keys, ours.public_context, r"keys\.json: field 'secret_context': "),
        "secret in public.ctx": (
            mine,
            mine.secret_context,
            r"public\.ctx: context role 'secret': expected a public context",
        ),
        "damaged public.ctx": (mine, ours.public_context[:-100], r"public\.ctx: "),
    }
    for label, (keys, public, message) in cases.items():
        directory = _owner_dir(tmp_path / label.replace(" ", "-"), keys, public)
        with pytest.raises(DeployError, match=message) as err:
            owner_main(["serve", "--dir", directory])
        assert "\n" not in str(err.value), label
        for name in (LEDGER_FILE, READY_FILE, SYFT_STATE_DIR):
            assert not os.path.exists(os.path.join(directory, name)), (label, name)
    # As a command: one line on stderr, exit status 2.
    swapped = str(tmp_path / "swapped")
    result = subprocess.run(
        [sys.executable, "-m", "fedrec.deploy.owner", "serve", "--dir", swapped],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "key generation" in result.stderr and swapped in result.stderr


def test_mock_has_the_schema_and_none_of_the_rows():
    from fedrec.deploy.owner import synthetic_mock

    rng = np.random.default_rng(1)
    meta = {"task": "ctr", "table_sizes": [5, 7, 11]}
    arrays = {
        "dense": rng.random((50, 13)).astype(np.float32),
        "sparse": rng.integers(0, 5, size=(50, 3)).astype(np.int32),
        "label": rng.integers(0, 2, size=50).astype(np.float32),
    }
    mock = synthetic_mock(arrays, meta, seed=3)
    assert {k: (v.dtype, v.shape) for k, v in mock.items()} == {
        k: (v.dtype, v.shape) for k, v in arrays.items()
    }
    assert (mock["sparse"] < np.array([5, 7, 11])).all() and (mock["sparse"] >= 0).all()
    assert set(np.unique(mock["label"])) <= {0.0, 1.0}
    assert not np.array_equal(mock["dense"], arrays["dense"])


def test_syft_section_is_validated(tmp_path):
    base = deploy_data(tmp_path)
    bad = {
        "syft.datasites": ([{"client_id": 0, "url": "http://127.0.0.1:1", "email": "a@b.org", "password_file": "p"}],
                           "syft.public_context"),
        "syft.host": ("", "syft.host"),
        "syft.approval_timeout": (0, "syft.approval_timeout"),
        "syft.min_aggregate_clients": (0, "syft.min_aggregate_clients"),
    }  # fmt: skip
    for key, (value, named) in bad.items():
        data = copy.deepcopy(base)
        data["syft"][key.split(".")[1]] = value
        with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
            build(data)
    data = copy.deepcopy(base)
    data["syft"]["datasites"] = [
        {"client_id": 0, "url": "127.0.0.1:1", "email": "a@b.org", "password_file": "p"}
    ]
    data["syft"]["public_context"] = "public.ctx"
    with pytest.raises(ConfigError, match=r"datasites\[0\]\.url"):
        build(data)


def test_models_with_per_user_parameters_are_refused(tmp_path):
    from fedrec.deploy.training import ModelPlan

    data = deploy_data(tmp_path)
    data["model"] = {"name": "mf", "preproc": {"dataset": "movielens"}}
    with pytest.raises(DeployError, match="per-user parameters"):
        ModelPlan.build(build(data), {"num_users": 5, "num_items": 7, "rating_min": 1, "rating_max": 5})


def test_function_digest_is_of_the_exact_source():
    from fedrec.deploy import functions

    digest = function_digest(functions.fedrec_train_round)
    assert digest == approved_digests()["fedrec_train_round"]
    import deploy_tampered

    assert function_digest(deploy_tampered.fedrec_train_round) != digest


# ------------------------------------------------------------------------------------------ in-process rounds
@pytest.fixture(scope="module")
def inprocess(deploy_cache, tmp_path_factory):
    """The datasite code run in this process (no PySyft): three owners' inputs and keys."""
    from fedrec.data.partition import make_partition
    from fedrec.deploy.keys import generate_federation_keys
    from fedrec.deploy.training import ModelPlan, model_meta
    from fedrec.experiment import prepare_data
    from fedrec.federated.clients import client_privacy_config
    from privacy.ledger import PrivacyLedger

    config = build(deploy_data(deploy_cache))
    data = prepare_data(config, log=lambda message: None, progress=False)
    train = data.split("train")
    partition = make_partition("iid", train.arrays, 3, seed=config.seed, alpha=0.5)
    keys = generate_federation_keys(
        client_ids=[0, 1, 2], max_clients=3, max_weight=int(partition.sizes().max()), scheme="bfv", clip=1.0,
        precision_bits=16,
    )  # fmt: skip
    client_config = dataclasses.replace(
        config, privacy=client_privacy_config(config, partition), syft=None, communications=None
    )
    meta = model_meta(data.meta)
    root = tmp_path_factory.mktemp("inprocess-owners")
    owners, rows = [], []
    for k in range(3):
        ledger = str(root / f"ledger{k}.sqlite")
        PrivacyLedger.open(ledger, delta=1e-5, client_epsilon_budget=1000.0).close()
        owners.append(
            {
                "client_id": k,
                "secret_context": keys.owners[k].secret_context,
                "model_key": keys.owners[k].model_key,
                "ledger": ledger,
                "min_aggregate_clients": 2,
                "signing_key": keys.owners[k].signing_key,
                "registered_keys": {str(c): v for c, v in keys.owners[k].registered_keys.items()},
                "reproducible_noise": True,  # comparable with the simulation (the attack test turns it off)
            }
        )
        rows.append(train.subset(partition.client_rows(k)).arrays)
    plan = ModelPlan.build(client_config, meta)
    return {
        "config": client_config,
        "meta": meta,
        "keys": keys,
        "owners": owners,
        "rows": rows,
        "layout": plan.layout,
        "sizes": partition.sizes(),
    }


def _run_rounds(env, rounds: int):
    from fedrec.deploy.training import (
        RoundRequest,
        apply_round,
        initial_global_model,
        params_digest,
        train_round,
    )
    from fedrec.federated.private_store import attempt_tag
    from privacy.encryption.aggregator import StreamingAggregator
    from privacy.encryption.schema import UpdateSchema

    schema = UpdateSchema(env["layout"].entries)
    sealed, digest, bounds = None, params_digest(initial_global_model(env["config"], env["meta"])), []
    for r in range(rounds):
        aggregator = StreamingAggregator(env["keys"].public_context, schema, round_idx=attempt_tag(r, 0))
        contributions = {}
        for k in range(3):
            request = RoundRequest("run", env["config"], env["meta"], r, 0, k, sealed, digest).to_wire()
            output = train_round(env["rows"][k], env["owners"][k], request)
            contributions[k] = (output["update"], output["signature"])
            for payload in output["update"]:
                aggregator.add(payload)
        closed = aggregator.close()
        request = RoundRequest(
            "run", env["config"], env["meta"], r, 0, 0, sealed, digest, closed.aggregate, contributions
        )
        applied = apply_round(env["owners"][1], request.to_wire())
        sealed, digest = applied["global_model"], applied["digest"]
        bounds.append(applied["error_bound"])
    return sealed, digest, bounds


def test_owner_refuses_an_aggregate_below_min_aggregate_clients(inprocess):
    """An aggregate of one client (below the owner's min_aggregate_clients = 2) is not decrypted into
    a model: apply_round refuses it; the same round with two clients is applied."""
    from fedrec.deploy.training import (
        RoundRequest,
        apply_round,
        initial_global_model,
        params_digest,
        train_round,
    )
    from fedrec.federated.private_store import attempt_tag
    from privacy.encryption.aggregator import StreamingAggregator
    from privacy.encryption.schema import UpdateSchema

    env = inprocess
    assert env["owners"][2]["min_aggregate_clients"] == 2
    schema = UpdateSchema(env["layout"].entries)
    digest = params_digest(initial_global_model(env["config"], env["meta"]))
    outputs = {}
    for k in (0, 1):
        request = RoundRequest("run", env["config"], env["meta"], 0, 7, k, None, digest).to_wire()
        output = train_round(env["rows"][k], env["owners"][k], request)
        outputs[k] = (output["update"], output["signature"])

    def aggregate(clients):
        aggregator = StreamingAggregator(env["keys"].public_context, schema, round_idx=attempt_tag(0, 7))
        for k in clients:
            for payload in outputs[k][0]:
                aggregator.add(payload)
        closed = aggregator.close()
        return RoundRequest(
            "run", env["config"], env["meta"], 0, 7, 2, None, digest, closed.aggregate,
            {k: outputs[k] for k in clients},
        ).to_wire()  # fmt: skip

    with pytest.raises(DeployError, match="min_aggregate_clients=2"):
        apply_round(env["owners"][2], aggregate([0]))
    applied = apply_round(env["owners"][2], aggregate([0, 1]))
    assert applied["num_clients"] == 2 and applied["round"] == 1


def test_datasite_code_in_process_is_the_simulation_bit_for_bit(inprocess, simulation):
    """train_round/apply_round (what approved code runs) reproduce train_fl.py's rounds exactly."""
    sealed, digest, bounds = _run_rounds(inprocess, rounds=2)
    params = open_global_model(
        sealed,
        key=inprocess["keys"].owners[0].model_key,
        run_id="run",
        round_idx=2,
        size=inprocess["layout"].size,
    )
    assert digest == simulation.digest
    np.testing.assert_array_equal(params, simulation.params)
    # The released bound is one constant of the configuration (about a quantum), not data-derived.
    assert len(set(bounds)) == 1 and 0 < bounds[0] < 1e-3


def test_mock_run_computes_nothing(inprocess):
    """PySyft's second run over the mocks gets no owner keys: a constant the coordinator rejects."""
    from fedrec.deploy.training import MOCK_RUN_OUTPUT, train_round

    class ActionDataEmpty:  # what PySyft passes for an asset without a mock
        pass

    class Wrapped:
        syft_action_data = ActionDataEmpty()

    assert train_round(inprocess["rows"][0], Wrapped(), {}) == MOCK_RUN_OUTPUT
    with pytest.raises(DeployError):
        train_round(inprocess["rows"][0], {"client_id": 0}, {})  # a real but broken owner asset fails closed


def test_outputs_are_checked_before_anything_is_added(inprocess):
    """Every malformed output is RejectedOutput and leaves the running sum empty; the real one is added."""
    from fedrec.deploy.outputs import expected_spend, validate_train_output
    from fedrec.deploy.training import (
        PROTOCOL,
        RoundRequest,
        initial_global_model,
        params_digest,
        train_round,
    )
    from fedrec.federated.private_store import attempt_tag
    from privacy.encryption.aggregator import StreamingAggregator
    from privacy.encryption.schema import UpdateSchema

    env = inprocess
    schema = UpdateSchema(env["layout"].entries)
    digest = params_digest(initial_global_model(env["config"], env["meta"]))
    # A coordinator of another protocol (e.g. 1: before signed contributions and public weights) is
    # refused by the datasite code before it trains or spends.
    older = {**RoundRequest("run", env["config"], env["meta"], 0, 0, 1, None, digest).to_wire()}
    older["protocol"] = PROTOCOL - 1
    with pytest.raises(DeployError, match=f"round request protocol {PROTOCOL - 1}: expected {PROTOCOL}"):
        RoundRequest.from_wire(older)
    request = RoundRequest("run", env["config"], env["meta"], 0, 0, 1, None, digest).to_wire()
    good = train_round(env["rows"][1], env["owners"][1], request)
    aggregator = StreamingAggregator(env["keys"].public_context, schema, round_idx=attempt_tag(0, 0))
    spend = expected_spend(env["config"], int(env["sizes"][1]))
    payload = good["update"][0]

    def variant(**changes):
        out = copy.deepcopy(good)
        out.update(changes)
        return out

    def header_field(offset: int, value: int) -> list[bytes]:
        return [p[:offset] + struct.pack("<Q", value) + p[offset + 8 :] for p in good["update"]]

    malformed = {
        "not a dict": [b"x"],
        "extra key": variant(extra=1),
        "mock run": {"protocol": PROTOCOL, "mock_run": True},
        "protocol of an older datasite": variant(protocol=PROTOCOL - 1),
        "protocol of a newer datasite": variant(protocol=PROTOCOL + 1),
        "update not a list": variant(update=payload),
        "missing chunk": variant(update=good["update"][:-1] or []),
        "truncated": variant(update=[p[:-5] for p in good["update"]]),
        "garbage": variant(update=[b"FRHE" + bytes(200) for _ in good["update"]]),
        "other client": variant(update=header_field(80, 0)),
        "other round": variant(update=header_field(72, attempt_tag(1, 0))),
        "fewer steps": variant(spend={**good["spend"], "steps": good["spend"]["steps"] - 1}),
        "less noise": variant(spend={**good["spend"], "noise_multiplier": 0.5}),
        "bool steps": variant(spend={**good["spend"], "steps": True}),
        "spend of another client": variant(spend={**good["spend"], "client": 0}),
    }
    for label, output in malformed.items():
        with pytest.raises(RejectedOutput):
            validate_train_output(
                output, client_id=1, round_idx=0, attempt=0, aggregator=aggregator, spend=spend
            )
        assert aggregator.delivered == (), label
    payloads, record = validate_train_output(
        good, client_id=1, round_idx=0, attempt=0, aggregator=aggregator, spend=spend
    )
    for p in payloads:
        aggregator.add(p)
    assert aggregator.delivered == (1,) and record == good["spend"]


def test_guest_refusal_wraps_pysyft_and_refuses_keys_of_no_account(monkeypatch):
    """fedrec.deploy.guests without a server (test_deploy_security has the real datasites): keys of no
    account, unknown roles and a failing role lookup are refused before PySyft's handler; an account's
    call reaches it; installing twice wraps once; a PySyft without the methods is a one-line error."""
    from types import SimpleNamespace

    from syft.server.server import Server
    from syft.service.user.user_roles import ServiceRole

    from fedrec.deploy import guests

    for name in guests.WRAPPED:  # restored after the test
        monkeypatch.setattr(Server, name, getattr(Server, name))
    guests.install_guest_refusal()
    guests.install_guest_refusal()
    assert guests.guest_refusal_installed()
    assert not getattr(Server.get_api.__wrapped__, "__fedrec_guest_refusal__", False)  # wrapped once

    def fake_server(role):
        def lookup(credentials):
            if isinstance(role, Exception):
                raise role
            return role

        return SimpleNamespace(get_role_for_credentials=lookup)

    call = SimpleNamespace(credentials="some verify key")
    for role in (ServiceRole.GUEST, ServiceRole.NONE, RuntimeError("store down"), "admin"):
        refused = Server.handle_api_call_with_unsigned_result(fake_server(role), call)
        assert type(refused).__name__ == "SyftError" and guests.GUEST_REFUSAL in str(refused), role
        with pytest.raises(Exception, match="403") as listing:
            Server.get_api(fake_server(role), "some verify key")
        assert guests.GUEST_REFUSAL in str(listing.value.detail)
    refused = Server.handle_api_call_with_unsigned_result(fake_server(ServiceRole.ADMIN), SimpleNamespace())
    assert guests.GUEST_REFUSAL in str(refused)  # an unsigned call has no credentials
    for role in (ServiceRole.DATA_SCIENTIST, ServiceRole.ADMIN):  # past the check: PySyft's own handler
        with pytest.raises(AttributeError):
            Server.handle_api_call_with_unsigned_result(fake_server(role), call)
    monkeypatch.setattr(Server, "get_api", None)
    with pytest.raises(DeployError, match=r"no get_api; the guest refusal is written for PySyft 0\.9\.5"):
        guests.install_guest_refusal()


def test_owner_reads_pysyft_requests_as_the_policy_sees_them():
    """describe_request maps PySyft's input rules to this datasite's assets (swaps and extras show)."""
    from types import SimpleNamespace

    from syft.service.policy.policy import Matches, MixedInputPolicy, OutputPolicyExecuteCount, UserOwned
    from syft.types.uid import UID

    from fedrec.deploy import functions
    from fedrec.deploy.owner import ask_on_terminal, describe_request

    train, owner, other = UID(), UID(), UID()
    assets = {"train": train, "owner": owner}

    def code(rules, output_type=OutputPolicyExecuteCount, limit=7):
        return SimpleNamespace(
            service_func_name="fedrec_train_round",
            raw_code=functions.function_source(functions.fedrec_train_round),
            input_policy_type=MixedInputPolicy,
            input_policy_init_kwargs={"server": rules},
            output_policy_type=output_type,
            output_policy_init_kwargs={"limit": limit},
        )

    good = {
        "data": Matches(kw="data", val=train),
        "owner": Matches(kw="owner", val=owner),
        "request": UserOwned(kw="request", type=dict),
    }
    view = describe_request(code(good), assets)
    assert view.inputs == GOOD_INPUTS and view.max_executions == 7
    assert view.sha256 == approved_digests()["fedrec_train_round"]
    swapped = {**good, "data": Matches(kw="data", val=owner), "owner": Matches(kw="owner", val=other)}
    assert describe_request(code(swapped), assets).inputs["owner"].startswith("object ")
    assert describe_request(code(good, output_type=object), assets).max_executions is None
    request = describe_request(code(good), assets)
    assert ask_on_terminal(None, request, "unlisted") is False  # no terminal under pytest: the answer is no


def test_datasites_import_only_the_modules_their_owner_allows(inprocess):
    """fl.import_modules reaches datasites; a module the owner's policy does not list is refused, unimported."""
    import sys

    from fedrec.deploy.training import RoundRequest, initial_global_model, params_digest, train_round

    env = inprocess
    fl = dataclasses.replace(
        env["config"].fl, algorithm="_deploy_test_avg", import_modules=["deploy_custom_algo"]
    )
    config = dataclasses.replace(env["config"], fl=fl)
    digest = params_digest(initial_global_model(env["config"], env["meta"]))
    request = RoundRequest("run", config, env["meta"], 0, 0, 2, None, digest).to_wire()
    with pytest.raises(DeployError, match="not in this owner's policy allowed_modules"):
        train_round(env["rows"][2], env["owners"][2], request)
    assert "deploy_custom_algo" not in sys.modules
    other = {**env["owners"][2], "allowed_modules": ["some_other_module"]}
    with pytest.raises(DeployError, match="allowed_modules"):
        train_round(env["rows"][2], other, request)
    allowed = {**env["owners"][2], "allowed_modules": ["deploy_custom_algo"]}
    output = train_round(env["rows"][2], allowed, request)
    assert (
        set(output) == {"protocol", "update", "spend", "noise_source", "signature"}
        and output["spend"]["steps"] > 0
    )
    assert len(sys.modules["deploy_custom_algo"].LOCAL_STEPS) == output["spend"]["steps"]


def _sent_update(env, output, client: int) -> np.ndarray:
    """What a key holder colluding with the coordinator reads from one owner's sent update."""
    from fedrec.federated.client_round import attempt_tag
    from fedrec.federated.codec import SecureCodec

    codec = SecureCodec(env["layout"], public_context=env["keys"].public_context)
    running = codec.new_sum(attempt_tag(0, 0))
    codec.add(running, output["update"])
    aggregate, _ = codec.close(running)
    reader = SecureCodec(env["layout"], secret_context=env["keys"].owners[client].secret_context)
    decoded = reader.decode_mean(aggregate, tag=attempt_tag(0, 0))
    return decoded.mean * decoded.total_weight  # the owner's update (weight times the mean of one)


def test_replaying_an_owners_noise_from_the_request_no_longer_works(inprocess):
    """Issue 14's attack: rerun the owner's update from the request config. It matched exactly while the
    noise came from the request's seed; with the owner's own CSPRNG (the default) it does not."""
    from fedrec.deploy.training import (
        RoundRequest,
        encrypt_update,
        initial_global_model,
        local_update,
        params_digest,
        train_round,
    )
    from fedrec.federated.client_round import attempt_tag

    env, client = inprocess, 0
    initial = initial_global_model(env["config"], env["meta"])
    request = RoundRequest("run", env["config"], env["meta"], 0, 0, client, None, params_digest(initial))
    # The attacker: the request's config and seed, the shared secret key, no access to the owner's rows
    # beyond what it would guess; here it even has the rows, the strongest case.
    replay = local_update(
        env["config"], env["meta"], env["rows"][client], initial, client_id=client, round_idx=0, attempt=0
    )
    replayed = _sent_update(
        env,
        {
            "update": encrypt_update(
                env["config"],
                env["layout"],
                replay,
                env["keys"].owners[client].secret_context,
                tag=attempt_tag(0, 0),
            )
        },
        client,
    )
    seeded = train_round(env["rows"][client], env["owners"][client], request.to_wire())
    assert seeded["noise_source"] == "request_seed"
    np.testing.assert_array_equal(_sent_update(env, seeded, client), replayed)  # the attack worked
    owner = {**env["owners"][client], "reproducible_noise": False}
    first = train_round(env["rows"][client], owner, request.to_wire())
    second = train_round(env["rows"][client], owner, request.to_wire())
    assert first["noise_source"] == "owner_csprng"
    sent = _sent_update(env, first, client)
    # The noise std per step is noise_multiplier * max_grad_norm / batch; the replay misses it by far more
    # than the quantisation grid (clip * 2^-16).
    assert np.max(np.abs(sent - replayed)) > 100 * 2.0**-16
    assert np.max(np.abs(_sent_update(env, second, client) - sent)) > 100 * 2.0**-16  # fresh noise each call


def test_a_request_may_not_set_the_owners_noise_source(inprocess):
    from fedrec.deploy.training import RoundRequest, initial_global_model, params_digest, train_round

    env = inprocess
    digest = params_digest(initial_global_model(env["config"], env["meta"]))
    request = RoundRequest("run", env["config"], env["meta"], 0, 0, 1, None, digest).to_wire()
    assert "secure_mode" not in request["config"]["privacy"]
    for value in (False, True):
        tampered = copy.deepcopy(request)
        tampered["config"]["privacy"]["secure_mode"] = value
        with pytest.raises(DeployError, match=r"privacy\.secure_mode.*the datasite owns its noise source"):
            train_round(env["rows"][1], env["owners"][1], tampered)


def test_apply_is_a_recorded_budgeted_release_with_a_constant_error_bound(inprocess):
    """The decryption-oracle attack (issue 14, item 2): a coordinator asks one owner to apply many
    chosen aggregates of one round and reads the plaintext-derived ``error_bound`` of each. Now the
    bound is one constant, each distinct decryption is a ``decryption`` event in the owner's ledger
    (recorded before decrypting; a retried identical call is not a new release), another subset of an
    attempt already decrypted is refused (two subsets differ by one owner's update), and past
    MAX_DECRYPTIONS_PER_ROUND attempts of a round the owner refuses."""
    from fedrec.deploy.training import (
        MAX_DECRYPTIONS_PER_ROUND,
        RoundRequest,
        apply_round,
        initial_global_model,
        params_digest,
        train_round,
    )
    from fedrec.federated.private_store import attempt_tag
    from privacy.ledger import PrivacyLedger

    env = inprocess
    digest = params_digest(initial_global_model(env["config"], env["meta"]))

    def signed(attempt, clients):
        out = {}
        for k in clients:
            request = RoundRequest("run", env["config"], env["meta"], 0, attempt, k, None, digest).to_wire()
            output = train_round(env["rows"][k], env["owners"][k], request)
            out[k] = (output["update"], output["signature"])
        return RoundRequest(
            "oracle-run", env["config"], env["meta"], 0, attempt, 2, None, digest, None, out
        ).to_wire()

    assert attempt_tag(0, 20) != attempt_tag(0, 21)
    owner = env["owners"][2]
    bounds = set()
    first = signed(20, (0, 1, 2))
    bounds.add(apply_round(owner, first)["error_bound"])
    bounds.add(apply_round(owner, first)["error_bound"])  # a retried call: no new release
    subset = dict(first, contributions=[c for c in first["contributions"] if c["client"] != 2])
    with pytest.raises(DeployError, match="refusing another subset"):
        apply_round(owner, subset)
    for attempt in range(21, 20 + MAX_DECRYPTIONS_PER_ROUND):
        bounds.add(apply_round(owner, signed(attempt, (0, 1)))["error_bound"])
    assert len(bounds) == 1  # one constant, whatever was decrypted
    with PrivacyLedger.attach(owner["ledger"]) as ledger:
        events = [e for e in ledger.events() if e.kind == "decryption" and e.detail["run_id"] == "oracle-run"]
    assert len(events) == MAX_DECRYPTIONS_PER_ROUND
    with pytest.raises(DeployError, match="MAX_DECRYPTIONS_PER_ROUND"):
        apply_round(owner, signed(20 + MAX_DECRYPTIONS_PER_ROUND, (0, 1)))


def test_apply_refuses_forged_or_unsigned_contributors(inprocess):
    """The forged-contributor attack (issue 14, item 2): the public context lets a coordinator encrypt
    updates of its own under made-up client ids to pass min_aggregate_clients. The decrypting owner
    now recomputes the sum from signed contributions and counts only registered signers."""
    from fedrec.deploy.training import (
        RoundRequest,
        apply_round,
        initial_global_model,
        params_digest,
        train_round,
    )
    from fedrec.federated.private_store import attempt_tag
    from privacy.encryption.client import EncryptionClient
    from privacy.encryption.schema import UpdateSchema

    env = inprocess
    digest = params_digest(initial_global_model(env["config"], env["meta"]))
    request = RoundRequest("run", env["config"], env["meta"], 0, 30, 0, None, digest).to_wire()
    output = train_round(env["rows"][0], env["owners"][0], request)
    real = (output["update"], output["signature"])
    schema = UpdateSchema(env["layout"].entries)
    # What a coordinator can make: valid ciphertexts (here with a key holder's client) under other ids.
    forger = EncryptionClient(env["owners"][0]["secret_context"], schema)
    fake = forger.encrypt_update(np.zeros(schema.size), weight=1, round_idx=attempt_tag(0, 30), client_id=1)

    def ask(contributions):
        return RoundRequest(
            "forge-run", env["config"], env["meta"], 0, 30, 2, None, digest, None, contributions
        ).to_wire()

    owner = env["owners"][2]
    cases = {
        "unsigned": ({0: real, 1: (fake, b"\0" * 64)}, "does not verify"),
        "signature of another owner": ({0: real, 1: (fake, real[1])}, "does not verify"),
        "unregistered id": ({0: real, 77: (fake, real[1])}, "not a registered owner"),
        "replayed under another id": ({0: real, 1: real}, "does not verify"),
        "alone": ({0: real}, "min_aggregate_clients=2"),
    }
    for label, (contributions, message) in cases.items():
        with pytest.raises(DeployError, match=message):
            apply_round(owner, ask(contributions))
        assert label


def test_apply_drops_a_malformed_signed_contribution_and_applies_the_rest(inprocess):
    """A key-holding owner signs a contribution that passes every header check but would poison the
    aggregate (issue 14, item 4): forged unit values (the old negative-weight attack) or values 172x
    past the clip. The decrypting owner checks each update's format before decrypting the sum, leaves
    the bad one out (only its id leaves) and applies the others: the run goes on."""
    import os
    import tempfile

    from fedrec.deploy.outputs import validate_apply_output
    from fedrec.deploy.training import (
        RoundRequest,
        apply_round,
        initial_global_model,
        params_digest,
        train_round,
    )
    from fedrec.federated.private_store import attempt_tag
    from privacy.encryption import wire
    from privacy.encryption.client import EncryptionClient
    from privacy.encryption.params import META_VALUES
    from privacy.encryption.schema import UpdateSchema
    from privacy.encryption.signing import sign_contribution

    env = inprocess
    digest = params_digest(initial_global_model(env["config"], env["meta"]))
    tag = attempt_tag(0, 40)
    honest = {}
    for k in (0, 1):
        request = RoundRequest("run", env["config"], env["meta"], 0, 40, k, None, digest).to_wire()
        output = train_round(env["rows"][k], env["owners"][k], request)
        honest[k] = (output["update"], output["signature"])
    schema = UpdateSchema(env["layout"].entries)
    client = EncryptionClient(env["owners"][2]["secret_context"], schema)
    bound = 2**client.spec.quant.precision_bits

    def forged(values: int, units: int):
        payloads = []
        with tempfile.TemporaryDirectory() as scratch:
            for index, (start, stop, n_ct) in enumerate(client._layout):
                ints = np.concatenate([np.full(stop - start, values), np.full(META_VALUES, units)])
                body = wire.join_ciphertexts(client._encrypt_values(ints, n_ct, os.path.join(scratch, "ct")))
                header = wire.Header(
                    kind=wire.KIND_UPDATE, scheme=client.spec.params.scheme, param_hash=client.spec.param_hash,
                    schema_hash=schema.hash, round_idx=tag, client_id=2, chunk_index=index,
                    chunk_count=len(client._layout), num_ciphertexts=n_ct, weight=1,
                )  # fmt: skip
                payloads.append(wire.encode(header, body))
        return payloads, sign_contribution(env["owners"][2]["signing_key"], payloads)

    clean = None
    for run_id, bad in (("drop-units", forged(0, -485)), ("drop-scaled", forged(min(172 * bound, 2**20), 1))):
        request = RoundRequest(
            run_id, env["config"], env["meta"], 0, 40, 1, None, digest, None, {**honest, 2: bad}
        ).to_wire()
        applied = apply_round(env["owners"][1], request)
        assert applied["dropped"] == [2] and applied["num_clients"] == 2
        validate_apply_output(applied, round_idx=0, size=env["layout"].size, num_clients=3)
        clean = clean or applied["digest"]
        assert applied["digest"] == clean  # exactly the round of the two honest owners
